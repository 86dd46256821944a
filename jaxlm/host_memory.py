"""Keeps the memory XLA:CPU frees in the process, for its next step.

XLA:CPU allocates a step's temporaries in one block (300 MB for the pipeline's pretraining step)
and frees it when the step ends. glibc hands a block that large back to the kernel and maps a
fresh one on the next step, whose every page then faults: a quarter of the step's CPU time went
to the kernel. Served from one heap and never trimmed, the block is reused instead; but past a
few GB of temporaries the other allocations of a step split the freed block and the heap grows
step after step (a 5 GB step's process grew to 16 GB and ran 1.3x slower), so the trainer keeps
freed memory only for steps whose temporaries are small (`keep_freed_memory`).

That needs every thread on one malloc arena (an arena of its own maps large blocks whatever the
settings), and glibc fixes the number of arenas when a second thread first allocates: importing
jax starts one. So `share_one_arena` runs before jax is imported, first thing in the binaries'
package (`experiments/__init__.py`) and the tests' conftest. This module imports no jax.
"""

import ctypes
import importlib.util
import os
import sys

DISABLE = 'JAXLM_KEEP_FREED_MEMORY'  # set to 0 to leave malloc as it is
# Steps with fewer bytes of temporaries keep them (measured: 0.3 GB 1.2x faster, 5 GB slower).
MAX_KEPT_TEMP_BYTES = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters
_DEFAULT_MMAP_MAX, _DEFAULT_TRIM_THRESHOLD = 65536, 128 * 1024
_libc = None
_keeping = False


def _runs_on_cpu() -> bool:
  """Whether JAX will run on the CPU, decided without importing it."""
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0] == 'cpu'
  return all(importlib.util.find_spec(name) is None for name in ('jax_plugins', 'libtpu'))


def share_one_arena() -> bool:
  """Before jax is imported, on a Linux host where JAX will run on the CPU: every thread
  allocates from one malloc arena. Returns whether it did."""
  global _libc
  if (os.environ.get(DISABLE) == '0' or sys.platform != 'linux' or 'jax' in sys.modules
      or not _runs_on_cpu()):
    return False
  try:
    libc = ctypes.CDLL('libc.so.6')
  except OSError:  # not glibc
    return False
  if libc.mallopt(_M_ARENA_MAX, 1) == 1:
    _libc = libc
  return _libc is not None


def keep_freed_memory(temp_bytes: int) -> bool:
  """Keeps freed memory in the heap for a step with `temp_bytes` of temporaries, or gives it
  back as glibc does by default for a larger one; returns whether it keeps it. Does nothing
  unless `share_one_arena` ran."""
  global _keeping
  if _libc is None:
    return False
  keep = temp_bytes <= MAX_KEPT_TEMP_BYTES
  if keep or _keeping:  # glibc's own settings stay untouched until a step keeps memory
    _libc.mallopt(_M_MMAP_MAX, 0 if keep else _DEFAULT_MMAP_MAX)
    _libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1 if keep else _DEFAULT_TRIM_THRESHOLD)
  _keeping = keep
  return keep
