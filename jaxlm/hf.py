"""Hugging Face checkpoints in and out: `config.json` to `ModelConfig`, safetensors to jaxlm
parameters (straight onto the mesh) and back.

Each family is a translation of its `config.json` (`_FAMILIES`) and one table of tensors
(`_LAYER_TENSORS`, `_TOP_TENSORS`): the Hugging Face name, the jaxlm path and whether the matrix
is transposed (`nn.Linear` stores [out, in], `nn.Dense` [in, out]). Nothing is permuted: jaxlm's
RoPE rotates split halves, the layout Hugging Face stores, and heads are folded into the
projections in the same order. Every `config.json` field is honoured, listed in `IGNORED_FIELDS`
(it does not change the computation), or rejected by name.
"""

import glob
import json
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from safetensors import safe_open

from jaxlm import model as model_lib
from jaxlm.errors import UserError

# Fields that do not change what the model computes: token ids (the tokenizer's business),
# initialisation, caching, bookkeeping and storage precision (jaxlm's model.param_dtype decides).
IGNORED_FIELDS = frozenset({
    'architectures', 'model_type', 'transformers_version', '_name_or_path', 'torch_dtype',
    'dtype', 'bos_token_id', 'eos_token_id', 'pad_token_id', 'initializer_range', 'use_cache',
    'pretraining_tp', 'output_attentions', 'output_hidden_states', 'return_dict',
    'attn_implementation', 'cache_implementation',
})
# The fields each family's translation reads, and so checks.
_COMMON_FIELDS = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
                  'num_attention_heads', 'num_key_value_heads', 'head_dim',
                  'max_position_embeddings', 'rms_norm_eps', 'tie_word_embeddings',
                  'rope_theta', 'rope_scaling', 'rope_parameters', 'attention_dropout',
                  'attention_bias', 'layer_types')
_QWEN_FIELDS = ('hidden_act', 'use_sliding_window', 'sliding_window', 'max_window_layers')
_FIELDS = {
    'llama': _COMMON_FIELDS + ('hidden_act', 'mlp_bias'),
    'mistral': _COMMON_FIELDS + ('hidden_act', 'sliding_window'),
    'qwen2': _COMMON_FIELDS + _QWEN_FIELDS,
    'qwen3': _COMMON_FIELDS + _QWEN_FIELDS,
    'gemma3_text': _COMMON_FIELDS + (
        'hidden_activation', 'query_pre_attn_scalar', 'sliding_window', 'sliding_window_pattern',
        '_sliding_window_pattern', 'rope_local_base_freq', 'final_logit_softcapping',
        'attn_logit_softcapping', 'use_bidirectional_attention'),
}
ROPE_TYPES = ('default', 'linear', 'llama3')

# (Hugging Face name within `model.layers.{i}.`, jaxlm path within a block, transposed).
_NORMS = (('input_layernorm.weight', 'attention_norm/scale', False),
          ('post_attention_layernorm.weight', 'mlp_norm/scale', False))
_SANDWICH_NORMS = (('input_layernorm.weight', 'attention_norm/scale', False),
                   ('post_attention_layernorm.weight', 'post_attention_norm/scale', False),
                   ('pre_feedforward_layernorm.weight', 'mlp_norm/scale', False),
                   ('post_feedforward_layernorm.weight', 'post_mlp_norm/scale', False))
_PROJECTIONS = (('self_attn.q_proj.weight', 'attention/query/kernel', True),
                ('self_attn.k_proj.weight', 'attention/key/kernel', True),
                ('self_attn.v_proj.weight', 'attention/value/kernel', True),
                ('self_attn.o_proj.weight', 'attention/out/kernel', True),
                ('mlp.gate_proj.weight', 'mlp/gate/kernel', True),
                ('mlp.up_proj.weight', 'mlp/up/kernel', True),
                ('mlp.down_proj.weight', 'mlp/down/kernel', True))
_QKV_BIASES = (('self_attn.q_proj.bias', 'attention/query/bias', False),
               ('self_attn.k_proj.bias', 'attention/key/bias', False),
               ('self_attn.v_proj.bias', 'attention/value/bias', False))
