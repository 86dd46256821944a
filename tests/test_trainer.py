"""The shared training machinery: sharded steps, accumulation, resume, SIGTERM, damaged checkpoints."""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import flax.linen as nn
import jax
import numpy as np
import pytest

from experiments import pretrain
from jaxlm import model as model_lib
from jaxlm import perf
from jaxlm import sharding
from jaxlm import trainer
from jaxlm import lm
from tests import damage
from tests import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model():
  return model_lib.Transformer(model_lib.ModelConfig(
      vocab_size=128, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
      mlp_dim=128, max_seq_len=32))


def _batches(num, rows=8, length=32, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num):
    tokens = rng.integers(3, 128, (rows, length + 1), dtype=np.int32)
    segments = np.where(np.arange(length) < length // 2, 1, 2).astype(np.int32)
    positions = np.concatenate([np.arange(length // 2), np.arange(length - length // 2)])
    out.append({
        'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
        'segment_ids': np.broadcast_to(segments, (rows, length)).copy(),
        'positions': np.broadcast_to(positions.astype(np.int32), (rows, length)).copy(),
        'weights': (rng.random((rows, length)) < 0.9).astype(np.float32),
    })
  return out


def _train(mesh, batches, grad_accum_steps=1):
  model = _model()
  train_config = tiny_config.config().train
  train_config.grad_accum_steps = grad_accum_steps
  optimizer = trainer.make_optimizer(train_config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    _, shardings, init = trainer.abstract_state(lm.init_params_fn(model, 32), optimizer, mesh,
                                                jax.random.PRNGKey(0))
    state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(0))
    step = jax.jit(trainer.make_train_step(trainer.language_model_loss(model, 1e-4), optimizer,
                                           grad_accum_steps), out_shardings=(shardings, None))
    losses = []
    for batch in batches:
      if grad_accum_steps > 1:
        batch = {k: v.reshape(grad_accum_steps, -1, *v.shape[1:]) for k, v in batch.items()}
      state, metrics = step(state, sharding.put_batch(batch, mesh,
                                                      batch_axis=int(grad_accum_steps > 1)))
      losses.append(float(metrics['train/loss']))
  return np.array(losses), state


def test_train_steps_on_a_2x2x2_mesh_match_one_device():
  assert jax.device_count() == 8, 'conftest.py asks for 8 CPU devices'
  batches = _batches(3)
  one = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  eight = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  losses_1, state_1 = _train(one, batches)
  losses_8, state_8 = _train(eight, batches)
  # The 8-device state really is split: an MLP kernel is sharded over fsdp and tensor.
  kernel = state_8.params['layers']['mlp']['gate']['kernel']
  assert kernel.addressable_shards[0].data.shape == (2, 32, 64)
  # Sharded reductions sum in another order; fp32 rounding accumulates over 3 Adam steps.
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(state_8.params)),
                  jax.tree.leaves(jax.device_get(state_1.params))):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
  assert losses_1[-1] < losses_1[0]


def test_gradient_accumulation_matches_the_whole_batch():
  batches = _batches(2)
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  losses_whole, state_whole = _train(mesh, batches)
  losses_accum, state_accum = _train(mesh, batches, grad_accum_steps=4)
  # Microbatch sums are added in another order: fp32 rounding only.
  np.testing.assert_allclose(losses_accum, losses_whole, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state_accum.params), jax.tree.leaves(state_whole.params)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def _losses(workdir):
  """step -> train/loss, from metrics.jsonl; a resumed run's later lines win."""
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      out[record['step']] = record['train/loss']
  return out


def test_sigterm_ends_the_program_so_no_later_stage_starts_from_an_unfinished_model(tmp_path):
  workdir = tmp_path / 'base'
  metrics_file = workdir / 'metrics.jsonl'

  def terminate_once_training_logs():
    while not (metrics_file.exists() and metrics_file.read_text().count('\n') >= 2):
      time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=terminate_once_training_logs, daemon=True).start()
  steps = 5000  # far more than run before the signal
  with pytest.raises(trainer.Preempted) as stopped:
    pretrain.train_and_evaluate(tiny_config.config(steps=steps), str(workdir))
  assert stopped.value.code == 0  # a clean exit, as a job scheduler expects
  saved = [int(name) for name in os.listdir(workdir / 'checkpoints') if name.isdigit()]
  assert saved and max(saved) == max(_losses(str(workdir))) < steps


def test_sigterm_saves_and_the_resumed_run_repeats_the_uninterrupted_losses(tmp_path):
  steps = 150
  reference = tmp_path / 'reference'
  pretrain.train_and_evaluate(tiny_config.config(steps=steps), str(reference))

  interrupted = tmp_path / 'interrupted'
  command = [sys.executable, '-m', 'experiments.pretrain', '--config=tests/tiny_config.py',
             f'--workdir={interrupted}', f'--config.train.steps={steps}']
  process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
  metrics_file = interrupted / 'metrics.jsonl'
  deadline = time.time() + 120
  while not (metrics_file.exists() and metrics_file.read_text().count('\n') >= 5):
    assert process.poll() is None and time.time() < deadline, process.communicate()[0]
    time.sleep(0.02)
  process.send_signal(signal.SIGTERM)
  output = process.communicate(timeout=120)[0]
  assert process.returncode == 0, output
  assert 'SIGTERM: saved the checkpoint at step' in output
  stopped_at = max(_losses(interrupted))
  assert 5 <= stopped_at < steps

  resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  assert f'Resuming from the checkpoint at step {stopped_at}' in resumed.stdout
  expected, actual = _losses(reference), _losses(interrupted)
  assert sorted(actual) == list(range(1, steps + 1))
  # Same process layout, same compiled step, same data position: bit-identical losses.
  np.testing.assert_array_equal([actual[s] for s in sorted(actual)],
                                [expected[s] for s in sorted(expected)])


def test_a_training_run_compiles_its_step_once(tmp_path):
  with perf.counting_compilations() as compiled:
    pretrain.train_and_evaluate(tiny_config.config(steps=8, eval_every=4), str(tmp_path))
  # Eight steps with two evaluations and two checkpoints between them: a state, sharding or batch
  # that changed along the way would compile the step again.
  assert compiled['jit(train_step)'] == 1
  assert compiled['jit(eval_step)'] == 1


def _remove_manifest(step_dir):
  os.remove(os.path.join(step_dir, 'jaxlm_manifest.process_0.json'))


@pytest.mark.parametrize('harm', [damage.flip_a_byte, _remove_manifest])
def test_a_damaged_latest_checkpoint_is_skipped_with_a_warning(tmp_path, harm, caplog):
  workdir = str(tmp_path)
  config = tiny_config.config(steps=8)  # checkpoints at 4 and 8
  pretrain.train_and_evaluate(config, workdir)
  first = _losses(workdir)
  harm(os.path.join(workdir, 'checkpoints', '8'))
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w'):
    pass
  with caplog.at_level(logging.WARNING):
    state = pretrain.train_and_evaluate(config, workdir)
  assert any('checkpoints/8 is not usable' in r.getMessage() for r in caplog.records)
  assert os.listdir(os.path.join(workdir, 'checkpoints_rejected'))[0].startswith('8-')
  # It went back to step 4 and trained steps 5-8 again, exactly as the first time.
  second = _losses(workdir)
  assert sorted(second) == [5, 6, 7, 8]
  assert [second[s] for s in second] == [first[s] for s in second]
  assert int(state.step) == 8


def test_the_data_position_survives_the_checkpoint_with_its_tuples(tmp_path):
  """Grain's packer marks "no remainder" with (-1, -1); JSON would hand back a list."""
  from jaxlm import checkpoint
  state = {'w': jax.numpy.arange(4.0)}
  data_state = {'remainder_slices': {'inputs': (-1, -1)}, 'parent': {'next_index': 3}}
  saver = checkpoint.Checkpointer(str(tmp_path), keep=1, async_save=False)
  saver.save(1, state, data_state)
  saver.close()
  abstract = {'w': jax.ShapeDtypeStruct((4,), jax.numpy.float32,
                                        sharding=jax.sharding.SingleDeviceSharding(
                                            jax.devices()[0]))}
  restored_state, restored_data, step = checkpoint.Checkpointer(
      str(tmp_path), keep=1).restore_latest(abstract)
  assert step == 1 and restored_data == data_state
  np.testing.assert_array_equal(restored_state['w'], np.arange(4.0))


def test_a_checkpoint_of_another_model_is_an_error_not_damage(tmp_path):
  from jaxlm import checkpoint
  saver = checkpoint.Checkpointer(str(tmp_path), keep=1, async_save=False)
  saver.save(1, {'w': jax.numpy.zeros(4)}, {})
  saver.close()
  abstract = {'w': jax.ShapeDtypeStruct((5,), jax.numpy.float32)}
  with pytest.raises(ValueError, match=r"\['w'\] has shape \(4,\)"):
    checkpoint.Checkpointer(str(tmp_path), keep=1).restore_latest(abstract)
  assert os.listdir(tmp_path) == ['1']  # nothing was moved aside
