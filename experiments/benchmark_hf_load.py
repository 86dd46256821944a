r"""Host memory of loading a Hugging Face checkpoint onto a mesh, against the checkpoint's size.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.benchmark_hf_load \
      --config=experiments/configs/llama_1b.py --dir=/tmp/llama_1b_hf

Writes a randomly initialised Llama checkpoint of the config's size in Hugging Face format (once;
float32 safetensors shards of about 1 GiB with an index), then, each in a fresh process, loads it onto
the config's mesh (FSDP over every device for llama_1b) and onto a single device, and reports
each load's peak anonymous resident memory against the checkpoint's size, and whether the two loads hold
the same parameters (a SHA-256 of every tensor). Prints one JSON object.
"""

import hashlib
import json
import os
import subprocess
import sys
import threading
import time

import flax.linen as nn
import jax
import numpy as np
from absl import flags

from jaxlm import cli
from jaxlm import hf
from jaxlm import lm
from jaxlm import model as model_lib
from jaxlm import sharding


def _model_config(config) -> model_lib.ModelConfig:
  return model_lib.ModelConfig.from_config(config.model, config.tokenizer.vocab_size)


def write_checkpoint(config, directory: str) -> None:
  """Tensor by tensor, so writing never holds more than one shard file's worth."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  model_config = _model_config(config)
  model = model_lib.Transformer(model_config)
  shapes = jax.eval_shape(lm.init_params_fn(model, 1), jax.random.PRNGKey(0))
  shapes = nn.meta.unbox(shapes)
  flat = {hf._path(k): v for k, v in jax.tree_util.tree_flatten_with_path(shapes)[0]}  # pylint: disable=protected-access
  rng = np.random.default_rng(0)
  tensors = []
  for path, (pattern, transposed) in hf._tensor_table('llama', model_config).items():  # pylint: disable=protected-access
    shape = flat[path].shape
    for i in range(model_config.num_layers) if '{i}' in pattern else [None]:
      tensor_shape = shape[1:] if i is not None else shape
      tensors.append((pattern.format(i=i), tensor_shape[::-1] if transposed else tensor_shape))
  os.makedirs(directory, exist_ok=True)
  weight_map, shard, size = {}, {}, 0

  def flush():
    name = f'model-{len(set(weight_map.values())) + 1:05d}.safetensors'
    save_file(shard, os.path.join(directory, name), metadata={'format': 'pt'})
    weight_map.update({tensor: name for tensor in shard})

  for name, shape in tensors:
    shard[name] = rng.standard_normal(shape, np.float32) * 0.02
    size += shard[name].nbytes
    if size >= 1 << 30:
      flush()
      shard, size = {}, 0
  if shard:
    flush()
  with open(os.path.join(directory, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {}, 'weight_map': weight_map}, f)
  hf_config = hf.llama_config(model_config, _NoTokenizer())
  hf_config['vocab_size'] = model_config.vocab_size
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(hf_config, f, indent=2)


class _NoTokenizer:
  bos_id, eos_id, pad_id = 1, 2, 0


def _status_bytes(field: str) -> int:
  with open('/proc/self/status', encoding='utf-8') as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ':'))


class _AnonymousPeak:
  """Peak anonymous resident memory, sampled every 5 ms: what the host must really hold.
  (Resident memory as a whole also counts the safetensors files' mapped pages, which are page
  cache the kernel can drop.)"""

  def __init__(self):
    self.peak = _status_bytes('RssAnon')
    self._done = threading.Event()
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()

  def _sample(self):
    while not self._done.wait(0.005):
      self.peak = max(self.peak, _status_bytes('RssAnon'))

  def stop(self) -> int:
    self._done.set()
    self._thread.join()
    return max(self.peak, _status_bytes('RssAnon'))


def load_and_report(config, directory: str, single_device: bool) -> dict:
  """Loads in this process; peak RSS of the load, then a digest of every tensor."""
  model_config = hf.model_config(hf.read_config(directory))
  model = model_lib.Transformer(model_config)
  mesh = (sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
          if single_device else sharding.make_mesh(config.mesh))
  before = _status_bytes('RssAnon')
  sampler, start = _AnonymousPeak(), time.time()
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    params = hf.load_params(directory, 'llama', model_config, lm.abstract_params(model, mesh))
    jax.block_until_ready(params)
  seconds, peak = time.time() - start, sampler.stop()
  digests = {hf._path(k): hashlib.sha256(np.asarray(v).tobytes()).hexdigest()  # pylint: disable=protected-access
             for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  return {'mesh': dict(mesh.shape), 'devices': mesh.size, 'seconds': round(seconds, 1),
          'anonymous_before_gib': before / 2**30, 'anonymous_peak_gib': peak / 2**30,
          'resident_peak_gib': _status_bytes('VmHWM') / 2**30,
          'largest_device_gib': max(
              sum(s.data.nbytes for leaf in jax.tree.leaves(params)
                  for s in leaf.addressable_shards if s.device == d)
              for d in mesh.devices.flat) / 2**30,
          'digests': digests}


def main(argv):
  del argv
  config, directory = cli.config_value(_CONFIG), _DIR.value
  if _LOAD.value:
    print(json.dumps(load_and_report(config, directory, _LOAD.value == 'single')))
    return
  if not os.path.exists(os.path.join(directory, 'config.json')):
    write_checkpoint(config, directory)
  checkpoint_bytes = sum(os.path.getsize(os.path.join(directory, f))
                         for f in os.listdir(directory) if f.endswith('.safetensors'))
  results = {}
  for kind in ('mesh', 'single'):
    config_flags_given = [a for a in sys.argv[1:] if a.startswith('--config')]
    out = subprocess.run([sys.executable, '-m', 'experiments.benchmark_hf_load',
                          *config_flags_given, f'--dir={directory}', f'--load={kind}'],
                         check=True, capture_output=True, text=True)
    results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
  same = results['mesh'].pop('digests') == results['single'].pop('digests')
  gib = checkpoint_bytes / 2**30
  for r in results.values():
    r['load_gib'] = r['anonymous_peak_gib'] - r['anonymous_before_gib']
    r['load_over_checkpoint'] = r['load_gib'] / gib
  print(json.dumps({'checkpoint_gib': gib, 'parameters': _model_config(config).num_params(),
                    'equal_to_single_device_load': same, **results}, indent=2))


if __name__ == '__main__':
  _CONFIG = cli.define_config('experiments/configs/llama_1b.py', 'The model to write and load.')
  _DIR = flags.DEFINE_string('dir', None, 'Where the checkpoint is (written if absent).',
                             required=True)
  _LOAD = flags.DEFINE_enum('load', '', ['', 'mesh', 'single'],
                            'Internal: load once in this process onto the config\'s mesh or one '
                            'device, and print the measurement.')
  cli.start(main)
