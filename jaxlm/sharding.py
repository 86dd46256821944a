"""Every sharding decision in one place: the mesh, the logical-axis rules, and placement.

Parameters and activations are annotated with logical axis names in `jaxlm.model`; `RULES`
maps those names onto the mesh axes (data, fsdp, tensor). Changing the parallelism strategy is
changing the mesh shape in the config, not the model.
"""

import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm.errors import UserError

MESH_AXES = ('data', 'fsdp', 'tensor')

RULES = (
    # Activations.
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('act_embed', None),
    ('act_mlp', 'tensor'),
    ('act_heads', 'tensor'),
    ('act_vocab', 'tensor'),
    # Parameters: FSDP shards the model dimension, tensor parallelism the wide ones.
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('vocab', 'tensor'),
    ('layers', None),
    ('norm', None),
)


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  """Resolves the (data, fsdp, tensor) sizes; at most one may be -1 ("the rest")."""
  sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise UserError(f'config.mesh: sizes must be positive, with at most one -1; got '
                     f'{dict(zip(MESH_AXES, sizes))}')
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known:
      raise UserError(f'config.mesh: {num_devices} devices do not divide into '
                       f'{dict(zip(MESH_AXES, sizes))}')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise UserError(f'config.mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} '
                     f'devices but {num_devices} are available')
  return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all devices, or the first `mesh_config.num_devices`.

  With `dcn_*` sizes above 1 the mesh spans several slices (multi-slice TPU) or hosts (GPU nodes):
  each axis is its `dcn_*` size (over the slow data-centre network) times its in-slice size, and
  only the axes given a `dcn_*` size cross it, usually data.
  """
  if devices is None:
    devices = jax.devices()
    if mesh_config.get('num_devices', 0):
      if jax.process_count() > 1 or mesh_config.num_devices > len(devices):
        raise UserError(f'config.mesh.num_devices={mesh_config.num_devices} needs a single '
                         f'process with at least that many devices; have {len(devices)}')
      devices = devices[:mesh_config.num_devices]
  dcn = tuple(int(mesh_config.get(f'dcn_{axis}', 1)) for axis in MESH_AXES)
  if any(size < 1 for size in dcn) or len(devices) % math.prod(dcn):
    raise UserError(f'config.mesh: dcn sizes {dict(zip(MESH_AXES, dcn))} must be positive and '
                     f'divide the {len(devices)} devices')
  # Auto axes: partitioning is propagated by the compiler from our annotations (Explicit mode
  # would reject contractions over sharded dimensions).
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if math.prod(dcn) == 1:
    return jax.make_mesh(mesh_shape(mesh_config, len(devices)), MESH_AXES, devices=devices,
                         axis_types=axis_types)
  ici = mesh_shape(mesh_config, len(devices) // math.prod(dcn))
  # TPU devices know their slice; elsewhere each process (host) is one granule.
  grid = mesh_utils.create_hybrid_device_mesh(
      ici, dcn, devices, process_is_granule=devices[0].platform != 'tpu')
  return Mesh(grid, MESH_AXES, axis_types=axis_types)


def logical_shardings(boxed_tree, mesh: Mesh):
  """NamedShardings for a tree of (possibly) logically-partitioned values."""
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_tree), mesh, RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data and fsdp; the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(('data', 'fsdp')))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_size_per_process(global_batch_size: int, mesh: Mesh) -> int:
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  if global_batch_size % shards:
    raise UserError(f'batch size {global_batch_size} must be divisible by data x fsdp = '
                     f'{shards}')
  return global_batch_size // jax.process_count()


def put_batch(local_batch: dict[str, np.ndarray], mesh: Mesh, batch_axis: int = 0):
  """Builds global arrays from this process's rows of the batch.

  `batch_axis` is 1 for [microbatch, batch, ...] arrays used by gradient accumulation.
  """
  spec = PartitionSpec(*([None] * batch_axis), ('data', 'fsdp'))
  sharding = NamedSharding(mesh, spec)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def local_rows(batch_array, mesh: Mesh) -> np.ndarray:
  """This process's rows of a global batch array: the inverse of `put_batch`."""
  return np.asarray(multihost_utils.global_array_to_host_local_array(
      batch_array, mesh, PartitionSpec(('data', 'fsdp'))))


def with_rules(fn):
  """Runs `fn` with the logical-axis rules active, so activation constraints resolve."""
  def wrapped(*args, **kwargs):
    with nn.logical_axis_rules(RULES):
      return fn(*args, **kwargs)
  return wrapped
