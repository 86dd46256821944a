"""TFDS builders and the Grain pipeline: every document exactly once, packed rows that unpack
back to the tokenized documents, per-process slices, and exactly resumable iterators."""

import collections
import itertools
import json
import sys

import grain
import grain.experimental as grain_experimental
import numpy as np
import pytest

from experiments.configs import base
from jaxlm import checkpoint
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.data import mixture
from jaxlm.data import packing
from jaxlm.data import pipeline
from jaxlm.data import tfds_builders
from jaxlm.data import world as world_lib
from jaxlm.errors import UserError

SEQ_LEN, BATCH = 32, 4
FIELDS = ('inputs', 'targets', 'segment_ids', 'positions', 'weights')


@pytest.fixture(scope='module')
def docs():
  """Documents of 30-120 tokens: most span several 32-token rows."""
  return world_lib.World(world_lib.WorldConfig(seed=5)).documents('train', 40)


def _write_text_files(root):
  """40 files of a few lines, with blank and whitespace-only lines, a repeated line, non-ASCII
  text, and one blank file. Returns (per-file documents, per-line documents)."""
  root.mkdir()
  by_file, by_line = [], []
  for i in range(40):
    lines = [f'file {i} line {j}: naïve café {i * j}' for j in range(i % 4 + 1)]
    lines += ['', '   ', 'the same line in every file']
    text = '\n'.join(lines) + '\n'
    if i == 7:
      text = ' \n\n\t\n'  # nothing but whitespace: no document either way
    (root / f'{i:02d}.txt').write_text(text, encoding='utf-8')
    by_file += [text] if text.strip() else []
    by_line += [line for line in text.splitlines() if line.strip()]
  return by_file, by_line


def _read_all(source):
  return [tfds_builders.decode_text(source[i]) for i in range(len(source))]


@pytest.mark.parametrize('split_by', ['file', 'line'])
def test_local_text_splits_hold_every_document_exactly_once(tmp_path, split_by):
  by_file, by_line = _write_text_files(tmp_path / 'text')
  expected = by_file if split_by == 'file' else by_line
  builder = tfds_builders.prepared(lambda: tfds_builders.local_text_builder(
      str(tmp_path / 'text' / '*.txt'), split_by, 0.3, str(tmp_path / 'tfds')))
  train = _read_all(builder.as_data_source(split='train'))
  validation = _read_all(builder.as_data_source(split='validation'))
  assert collections.Counter(train) + collections.Counter(validation) == collections.Counter(
      expected)
  # Documents go to validation by a hash of the (random) tmp path, so the share is binomial:
  # within 5 sigma of 0.3 but for one run in a million (and a swapped split, 0.7, is outside).
  share, n = len(validation) / len(expected), len(expected)
  assert abs(share - 0.3) < 5 * np.sqrt(0.3 * 0.7 / n), (share, n)


def test_adding_files_keeps_every_document_in_its_split(tmp_path):
  """The split hashes each document's file path, so new files never move old documents."""
  _write_text_files(tmp_path / 'text')
  splits = []
  for round_ in range(2):
    if round_:
      for i in range(40, 60):
        (tmp_path / 'text' / f'{i:02d}.txt').write_text(f'new file {i}\nsecond line {i}\n')
    builder = tfds_builders.prepared(lambda: tfds_builders.local_text_builder(
        str(tmp_path / 'text' / '*.txt'), 'line', 0.3, str(tmp_path / f'tfds{round_}')))
    splits.append({split: set(_read_all(builder.as_data_source(split=split)))
                   for split in ('train', 'validation')})
  assert splits[0]['train'] < splits[1]['train']
  assert splits[0]['validation'] < splits[1]['validation']


def test_local_text_builder_config_names_follow_the_glob(tmp_path):
  _write_text_files(tmp_path / 'text')
  names = {tfds_builders.local_text_builder(str(tmp_path / 'text' / glob), 'line', 0.1,
                                            str(tmp_path)).builder_config.name
           for glob in ('*.txt', '0*.txt')}
  assert len(names) == 2  # another glob never reuses data prepared for the first


