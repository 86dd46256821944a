"""jaxlm.host_memory: a CPU step's freed temporaries are reused, not mapped afresh each step."""

import resource
import sys

import jax
import jax.numpy as jnp
import pytest

from jaxlm import host_memory


def _page_faults_per_call(compiled, x, calls: int = 20) -> float:
  for _ in range(calls):  # the heap grows to the step's size first
    compiled(x).block_until_ready()
  start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(calls):
    compiled(x).block_until_ready()
  return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / calls


@pytest.mark.skipif(sys.platform != 'linux', reason='glibc malloc settings')
def test_a_small_step_s_temporaries_stop_faulting_a_large_one_s_go_back_to_the_kernel():
  x = jnp.ones((64 << 20) // 4, jnp.float32)

  def step(x):  # two 64 MB temporaries that XLA cannot fuse away
    doubled = jax.lax.optimization_barrier(x * 2)
    return jax.lax.optimization_barrier(doubled + 1).sum() + doubled.sum()

  compiled = jax.jit(step).lower(x).compile()
  temp_pages = compiled.memory_analysis().temp_size_in_bytes // resource.getpagesize()
  assert temp_pages >= (64 << 20) // resource.getpagesize()
  try:
    # The conftest put every thread on one arena before importing jax, as the binaries do.
    assert not host_memory.keep_freed_memory(host_memory.MAX_KEPT_TEMP_BYTES + 1)
    assert _page_faults_per_call(compiled, x) > 0.9 * temp_pages  # glibc's default: every page
    assert host_memory.keep_freed_memory(compiled.memory_analysis().temp_size_in_bytes)
    # Reused: none in a fresh process; after other tests' allocations, an occasional call that
    # finds the freed block split still faults its pages in.
    assert _page_faults_per_call(compiled, x) < 0.2 * temp_pages
  finally:
    host_memory.keep_freed_memory(0)
