"""Throughput and model FLOPs utilisation (MFU).

MFU = achieved model FLOPs / peak FLOPs of the devices. Accelerators use their published dense
bf16 peak; a CPU has no meaningful published figure, so it uses a matmul measured in the same
process (figures from different runs on a shared CPU are not comparable).
"""

import collections
import contextlib
import functools
import os
import time

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per device, by `device_kind` prefix.
PEAK_FLOPS = {
    'NVIDIA H200': 989e12,
    'NVIDIA H100': 989e12,
    'NVIDIA A100': 312e12,
    'NVIDIA L4': 121e12,
    'TPU v6': 918e12,
    'TPU v5p': 459e12,
    'TPU v5 lite': 197e12,
    'TPU v5e': 197e12,
    'TPU v4': 275e12,
    'TPU v3': 123e12,
}


# Once per process: the probe takes about a second, and a pipeline's stages would each repeat it.
@functools.cache
def measure_matmul_flops(size: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
  """FLOP/s of a jitted square matmul on the default device: the CPU's practical peak."""
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), dtype)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best


def cache_compilations(workdir: str) -> None:
  """Keeps compiled programs in `<workdir>/compilation_cache`, so that a resumed run, and every
  stage or cell of a run that shares the workdir, compiles a program once (XLA on a CPU took
  111 s for the pipeline's 85 programs, before RL's trimmed rollout rows added a few).
  `JAX_COMPILATION_CACHE_DIR` picks another directory, and a workdir on remote storage
  (`gs://...`) gets none."""
  if not jax.config.jax_compilation_cache_dir and '://' not in workdir:
    jax.config.update('jax_compilation_cache_dir', os.path.join(workdir, 'compilation_cache'))
    # Small programs too: most compile in under JAX's default threshold of a second, and reading
    # one back takes milliseconds.
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)


def peak_flops_per_device(device=None) -> tuple[float, str]:
  """(peak FLOP/s, where the figure comes from)."""
  device = device or jax.devices()[0]
  for prefix, flops in PEAK_FLOPS.items():
    if device.device_kind.startswith(prefix):
      return flops, f'{device.device_kind} spec sheet'
  return measure_matmul_flops(), f'{device.device_kind}: fp32 matmul probe'


def peak_memory_bytes() -> int | None:
  """Peak bytes in use on device 0, where the backend reports it (not on CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get('peak_bytes_in_use')


@contextlib.contextmanager
def counting_compilations():
  """Yields a Counter of XLA compilations by function name, filled while the block runs: a
  program compiled again (new shapes, shardings or static arguments) counts twice."""
  counts = collections.Counter()

  def listen(event, duration, fun_name='', **kwargs):
    del duration, kwargs
    if event == '/jax/core/compile/backend_compile_duration':
      counts[fun_name] += 1

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield counts
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