def test_edited_files_are_prepared_anew_in_the_same_data_dir(tmp_path):
  _write_text_files(tmp_path / 'text')

  def all_documents():
    builder = tfds_builders.prepared(lambda: tfds_builders.local_text_builder(
        str(tmp_path / 'text' / '*.txt'), 'file', 0.5, str(tmp_path / 'tfds')))
    return {doc for split in ('train', 'validation')
            for doc in _read_all(builder.as_data_source(split=split))}

  before = all_documents()
  (tmp_path / 'text' / 'new.txt').write_text('a document added later')
  assert all_documents() == before | {'a document added later'}


def test_an_empty_split_is_an_error_naming_the_fraction(tmp_path):
  (tmp_path / 'a.txt').write_text('the only document')
  with pytest.raises(ValueError, match='validation_fraction'):
    tfds_builders.prepared(lambda: tfds_builders.local_text_builder(
        str(tmp_path / '*.txt'), 'file', 0.0, str(tmp_path / 'tfds')))


def test_a_glob_matching_nothing_raises_naming_the_glob(tmp_path):
  pattern = str(tmp_path / 'missing_dir' / '*.txt')
  with pytest.raises(UserError, match='missing_dir'):
    tfds_builders.local_text_builder(pattern, 'file', 0.1, str(tmp_path / 'tfds'))


def test_an_unknown_split_by_raises_naming_the_field(tmp_path):
  _write_text_files(tmp_path / 'text')
  with pytest.raises(ValueError, match='split_by'):
    tfds_builders.local_text_builder(str(tmp_path / 'text' / '*.txt'), 'paragraph', 0.1,
                                     str(tmp_path / 'tfds'))


def test_synthetic_world_builder_writes_the_world_documents(tmp_path):
  builder = tfds_builders.prepared(
      lambda: tfds_builders.synthetic_world_builder(3, 40, 10, str(tmp_path)))
  world = world_lib.World(world_lib.WorldConfig(seed=3))
  for split, n in (('train', 40), ('validation', 10)):
    got = _read_all(builder.as_data_source(split=split))
    # TFDS shuffles records by key when writing: compare as multisets.
    assert sorted(got) == sorted(world.documents(split, n)), split


def _unpack(batches, tokenizer):
  """Checks every row's layout and returns the documents' (inputs, targets) in stream order.

  A segment starting with bos starts a document; one that does not continues the previous
  document and must open its row (concat-then-split carries a long document's tail over).
  """
  documents, continuations = [], 0
  for batch in batches:
    assert set(batch) == set(FIELDS)
    for name in FIELDS:
      assert batch[name].dtype == (np.float32 if name == 'weights' else np.int32), name
      assert batch[name].shape == batch['inputs'].shape and batch[name].shape[1] == SEQ_LEN
    np.testing.assert_array_equal(batch['weights'], batch['segment_ids'] > 0)
    for row in range(len(batch['inputs'])):
      seg = batch['segment_ids'][row]
      used = int(np.count_nonzero(seg))
      assert np.all(seg[used:] == 0)  # padding only at the end
      assert np.all(np.diff(seg[:used]) >= 0) and np.all(np.diff(seg[:used]) <= 1)
      assert used == 0 or seg[0] == 1
      for segment_id in range(1, int(seg.max()) + 1):
        where = seg == segment_id
        inputs, targets = batch['inputs'][row][where], batch['targets'][row][where]
        np.testing.assert_array_equal(batch['positions'][row][where], np.arange(len(inputs)))
        if inputs[0] == tokenizer_lib.BOS_ID:
          documents.append((inputs, targets))
        else:
          assert segment_id == 1, 'only a row can open with a continued document'
          continuations += 1
          documents[-1] = tuple(np.concatenate([a, b]) for a, b in zip(documents[-1],
                                                                       (inputs, targets)))
  return documents, continuations


def _key(doc):
  return tuple(doc[0].tolist()), tuple(doc[1].tolist())


def _tokenized(tokenizer, texts):
  out = []
  for text in texts:
    doc = pipeline.tokenize_document(tokenizer, text)
    out.append((doc['inputs'], doc['targets']))
  return out


