"""Pretokenization: experiments.tokenize_data's shards give exactly the batches, prompts and
losses of tokenizing on the fly, and a rerun rewrites only what is missing."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from experiments import pretrain
from jaxlm import lm
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.data import pipeline
from jaxlm.data import tokenized
from jaxlm.errors import UserError
from tests import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD_DOCS = 64  # 400 + 40 documents: 7 train shards, 1 validation shard


def _tokenize(out):
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.tokenize_data', '--config=tests/tiny_config.py',
       f'--out={out}', '--num_workers=2', f'--shard_docs={SHARD_DOCS}'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  return result.stdout


@pytest.fixture(scope='module')
def token_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('tokens'))
  assert 'tokens/s per worker' in _tokenize(out)
  return out


def _text_and_tokenizer(token_dir):
  """The same documents as text, and the tokenizer that made the tokens."""
  texts = pipeline.text_sources(tiny_config.config().data, os.path.join(token_dir, 'tfds'))
  return texts, tokenizer_lib.load(tokenized.tokenizer_path(token_dir))


def test_manifest_counts_every_document_and_token(token_dir):
  texts, tokenizer = _text_and_tokenizer(token_dir)
  with open(os.path.join(token_dir, tokenized.MANIFEST)) as f:
    manifest = json.load(f)
  assert manifest['vocab_size'] == tokenizer.vocab_size == 320
  for split, documents in zip(tokenized.SPLITS, texts):
    tokens = sum(len(pipeline.document_ids(tokenizer, documents[i]))
                 for i in range(len(documents)))
    assert manifest['splits'][split]['documents'] == len(documents)
    assert manifest['splits'][split]['tokens'] == tokens
  assert len(manifest['splits']['train']['shards']) == 7


def test_shards_give_the_batches_and_prompts_of_tokenizing_on_the_fly(token_dir):
  (train_text, validation_text), tokenizer = _text_and_tokenizer(token_dir)
  train_tokens, validation_tokens = pipeline.token_sources(
      tiny_config.config(**{'data.source': 'tokens', 'data.token_dir': token_dir}).data)
  def batches(documents):
    return pipeline.packed_batches(documents, tokenizer, 64, 8, seed=3, shard_index=1,
                                   num_shards=2)
  for from_tokens, from_text, _ in zip(batches(train_tokens), batches(train_text), range(20)):
    for key in from_text:
      np.testing.assert_array_equal(from_tokens[key], from_text[key], err_msg=key)
  assert (lm.sample_prompts(validation_tokens, tokenizer, 3, 5)
          == lm.sample_prompts(validation_text, tokenizer, 3, 5))


def test_a_rerun_rewrites_only_the_missing_shard(token_dir, tmp_path):
  out = str(tmp_path / 'tokens')
  shutil.copytree(token_dir, out)
  shards = [os.path.join(out, split, name) for split in tokenized.SPLITS
            for name in os.listdir(os.path.join(out, split)) if name.endswith('.array_record')]
  before = {p: os.stat(p).st_mtime_ns for p in shards}
  with open(shards[2], 'rb') as f:
    lost = f.read()
  os.remove(shards[2])
  os.remove(os.path.join(out, tokenized.MANIFEST))
  with pytest.raises(UserError, match='rerun python -m experiments.tokenize_data'):
    tokenized.read_manifest(out)
  assert 'this host writes 1 (7 already done)' in _tokenize(out)
  assert [p for p in shards if os.stat(p).st_mtime_ns != before[p]] == [shards[2]]
  with open(shards[2], 'rb') as f:
    assert f.read() == lost
  with open(os.path.join(out, tokenized.MANIFEST)) as f, \
       open(os.path.join(token_dir, tokenized.MANIFEST)) as g:
    assert json.load(f) == json.load(g)


def _train_losses(config, workdir):
  pretrain.train_and_evaluate(config, str(workdir))
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [(r['step'], r.get('train/loss'), r.get('eval/loss')) for r in map(json.loads, f)]


def test_pretraining_from_tokens_matches_pretraining_from_text(token_dir, tmp_path):
  common = {'eval.num_samples': 1, 'eval_every': 4}  # evaluations sample from a prompt
  from_tokens = _train_losses(tiny_config.config(**common, **{
      'data.source': 'tokens', 'data.token_dir': token_dir}), tmp_path / 'tokens')
  from_text = _train_losses(tiny_config.config(**common, **{
      'data.data_dir': os.path.join(token_dir, 'tfds'),
      'tokenizer.path': tokenized.tokenizer_path(token_dir)}), tmp_path / 'text')
  assert len([r for r in from_tokens if r[1] is not None]) == 8
  assert len([r for r in from_tokens if r[2] is not None]) == 2
  assert from_tokens == from_text
