r"""Measures what verified checkpoints cost: the save, the manifest of checksums each process
writes for its own files, and the restore with its verification.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.benchmark_checkpoint \
      --config=experiments/configs/gpt2_124m.py --dir=/tmp/ckpt_bench

Each process checksums the files it wrote; `hashed_gib` is what this process (process 0)
hashed. The train state is the config's (parameters and AdamW moments), filled with random values on the
config's mesh; `--what=params` saves the parameters alone.
"""

import json
import os
import shutil
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import flags
from etils import epath

from jaxlm import checkpoint
from jaxlm import cli
from jaxlm import lm
from jaxlm import metrics
from jaxlm import model as model_lib
from jaxlm import sharding
from jaxlm import trainer


def _timed(fn, *args):
  start = time.perf_counter()
  result = fn(*args)
  return result, time.perf_counter() - start


def benchmark(config, directory: str, what: str, repeats: int) -> dict:
  model = model_lib.Transformer(lm.padded_model_config(config, config.tokenizer.vocab_size))
  mesh = sharding.make_mesh(config.mesh)
  results = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    abstract, shardings, init_state = trainer.abstract_state(
        lm.init_params_fn(model, config.data.seq_len), trainer.make_optimizer(config.train),
        mesh, jax.random.PRNGKey(0))
    if what == 'params':
      abstract, shardings = abstract.params, shardings.params
    else:
      abstract, shardings = trainer.checkpointed(abstract), trainer.checkpointed(shardings)
    def init(rng):
      # Random values everywhere: freshly initialised AdamW moments are zeros, which Orbax
      # compresses to nothing, and a trained state's are not.
      state = init_state(rng)
      tree = state.params if what == 'params' else trainer.checkpointed(state)
      leaves, treedef = jax.tree.flatten(tree)
      keys = jax.random.split(rng, len(leaves))
      return treedef.unflatten([
          jax.random.normal(key, leaf.shape, leaf.dtype)
          if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf
          for key, leaf in zip(keys, leaves)])
    for repeat in range(repeats):
      shutil.rmtree(directory, ignore_errors=True)
      state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(repeat))
      jax.block_until_ready(state)
      saver = checkpoint.Checkpointer(directory, keep=1, async_save=False)
      _, save_seconds = _timed(saver.save, 1, state, {})
      _, manifest_seconds = _timed(saver.wait)
      saver.close()
      del state
      step_dir = epath.Path(directory) / '1'
      _, verify_seconds = _timed(checkpoint.verify, step_dir)
      restorer = checkpoint.Checkpointer(directory, keep=1)
      restored, restore_seconds = _timed(lambda: jax.block_until_ready(
          restorer.restore_latest(abstract)))
      restorer.close()
      del restored
      manifest = json.loads((step_dir / checkpoint.manifest_name(jax.process_index())).read_text())
      results.append(dict(save_s=save_seconds, manifest_s=manifest_seconds,
                          verify_s=verify_seconds, restore_with_verify_s=restore_seconds,
                          hashed_gib=sum(size for size, _ in manifest['files'].values()) / 2**30))
  on_disk = sum(os.path.getsize(os.path.join(d, f))
                for d, _, files in os.walk(directory) for f in files)
  best = {k: min(r[k] for r in results) for k in results[0]}
  return {'params': model.config.num_params(), 'what': what, 'mesh': dict(mesh.shape),
          'processes': jax.process_count(), 'checkpoint_gib': on_disk / 2**30,
          'best_of': repeats, **best,
          'save_with_verification_s': best['save_s'] + best['manifest_s'],
          'verification_overhead': best['manifest_s'] / best['save_s']}


def main(argv):
  del argv
  _INITIALIZE_DISTRIBUTED()
  metrics.configure_logging()
  result = benchmark(cli.config_value(_CONFIG), _DIR.value, _WHAT.value, _REPEATS.value)
  if jax.process_index() == 0:
    print(json.dumps(result, indent=2))


if __name__ == '__main__':
  # Flags live here so that other programs (and tests) can import several binaries.
  _CONFIG = cli.define_config('experiments/configs/gpt2_124m.py')
  _DIR = flags.DEFINE_string('dir', '/tmp/jaxlm_checkpoint_benchmark',
                             'Where to write the checkpoint (emptied first).')
  _WHAT = flags.DEFINE_enum('what', 'state', ['state', 'params'],
                            'The whole train state, or the parameters alone.')
  _REPEATS = flags.DEFINE_integer('repeats', 2, 'Runs; the best of each time is reported.')
  _INITIALIZE_DISTRIBUTED = cli.define_distributed_flags()
  cli.start(main)
