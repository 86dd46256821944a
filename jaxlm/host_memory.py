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

A larger step's block still goes back to the kernel and faults in afresh, one 4 KB page at a time
(1.3 million faults a step for 5.3 GB of temporaries). Asked to (`glibc.malloc.hugetlb=1`, glibc
2.35 and later), glibc advises the kernel to back the blocks it maps with transparent huge pages,
2 MB a fault; that matters where the kernel's THP setting is `madvise` (under `always` they get
them anyway). glibc reads `GLIBC_TUNABLES` only when a process starts, so a binary starts itself
once more with it (`restart_with_huge_pages`) before anything else runs; `keep_freed_memory`
turns huge pages off again for a step that keeps its memory.
"""

import ctypes
import importlib.util
import os
import sys

DISABLE = 'JAXLM_KEEP_FREED_MEMORY'  # set to 0 to leave malloc as it is
HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb'
_RESTARTED = 'JAXLM_RESTARTED_WITH_HUGE_PAGES'  # a guard, should glibc drop GLIBC_TUNABLES
_THP_SETTING = '/sys/kernel/mm/transparent_hugepage/enabled'
# Steps with fewer bytes of temporaries keep them (measured: 0.3 GB 1.2x faster, 5 GB slower).
MAX_KEPT_TEMP_BYTES = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters
_DEFAULT_MMAP_MAX, _DEFAULT_TRIM_THRESHOLD = 65536, 128 * 1024
# prctl: no transparent huge pages for this process from now on (and for children it starts).
_PR_SET_THP_DISABLE = 41
_libc = None
_keeping = False


def _runs_on_cpu() -> bool:
  """Whether JAX will run on the CPU, decided without importing it."""
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0] == 'cpu'
  return all(importlib.util.find_spec(name) is None for name in ('jax_plugins', 'libtpu'))


def glibc_can_ask_for_huge_pages() -> bool:
  """Whether glibc here can ask for transparent huge pages where asking is what gets them: glibc
  2.35 or later on a Linux kernel whose THP setting is `madvise`."""
  if sys.platform != 'linux':
    return False
  try:
    name, version = os.confstr('CS_GNU_LIBC_VERSION').split()
    if name != 'glibc' or tuple(int(part) for part in version.split('.')[:2]) < (2, 35):
      return False
    with open(_THP_SETTING, encoding='ascii') as f:
      return '[madvise]' in f.read()
  except (AttributeError, ValueError, OSError):  # no confstr name, an odd version, no THP
    return False


def _started_tunables() -> list[str]:
  """The glibc tunables this process was started with, whatever `os.environ` says since."""
  try:
    with open('/proc/self/environ', 'rb') as f:
      environ = f.read().split(b'\0')
  except OSError:
    return []
  prefix = b'GLIBC_TUNABLES='
  return next((entry[len(prefix):].decode(errors='replace').split(':')
               for entry in environ if entry.startswith(prefix)), [])


def maps_huge_pages() -> bool:
  """Whether this process started with glibc asking for huge pages for the blocks it maps."""
  return f'{HUGE_PAGES_TUNABLE}=1' in _started_tunables()


def restart_with_huge_pages() -> None:
  """Under `python -m`, before jax is imported, on a Linux host where JAX will run on the CPU:
  replaces the process with the same command line, `glibc.malloc.hugetlb=1` added to
  `GLIBC_TUNABLES` (which its children inherit). Skipped where glibc cannot ask for huge pages
  (`glibc_can_ask_for_huge_pages`), with `JAXLM_KEEP_FREED_MEMORY=0`, when `GLIBC_TUNABLES`
  sets the tunable already, and in the restarted process."""
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  if (os.environ.get(DISABLE) == '0' or os.environ.get(_RESTARTED) or 'jax' in sys.modules
      or sys.argv[0] != '-m'
      or any(t.startswith(f'{HUGE_PAGES_TUNABLE}=') for t in tunables.split(':'))
      or not _runs_on_cpu() or not glibc_can_ask_for_huge_pages()):
    return
  os.environ[_RESTARTED] = '1'
  os.environ['GLIBC_TUNABLES'] = ':'.join(filter(None, (tunables, f'{HUGE_PAGES_TUNABLE}=1')))
  os.execv(sys.executable, sys.orig_argv)


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
  back as glibc does by default for a larger one; returns whether it keeps it. Where the process
  maps huge pages, keeping turns them off for the whole process, and giving back on again. Does
  nothing unless `share_one_arena` ran."""
  global _keeping
  if _libc is None:
    return False
  keep = temp_bytes <= MAX_KEPT_TEMP_BYTES
  if keep or _keeping:  # glibc's own settings stay untouched until a step keeps memory
    _libc.mallopt(_M_MMAP_MAX, 0 if keep else _DEFAULT_MMAP_MAX)
    _libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1 if keep else _DEFAULT_TRIM_THRESHOLD)
  if maps_huge_pages():
    # Huge pages for the blocks mapped afresh only: a kept heap on them ran the pipeline's
    # pretraining 9% slower.
    _libc.prctl(_PR_SET_THP_DISABLE, int(keep), 0, 0, 0)
  _keeping = keep
  return keep
