"""Parquet and JSONL sources: every row once and in order, validation files kept out of training,
bad input as one error naming the file or as a counted skip, and pretraining end to end."""

import collections
import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from experiments import pretrain
from experiments.configs import base
from jaxlm.data import files
from jaxlm.data import pipeline
from jaxlm.data import tfds_builders
from jaxlm.errors import UserError
from tests import tiny_config


def _docs(prefix, n):
  return [f'{prefix} document {i}: the cat sat on mat number {i % 17}, naïve café.'
          for i in range(n)]


def _write_parquet(path, docs, row_group_size=7, **columns):
  table = pa.table({'id': list(range(len(docs))), 'text': docs, **columns})
  pq.write_table(table, path, row_group_size=row_group_size)


def _jsonl_bytes(docs, field='text'):
  return b''.join(json.dumps({'id': i, field: d}).encode() + b'\n' for i, d in enumerate(docs))


def _write_jsonl(path, docs):
  data = _jsonl_bytes(docs)
  if str(path).endswith('.gz'):
    data = gzip.compress(data)
  elif str(path).endswith('.zst'):
    data = zstandard.ZstdCompressor().compress(data)
  path.write_bytes(data)


def _all(source):
  return [source[i] for i in range(len(source))]


def _config(source, files_glob, **fields):
  config = base.get_config().data
  config.update(source=source, files=files_glob, validation_fraction=0.3, **fields)
  return config


@pytest.fixture
def parquet_dir(tmp_path):
  """Three files of 7-row groups (the last one short), and their documents in file order."""
  root = tmp_path / 'parquet'
  root.mkdir()
  docs = []
  for i, n in enumerate((20, 7, 33)):
    docs.append(_docs(f'file {i}', n))
    _write_parquet(root / f'part-{i}.parquet', docs[-1])
  return root, docs


@pytest.fixture
def jsonl_dir(tmp_path):
  root = tmp_path / 'jsonl'
  root.mkdir()
  docs = []
  for i, name in enumerate(('a.jsonl', 'b.jsonl.gz', 'c.jsonl.zst')):
    docs.append(_docs(name, 25 + i))
    _write_jsonl(root / name, docs[-1])
  return root, docs


def test_parquet_rows_are_read_in_order_across_row_groups_and_files(parquet_dir):
  root, docs = parquet_dir
  paths = files.glob_files(str(root / '*.parquet'), 'data.files')
  source = files.ParquetDocuments(paths, 'text')
  assert pq.ParquetFile(paths[0]).metadata.num_row_groups == 3
  assert _all(source) == sum(docs, [])
  assert source[len(source) - 1] == docs[-1][-1] and source[0] == docs[0][0]  # jumping back


def test_jsonl_plain_gz_and_zst_lines_are_read_in_order(jsonl_dir, tmp_path):
  root, docs = jsonl_dir
  paths = files.glob_files(f'{root}/*.jsonl,{root}/*.jsonl.gz,{root}/*.jsonl.zst',
                           'data.files')
  source = files.JsonlDocuments(paths, 'text', str(tmp_path / 'cache'))
  assert _all(source) == sum(docs, [])
  caches = os.listdir(tmp_path / 'cache')
  assert len(caches) == 2 and all(c.endswith('.jsonl') for c in caches)  # no .tmp left behind
  again = files.JsonlDocuments(paths, 'text', str(tmp_path / 'cache'))  # from the cache
  assert _all(again) == sum(docs, []) and sorted(os.listdir(tmp_path / 'cache')) == sorted(caches)


@pytest.mark.parametrize('source', ['parquet', 'jsonl'])
def test_validation_fraction_splits_every_document_once(parquet_dir, jsonl_dir, tmp_path, source):
  root, docs = parquet_dir if source == 'parquet' else jsonl_dir
  config = _config(source, str(root / '*'))
  train, validation = pipeline.text_sources(config, str(tmp_path / 'data'))
  train, validation = _all(train), _all(validation)
  everything = sum(docs, [])
  assert sorted(train + validation) == sorted(everything) and not set(train) & set(validation)
  assert 0.1 < len(validation) / len(everything) < 0.5  # 0.3 of ~80, within 4 sigma
  again = pipeline.text_sources(config, str(tmp_path / 'data'))[1]
  assert _all(again) == validation  # the same split every time


@pytest.mark.parametrize('source', ['parquet', 'jsonl'])
def test_validation_files_never_reach_training(parquet_dir, jsonl_dir, tmp_path, source):
  root, docs = parquet_dir if source == 'parquet' else jsonl_dir
  held_out = sorted(os.listdir(root))[1]
  config = _config(source, str(root / '*'), validation_files=str(root / held_out))
  train, validation = (_all(s) for s in pipeline.text_sources(config, str(tmp_path / 'data')))
  assert validation == docs[1]
  assert train == docs[0] + docs[2]  # the training glob matched the validation file too


def test_text_files_honour_validation_files(tmp_path):
  root = tmp_path / 'text'
  root.mkdir()
  for i in range(6):
    (root / f'{i}.txt').write_text(f'line one of {i}\nline two of {i}\n')
  builder = tfds_builders.prepared(lambda: tfds_builders.local_text_builder(
      str(root / '*.txt'), 'line', 0.5, str(tmp_path / 'tfds'), f'{root}/4.txt,{root}/5.txt'))
  read = lambda split: collections.Counter(tfds_builders.decode_text(r) for r in
                                           builder.as_data_source(split=split))
  assert read('validation') == collections.Counter(
      f'line {n} of {i}' for i in (4, 5) for n in ('one', 'two'))
  assert read('train') == collections.Counter(
      f'line {n} of {i}' for i in range(4) for n in ('one', 'two'))


