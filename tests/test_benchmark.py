"""experiments.benchmark: the --compare and --data_workdir modes and the overrides they read."""

import numpy as np
import pytest

from experiments import benchmark
from jaxlm import configs
from jaxlm.data import mixture
from jaxlm.data import pipeline
from jaxlm.errors import UserError
from tests import saved_models
from tests import tiny_config


def test_overrides_take_the_fields_types():
  config = tiny_config.config()
  other = configs.overridden(config, ['train.batch_size=16', 'model.scan_layers=False',
                                      'train.learning_rate=1e-2', 'model.dtype=bfloat16'])
  assert (other.train.batch_size, other.model.scan_layers) == (16, False)
  assert (other.train.learning_rate, other.model.dtype) == (1e-2, 'bfloat16')
  assert (config.train.batch_size, config.model.dtype) == (8, 'float32')  # the original stays


@pytest.mark.parametrize('override, message', [
    ('train.batch_sise=16', 'not an override of an existing field'),
    ('train.batch_size', 'not an override of an existing field'),
    ('model.scan_layers=maybe', 'expected true or false'),
    ('train.batch_size=big', 'expected a int'),
    ('data.mixture=world', 'data.mixture holds a tuple'),
])
def test_a_bad_override_names_itself(override, message):
  with pytest.raises(UserError, match=message):
    configs.overridden(tiny_config.config(), [override])


def test_compare_alternates_the_configs_and_each_runs_as_configured():
  config = tiny_config.config()
  result = benchmark.compare(
      {'whole': config, 'higher_lr': configs.overridden(config, ['train.learning_rate=0.03']),
       'accumulated': configs.overridden(config, ['train.grad_accum_steps=2'])},
      steps=2, vocab_size=None, rounds=2)
  assert [len(result[name]['step_seconds']) for name in ('whole', 'accumulated')] == [2, 2]
  assert all(result[name]['median_page_faults_per_step'] >= 0 for name in ('whole', 'accumulated'))
  assert result['speedup'] == pytest.approx(result['whole']['median_step_seconds']
                                            / result['accumulated']['median_step_seconds'])
  assert abs(result['higher_lr']['final_loss'] - result['whole']['final_loss']) > 1e-3
  # The same batch in two micro-batches: the same updates, so the same loss.
  np.testing.assert_allclose(result['accumulated']['final_loss'], result['whole']['final_loss'],
                             rtol=1e-5)


def test_the_generation_benchmark_counts_every_row_s_new_tokens():
  result = benchmark.benchmark_generation(tiny_config.config(), rows=4, prompt_len=8,
                                          max_new_tokens=5, vocab_size=320, rounds=2)
  assert len(result['generate_seconds']) == 2
  assert result['generated_tokens_per_sec'] == pytest.approx(
      4 * 5 / min(result['generate_seconds']))


def test_the_data_path_benchmark_feeds_the_step_from_the_workdir_s_own_data(tmp_path, tokenizer):
  workdir = saved_models.random_workdir(str(tmp_path), tokenizer)
  result = benchmark.benchmark_data_path(workdir, steps=3, rounds=2)
  assert len(result['fixed_batch_step_seconds']) == len(result['loop_step_seconds']) == 2
  assert result['loop_rate_over_step_rate'] == pytest.approx(
      np.median(result['fixed_batch_step_seconds']) / np.median(result['loop_step_seconds']))
  # 7 batches of the workdir's config, from its world in its shuffled order: the documents
  # that fill them.
  config = configs.load(workdir)
  train, _ = pipeline.pretraining_sources(config.data, workdir)
  shuffled = mixture.document_order(train, config.seed, shuffle=True, repeat=True, shard_index=0,
                                    num_shards=1)
  order = [shuffled[i] for i in range(len(train))]
  tokens = np.cumsum([len(tokenizer.encode(text)) + 1 for text in order])
  wanted = 7 * config.train.batch_size * config.data.seq_len
  assert result['documents_read'] == np.searchsorted(tokens, wanted, side='right'), tokens[:20]
