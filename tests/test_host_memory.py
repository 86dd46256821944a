"""jaxlm.host_memory: a CPU step's freed temporaries are reused, not mapped afresh each step."""

import json
import os
import resource
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from jaxlm import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_huge_pages = pytest.mark.skipif(not host_memory.glibc_can_ask_for_huge_pages(),
                                      reason='glibc cannot ask for transparent huge pages here')


def _environment(**changes) -> dict:
  """This process's environment without glibc tunables or jaxlm's memory settings, with
  `changes`."""
  env = {k: v for k, v in os.environ.items()
         if k not in ('GLIBC_TUNABLES', host_memory.DISABLE, host_memory._RESTARTED)}  # pylint: disable=protected-access
  return {**env, **changes}


def _run(command: list[str], env: dict) -> str:
  done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
                        check=False)
  assert done.returncode == 0, done.stdout + done.stderr
  return done.stdout


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


# A 64 MB block of temporaries each call: given back and mapped afresh (a large step's, as glibc
# does by default), then kept (a small step's). Prints the page faults per call of the first, the
# block's pages, and whether the process may use huge pages in each case and once it gives a
# larger step's block back again.
_FAULTS_OF_A_MAPPED_BLOCK = textwrap.dedent("""
    import resource
    from jaxlm import host_memory
    host_memory.share_one_arena()
    import jax
    import jax.numpy as jnp

    def thp_enabled():
      with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('THP_enabled'))

    x = jnp.ones((64 << 20) // 4, jnp.float32)
    def step(x):
      doubled = jax.lax.optimization_barrier(x * 2)
      return jax.lax.optimization_barrier(doubled + 1).sum() + doubled.sum()
    compiled = jax.jit(step).lower(x).compile()
    temp_bytes = compiled.memory_analysis().temp_size_in_bytes
    assert not host_memory.keep_freed_memory(host_memory.MAX_KEPT_TEMP_BYTES + 1)
    for _ in range(5):
      compiled(x).block_until_ready()
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
      compiled(x).block_until_ready()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 20)
    print(temp_bytes // resource.getpagesize())
    print(thp_enabled())
    assert host_memory.keep_freed_memory(temp_bytes)
    print(thp_enabled())
    assert not host_memory.keep_freed_memory(host_memory.MAX_KEPT_TEMP_BYTES + 1)
    print(thp_enabled())
""")


@needs_huge_pages
def test_huge_pages_fault_a_mapped_block_in_2_mb_pieces_and_stay_off_a_kept_heap():
  def run(env):
    return [float(line) for line in
            _run([sys.executable, '-c', _FAULTS_OF_A_MAPPED_BLOCK], env).split()]

  faults, temp_pages, *_ = run(_environment())
  assert faults > 0.9 * temp_pages  # every 4 KB page
  huge_faults, _, mapped_thp, kept_thp, mapped_again_thp = run(
      _environment(GLIBC_TUNABLES=f'{host_memory.HUGE_PAGES_TUNABLE}=1'))
  assert huge_faults < 0.1 * temp_pages  # 512 pages a fault where the block is 2 MB aligned
  # A heap kept on huge pages ran the pipeline's pretraining slower.
  assert (mapped_thp, kept_thp, mapped_again_thp) == (1, 0, 1)


def _benchmark(env, *flags: str) -> dict:
  stdout = _run([sys.executable, '-m', 'experiments.benchmark', '--config=tests/tiny_config.py',
                 '--config.train.batch_size=4', *flags], env)
  return json.loads(stdout[stdout.index('{'):])


@needs_huge_pages
def test_a_binary_restarts_once_with_huge_pages_and_its_own_arguments():
  # Read from the environment the process started with: only a restart puts the tunable there.
  result = _benchmark(_environment(), '--steps=1')
  assert result['malloc_huge_pages'] and result['batch_size'] == 4
  assert not _benchmark(_environment(**{host_memory.DISABLE: '0'}),
                        '--memory_only')['malloc_huge_pages']
  # A tunable the user set is theirs: no restart overrides it.
  assert not _benchmark(_environment(GLIBC_TUNABLES=f'{host_memory.HUGE_PAGES_TUNABLE}=0'),
                        '--memory_only')['malloc_huge_pages']