_QK_NORMS = (('self_attn.q_norm.weight', 'attention/query_norm/scale', False),
             ('self_attn.k_norm.weight', 'attention/key_norm/scale', False))
_LAYER_TENSORS = {
    'llama': _NORMS + _PROJECTIONS,
    'mistral': _NORMS + _PROJECTIONS,
    'qwen2': _NORMS + _PROJECTIONS + _QKV_BIASES,
    'qwen3': _NORMS + _PROJECTIONS + _QK_NORMS,
    'gemma3_text': _SANDWICH_NORMS + _PROJECTIONS + _QK_NORMS,
}
_TOP_TENSORS = (('model.embed_tokens.weight', 'embed/embedding', False),
                ('model.norm.weight', 'final_norm/scale', False),
                ('lm_head.weight', 'unembed/kernel', True))  # absent when tied
# Tensors some checkpoints carry that hold nothing to load (a cached RoPE table).
_SKIPPED_SUFFIXES = ('rotary_emb.inv_freq',)
SUPPORTED_FAMILIES = tuple(_LAYER_TENSORS)
assert set(_FIELDS) == set(_LAYER_TENSORS)


def _require(hf: dict, field: str, allowed, what: str) -> None:
  if hf.get(field, allowed[0]) not in allowed:
    raise UserError(f'config.json: {field}={hf[field]!r} is not supported by jaxlm '
                    f'(allowed: {what})')


def _rope(hf: dict, layer_type: str) -> dict[str, Any]:
  """ModelConfig's RoPE fields from `rope_parameters` (transformers 5) or the older
  `rope_theta` and `rope_scaling`."""
  params = hf.get('rope_parameters')
  if isinstance(params, dict) and layer_type in params:  # one entry per layer type
    params = params[layer_type]
  if not params:  # Gemma 3's local layers: their own base, never scaled
    if layer_type == 'sliding_attention':
      params = {'rope_theta': hf.get('rope_local_base_freq', 10_000.0)}
    else:
      params = {**(hf.get('rope_scaling') or {}), 'rope_theta': hf.get('rope_theta', 10_000.0)}
  kind = params.get('rope_type', params.get('type', 'default'))
  if kind not in ROPE_TYPES:
    raise UserError(f'config.json: rope type {kind!r} is not supported by jaxlm (supported: '
                    f'{", ".join(ROPE_TYPES)})')
  rope = {'rope_theta': float(params['rope_theta']),
          'rope_scaling': 'none' if kind == 'default' else kind,
          'rope_scaling_factor': float(params.get('factor', 1.0))}
  if kind == 'llama3':
    rope.update(rope_low_freq_factor=float(params['low_freq_factor']),
                rope_high_freq_factor=float(params['high_freq_factor']),
                rope_original_max_len=int(params['original_max_position_embeddings']))
  return rope


def _layer_types(hf: dict, num_layers: int) -> list[str]:
  if hf.get('layer_types'):
    types = list(hf['layer_types'])
  elif hf.get('sliding_window_pattern'):  # Gemma 3 before layer_types: every n-th is global
    n = hf['sliding_window_pattern']
    types = ['full_attention' if (i + 1) % n == 0 else 'sliding_attention'
             for i in range(num_layers)]
  else:
    types = ['full_attention'] * num_layers
  unknown = set(types) - {'full_attention', 'sliding_attention'}
  if unknown or len(types) != num_layers:
    raise UserError(f'config.json: layer_types must list full_attention or sliding_attention '
                    f'for each of the {num_layers} layers, got {types}')
  return types


def _common(hf: dict) -> dict[str, Any]:
  heads = hf['num_attention_heads']
  return dict(
      vocab_size=hf['vocab_size'], d_model=hf['hidden_size'], mlp_dim=hf['intermediate_size'],
      num_layers=hf['num_hidden_layers'], num_heads=heads,
      num_kv_heads=hf.get('num_key_value_heads') or heads,
      head_dim=hf.get('head_dim') or hf['hidden_size'] // heads,
      max_seq_len=hf.get('max_position_embeddings', 2048),
      norm_eps=hf.get('rms_norm_eps', 1e-6),
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)))


