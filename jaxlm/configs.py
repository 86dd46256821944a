"""Checks a config before anything runs, so a bad value fails in seconds with the field named."""

import json
import os

import jax
import ml_collections

from jaxlm import lora
from jaxlm import model as model_lib
from jaxlm import sharding
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.data import mixture
from jaxlm.data import tfds_builders
from jaxlm.errors import UserError

CHOICES = {
    'model.remat': tuple(model_lib.REMAT_POLICIES),
    'model.dtype': tuple(model_lib.DTYPES),
    'model.param_dtype': tuple(model_lib.DTYPES),
    'model.attention_impl': model_lib.ATTENTION_IMPLEMENTATIONS,
    'tokenizer.type': tokenizer_lib.MODEL_TYPES,
    'data.split_by': tfds_builders.SPLIT_BY,
}
POSITIVE = ('model.d_model', 'model.num_layers', 'model.num_heads', 'model.num_kv_heads',
            'model.causal_query_blocks',
            'model.head_dim', 'model.mlp_dim', 'model.max_seq_len', 'model.vocab_multiple',
            'tokenizer.vocab_size', 'data.seq_len', 'train.steps', 'train.batch_size',
            'train.grad_accum_steps', 'train.learning_rate', 'eval.batch_size',
            'checkpoint.every', 'checkpoint.keep', 'log_every')


# The field a source needs: the first of these the config has (pretraining reads JSONL from
# data.files, post-training from data.jsonl_train).
NEEDED_BY_SOURCE = {'text': ('data.text_glob',), 'tfds': ('data.tfds_name',),
                    'parquet': ('data.files',), 'jsonl': ('data.files', 'data.jsonl_train'),
                    'tokens': ('data.token_dir',)}
_MISSING = object()


def _get(config, dotted: str):
  for part in dotted.split('.'):
    if part not in config:
      return _MISSING
    config = config[part]
  return config


def _parse_like(text: str, current, key: str):
  """`text` as a value of `current`'s type, as `--config.<key>=<text>` would read it."""
  if isinstance(current, bool):
    if text.lower() not in ('true', 'false'):
      raise UserError(f'{key}={text}: expected true or false')
    return text.lower() == 'true'
  if isinstance(current, (int, float)):
    try:
      return type(current)(text)
    except ValueError:
      raise UserError(f'{key}={text}: expected a {type(current).__name__}') from None
  if current is None:  # an unset placeholder: read the text as JSON where it is JSON
    try:
      return json.loads(text.lower() if text.lower() in ('true', 'false') else text)
    except ValueError:
      return text
  return text


def overridden(config: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
  """A copy of `config` with each 'dotted.key=value' of `overrides` set, typed as the field is."""
  other = config.copy_and_resolve_references()
  for item in overrides:
    key, sep, text = item.partition('=')
    parent_key, _, leaf = key.rpartition('.')
    parent = _get(other, parent_key) if parent_key else other
    if not sep or parent is _MISSING or not isinstance(parent, ml_collections.ConfigDict) \
        or leaf not in parent:
      raise UserError(f'{item!r} is not an override of an existing field (dotted.key=value, '
                      'such as model.scan_layers=false)')
    try:
      parent[leaf] = _parse_like(text, parent[leaf], key)
    except TypeError:  # a tuple or nested field, which one string cannot set
      raise UserError(f'{item!r}: {key} holds a {type(parent[leaf]).__name__}, which '
                      '--compare cannot set') from None
  return other


def validate(config: ml_collections.ConfigDict, choices: dict | None = None) -> None:
  """Raises ValueError naming the first invalid field and what is allowed.

  Fields a config does not have are skipped; `choices` adds a binary's own enumerations. The
  mesh is checked against this run's devices.
  """
  for field, allowed in {**CHOICES, **(choices or {})}.items():
    value = _get(config, field)
    if value is not _MISSING and value is not None and value not in allowed:
      raise UserError(f'config.{field} must be one of {allowed}, got {value!r}')
  lora.check(config)
  for field in POSITIVE:
    value = _get(config, field)
    if value is not _MISSING and value is not None and not value > 0:
      raise UserError(f'config.{field} must be positive, got {value!r}')
  if 'model' in config and 'num_heads' in config.model:  # not a stage's runtime choices alone
    _validate_model(config)
  if 'vocab_size' in config.get('tokenizer', {}) and not config.tokenizer.get('path'):  # to train
    tokenizer_lib.check_vocab_size(config.tokenizer.vocab_size)
  if config.train.batch_size % config.train.grad_accum_steps:
    raise UserError(f'config.train.batch_size ({config.train.batch_size}) must be divisible by '
                     f'config.train.grad_accum_steps ({config.train.grad_accum_steps})')
  if not 0.0 <= config.train.min_lr_ratio <= 1.0:
    raise UserError(f'config.train.min_lr_ratio must be in [0, 1], got {config.train.min_lr_ratio}')
  present = [field for field in NEEDED_BY_SOURCE.get(config.data.source, ())
             if _get(config, field) is not _MISSING]
  if present and not _get(config, present[0]):
    raise UserError(f'config.{present[0]} must be set when config.data.source is '
                     f'{config.data.source!r}')
  if config.data.get('mixture'):
    mixture.entries(config.data)
  if 'mesh' in config:
    _validate_mesh(config)


def _validate_model(config) -> None:
  m = config.model
  if m.num_heads % m.num_kv_heads:
    raise UserError(f'config.model.num_heads ({m.num_heads}) must be a multiple of '
                     f'config.model.num_kv_heads ({m.num_kv_heads})')
  if m.head_dim % 2:
    raise UserError(f'config.model.head_dim must be even for rotary embeddings, got {m.head_dim}')
  if config.data.seq_len > m.max_seq_len:
    raise UserError(f'config.data.seq_len ({config.data.seq_len}) exceeds '
                     f'config.model.max_seq_len ({m.max_seq_len})')


# Split over the mesh's data and fsdp axes; RL's train batch is its prompts per step.
BATCH_SIZES = ('rollout.prompts_per_step', 'train.batch_size', 'eval.batch_size')


def _validate_mesh(config) -> None:
  mesh = sharding.make_mesh(config.mesh)  # raises on sizes the devices do not divide into
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  for field in BATCH_SIZES:
    value = _get(config, field)
    if value is not _MISSING and value % shards:
      raise UserError(f'config.{field} ({value}) must be divisible by the mesh\'s data x fsdp '
                      f'({shards} devices)')


def save(config: ml_collections.ConfigDict, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index():
    return
  with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
    f.write(config.to_json_best_effort(indent=2))


def load(workdir: str) -> ml_collections.ConfigDict:
  if not os.path.isdir(workdir):
    raise UserError(f'no such directory: {workdir} (a jaxlm workdir was expected)')
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise UserError(f'no config.json in {workdir}: is it a jaxlm workdir?')
  with open(path, encoding='utf-8') as f:
    return ml_collections.ConfigDict(json.load(f))