def test_packed_rows_unpack_to_the_tokenized_documents_in_order(tokenizer, docs):
  ds = pipeline.packed_batches(grain.MapDataset.source(docs), tokenizer, SEQ_LEN, BATCH, seed=0,
                               shuffle=False, repeat=False)
  batches = list(ds)
  assert all(len(b['inputs']) == BATCH for b in batches[:-1])  # without repeat, the last batch
  assert 0 < len(batches[-1]['inputs']) <= BATCH                # may be short
  got, continuations = _unpack(batches, tokenizer)
  assert continuations > 0  # long documents really were split across rows
  want = _tokenized(tokenizer, docs)
  assert [_key(d) for d in got] == [_key(d) for d in want]
  # tokenize_document itself: [bos] doc [eos], shifted by one.
  ids = [tokenizer_lib.BOS_ID] + tokenizer.encode(docs[0]) + [tokenizer_lib.EOS_ID]
  assert _key(want[0]) == (tuple(ids[:-1]), tuple(ids[1:]))


def test_each_shard_reads_its_own_documents_and_together_all(tokenizer, docs):
  got = []
  for shard in range(2):
    ds = pipeline.packed_batches(grain.MapDataset.source(docs), tokenizer, SEQ_LEN, BATCH,
                                 seed=0, shuffle=True, repeat=False, shard_index=shard,
                                 num_shards=2)
    got.append(collections.Counter(_key(d) for d in _unpack(ds, tokenizer)[0]))
    want = _tokenized(tokenizer, docs[shard::2])
    assert got[-1] == collections.Counter(_key(d) for d in want)
  assert not set(got[0]) & set(got[1])
  assert got[0] + got[1] == collections.Counter(_key(d) for d in _tokenized(tokenizer, docs))


def _grain_packed(order, seq_len, batch_size, drop_remainder):
  """The same rows made by Grain's concat-then-split packing, an independent implementation."""
  rows = grain_experimental.ConcatThenSplitIterDataset(
      order.to_iter_dataset(), length_struct={'inputs': seq_len, 'targets': seq_len})
  return rows.map(lambda row: {
      'inputs': row['inputs'], 'targets': row['targets'],
      'segment_ids': row['inputs_segment_ids'], 'positions': row['inputs_positions'],
      'weights': (row['inputs_segment_ids'] != 0).astype(np.float32)}).batch(
          batch_size, drop_remainder=drop_remainder)


@pytest.mark.parametrize('seq_len, batch_size, repeat', [
    (SEQ_LEN, BATCH, False), (SEQ_LEN, BATCH, True), (7, 3, False), (128, 8, True), (300, 2, False)])
def test_packed_batches_equal_grains_concat_then_split(tokenizer, docs, seq_len, batch_size,
                                                       repeat):
  """Rows shorter than most documents, longer than any, and a finite source's short last batch:
  30 batches each, the same as Grain's packing of the same document order."""
  source = grain.MapDataset.source(docs)
  order = mixture.document_order(
      source.map(lambda doc: pipeline.tokenize_document(tokenizer, doc)), seed=0,
      shuffle=repeat, repeat=repeat, shard_index=0, num_shards=1)
  want = list(itertools.islice(_grain_packed(order, seq_len, batch_size, repeat), 30))
  got = list(itertools.islice(pipeline.packed_batches(
      source, tokenizer, seq_len, batch_size, seed=0, shuffle=repeat, repeat=repeat), 30))
  _assert_same_batches(got, want)


def test_repeated_epochs_tokenize_each_document_once(docs):
  reads = collections.Counter()
  def tokenized(index):
    reads[index] += 1
    return {'inputs': np.full(5 + index % 7, index, np.int32)}
  indices = grain.MapDataset.range(len(docs))
  memoized = packing.Memoized(indices.map(tokenized)).shuffle(seed=0).repeat(3)
  assert [memoized[i]['inputs'][0] for i in range(len(memoized))] == [
      indices.shuffle(seed=0).repeat(3)[i] for i in range(3 * len(docs))]
  assert set(reads.values()) == {1} and len(reads) == len(docs)
  # Past its budget it keeps what it has and reads the rest afresh.
  reads.clear()
  small = packing.Memoized(indices.map(tokenized), max_bytes=10 * 4 * 5)
  for _ in range(2):
    for i in range(len(docs)):
      assert small[i]['inputs'][0] == i
  assert 0 < sum(count == 1 for count in reads.values()) < len(docs)
  assert sum(reads.values()) < 2 * len(docs)