def _llama_like(hf: dict, family: str) -> dict[str, Any]:
  _require(hf, 'hidden_act', ('silu',), 'silu')
  _require(hf, 'mlp_bias', (False,), 'false')
  _require(hf, 'attention_dropout', (0.0, 0), '0.0: jaxlm has no attention dropout')
  if family != 'qwen2':  # Llama's attention_bias also puts a bias on the output projection
    _require(hf, 'attention_bias', (False,), 'false')
  if family in ('qwen2', 'qwen3'):
    _require(hf, 'use_sliding_window', (False,), 'false')
  fields = {**_common(hf), **_rope(hf, 'full_attention'), 'qkv_bias': family == 'qwen2',
            'qk_norm': family == 'qwen3'}
  if family == 'mistral' and hf.get('sliding_window'):
    fields.update(layer_types=('local',) * fields['num_layers'],
                  sliding_window=int(hf['sliding_window']))
  elif any(t != 'full_attention' for t in _layer_types(hf, fields['num_layers'])):
    raise UserError(f'config.json: {family} with sliding_attention layers is not supported')
  return fields


def _gemma3(hf: dict) -> dict[str, Any]:
  _require(hf, 'hidden_activation', ('gelu_pytorch_tanh',), 'gelu_pytorch_tanh')
  _require(hf, 'attention_bias', (False,), 'false')
  _require(hf, 'attention_dropout', (0.0, 0), '0.0: jaxlm has no attention dropout')
  _require(hf, 'final_logit_softcapping', (None,), 'null')
  _require(hf, 'attn_logit_softcapping', (None,), 'null')
  _require(hf, 'use_bidirectional_attention', (False,), 'false')
  fields = {**_common(hf), **_rope(hf, 'full_attention')}
  local_rope = _rope(hf, 'sliding_attention')
  if local_rope['rope_scaling'] != 'none':
    raise UserError('config.json: RoPE scaling on sliding-attention layers is not supported')
  types = _layer_types(hf, fields['num_layers'])
  fields.update(
      qk_norm=True, norm_zero_centered=True, post_norms=True, embed_scale=True,
      mlp_activation='gelu_tanh', query_scale=float(hf['query_pre_attn_scalar']) ** -0.5,
      layer_types=tuple('local' if t == 'sliding_attention' else 'global' for t in types),
      sliding_window=int(hf['sliding_window']), local_rope_theta=local_rope['rope_theta'])
  return fields


_FAMILIES = {
    'llama': lambda hf: _llama_like(hf, 'llama'),
    'mistral': lambda hf: _llama_like(hf, 'mistral'),
    'qwen2': lambda hf: _llama_like(hf, 'qwen2'),
    'qwen3': lambda hf: _llama_like(hf, 'qwen3'),
    'gemma3_text': _gemma3,
}


def read_config(directory: str) -> dict:
  path = os.path.join(directory, 'config.json')
  if not os.path.exists(path):
    raise UserError(f'{directory} is not a Hugging Face checkpoint: no config.json')
  with open(path, encoding='utf-8') as f:
    try:
      return json.load(f)
    except ValueError as e:
      raise UserError(f'{path}: not valid JSON ({e})') from e


def model_fields(hf: dict) -> dict[str, Any]:
  """`ModelConfig` fields (including `vocab_size`) for a Hugging Face `config.json`."""
  family = hf.get('model_type')
  if family not in _FAMILIES:
    raise UserError(f'config.json: model_type {family!r} is not supported; supported: '
                    f'{", ".join(SUPPORTED_FAMILIES)}')
  unknown = sorted(set(hf) - IGNORED_FIELDS - set(_FIELDS[family]))
  if unknown:
    raise UserError(f'config.json: field {unknown[0]!r} is not understood by jaxlm\'s {family} '
                    f'import, so the model could compute something else (read: '
                    f'{", ".join(_FIELDS[family])}; ignored: jaxlm.hf.IGNORED_FIELDS)')
  try:
    return _FAMILIES[family](hf)
  except KeyError as e:
    raise UserError(f'config.json: {family} needs the field {e.args[0]!r}') from e