@pytest.mark.parametrize('source, pattern', [('parquet', 'nothing/*.parquet'),
                                             ('jsonl', 'nothing/*.jsonl')])
def test_an_empty_glob_names_the_glob(tmp_path, source, pattern):
  with pytest.raises(UserError, match=r'config\.data\.files matches no files: .*nothing'):
    pipeline.text_sources(_config(source, str(tmp_path / pattern)), str(tmp_path / 'data'))
  (tmp_path / 'train').write_text('never read: the validation glob fails first')
  with pytest.raises(UserError, match=r'config\.data\.validation_files .*nothing'):
    pipeline.text_sources(_config(source, str(tmp_path / 'train'),
                                  validation_files=str(tmp_path / pattern)),
                          str(tmp_path / 'data'))


def test_a_missing_parquet_column_names_the_file_and_the_columns(parquet_dir, tmp_path):
  root, _ = parquet_dir
  with pytest.raises(UserError, match=r"part-0\.parquet has no column 'body'.*\['id', 'text'\]"):
    pipeline.text_sources(_config('parquet', str(root / '*'), text_field='body'),
                          str(tmp_path / 'data'))


def test_a_non_string_parquet_column_names_its_type(parquet_dir, tmp_path):
  root, _ = parquet_dir
  with pytest.raises(UserError, match=r"part-0\.parquet: column 'id' is int64"):
    pipeline.text_sources(_config('parquet', str(root / '*'), text_field='id'),
                          str(tmp_path / 'data'))


def test_a_missing_jsonl_field_names_the_file_and_the_fields(tmp_path):
  (tmp_path / 'a.jsonl').write_bytes(_jsonl_bytes(_docs('a', 5), field='content'))
  with pytest.raises(UserError, match=r"a\.jsonl has no field 'text'.*\['id', 'content'\]"):
    pipeline.text_sources(_config('jsonl', str(tmp_path / '*.jsonl')), str(tmp_path / 'data'))


def test_a_truncated_parquet_file_is_named(parquet_dir, tmp_path):
  root, _ = parquet_dir
  data = (root / 'part-1.parquet').read_bytes()
  (root / 'part-1.parquet').write_bytes(data[:len(data) // 2])
  with pytest.raises(UserError, match=r'part-1\.parquet: not a readable Parquet file'):
    pipeline.text_sources(_config('parquet', str(root / '*')), str(tmp_path / 'data'))


@pytest.mark.parametrize('name', ['a.jsonl.gz', 'a.jsonl.zst'])
@pytest.mark.parametrize('damage', ['truncated', 'corrupt'])
def test_a_damaged_compressed_jsonl_file_is_named_and_leaves_no_cache(tmp_path, name, damage):
  _write_jsonl(tmp_path / name, _docs('a', 400))
  data = bytearray((tmp_path / name).read_bytes())
  if damage == 'truncated':
    data = data[:len(data) // 2]
  else:
    data[len(data) // 2:len(data) // 2 + 64] = bytes(range(64))
  (tmp_path / name).write_bytes(bytes(data))
  with pytest.raises(UserError, match=rf'{name}: corrupt or truncated'):
    pipeline.text_sources(_config('jsonl', str(tmp_path / name)), str(tmp_path / 'data'))
  assert not os.listdir(tmp_path / 'data' / 'jsonl')


def test_bad_jsonl_lines_are_left_out_and_counted(tmp_path, capsys):
  docs = _docs('good', 30)
  lines = [json.dumps({'text': d}).encode() for d in docs]
  bad = [b'\xff\xfe not utf-8', b'{"text": "unterminated', b'[1, 2]', b'{"text": null}',
         b'{"text": 3}', b'{"other": "no text field"}']
  for i, line in enumerate(bad):
    lines.insert(3 * i + 1, line)
  (tmp_path / 'a.jsonl').write_bytes(b'\n'.join(lines) + b'\n\n{"text": "trunc')
  source = files.JsonlDocuments([str(tmp_path / 'a.jsonl')], 'text', str(tmp_path / 'cache'))
  assert _all(source) == docs  # dense: the bad lines take no index
  assert f"left out 7 lines that are not UTF-8 JSON objects with a string 'text', the first at " \
         f"{tmp_path / 'a.jsonl'}:2." in capsys.readouterr().out


def test_null_parquet_values_are_left_out_and_counted(tmp_path, capsys):
  docs = _docs('doc', 30)
  with_nulls = [None if i % 4 == 1 else d for i, d in enumerate(docs)]
  _write_parquet(tmp_path / 'a.parquet', with_nulls)
  source = files.ParquetDocuments([str(tmp_path / 'a.parquet')], 'text')
  assert _all(source) == [d for d in with_nulls if d is not None]
  assert "left out 8 null 'text' values" in capsys.readouterr().out


@pytest.mark.parametrize('source, name', [('parquet', 'train.parquet'),
                                          ('jsonl', 'train.jsonl.zst')])
def test_pretraining_reads_one_file(tmp_path, source, name):
  docs = _docs('doc', 300)
  if source == 'parquet':
    _write_parquet(tmp_path / name, docs, row_group_size=64)
  else:
    _write_jsonl(tmp_path / name, docs)
  config = tiny_config.config(steps=8, **{'data.source': source,
                                          'data.files': str(tmp_path / name),
                                          'data.validation_fraction': 0.1,
                                          'tokenizer.vocab_size': 300})
  state = pretrain.train_and_evaluate(config, str(tmp_path / 'work'))
  assert int(state.step) == 8
  records = [json.loads(line) for line in open(tmp_path / 'work' / 'metrics.jsonl')]
  assert 'eval/loss' in records[-1]
