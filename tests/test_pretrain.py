"""Pretraining end to end: the tiny model learns the synthetic world, and the binaries work."""

import json
import math
import re
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from experiments import pretrain
from jaxlm import configs
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.data import pipeline
from tests import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _unigram_cross_entropy(config, workdir):
  """Nats per token of the best context-free model: train-token frequencies scored on the
  held-out tokens (add-one smoothing), counted the way the eval counts targets."""
  train, validation = pipeline.text_sources(config.data, os.path.join(workdir, 'tfds'))
  tokenizer = tokenizer_lib.Tokenizer.load(os.path.join(workdir, 'tokenizer.model'))
  counts = np.ones(tokenizer.vocab_size)
  for i in range(len(train)):
    np.add.at(counts, pipeline.tokenize_document(tokenizer, train[i])['targets'], 1)
  log_probs = np.log(counts / counts.sum())
  held_out = np.concatenate([pipeline.tokenize_document(tokenizer, validation[i])['targets']
                             for i in range(len(validation))])
  return -log_probs[held_out].mean()


def test_tiny_pretraining_learns_far_beyond_unigram_statistics(tmp_path):
  workdir = str(tmp_path)
  config = tiny_config.config(steps=200, **{'train.learning_rate': 1e-2, 'log_every': 20,
                                            'eval.batches': 5})
  pretrain.train_and_evaluate(config, workdir)
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  final = records[-1]
  for key in ('train/loss', 'eval/loss', 'eval/bits_per_byte', 'perf/tokens_per_sec',
              'perf/mfu', 'train/learning_rate', 'train/grad_norm'):
    assert math.isfinite(final[key]), key
  unigram = _unigram_cross_entropy(config, workdir)
  print(f"eval loss {final['eval/loss']:.3f} nats vs unigram {unigram:.3f}")
  assert final['eval/loss'] < 0.5 * unigram, (final['eval/loss'], unigram)
  assert final['eval/bits_per_byte'] < 0.5 * unigram / math.log(2)
  assert os.listdir(os.path.join(workdir, 'tensorboard'))

  generated = subprocess.run(
      [sys.executable, '-m', 'experiments.generate', f'--workdir={workdir}',
       '--prompt=The pet of', '--temperature=0', '--max_tokens=8'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert generated.returncode == 0, generated.stderr
  assert 'Loaded the parameters of' in generated.stdout and 'at step 200' in generated.stdout
  assert "'The pet of' -> '" in generated.stdout


def test_pretraining_reads_local_text_files_into_a_relative_workdir(tmp_path, monkeypatch):
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for i in range(30):
    (corpus / f'{i}.txt').write_text(f'File {i} says hello to the reader, number {i * 7}.\n')
  config = tiny_config.config(steps=2, **{'data.source': 'text',
                                          'data.text_glob': str(corpus / '*.txt'),
                                          'data.validation_fraction': 0.2,
                                          'tokenizer.vocab_size': 300})
  monkeypatch.chdir(tmp_path)
  state = pretrain.train_and_evaluate(config, 'work')
  assert int(state.step) == 2
  assert os.listdir(tmp_path / 'work' / 'checkpoints') == ['2']


def test_a_run_takes_every_program_from_the_compilation_cache_an_earlier_run_left(tmp_path):
  """The binaries keep compiled programs in the workdir: a run there that finds them compiles
  nothing new and trains exactly as the run that compiled them."""
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_PERSISTENT_CACHE')
         and k != 'JAX_COMPILATION_CACHE_DIR'}  # the test session's own cache

  def train():
    result = subprocess.run(
        [sys.executable, '-m', 'experiments.pretrain', '--config=tests/tiny_config.py',
         f'--workdir={tmp_path}', '--config.train.steps=4'],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / 'metrics.jsonl', encoding='utf-8') as f:
      return [json.loads(line)['train/loss'] for line in f if 'train/loss' in line]

  losses = train()
  compiled = sorted(os.listdir(tmp_path / 'compilation_cache'))
  assert len(compiled) > 3 and len(losses) == 4
  for path in tmp_path.iterdir():  # a fresh start, but for the cache
    if path.is_dir() and path.name != 'compilation_cache':
      shutil.rmtree(path)
    elif path.is_file():
      path.unlink()
  assert train() == losses
  assert sorted(os.listdir(tmp_path / 'compilation_cache')) == compiled


@pytest.mark.parametrize('field, value, message', [
    ('model.remat', 'sometimes', "config.model.remat must be one of ('none'"),
    ('model.num_kv_heads', 3, 'must be a multiple of config.model.num_kv_heads'),
    ('data.source', 'web', f'config.data.source must be one of {pipeline.SOURCES}'),
    ('data.seq_len', 4096, 'exceeds config.model.max_seq_len'),
    ('train.steps', 0, 'config.train.steps must be positive'),
])
def test_an_invalid_config_names_the_field(field, value, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    configs.validate(tiny_config.config(**{field: value}), {'data.source': pipeline.SOURCES})


def test_a_wrong_flag_fails_before_training_with_the_field_named(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.pretrain', '--config=tests/tiny_config.py',
       f'--workdir={tmp_path}', '--config.mesh.tensor=3'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert 'config.mesh' in result.stderr and 'devices' in result.stderr
