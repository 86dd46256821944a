"""Multi-process runs on JAX's own runtime: one process per host (TPU VM worker, GPU node), all
running the same program on their part of one global mesh.

Nothing here replaces `jax.distributed`; it only decides when to start it and adds the few
host-side agreements a training loop needs (who writes shared files, gathering small states).
"""

import json
import os
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils


def _launched_as_many_processes() -> bool:
  """True under a launcher that starts one process per host and that `jax.distributed` can read
  (SLURM, Open MPI, a multi-worker TPU slice)."""
  def count(name):
    try:
      return int(os.environ.get(name, '1'))
    except ValueError:
      return 1
  return (count('SLURM_NTASKS') > 1 or count('OMPI_COMM_WORLD_SIZE') > 1
          or ',' in os.environ.get('TPU_WORKER_HOSTNAMES', ''))


def initialize(coordinator_address: str = '', num_processes: int = 0, process_id: int = -1,
               multiprocess: bool = False) -> None:
  """Starts `jax.distributed` for a multi-process run; a single process needs nothing.

  An explicit coordinator (GPU clusters without a known scheduler) wins. `multiprocess` (or a
  launcher seen in the environment) lets JAX detect the rest itself: Cloud TPU pod slices, SLURM,
  Open MPI, Kubernetes. Must run before anything touches a device.
  """
  if coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS'):
    jax.distributed.initialize(coordinator_address or None, num_processes or None,
                               None if process_id < 0 else process_id)
  elif multiprocess or _launched_as_many_processes():
    jax.distributed.initialize()


def is_main() -> bool:
  return jax.process_index() == 0


def barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def main_process_first(fn: Callable[[], Any], name: str) -> Any:
  """Runs `fn` on process 0, then on the others.

  For work that writes shared files once (preparing a TFDS dataset, training the tokenizer):
  with a shared filesystem the others find it done; without one, each host makes its own copy
  the same way.
  """
  if is_main():
    result = fn()
  barrier(f'jaxlm_{name}')
  if not is_main():
    result = fn()
  return result


def all_gather_json(value) -> list:
  """Every process's JSON-able `value`, in process order, on every process."""
  if jax.process_count() == 1:
    return [value]
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.int32(len(data)))).ravel()
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:len(data)] = data
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths)]


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is true on any (e.g. one host got SIGTERM)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())

