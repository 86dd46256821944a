"""SFT and reward-model training end to end, and starting a stage from another's checkpoint."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import pretrain
from experiments import reward_model
from experiments import sft
from jaxlm import lm
from jaxlm import model as model_lib
from jaxlm import reward
from jaxlm import sharding
from tests import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('pretrained'))
  state = pretrain.train_and_evaluate(tiny_config.config(steps=8), workdir)
  return workdir, jax.device_get(state.params)


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_a_stage_starts_from_the_exact_logits_of_the_previous_checkpoint(pretrained):
  workdir, final_params = pretrained
  _, _, model = lm.load_workdir(workdir)
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    loaded = lm.load_params(workdir, model, mesh)
  tokens = jnp.arange(24, dtype=jnp.int32).reshape(2, 12) % 300
  expected, _ = model.apply({'params': final_params}, tokens)
  actual, _ = model.apply({'params': jax.device_get(loaded)}, tokens)
  np.testing.assert_array_equal(actual, expected)  # same bytes in, same program: bit-identical


@pytest.mark.parametrize('change, message', [
    ({'d_model': 32, 'head_dim': 8}, 'has shape'),
    ({'vocab_size': 1024}, "params['embed']['embedding'] has shape"),
])
def test_a_checkpoint_of_another_model_is_a_clear_error(pretrained, change, message):
  workdir, _ = pretrained
  _, _, model = lm.load_workdir(workdir)
  other = model_lib.Transformer(model_lib.ModelConfig(**{**model.config.__dict__, **change}))
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    with pytest.raises(ValueError, match=message.replace('[', r'\[').replace(']', r'\]')):
      lm.load_params(workdir, other, mesh)


def test_sft_then_reward_model_end_to_end(pretrained, tmp_path):
  base, _ = pretrained
  sft_dir, rm_dir = str(tmp_path / 'sft'), str(tmp_path / 'rm')
  sft.train_and_evaluate(tiny_config.sft_config(base, steps=6), sft_dir)
  records = _records(sft_dir)
  assert records[0]['step'] == 0  # the starting model is evaluated first
  for key in ('eval/loss', 'eval/format_rate', 'eval/exact_match'):
    assert key in records[0] and key in records[-1]
  assert records[-1]['eval/loss'] < records[0]['eval/loss']

  reward_model.train_and_evaluate(tiny_config.reward_config(sft_dir, steps=6), rm_dir)
  final = _records(rm_dir)[-1]
  assert 0.0 <= final['eval/pairwise_accuracy'] <= 1.0
  assert 'eval/reward_gap' in final
  stats = reward.load_stats(rm_dir)
  assert stats['std'] > 0 and stats['num_scored'] == 32

  conversations = tmp_path / 'score.jsonl'
  conversations.write_text('\n'.join(json.dumps(r) for r in [
      {'prompt': 'What is 2 + 2?', 'response': 'Answer: 4'},
      {'messages': [{'role': 'user', 'content': 'What is 2 + 2?'},
                    {'role': 'assistant', 'content': 'Answer: 5'}]}]))
  scored = subprocess.run(
      [sys.executable, '-m', 'experiments.reward_model', f'--workdir={rm_dir}',
       f'--score={conversations}'], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert scored.returncode == 0, scored.stderr
  lines = [json.loads(l) for l in scored.stdout.splitlines() if l.startswith('{')]
  assert len(lines) == 2
  direct = reward.score(rm_dir, [[{'role': 'user', 'content': 'What is 2 + 2?'},
                                  {'role': 'assistant', 'content': 'Answer: 4'}]])
  np.testing.assert_allclose(lines[0]['reward'], direct[0]['reward'], rtol=1e-6)
  np.testing.assert_allclose(
      lines[0]['normalized'], (lines[0]['reward'] - stats['mean']) / stats['std'], rtol=1e-5)


def test_sft_without_a_starting_workdir_names_the_field(tmp_path):
  with pytest.raises(ValueError, match='config.init_workdir'):
    sft.train_and_evaluate(tiny_config.sft_config(''), str(tmp_path))
