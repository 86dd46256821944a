"""Low-rank adapters (LoRA) on the one transformer, through qwix.

qwix intercepts the projections' matmuls inside the Flax modules and adds `kernel_lora_a`
[..., in, rank] and `kernel_lora_b` [..., rank, out] beside each kernel whose module path
(`layers/attention/query`, `transformer/layers/mlp/up`) `config.lora.targets` matches. They carry
the kernel's logical axis names, and its `layers` axis under `nn.scan`, so adapters shard with
the base on every mesh. A projection computes x @ W + (x @ A) @ B * alpha / rank; B starts at
zero, so a fresh adapter changes nothing.

In a LoRA run only adapters, scalar heads and what `config.lora.train_fully` names train: the
trainer keeps every other parameter in `TrainState.frozen`, outside the optimizer and the
checkpoints. The base model applied to the
params without their adapters is the model the run started from: RL's and DPO's reference.
"""

import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import qwix

from jaxlm.errors import UserError

ADAPTER_SUFFIXES = ('_lora_a', '_lora_b')
# Parameters a LoRA run trains besides the adapters: the reward model's and the critic's heads.
HEADS = ('head', 'value_head', 'likelihood_scale')
FROZEN_DTYPES = ('', 'float32', 'bfloat16', 'float16')


def enabled(config) -> bool:
  return 'lora' in config and config.lora.rank > 0


def check(config, dropout_allowed: bool = True) -> None:
  """Raises a `UserError` naming the `config.lora` field that is out of range."""
  if 'lora' not in config:
    return
  c = config.lora
  if c.rank < 0:
    raise UserError(f'config.lora.rank must be >= 0 (0: no adapters), got {c.rank}')
  if c.rank == 0:
    return
  if c.alpha <= 0:
    raise UserError(f'config.lora.alpha must be positive, got {c.alpha}')
  if not 0 <= c.dropout < 1:
    raise UserError(f'config.lora.dropout must be in [0, 1), got {c.dropout}')
  if c.get('frozen_dtype', '') not in FROZEN_DTYPES:
    raise UserError(f'config.lora.frozen_dtype must be one of {FROZEN_DTYPES}, got '
                    f'{c.frozen_dtype!r}')
  if c.dropout and not dropout_allowed:
    raise UserError('config.lora.dropout must be 0 in this stage (adapter dropout is for SFT '
                    'and continued pretraining)')
  for field in ('targets', 'train_fully'):
    try:
      re.compile(c.get(field, ''))
    except re.error as e:
      raise UserError(f'config.lora.{field} is not a regular expression ({e})') from e


def wrap(model, lora_config, training: bool = False):
  """`model` with adapters on the projections `lora_config.targets` matches. Dropout on the
  adapters' inputs (it needs a 'dropout' rng) only when `training`."""
  provider = qwix.LoraProvider(module_path=lora_config.targets, rank=lora_config.rank,
                               alpha=lora_config.alpha,
                               dropout=lora_config.dropout if training else 0.0)
  methods = [m for m in ('__call__', 'hidden_states', 'logits', 'reward', 'head_values')
             if hasattr(type(model), m)]
  return qwix.apply_lora_to_model(model, provider, methods=methods)


def for_config(model, config, training: bool = False):
  """The model a stage runs: `model` itself, or with adapters when `config.lora.rank` > 0."""
  return wrap(model, config.lora, training) if enabled(config) else model


def is_adapter(path: tuple[str, ...]) -> bool:
  return path[-1].endswith(ADAPTER_SUFFIXES)


def trainable(lora_config):
  """path -> whether a LoRA run trains that parameter: adapters, heads, and the parameters
  `lora_config.train_fully` matches (e.g. 'embed/embedding|unembed/kernel', for new tokens)."""
  fully = re.compile(lora_config.get('train_fully', '') or '(?!)')
  return lambda path: (is_adapter(path) or any(name in HEADS for name in path)
                       or fully.fullmatch('/'.join(path)) is not None)


def split(params, keep) -> tuple[dict, dict]:
  """(the leaves whose path `keep` accepts, the others), each a nested dict."""
  flat = flax.traverse_util.flatten_dict(params)
  kept = {path: leaf for path, leaf in flat.items() if keep(path)}
  rest = {path: leaf for path, leaf in flat.items() if not keep(path)}
  return (flax.traverse_util.unflatten_dict(kept), flax.traverse_util.unflatten_dict(rest))


def join(*trees) -> dict:
  """One nested dict holding the leaves of every tree (whose paths are disjoint)."""
  flat = {}
  for tree in trees:
    flat.update(flax.traverse_util.flatten_dict(tree))
  return flax.traverse_util.unflatten_dict(flat)


def without_adapters(params) -> dict:
  return split(params, is_adapter)[1]


def _pairs(flat: dict):
  """{kernel path: (A path, B path)} of the adapters in a flattened tree."""
  return {path[:-1] + (path[-1][:-len('_lora_a')],): (path, path[:-1] + (path[-1][:-1] + 'b',))
          for path in flat if path[-1].endswith('_lora_a')}


def merge(params, alpha: float, rank: int) -> dict:
  """The params with each adapter folded into its kernel, W + A @ B * alpha / rank, and no
  adapter leaves: the same function, computed without the adapters' matmuls."""
  flat = flax.traverse_util.flatten_dict(params)
  for kernel, (a, b) in _pairs(flat).items():
    delta = jnp.einsum('...ir,...ro->...io', flat.pop(a).astype(jnp.float32),
                       flat.pop(b).astype(jnp.float32)) * (alpha / rank)
    flat[kernel] = (flat[kernel].astype(jnp.float32) + delta).astype(flat[kernel].dtype)
  return flax.traverse_util.unflatten_dict(flat)


def adapter_pairs(params) -> dict[str, tuple[jax.Array, jax.Array]]:
  """{'layers/attention/query/kernel': (A, B)} of every adapter, for export."""
  flat = flax.traverse_util.flatten_dict(params)
  return {'/'.join(kernel): (flat[a], flat[b]) for kernel, (a, b) in _pairs(flat).items()}


def cast(params, dtype: str):
  """Floating-point leaves (boxed or not) as `dtype`: a frozen base in bfloat16 takes half the
  memory, and the model still computes in its own dtype."""
  def cast_leaf(leaf):
    if isinstance(leaf, nn.meta.AxisMetadata):
      return leaf.replace_boxed(cast_leaf(leaf.unbox(apply_constraint=False)))
    return leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf
  return jax.tree.map(cast_leaf, params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