def model_config(hf: dict) -> model_lib.ModelConfig:
  fields = model_fields(hf)
  return model_lib.ModelConfig(**fields)


class Checkpoint:
  """The tensors of a checkpoint directory (one safetensors file, or shards with an index),
  read lazily: a slice read touches only its bytes."""

  def __init__(self, directory: str):
    self.directory = directory
    index = os.path.join(directory, 'model.safetensors.index.json')
    if os.path.exists(index):
      with open(index, encoding='utf-8') as f:
        self.files = json.load(f)['weight_map']
      for name, file in self.files.items():
        if not os.path.exists(os.path.join(directory, file)):
          raise UserError(f'{directory}: shard {file} (holding {name}, by '
                          f'model.safetensors.index.json) is missing')
    else:
      paths = sorted(glob.glob(os.path.join(directory, '*.safetensors')))
      if not paths:
        raise UserError(f'{directory}: no *.safetensors files')
      self.files = {}
      for path in paths:
        with safe_open(path, 'np') as f:
          self.files.update({name: os.path.basename(path) for name in f.keys()})
    self._handles = {}

  def _slice(self, name: str):
    file = self.files[name]
    if file not in self._handles:
      self._handles[file] = safe_open(os.path.join(self.directory, file), 'np')
    return self._handles[file].get_slice(name)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._slice(name).get_shape())

  def read(self, name: str, index: tuple = ()) -> np.ndarray:
    return np.asarray(self._slice(name)[index] if index else self._slice(name)[:])


def _tensor_table(family: str, config: model_lib.ModelConfig):
  """{jaxlm path: (Hugging Face name, or a name pattern with {i} for stacked layers,
  transposed)} for this model's parameters."""
  table = {}
  for hf_name, path, transposed in _TOP_TENSORS:
    if not (config.tie_embeddings and path == 'unembed/kernel'):
      table[path] = (hf_name, transposed)
  for hf_name, path, transposed in _LAYER_TENSORS[family]:
    if config.scan_layers:
      table[f'layers/{path}'] = (f'model.layers.{{i}}.{hf_name}', transposed)
    else:
      for i in range(config.num_layers):
        table[f'layer_{i}/{path}'] = (f'model.layers.{i}.{hf_name}', transposed)
  return table


def _path(key_path) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in key_path)


def load_params(directory: str, family: str, config: model_lib.ModelConfig, abstract_params):
  """Parameters shaped, typed and sharded as `abstract_params` (ShapeDtypeStructs carrying
  shardings) from the checkpoint in `directory`. Each process reads only the slices its devices
  hold, so no host ever holds the whole model."""
  checkpoint = Checkpoint(directory)
  table = _tensor_table(family, config)
  used = set()

  def build(key_path, like):
    path = _path(key_path)
    if path not in table:
      raise AssertionError(f'no Hugging Face tensor maps to {path}')
    pattern, transposed = table[path]
    stacked = '{i}' in pattern
    names = ([pattern.format(i=i) for i in range(config.num_layers)] if stacked else [pattern])
    shape = like.shape[1:] if stacked else like.shape
    for name in names:
      if name not in checkpoint.files:
        raise UserError(f'{directory}: tensor {name} is missing from the checkpoint')
      have = checkpoint.shape(name)
      want = shape[::-1] if transposed else shape
      if have != tuple(want):
        raise UserError(f'{directory}: tensor {name} has shape {list(have)}, the config.json '
                        f'makes it {list(want)}')
      used.add(name)

    def read(name, index):
      if transposed:
        return checkpoint.read(name, tuple(index[::-1])).T
      return checkpoint.read(name, tuple(index))

    def callback(index):
      if stacked:
        layers = range(config.num_layers)[index[0]]
        part = np.stack([read(names[i], index[1:]) for i in layers])
      else:
        part = read(names[0], index)
      return part.astype(like.dtype, copy=False)

    return jax.make_array_from_callback(like.shape, like.sharding, callback)

  params = jax.tree_util.tree_map_with_path(build, abstract_params)
  leftover = sorted(n for n in set(checkpoint.files) - used
                    if not n.endswith(_SKIPPED_SUFFIXES)
                    and not (n == 'lm_head.weight' and config.tie_embeddings))
  if leftover:
    raise UserError(f'{directory}: tensor {leftover[0]} has no place in jaxlm\'s {family} '
                    f'model ({len(leftover)} such tensors)')
  return params


