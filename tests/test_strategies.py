"""Every stage under every parallelism strategy on 8 CPU devices: chosen by config alone, and
computing the same losses as one device."""

import json
import os

import numpy as np
import pytest

from experiments import dpo
from experiments import pretrain
from experiments import reward_model
from experiments import rl
from experiments import sft
from tests import tiny_config

STRATEGIES = {  # (data, fsdp, tensor)
    'dp': (8, 1, 1),
    'fsdp': (1, 8, 1),
    'tp': (1, 1, 8),
    'fsdp_tp': (1, 2, 4),
    'dp_fsdp_tp': (2, 2, 2),
}
STAGES = ('sft', 'reward_model', 'dpo', 'grpo', 'ppo')


def _mesh(strategy: str) -> dict:
  if strategy == 'one_device':
    return {'mesh.num_devices': 1, 'mesh.data': 1, 'mesh.fsdp': 1, 'mesh.tensor': 1}
  data, fsdp, tensor = STRATEGIES[strategy]
  return {'mesh.num_devices': 0, 'mesh.data': data, 'mesh.fsdp': fsdp, 'mesh.tensor': tensor}


def _losses(workdir, key='train/loss') -> list[float]:
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [r[key] for r in map(json.loads, f) if key in r]


@pytest.fixture(scope='module')
def workdirs(tmp_path_factory):
  """A pretrained, a fine-tuned and a reward-model workdir, trained on one device."""
  base, sft_dir, rm_dir = (str(tmp_path_factory.mktemp(n)) for n in ('base', 'sft', 'rm'))
  pretrain.train_and_evaluate(tiny_config.config(steps=8), base)
  sft.train_and_evaluate(tiny_config.sft_config(base, steps=4), sft_dir)
  reward_model.train_and_evaluate(tiny_config.reward_config(sft_dir, steps=4), rm_dir)
  return {'base': base, 'sft': sft_dir, 'rm': rm_dir}


def _run_stage(stage: str, workdirs: dict, workdir: str, strategy: str) -> None:
  mesh = _mesh(strategy)
  if stage == 'pretrain':
    pretrain.train_and_evaluate(tiny_config.config(steps=3, **mesh), workdir)
  elif stage == 'sft':
    sft.train_and_evaluate(tiny_config.sft_config(workdirs['base'], steps=2, **mesh), workdir)
  elif stage == 'reward_model':
    reward_model.train_and_evaluate(tiny_config.reward_config(workdirs['sft'], steps=2, **mesh),
                                    workdir)
  elif stage == 'dpo':
    dpo.train_and_evaluate(tiny_config.dpo_config(workdirs['sft'], steps=2, **mesh), workdir)
  else:
    reward = {'reward': 'model', 'reward_workdir': workdirs['rm']} if stage == 'ppo' else {}
    rl.train_and_evaluate(tiny_config.rl_config(
        workdirs['sft'], steps=2, algorithm=stage, **{'rollout.prompts_per_step': 8},
        **reward, **mesh), workdir)


@pytest.fixture(scope='module')
def one_device(workdirs, tmp_path_factory):
  """stage -> its losses on one device, each computed once."""
  cache = {}

  def losses(stage):
    if stage not in cache:
      workdir = str(tmp_path_factory.mktemp(f'{stage}_one_device'))
      _run_stage(stage, workdirs, workdir, 'one_device')
      cache[stage] = _losses(workdir)
    return cache[stage]
  return losses


# The default suite runs the mesh with every axis; `pytest -m slow` each axis alone too.
@pytest.mark.parametrize('strategy', [
    s if s == 'dp_fsdp_tp' else pytest.param(s, marks=pytest.mark.slow) for s in STRATEGIES])
def test_pretraining_losses_match_one_device_under_every_strategy(tmp_path, one_device,
                                                                  strategy):
  _run_stage('pretrain', {}, str(tmp_path), strategy)
  assert len(_losses(tmp_path)) == 3
  np.testing.assert_allclose(_losses(tmp_path), one_device('pretrain'), rtol=1e-4)


def _check_stage(stage, strategy, workdirs, one_device, tmp_path):
  _run_stage(stage, workdirs, str(tmp_path), strategy)
  sharded = _losses(tmp_path)
  assert len(sharded) == 2 and np.all(np.isfinite(sharded))
  if stage in ('sft', 'reward_model', 'dpo'):  # RL samples: its batches differ with the mesh
    np.testing.assert_allclose(sharded, one_device(stage), rtol=1e-4)


@pytest.mark.parametrize('stage', STAGES)
def test_post_training_stages_run_on_a_data_fsdp_tensor_mesh(tmp_path, workdirs, one_device,
                                                             stage):
  _check_stage(stage, 'dp_fsdp_tp', workdirs, one_device, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize('strategy', [s for s in STRATEGIES if s != 'dp_fsdp_tp'])
@pytest.mark.parametrize('stage', STAGES)
def test_post_training_stages_under_every_strategy(tmp_path, workdirs, one_device, stage,
                                                   strategy):
  _check_stage(stage, strategy, workdirs, one_device, tmp_path)
