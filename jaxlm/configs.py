"""Checks a config before anything runs, so a bad value fails in seconds with the field named."""

import json
import os

import ml_collections

from jaxlm import model as model_lib
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.data import pipeline
from jaxlm.data import tfds_builders

CHOICES = {
    'model.remat': tuple(model_lib.REMAT_POLICIES),
    'model.dtype': tuple(model_lib.DTYPES),
    'model.param_dtype': tuple(model_lib.DTYPES),
    'model.attention_impl': model_lib.ATTENTION_IMPLEMENTATIONS,
    'tokenizer.type': tokenizer_lib.MODEL_TYPES,
    'data.source': pipeline.SOURCES,
    'data.split_by': tfds_builders.SPLIT_BY,
}
POSITIVE = ('model.d_model', 'model.num_layers', 'model.num_heads', 'model.num_kv_heads',
            'model.head_dim', 'model.mlp_dim', 'model.max_seq_len', 'model.vocab_multiple',
            'tokenizer.vocab_size', 'data.seq_len', 'train.steps', 'train.batch_size',
            'train.grad_accum_steps', 'train.learning_rate', 'eval.batch_size',
            'checkpoint.every', 'checkpoint.keep', 'log_every')


def _get(config, dotted: str):
  for part in dotted.split('.'):
    config = config[part]
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first invalid field and what is allowed."""
  for field, allowed in CHOICES.items():
    if _get(config, field) not in allowed:
      raise ValueError(f'config.{field} must be one of {allowed}, got {_get(config, field)!r}')
  for field in POSITIVE:
    if not _get(config, field) > 0:
      raise ValueError(f'config.{field} must be positive, got {_get(config, field)!r}')
  m = config.model
  if m.num_heads % m.num_kv_heads:
    raise ValueError(f'config.model.num_heads ({m.num_heads}) must be a multiple of '
                     f'config.model.num_kv_heads ({m.num_kv_heads})')
  if m.head_dim % 2:
    raise ValueError(f'config.model.head_dim must be even for rotary embeddings, got {m.head_dim}')
  if config.data.seq_len > m.max_seq_len:
    raise ValueError(f'config.data.seq_len ({config.data.seq_len}) exceeds '
                     f'config.model.max_seq_len ({m.max_seq_len})')
  if config.train.batch_size % config.train.grad_accum_steps:
    raise ValueError(f'config.train.batch_size ({config.train.batch_size}) must be divisible by '
                     f'config.train.grad_accum_steps ({config.train.grad_accum_steps})')
  if not 0.0 <= config.train.min_lr_ratio <= 1.0:
    raise ValueError(f'config.train.min_lr_ratio must be in [0, 1], got {config.train.min_lr_ratio}')
  if config.data.source == 'text' and not config.data.text_glob:
    raise ValueError('config.data.text_glob must be set when config.data.source is "text"')
  if config.data.source == 'tfds' and not config.data.tfds_name:
    raise ValueError('config.data.tfds_name must be set when config.data.source is "tfds"')


def save(config: ml_collections.ConfigDict, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
    f.write(config.to_json_best_effort(indent=2))


def load(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'no config.json in {workdir}: is it a jaxlm workdir?')
  with open(path, encoding='utf-8') as f:
    return ml_collections.ConfigDict(json.load(f))