def test_an_iterator_state_of_another_format_is_refused(tokenizer, docs):
  it = iter(_batches(tokenizer, docs, seed=0))
  with pytest.raises(UserError, match='older jaxlm data pipeline'):
    it.set_state({'parent': {'next_index': 3}, 'buffer': []})


def _batches(tokenizer, docs, seed):
  return pipeline.packed_batches(grain.MapDataset.source(docs), tokenizer, SEQ_LEN, BATCH,
                                 seed=seed)


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for name in FIELDS:
      np.testing.assert_array_equal(x[name], y[name], err_msg=name)


def _check_resume(tokenizer, docs, through_json):
  """At each of the first 12 batches, a fresh iterator set to the live one's state must give the
  next 8 batches of an uninterrupted run. 12 documents fill ~8 batches, so these cross epoch
  boundaries, where the shuffle changes."""
  docs = docs[:12]
  reference = iter(_batches(tokenizer, docs, seed=0))
  expected = [next(reference) for _ in range(20)]
  it = iter(_batches(tokenizer, docs, seed=0))
  for position in range(12):
    state = it.get_state()
    if through_json:
      # As the checkpoint stores it (Orbax JsonSave) and restores it.
      state = checkpoint.from_json(json.loads(json.dumps(state)))
    fresh = iter(_batches(tokenizer, docs, seed=0))
    fresh.set_state(state)
    _assert_same_batches([next(fresh) for _ in range(8)], expected[position:position + 8])
    _assert_same_batches([next(it)], expected[position:position + 1])  # get_state disturbs nothing


def test_iterator_state_resumes_exactly(tokenizer, docs):
  _check_resume(tokenizer, docs, through_json=False)


def test_iterator_state_survives_a_json_round_trip(tokenizer, docs):
  _check_resume(tokenizer, docs, through_json=True)


def test_same_seed_same_batches_other_seed_other_batches(tokenizer, docs):
  def first(seed):
    it = iter(_batches(tokenizer, docs, seed))
    return [next(it) for _ in range(5)]

  _assert_same_batches(first(0), first(0))
  a, b = first(0), first(1)
  assert any(not np.array_equal(x['inputs'], y['inputs']) for x, y in zip(a, b))


@pytest.mark.parametrize('source', ['text', 'world'])
def test_prepared_sources_feed_the_pipeline_without_tensorflow(tmp_path, tokenizer, source):
  _, by_line = _write_text_files(tmp_path / 'text')
  config = base.get_config().data
  config.update(source=source, text_glob=str(tmp_path / 'text' / '*.txt'), split_by='line',
                validation_fraction=0.3, world_seed=2, num_train_docs=30, num_validation_docs=6)
  train, validation = pipeline.text_sources(config, str(tmp_path / 'tfds'))
  texts = [train[i] for i in range(len(train))] + [validation[i] for i in range(len(validation))]
  assert all(isinstance(t, str) for t in texts)
  if source == 'text':
    assert collections.Counter(texts) == collections.Counter(by_line)
  else:
    world = world_lib.World(world_lib.WorldConfig(seed=2))
    assert sorted(texts) == sorted(world.documents('train', 30) + world.documents('validation', 6))

  ds = pipeline.packed_batches(train, tokenizer, SEQ_LEN, BATCH, seed=0, repeat=False)
  got = collections.Counter(_key(d) for d in _unpack(ds, tokenizer)[0])
  train_texts = [train[i] for i in range(len(train))]
  assert got == collections.Counter(_key(d) for d in _tokenized(tokenizer, train_texts))
  # The default install ships no TensorFlow; preparing and reading must never import it.
  assert 'tensorflow' not in sys.modules
