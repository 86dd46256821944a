"""What a run does when things go wrong, checked on disk: unusable checkpoints stop the resume,
non-finite steps never reach the parameters, failed saves keep the last good step, and one
writer holds a workdir."""

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import flax.linen as nn
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import pretrain
from jaxlm import checkpoint
from jaxlm import lm
from jaxlm import locking
from jaxlm import model as model_lib
from jaxlm import sharding
from jaxlm import trainer
from jaxlm.errors import UserError
from tests import damage
from tests import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _saved_params(workdir, step):
  """The parameters of one checkpoint step, read with Orbax directly."""
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                                  item_handlers={'state': ocp.PyTreeCheckpointHandler()})
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))
  manager.close()
  return restored['state']['params']


def test_resume_stops_when_no_checkpoint_verifies_and_moves_nothing(tmp_path):
  workdir = str(tmp_path)
  config = tiny_config.config(steps=8)  # checkpoints at 4 and 8
  pretrain.train_and_evaluate(config, workdir)
  first = {r['step']: r['train/loss'] for r in _metrics(workdir)}
  checkpoints = os.path.join(workdir, 'checkpoints')
  for step in ('4', '8'):
    damage.flip_a_byte(os.path.join(checkpoints, step))
  with pytest.raises(checkpoint.UnusableCheckpoints) as error:
    pretrain.train_and_evaluate(config, workdir)
  message = str(error.value)
  assert checkpoints in message and '--config.checkpoint.start_over=true' in message
  assert 'step 8: file' in message and 'step 4: file' in message
  assert 'does not match its checksum' in message
  assert sorted(os.listdir(checkpoints)) == ['4', '8']
  assert not os.path.exists(checkpoints + '_rejected')

  # Asked explicitly: both are set aside and the run starts over, as the first run did.
  config.checkpoint.start_over = True
  state = pretrain.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(checkpoints)) == ['4', '8']
  assert len(os.listdir(checkpoints + '_rejected')) == 2
  again = {r['step']: r['train/loss'] for r in _metrics(workdir)}
  assert again == first and int(state.step) == 8


def test_a_damaged_latest_step_resumes_from_the_older_one_and_says_so(tmp_path, capsys):
  workdir = str(tmp_path)
  config = tiny_config.config(steps=8)
  pretrain.train_and_evaluate(config, workdir)
  damage.flip_a_byte(os.path.join(workdir, 'checkpoints', '8'))
  capsys.readouterr()
  pretrain.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert 'Resuming from step 4, the newest usable checkpoint' in out
  assert 'checkpoints/8 is not usable (file' in out


def _model():
  return model_lib.Transformer(model_lib.ModelConfig(
      vocab_size=64, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16,
      mlp_dim=64, max_seq_len=16))


def _batches(num, poisoned=()):
  """Random token batches; the poisoned ones carry NaN weights, as a corrupt batch would."""
  rng = np.random.default_rng(0)
  batches = []
  for index in range(num):
    tokens = rng.integers(3, 64, (4, 17), dtype=np.int32)
    weights = np.ones((4, 16), np.float32)
    if index in poisoned:
      weights[0, 3] = np.nan
    batches.append({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'weights': weights,
                    'positions': np.broadcast_to(np.arange(16, dtype=np.int32), (4, 16)),
                    'segment_ids': np.ones((4, 16), np.int32)})
  return batches


def _train_on(batches, workdir, max_nonfinite_steps=3):
  model = _model()
  config = tiny_config.config(steps=len(batches))
  config.train.update(batch_size=4, warmup_steps=0, min_lr_ratio=1.0,  # a constant rate
                      max_nonfinite_steps=max_nonfinite_steps)
  config.checkpoint.update(every=2, keep=20, async_save=False)
  stage = trainer.Stage(
      init_params=lm.init_params_fn(model, 16), loss_fn=trainer.language_model_loss(model),
      train_batches=grain.MapDataset.source(batches).to_iter_dataset(),
      evaluate=lambda params, step: {}, flops_per_token=1.0, tokens_per_row=16)
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    return trainer.train(config, workdir, stage, mesh)