def _host(array) -> np.ndarray:
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


SEQUENCE_CLASSIFIERS = {'llama': 'LlamaForSequenceClassification',
                        'mistral': 'MistralForSequenceClassification',
                        'qwen2': 'Qwen2ForSequenceClassification',
                        'qwen3': 'Qwen3ForSequenceClassification',
                        'gemma3_text': 'Gemma3TextForSequenceClassification'}


def export(directory: str, params, family: str, config: model_lib.ModelConfig, hf_config: dict,
           max_shard_bytes: int = 2 << 30, score_head=None) -> None:
  """Writes `config.json` and safetensors shards (with an index when there are several).
  Embedding rows past `config.tokenizer_vocab_size` (jaxlm's sharding padding) are dropped.

  With `score_head` (a reward model's head params, `params` its backbone) the checkpoint is a
  `*ForSequenceClassification` model: `score.weight` instead of the language-model head, and
  the head's bias (a constant that shifts every reward alike) as `jaxlm_score_bias`.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  vocab = config.tokenizer_vocab_size or config.vocab_size
  table = _tensor_table(family, config)
  if score_head is not None:
    table.pop('unembed/kernel', None)
    params = {**params, 'score': score_head['kernel']}
    table['score'] = ('score.weight', True)
    hf_config = {**hf_config, 'architectures': [SEQUENCE_CLASSIFIERS[family]], 'num_labels': 1,
                 'id2label': {'0': 'LABEL_0'}, 'label2id': {'LABEL_0': 0},
                 'jaxlm_score_bias': float(np.asarray(_host(score_head['bias']))[0])}
  flat = {_path(k): v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  main = jax.process_index() == 0
  shards, current, current_bytes = [], {}, 0

  def add(name, array):
    nonlocal current, current_bytes
    if current and current_bytes + array.nbytes > max_shard_bytes:
      shards.append(current)
      current, current_bytes = {}, 0
    current[name] = np.ascontiguousarray(array)
    current_bytes += array.nbytes

  for path, (pattern, transposed) in table.items():
    array = _host(flat[path])  # every process takes part in the gather
    if not main:
      continue
    if path in ('embed/embedding', 'unembed/kernel'):
      array = array[:vocab] if path == 'embed/embedding' else array[:, :vocab]
    if '{i}' in pattern:
      for i in range(config.num_layers):
        add(pattern.format(i=i), array[i].T if transposed else array[i])
    else:
      add(pattern, array.T if transposed else array)
  if not main:
    return
  shards.append(current)
  os.makedirs(directory, exist_ok=True)
  names = (['model.safetensors'] if len(shards) == 1 else
           [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))])
  for name, shard in zip(names, shards):
    save_file(shard, os.path.join(directory, name), metadata={'format': 'pt'})
  if len(shards) > 1:
    weight_map = {tensor: name for name, shard in zip(names, shards) for tensor in shard}
    total = sum(a.nbytes for shard in shards for a in shard.values())
    with open(os.path.join(directory, 'model.safetensors.index.json'), 'w',
              encoding='utf-8') as f:
      json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
  with open(os.path.join(directory, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump({**hf_config, 'vocab_size': vocab}, f, indent=2)


def export_peft(directory: str, adapters: dict, family: str, config: model_lib.ModelConfig,
                lora_config, base_model: str = '') -> None:
  """Writes LoRA adapters (`jaxlm.lora.adapter_pairs` of a model's params) in the PEFT layout:
  `adapter_config.json` and `adapter_model.safetensors`, which `peft.PeftModel.from_pretrained`
  loads onto the base model (`base_model`: its hub name or directory). PEFT stores A as
  [rank, in] and B as [out, rank] and scales B @ A by lora_alpha / r, as jaxlm does."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  table = _tensor_table(family, config)
  tensors, modules = {}, set()
  for path, (a, b) in adapters.items():
    pattern, transposed = table[path]
    assert transposed and pattern.endswith('.weight'), path  # projections are stored [out, in]
    a, b = _host(a), _host(b)
    stem = 'base_model.model.' + pattern[:-len('.weight')]
    layers = range(config.num_layers) if '{i}' in pattern else [None]
    for i in layers:
      name = stem.format(i=i)
      tensors[f'{name}.lora_A.weight'] = np.ascontiguousarray((a if i is None else a[i]).T)
      tensors[f'{name}.lora_B.weight'] = np.ascontiguousarray((b if i is None else b[i]).T)
    modules.add(pattern.split('.')[-2])
  if jax.process_index():
    return
  os.makedirs(directory, exist_ok=True)
  save_file(tensors, os.path.join(directory, 'adapter_model.safetensors'),
            metadata={'format': 'pt'})
  adapter_config = {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'base_model_name_or_path': base_model,
      'r': lora_config.rank, 'lora_alpha': lora_config.alpha,
      'lora_dropout': lora_config.dropout, 'target_modules': sorted(modules), 'bias': 'none',
      'fan_in_fan_out': False, 'inference_mode': True, 'use_rslora': False,
      'modules_to_save': None}
  with open(os.path.join(directory, 'adapter_config.json'), 'w', encoding='utf-8') as f:
    json.dump(adapter_config, f, indent=2)


def llama_config(config: model_lib.ModelConfig, tokenizer) -> dict:
  """A Llama `config.json` for a model jaxlm trained from scratch (its default switches)."""
  changed = [f for f in ('qkv_bias', 'qk_norm', 'norm_zero_centered', 'post_norms',
                         'embed_scale', 'layer_types')
             if getattr(config, f) != getattr(model_lib.ModelConfig(vocab_size=1), f)]
  if changed or config.mlp_activation != 'silu' or config.rope_scaling != 'none':
    raise UserError(f'only jaxlm\'s default architecture exports as Llama; this model sets '
                    f'{changed or ["mlp_activation/rope_scaling"]}')
  return {
      'architectures': ['LlamaForCausalLM'], 'model_type': 'llama',
      'vocab_size': config.tokenizer_vocab_size or config.vocab_size,
      'hidden_size': config.d_model, 'intermediate_size': config.mlp_dim,
      'num_hidden_layers': config.num_layers, 'num_attention_heads': config.num_heads,
      'num_key_value_heads': config.num_kv_heads, 'head_dim': config.head_dim,
      'max_position_embeddings': config.max_seq_len, 'rms_norm_eps': config.norm_eps,
      'rope_theta': config.rope_theta, 'tie_word_embeddings': config.tie_embeddings,
      'hidden_act': 'silu', 'attention_bias': False, 'mlp_bias': False,
      'bos_token_id': tokenizer.bos_id, 'eos_token_id': tokenizer.eos_id,
      'pad_token_id': tokenizer.pad_id, 'torch_dtype': 'float32',
  }


def resolve(name_or_path: str) -> str:
  """A local checkpoint directory as is; otherwise a hub name, downloaded (needs network)."""
  if os.path.isdir(name_or_path):
    return name_or_path
  if name_or_path.startswith(('/', '.', '~')) or name_or_path.count('/') != 1:
    raise UserError(f'config.init_hf: no such directory {name_or_path} (a hub name is '
                    'owner/name)')
  from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top
  try:
    return snapshot_download(name_or_path, allow_patterns=[
        '*.json', '*.safetensors', 'tokenizer.model', '*.txt', '*.jinja'])
  except Exception as e:  # the hub's errors: no network, no such repo, gated
    raise UserError(f'config.init_hf: {name_or_path!r} is not a local directory and could not '
                    f'be fetched from the Hugging Face hub ({type(e).__name__}: {e})') from e
