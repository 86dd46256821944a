"""Data shards: how training data is split between hosts, independently of how many there are.

The training data is cut into `num_shards` disjoint shards, each its own resumable Grain
iterator; a process reads only the shards it owns, and a global batch is one batch from every
shard. The batches (and so the losses) depend on `num_shards`, not on the number of processes:
the same config trains identically on 1, 2 or 4 hosts, and a checkpoint resumes on any host
count that divides `num_shards`.
"""

from typing import Callable

import jax
import numpy as np

from jaxlm import distributed
from jaxlm import sharding
from jaxlm.errors import UserError

# (shard_index, num_shards, rows) -> a Grain IterDataset of that shard's [rows, ...] batches.
MakeShard = Callable[[int, int, int], object]


class ShardedBatches:
  """This process's rows of every global batch: one batch from each of its shards."""

  def __init__(self, make_shard: MakeShard, num_shards: int, global_batch_size: int, mesh,
               field: str = 'config.data.num_shards'):
    sharding.batch_size_per_process(global_batch_size, mesh)  # checks the mesh divides it
    processes = jax.process_count()
    self.num_shards = num_shards or processes
    if self.num_shards % processes:
      raise UserError(f'{field}={self.num_shards} must be a multiple of the number of '
                       f'processes ({processes})')
    if global_batch_size % self.num_shards:
      raise UserError(f'the batch size ({global_batch_size}) must be divisible by {field} '
                       f'({self.num_shards})')
    self._field = field
    per_process = self.num_shards // processes
    owned = range(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
    rows = global_batch_size // self.num_shards
    self._iterators = {i: iter(make_shard(i, self.num_shards, rows)) for i in owned}

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batches = [next(iterator) for iterator in self._iterators.values()]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self) -> dict:
    """The position of every shard, gathered from all processes (a collective)."""
    shards = {}
    for states in distributed.all_gather_json(
        {str(i): it.get_state() for i, it in self._iterators.items()}):
      shards.update(states)
    return {'num_shards': self.num_shards, 'shards': shards}

  def set_state(self, state: dict) -> None:
    if state.get('num_shards') != self.num_shards:
      raise UserError(
          f'the checkpoint\'s data was cut into {state.get("num_shards")} shards but this run '
          f'uses {self.num_shards}; set {self._field}={state.get("num_shards")} to resume it')
    for i, iterator in self._iterators.items():
      iterator.set_state(state['shards'][str(i)])