def test_a_nan_batch_skips_its_update_and_nothing_else(tmp_path, capsys):
  batches = _batches(9, poisoned={5})
  state = _train_on(batches, str(tmp_path / 'poisoned'))
  assert 'step 6: skipped 1 update(s) with a non-finite loss' in capsys.readouterr().out
  records = _metrics(str(tmp_path / 'poisoned'))
  assert [r['train/nonfinite_steps'] for r in records] == [0] * 5 + [1] * 4
  assert np.isnan(records[5]['train/loss'])
  assert int(state.nonfinite_steps) == 1 and int(state.nonfinite_streak) == 0
  # Skipping is as if the batch had never been there (the rate is constant).
  clean = _train_on(batches[:5] + batches[6:], str(tmp_path / 'clean'))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params),
               jax.device_get(clean.params))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.opt_state),
               jax.device_get(clean.opt_state))


def test_nan_batches_in_a_row_stop_the_run_at_the_step_that_reached_the_limit(tmp_path):
  workdir = str(tmp_path)
  with pytest.raises(trainer.NonFiniteTraining, match=r'^step 7: 3 steps in a row'):
    _train_on(_batches(12, poisoned={4, 5, 6}), workdir)
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')))
  assert steps == [2, 4, 6]  # nothing saved at or after the step that stopped the run
  for step in steps:
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(_saved_params(workdir, step)))


def test_a_divergent_learning_rate_stops_with_only_finite_checkpoints(tmp_path):
  workdir = str(tmp_path)
  config = tiny_config.config(steps=40)
  config.train.update(learning_rate=1e30, max_nonfinite_steps=3)
  config.checkpoint.every = 1
  with pytest.raises(trainer.NonFiniteTraining) as error:
    pretrain.train_and_evaluate(config, workdir)
  records = _metrics(workdir)
  first_bad = min(r['step'] for r in records if r['train/nonfinite_steps'] > 0)
  assert str(error.value).startswith(f'step {first_bad + 2}: 3 steps in a row')
  steps = [int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))]
  assert steps and max(steps) < first_bad + 2
  for step in steps:
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(_saved_params(workdir, step)))


class _FailingWrite:
  """An Orbax commit future whose write failed, as a full disk makes it fail."""

  def result(self, timeout=None):
    del timeout
    raise OSError(errno.ENOSPC, 'No space left on device')


@pytest.mark.parametrize('where', ['async_writer', 'manifest'])
def test_a_failed_save_stops_the_run_and_keeps_the_last_good_step(tmp_path, monkeypatch, where):
  workdir = str(tmp_path)
  config = tiny_config.config(steps=12)  # saves at 4, 8 (fails), 12
  saves = []
  if where == 'async_writer':
    original = ocp.PyTreeCheckpointHandler.async_save

    async def async_save(self, *args, **kwargs):
      futures = await original(self, *args, **kwargs)
      saves.append(1)
      return list(futures or []) + ([_FailingWrite()] if len(saves) == 2 else [])
    monkeypatch.setattr(ocp.PyTreeCheckpointHandler, 'async_save', async_save)
  else:
    original = checkpoint.write_manifest

    def write_manifest(step_dir, *args):
      saves.append(1)
      if len(saves) == 2:
        raise OSError(errno.ENOSPC, 'No space left on device')
      return original(step_dir, *args)
    monkeypatch.setattr(checkpoint, 'write_manifest', write_manifest)
  with pytest.raises(checkpoint.CheckpointSaveFailed,
                     match=r'saving step 8 to .*No space left on device.*; step 4 is the newest '
                           'verified checkpoint'):
    pretrain.train_and_evaluate(config, workdir)
  monkeypatch.undo()
  # The rerun resumes from step 4 and finishes as an uninterrupted run does.
  state = pretrain.train_and_evaluate(config, workdir)
  assert int(state.step) == 12
  reference = str(tmp_path / 'reference')
  pretrain.train_and_evaluate(config, reference)
  expected = {r['step']: r['train/loss'] for r in _metrics(reference)}
  assert {r['step']: r['train/loss'] for r in _metrics(workdir)} == expected


def _lock_file(workdir):
  return os.path.join(workdir, locking.LOCK_FILE)


