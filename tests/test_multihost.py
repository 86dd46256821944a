"""Multi-process training over loopback with `jax.distributed` (CPU collectives through gloo):
the same losses as one process with the same global batch and mesh, and checkpoints that move
between process counts and meshes."""

import json
import os
import shutil
import socket
import subprocess
import sys

import grain
import jax
import numpy as np
import pytest

from jaxlm.data import shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _pretrain(workdir, num_processes: int, devices_per_process: int, *overrides: str):
  return _run('pretrain', 'pretrain', workdir, num_processes, devices_per_process,
              '--config.train.steps=4', '--config.checkpoint.every=2', *overrides)


def _run(binary: str, config: str, workdir, num_processes: int, devices_per_process: int,
         *overrides: str):
  """Runs experiments.<binary> as `num_processes` processes; returns (train/loss by step, the
  first process's output)."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices_per_process}'}
  args = [sys.executable, '-m', f'experiments.{binary}', f'--config=tests/tiny_config.py:{config}',
          f'--workdir={workdir}', '--config.mesh.num_devices=0', '--config.data.num_shards=2',
          *overrides]
  if num_processes > 1:
    port = _free_port()
    args += [f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={num_processes}']
  processes = [subprocess.Popen(args + ([f'--process_id={i}'] if num_processes > 1 else []),
                                cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
               for i in range(num_processes)]
  outputs = [p.communicate(timeout=300) for p in processes]
  for p, (out, err) in zip(processes, outputs):
    assert p.returncode == 0, out + err[-3000:]
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return ({r['step']: r['train/loss'] for r in map(json.loads, f) if 'train/loss' in r},
            outputs[0][0])


def test_two_processes_train_like_one_and_their_checkpoint_resumes_in_one(tmp_path):
  # Two processes of 4 devices; the data axis crosses them as a multi-host (dcn) axis, and the
  # final evaluation samples text from the sharded model.
  two, log = _pretrain(tmp_path / 'two', 2, 4, '--config.mesh.dcn_data=2',
                       '--config.mesh.data=1', '--config.mesh.fsdp=4',
                       '--config.eval.num_samples=1', '--config.eval.sample_tokens=4')
  assert "mesh {'data': 2, 'fsdp': 4, 'tensor': 1}" in log
  assert 'sample at step 4' in log
  one, _ = _pretrain(tmp_path / 'one', 1, 8, '--config.mesh.data=2', '--config.mesh.fsdp=4')
  assert sorted(two) == sorted(one) == [1, 2, 3, 4]
  np.testing.assert_allclose([two[s] for s in range(1, 5)], [one[s] for s in range(1, 5)],
                             rtol=2e-5)

  # The two processes' checkpoint at step 2, resumed by one process on another mesh.
  resumed = tmp_path / 'resumed'
  shutil.copytree(tmp_path / 'two', resumed)
  shutil.rmtree(resumed / 'checkpoints' / '4')
  os.remove(resumed / 'metrics.jsonl')
  after, log = _pretrain(resumed, 1, 8, '--config.mesh.data=1', '--config.mesh.fsdp=4',
                         '--config.mesh.tensor=2')
  assert 'Resuming from the checkpoint at step 2' in log
  assert sorted(after) == [3, 4]
  np.testing.assert_allclose([after[3], after[4]], [two[3], two[4]], rtol=2e-5)


def _two_processes_match_one(tmp_path, binary, config, *overrides):
  mesh = ('--config.mesh.data=2', '--config.mesh.fsdp=2', '--config.mesh.tensor=2')
  two, _ = _run(binary, config, tmp_path / 'two', 2, 4, *mesh, *overrides)
  one, _ = _run(binary, config, tmp_path / 'one', 1, 8, *mesh, *overrides)
  assert sorted(two) == sorted(one) == [1, 2]
  np.testing.assert_allclose([two[1], two[2]], [one[1], one[2]], rtol=1e-4)


@pytest.mark.slow
def test_grpo_on_two_processes_matches_one(tmp_path, sft_workdir):
  # Each process samples its own prompts' replies and scores them; the update is global.
  _two_processes_match_one(tmp_path, 'rl', 'rl', f'--config.init_workdir={sft_workdir}',
                           '--config.train.steps=2', '--config.rollout.prompts_per_step=8')


@pytest.mark.slow
@pytest.mark.parametrize('binary, config', [('sft', 'sft'), ('reward_model', 'reward'),
                                            ('dpo', 'dpo')])
def test_post_training_on_two_processes_matches_one(tmp_path, sft_workdir, binary, config):
  _two_processes_match_one(tmp_path, binary, config, f'--config.init_workdir={sft_workdir}',
                           '--config.train.steps=2')


class _FakeProcess:
  """Makes this process look like process `index` of `count` to the shard assignment."""

  def __init__(self, monkeypatch, index: int, count: int):
    monkeypatch.setattr(jax, 'process_index', lambda: index)
    monkeypatch.setattr(jax, 'process_count', lambda: count)


def _row_batches(shard, num_shards, rows):
  return grain.MapDataset.source(np.arange(64))[shard::num_shards].batch(rows).map(
      lambda ids: {'ids': ids}).to_iter_dataset()


def test_processes_read_disjoint_shards_that_make_up_the_one_process_batch(monkeypatch):
  mesh = jax.make_mesh((2, 1, 1), ('data', 'fsdp', 'tensor'), devices=jax.devices()[:2],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  single = shards.ShardedBatches(_row_batches, 4, 8, mesh)
  want = [next(single)['ids'] for _ in range(3)]
  per_process = []
  for index in range(2):
    _FakeProcess(monkeypatch, index, 2)
    batches = shards.ShardedBatches(_row_batches, 4, 8, mesh)
    per_process.append([next(batches)['ids'] for _ in range(3)])
  for step in range(3):
    assert not set(per_process[0][step]) & set(per_process[1][step])
    np.testing.assert_array_equal(
        np.concatenate([per_process[0][step], per_process[1][step]]), want[step])


def test_a_shard_count_that_does_not_fit_is_an_error_naming_the_field(monkeypatch):
  mesh = jax.make_mesh((1, 1, 1), ('data', 'fsdp', 'tensor'), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  _FakeProcess(monkeypatch, 0, 2)
  with pytest.raises(ValueError, match=r'config.data.num_shards=3 must be a multiple of the '
                                       r'number of processes \(2\)'):
    shards.ShardedBatches(_row_batches, 3, 6, mesh)
  monkeypatch.undo()
  batches = shards.ShardedBatches(_row_batches, 2, 8, mesh)
  state = batches.get_state()
  with pytest.raises(ValueError, match='set config.data.num_shards=2 to resume'):
    shards.ShardedBatches(_row_batches, 4, 8, mesh).set_state(state)


@pytest.mark.slow
def test_an_imported_model_loads_and_trains_on_two_processes_like_one(tmp_path):
  """Each process reads only the slices of the Hugging Face checkpoint its devices hold; SFT
  from it on 2 processes x 4 devices (FSDP) gives the losses of 1 process x 8 devices."""
  checkpoint = os.path.join(ROOT, 'tests', 'fixtures', 'hf', 'qwen2')
  overrides = (f'--config.init_hf={checkpoint}', '--config.data.seq_len=192',
               '--config.mesh.data=1', '--config.mesh.fsdp=-1', '--config.train.steps=3',
               '--config.eval.num_prompts=0')
  two, _ = _run('sft', 'sft', tmp_path / 'two', 2, 4, *overrides)
  one, _ = _run('sft', 'sft', tmp_path / 'one', 1, 8, *overrides)
  assert sorted(two) == [1, 2, 3]
  np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)],
                             rtol=1e-5)
