"""Mixtures of pretraining sources: proportions, exact resume, validation, per-source shares."""

import json
import os

import grain
import numpy as np
import pytest

from experiments import pretrain
from jaxlm.data import mixture
from jaxlm.data import pipeline
from jaxlm.errors import UserError
from tests import tiny_config


def _component(name, weight, size):
  return mixture.Component(name, weight, grain.MapDataset.source(
      [f'{name} document {i} about the number {i % 97}.' for i in range(size)]))


def test_realised_proportions_are_within_one_percent_of_the_weights():
  mix = mixture.Mixture([_component('web', 0.6, 3000), _component('code', 0.3, 50),
                         _component('books', 0.1, 700)])
  order = mixture.document_order(mix, seed=0, shuffle=True, repeat=True, shard_index=0,
                                 num_shards=1)
  counts = np.bincount([order[i][0] for i in range(10_000)], minlength=3) / 10_000
  np.testing.assert_allclose(counts, [0.6, 0.3, 0.1], atol=0.01)
  # Every document of a scarce source comes round, each epoch in a new order.
  code = [order[i][1] for i in range(10_000) if order[i][0] == 1]
  assert set(code[:50]) == set(code[50:100]) == {mix.components[1].documents[i]
                                                 for i in range(50)}
  assert code[:50] != code[50:100]


def test_shards_of_a_mixture_split_every_source():
  mix = mixture.Mixture([_component('a', 0.5, 40), _component('b', 0.5, 40)])
  seen = set()
  for shard in range(2):
    order = mixture.document_order(mix, 0, shuffle=False, repeat=False, shard_index=shard,
                                   num_shards=2)
    docs = {order[i] for i in range(len(order))}
    assert not docs & seen
    seen |= docs
  assert len(seen) == 80


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  from jaxlm import tokenizer as tokenizer_lib
  texts = [d for c in ('web', 'code') for d in _component(c, 1, 200).documents]
  return tokenizer_lib.Tokenizer.train(texts, str(tmp_path_factory.mktemp('tok') / 't.model'),
                                       vocab_size=300)


def test_a_mixture_resumes_mid_epoch_with_the_same_batches(tokenizer):
  mix = mixture.Mixture([_component('web', 0.7, 300), _component('code', 0.3, 40)])
  batches = lambda: pipeline.packed_batches(mix, tokenizer, seq_len=32, batch_size=4, seed=3)
  uninterrupted = iter(batches())
  expected = [next(uninterrupted) for _ in range(30)]
  first = iter(batches())
  for _ in range(13):
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  resumed = iter(batches())
  resumed.set_state(state)
  for want in expected[13:]:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_packed_rows_say_which_source_each_token_came_from(tokenizer):
  mix = mixture.Mixture([_component('web', 0.5, 100), _component('code', 0.5, 100)])
  batch = next(iter(pipeline.packed_batches(mix, tokenizer, 64, 8, seed=0)))
  for row in range(8):
    for segment in set(batch['segment_ids'][row]) - {0}:
      in_segment = batch['segment_ids'][row] == segment
      sources = set(batch['source_ids'][row][in_segment])
      assert len(sources) == 1
      text = tokenizer.decode(batch['inputs'][row][in_segment].tolist())
      source = sources.pop()
      assert ('web document' not in text if source else 'code document' not in text), text


@pytest.mark.parametrize('entry, message', [
    ({'source': 'world'}, r'mixture\[1\]\.weight must be a positive number, got None'),
    ({'source': 'world', 'weight': 0}, r'mixture\[1\]\.weight must be a positive number'),
    ({'source': 'world', 'weight': 1, 'colour': 'red'}, r"mixture\[1\] sets 'colour'"),
    ({'source': 'world', 'weight': 1, 'mixture': ()}, r"mixture\[1\] sets 'mixture'"),
    ({'source': 'tokens', 'weight': 1}, r"mixture\[1\]: .*source 'tokens' is not supported"),
    ('world', r'mixture\[1\] must be a dict'),
])
def test_a_bad_mixture_entry_is_named(entry, message):
  config = tiny_config.config()
  config.data.mixture = ({'source': 'world', 'weight': 1}, entry)
  with pytest.raises(UserError, match=message):
    mixture.entries(config.data)


def test_pretraining_on_a_mixture_reports_each_sources_share(tmp_path):
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for i in range(40):
    (corpus / f'{i}.txt').write_text(f'File {i} says hello to the reader, number {i * 7}.\n')
  config = tiny_config.config(steps=6, **{'tokenizer.vocab_size': 512})
  config.data.mixture = ({'name': 'world', 'source': 'world', 'weight': 0.75},
                         {'name': 'files', 'source': 'text', 'text_glob': str(corpus / '*.txt'),
                          'validation_fraction': 0.2, 'weight': 0.25})
  workdir = str(tmp_path / 'work')
  state = pretrain.train_and_evaluate(config, workdir)
  assert int(state.step) == 6
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  shares = np.array([[r['train/source_share/world'], r['train/source_share/files']]
                     for r in records])
  np.testing.assert_allclose(shares.sum(axis=1), 1.0, rtol=1e-6)
  assert (shares[:, 1] > 0).all()  # documents of both sources reach every batch