def test_a_second_run_on_a_held_workdir_is_refused_and_writes_nothing(tmp_path):
  workdir = tmp_path / 'run'
  command = [sys.executable, '-m', 'experiments.pretrain', '--config=tests/tiny_config.py',
             f'--workdir={workdir}', '--config.train.steps=100000']
  first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
  try:
    deadline = time.time() + 120
    while not (workdir / 'metrics.jsonl').exists():
      assert first.poll() is None and time.time() < deadline, first.communicate()[0]
      time.sleep(0.1)
    holder = json.loads((workdir / locking.LOCK_FILE).read_text())
    assert holder['pid'] == first.pid and holder['host'] == socket.gethostname()
    config_before = (workdir / 'config.json').read_text()
    second = subprocess.run(command + ['--config.seed=7'], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [second.stderr.strip()]
    assert f'is in use by pid {first.pid} on {socket.gethostname()}' in second.stderr
    assert (workdir / 'config.json').read_text() == config_before
  finally:
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
  assert not (workdir / locking.LOCK_FILE).exists()  # released on the way out


def _dead_pid():
  process = subprocess.Popen([sys.executable, '-c', 'pass'])
  process.wait()
  return process.pid


@pytest.mark.parametrize('holder, taken_over', [
    (lambda: {'host': socket.gethostname(), 'pid': _dead_pid(), 'started': 1.0,
              'heartbeat': time.time()}, True),
    (lambda: {'host': 'another-host', 'pid': os.getpid(), 'started': 1.0,
              'heartbeat': time.time() - 2 * locking.STALE_AFTER_SECONDS}, True),
    (lambda: {'host': 'another-host', 'pid': os.getpid(), 'started': 1.0,
              'heartbeat': time.time()}, False),
    (lambda: {'host': socket.gethostname(), 'pid': os.getppid(), 'started': 1.0,
              'heartbeat': time.time()}, False),
], ids=['dead-pid', 'silent-other-host', 'live-other-host', 'live-pid'])
def test_a_lock_is_taken_over_only_when_its_holder_is_gone(tmp_path, capsys, holder, taken_over):
  workdir = str(tmp_path)
  held_by = holder()
  with open(_lock_file(workdir), 'w') as f:
    json.dump(held_by, f)
  if not taken_over:
    with pytest.raises(UserError, match=f"in use by pid {held_by['pid']} on "
                                                f"{held_by['host']}"):
      with locking.hold(workdir):
        pass
    assert json.load(open(_lock_file(workdir))) == held_by
    return
  with locking.hold(workdir):
    assert f'taking over the lock on {workdir}' in capsys.readouterr().out
    mine = json.load(open(_lock_file(workdir)))
    assert mine['pid'] == os.getpid() and mine['host'] == socket.gethostname()
  assert not os.path.exists(_lock_file(workdir))


@pytest.mark.slow
def test_twenty_kill_9s_then_resume_give_the_uninterrupted_losses(tmp_path):
  steps = 600
  reference = str(tmp_path / 'reference')
  pretrain.train_and_evaluate(tiny_config.config(steps=steps), reference)
  workdir = tmp_path / 'killed'
  command = [sys.executable, '-m', 'experiments.pretrain', '--config=tests/tiny_config.py',
             f'--workdir={workdir}', f'--config.train.steps={steps}']
  rng = np.random.default_rng(0)
  for _ in range(20):
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    # Once it trains, a step takes tens of milliseconds and a checkpoint is written
    # (asynchronously) every 4 steps: kills land in and between writes.
    for line in process.stdout:
      if re.search(r' step \d+/', line):  # a progress line: it trains
        break
    assert process.poll() is None, 'the run ended before its kill'
    time.sleep(rng.uniform(0.0, 1.5))
    process.send_signal(signal.SIGKILL)
    process.communicate()
  resumed_from = max(r['step'] for r in _metrics(workdir))
  assert resumed_from < steps
  final = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert final.returncode == 0, final.stdout + final.stderr
  expected = [(r['step'], r['train/loss']) for r in _metrics(reference)]
  assert [(r['step'], r['train/loss']) for r in _metrics(workdir)] == expected
