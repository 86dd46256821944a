"""Hugging Face import and export against references computed by transformers + torch.

The fixtures (`tests/fixtures/hf/<family>/`) are tiny random checkpoints with their logits,
greedy continuations and tokenizations, written by `tests/fixtures/make_hf_fixtures.py`.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxlm import chat
from jaxlm import hf
from jaxlm import lm
from jaxlm import model as model_lib
from jaxlm import sampling
from jaxlm import sharding
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.errors import UserError

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'hf')
FAMILIES = ('llama', 'mistral', 'qwen2', 'qwen3', 'gemma3', 'smollm')
# The conversation make_hf_fixtures.py rendered.
CONVERSATION = [
    {'role': 'system', 'content': 'You are a terse assistant. Answer in one line.'},
    {'role': 'user', 'content': 'What is π to 5 places, and where is Zürich?'},
    {'role': 'assistant', 'content': 'π ≈ 3.14159; Zürich is in Switzerland.'},
    {'role': 'user', 'content': 'Add 1234 and 8766, then say thanks in Chinese.'},
    {'role': 'assistant', 'content': '1234 + 8766 = 10000. 谢谢! 🙂'},
]


def _mesh(**axes):
  return sharding.make_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1,
                                                       **axes}))


def _load(directory, mesh=None, **overrides):
  hf_config = hf.read_config(directory)
  config = dataclasses.replace(hf.model_config(hf_config), **overrides)
  model = model_lib.Transformer(config)
  mesh = mesh or _mesh()
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    params = hf.load_params(directory, hf_config['model_type'], config,
                            lm.abstract_params(model, mesh))
  return model, params, mesh


def _logits(model, params, mesh, tokens):
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    return np.asarray(jax.jit(lambda p, t: model.apply({'params': p}, t)[0])(
        params, jnp.asarray(tokens)))


def _log_softmax64(logits):
  logits = logits.astype(np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def assert_logits_match(logits, reference):
  """Per-token KL(HF || jaxlm) < 1e-6 and max |logit difference| < 1e-4: float32 rounding
  over a few layers stays near 1e-5; a misplaced tensor or switch is off by far more."""
  p, q = _log_softmax64(reference), _log_softmax64(logits)
  kl = np.sum(np.exp(p) * (p - q), axis=-1)
  assert kl.max() < 1e-6, f'max per-token KL {kl.max():.3g}'
  np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-4)


def _reference(family):
  return np.load(os.path.join(FIXTURES, family, 'reference.npz'))


@pytest.mark.parametrize('scan_layers', [True, False])
@pytest.mark.parametrize('family', FAMILIES)
def test_logits_match_transformers(family, scan_layers):
  model, params, mesh = _load(os.path.join(FIXTURES, family), scan_layers=scan_layers)
  reference = _reference(family)
  assert_logits_match(_logits(model, params, mesh, reference['input_ids']), reference['logits'])


@pytest.mark.parametrize('family, switch', [
    ('llama', {'rope_scaling': 'none'}),
    ('mistral', {'sliding_window': 64}),
    ('gemma3', {'query_scale': 0.0}),
    ('gemma3', {'embed_scale': False}),
    ('gemma3', {'local_rope_theta': 0.0}),
    ('gemma3', {'layer_types': ('global',) * 4}),
])
def test_each_switch_matters_on_the_fixtures(family, switch):
  """The parity test can fail: each switch, set wrong, moves the logits well past tolerance."""
  model, params, mesh = _load(os.path.join(FIXTURES, family), **switch)
  reference = _reference(family)
  logits = _logits(model, params, mesh, reference['input_ids'])
  assert np.abs(logits - reference['logits']).max() > 1e-2


def test_rope_is_split_halves_not_interleaved():
  """Pairing adjacent dimensions (the interleaved layout) instead of halves breaks parity: the
  loader's transposes and reshapes alone put HF's layout where jaxlm's RoPE expects it."""
  directory = os.path.join(FIXTURES, 'llama')
  model, params, mesh = _load(directory)
  config = model.config
  interleave = np.concatenate([np.arange(0, config.head_dim, 2), np.arange(1, config.head_dim, 2)])

  def permute(kernel, heads):
    shape = kernel.shape
    kernel = np.asarray(kernel).reshape(*shape[:-1], heads, config.head_dim)
    return jnp.asarray(kernel[..., interleave].reshape(shape))
  attention = params['layers']['attention']
  attention['query']['kernel'] = permute(attention['query']['kernel'], config.num_heads)
  attention['key']['kernel'] = permute(attention['key']['kernel'], config.num_kv_heads)
  reference = _reference('llama')
  logits = _logits(model, params, mesh, reference['input_ids'])
  assert np.abs(logits - reference['logits']).max() > 1e-2


def _legacy(hf_config):
  """transformers-4-style RoPE fields (as released checkpoints have them)."""
  legacy = {k: v for k, v in hf_config.items() if k != 'rope_parameters'}
  params = hf_config['rope_parameters']
  if 'full_attention' in params:
    legacy['rope_local_base_freq'] = params['sliding_attention']['rope_theta']
    params = params['full_attention']
  legacy['rope_theta'] = params['rope_theta']
  if params['rope_type'] != 'default':
    legacy['rope_scaling'] = {k: v for k, v in params.items() if k != 'rope_theta'}
  return legacy


@pytest.mark.parametrize('family', FAMILIES)
def test_legacy_rope_fields_translate_the_same(family):
  hf_config = hf.read_config(os.path.join(FIXTURES, family))
  assert hf.model_config(_legacy(hf_config)) == hf.model_config(hf_config)


def test_gemma3_sliding_window_pattern_gives_its_layer_types():
  hf_config = _legacy(hf.read_config(os.path.join(FIXTURES, 'gemma3')))
  hf_config.pop('layer_types')
  hf_config['sliding_window_pattern'] = 3
  assert hf.model_config(hf_config).layer_types == ('local', 'local', 'global', 'local')


@pytest.mark.parametrize('family', FAMILIES)
def test_greedy_decoding_matches_transformers_generate(family):
  model, params, mesh = _load(os.path.join(FIXTURES, family))
  reference = _reference(family)
  prompt, expected = reference['generate_prompt'], reference['generate_output']
  new_tokens = expected.shape[1] - prompt.shape[1]
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    tokens, _ = sampling.generate(model, params, jnp.asarray(prompt),
                                  jnp.asarray([prompt.shape[1]]), jax.random.PRNGKey(0),
                                  max_new_tokens=new_tokens, temperature=0.0)
  np.testing.assert_array_equal(np.asarray(tokens), expected)


@pytest.mark.parametrize('family', FAMILIES)
def test_tokenizer_matches_the_checkpoint(family):
  tokenizer = tokenizer_lib.load(os.path.join(FIXTURES, family))
  reference = _reference(family)
  text = str(reference['text'])
  assert tokenizer.encode(text) == reference['text_ids'].tolist()
  assert tokenizer.decode(reference['text_ids']) == str(reference['decoded']) == text


@pytest.mark.parametrize('family', FAMILIES)
def test_chat_template_tokens_and_assistant_mask(family):
  tokenizer = tokenizer_lib.load(os.path.join(FIXTURES, family))
  reference = _reference(family)
  tokens, mask = chat.encode(tokenizer, CONVERSATION)
  assert tokens.tolist() == reference['chat_ids'].tolist()
  prompt, _ = chat.encode(tokenizer, CONVERSATION[:-1], add_generation_prompt=True)
  assert prompt.tolist() == reference['prompt_ids'].tolist()
  # Token by token: the trained tokens are each reply and the end-of-turn token after it.
  end_of_turn = chat.end_of_turn_id(tokenizer)
  runs, current = [], []
  for token, trained in zip(tokens.tolist(), mask.tolist()):
    if trained:
      current.append(token)
    elif current:
      runs.append(current)
      current = []
  runs += [current] if current else []
  replies = [m['content'] for m in CONVERSATION if m['role'] == 'assistant']
  assert len(runs) == len(replies)
  for run, reply in zip(runs, replies):
    assert run[-1] == end_of_turn and end_of_turn not in run[:-1]
    assert tokenizer.decode(run[:-1]).strip() == reply
  assert tokenizer.hf.convert_ids_to_tokens(end_of_turn) in {
      'llama': '<|eot_id|>', 'smollm': '<|eot_id|>', 'qwen2': '<|im_end|>',
      'qwen3': '<|im_end|>', 'gemma3': '<end_of_turn>', 'mistral': '</s>'}[family]


@pytest.mark.parametrize('family', ['llama', 'gemma3'])
def test_token_bytes_add_up_to_the_text(family):
  """Bits per byte: the bytes of a text's tokens sum to its UTF-8 length."""
  tokenizer = tokenizer_lib.load(os.path.join(FIXTURES, family))
  text = str(_reference(family)['text'])
  assert tokenizer.token_bytes()[tokenizer.encode(text)].sum() == len(text.encode('utf-8'))


def test_fsdp_tensor_parallel_load_equals_unsharded():
  directory = os.path.join(FIXTURES, 'qwen3')
  _, single, _ = _load(directory, mesh=sharding.make_mesh(
      ml_collections.ConfigDict({'data': 1, 'fsdp': 1, 'tensor': 1, 'num_devices': 1})))
  _, sharded, _ = _load(directory, mesh=_mesh(data=1, fsdp=4, tensor=2))
  kernel = sharded['layers']['attention']['query']['kernel']
  assert len({str(s.index) for s in kernel.addressable_shards}) == 8  # really split 8 ways
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               single, sharded)


def test_bfloat16_checkpoint_loads_its_values(tmp_path):
  source = os.path.join(FIXTURES, 'smollm')
  shutil.copytree(source, tmp_path, dirs_exist_ok=True)
  tensors = load_file(os.path.join(source, 'model.safetensors'))
  save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()},
            os.path.join(tmp_path, 'model.safetensors'))
  _, params, _ = _load(str(tmp_path))
  expected = tensors['model.layers.1.mlp.up_proj.weight'].astype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(np.asarray(params['layers']['mlp']['up']['kernel'][1]),
                                expected.astype(np.float32).T)


@pytest.mark.parametrize('family', FAMILIES)
def test_export_writes_back_the_checkpoint(family, tmp_path):
  """Import then export gives the very tensors and config transformers made."""
  directory = os.path.join(FIXTURES, family)
  model, params, _ = _load(directory)
  hf_config = hf.read_config(directory)
  hf.export(str(tmp_path), params, hf_config['model_type'], model.config, hf_config,
            max_shard_bytes=200_000)
  written = {}
  for name in os.listdir(tmp_path):
    if name.endswith('.safetensors'):
      written.update(load_file(os.path.join(tmp_path, name)))
  original = {}
  for name in set(hf.Checkpoint(directory).files.values()):
    original.update(load_file(os.path.join(directory, name)))
  if hf_config.get('tie_word_embeddings'):
    original.pop('lm_head.weight', None)
  assert written.keys() == original.keys()
  for name, tensor in original.items():
    np.testing.assert_array_equal(written[name], tensor, err_msg=name)
  assert hf.read_config(str(tmp_path)) == hf_config
  if len([n for n in os.listdir(tmp_path) if n.endswith('.safetensors')]) > 1:
    assert hf.Checkpoint(str(tmp_path)).files.keys() == written.keys()


def _broken_copy(tmp_path, family='qwen2'):
  shutil.copytree(os.path.join(FIXTURES, family), tmp_path, dirs_exist_ok=True)
  return str(tmp_path)


def _edit_config(directory, **changes):
  path = os.path.join(directory, 'config.json')
  with open(path, encoding='utf-8') as f:
    config = json.load(f)
  config.update(changes)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump({k: v for k, v in config.items() if v != 'DELETE'}, f)


@pytest.mark.parametrize('changes, message', [
    ({'model_type': 'gpt_neox'}, "model_type 'gpt_neox' is not supported; supported: llama, "),
    ({'quantization_config': {'quant_method': 'gptq'}}, "field 'quantization_config' is not"),
    ({'rope_parameters': {'rope_type': 'yarn', 'rope_theta': 1e4, 'factor': 4.0}},
     "rope type 'yarn' is not supported"),
    ({'hidden_act': 'relu'}, "hidden_act='relu' is not supported"),
    ({'use_sliding_window': True}, 'use_sliding_window=True is not supported'),
    ({'hidden_size': 'DELETE'}, "needs the field 'hidden_size'"),
])
def test_unsupported_configs_are_named(tmp_path, changes, message):
  directory = _broken_copy(tmp_path)
  _edit_config(directory, **changes)
  with pytest.raises(UserError, match=message.replace('(', r'\(').replace('[', r'\[')):
    hf.model_config(hf.read_config(directory))


def test_missing_tensor_shard_and_wrong_shape_are_named(tmp_path):
  directory = _broken_copy(tmp_path / 'missing')
  tensors = load_file(os.path.join(directory, 'model.safetensors'))
  del tensors['model.layers.1.self_attn.k_proj.bias']
  save_file(tensors, os.path.join(directory, 'model.safetensors'))
  with pytest.raises(UserError, match='tensor model.layers.1.self_attn.k_proj.bias is missing'):
    _load(directory)

  directory = _broken_copy(tmp_path / 'shape')
  _edit_config(directory, intermediate_size=96)
  with pytest.raises(UserError, match=r'tensor model.layers.0.mlp.(gate|down)_proj.weight has '
                                      r'shape \[(128, 64|64, 128)\], the config.json makes it '
                                      r'\[(96, 64|64, 96)\]'):
    _load(directory)

  directory = _broken_copy(tmp_path / 'shard', 'llama')
  shard = json.load(open(os.path.join(directory, 'model.safetensors.index.json'),
                         encoding='utf-8'))['weight_map']['model.norm.weight']
  os.remove(os.path.join(directory, shard))
  with pytest.raises(UserError, match=f'shard {shard} .* is missing'):
    _load(directory)

  directory = _broken_copy(tmp_path / 'extra', 'mistral')
  tensors = load_file(os.path.join(directory, 'model.safetensors'))
  tensors['model.layers.0.self_attn.o_proj.bias'] = np.zeros(64, np.float32)
  save_file(tensors, os.path.join(directory, 'model.safetensors'))
  with pytest.raises(UserError, match='o_proj.bias has no place'):
    _load(directory)


def test_tokenizer_larger_than_the_embedding_is_named():
  config = ml_collections.ConfigDict({'model': {'vocab_size': 100}})
  tokenizer = tokenizer_lib.load(os.path.join(FIXTURES, 'qwen2'))
  with pytest.raises(UserError, match=f'tokenizer has {tokenizer.vocab_size} ids but the '
                                      "model's embedding only 100"):
    lm.model_config(config, tokenizer)


def test_sft_binary_reports_an_unsupported_model_in_one_line(tmp_path):
  directory = _broken_copy(tmp_path / 'model')
  _edit_config(directory, model_type='falcon')
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.sft', f'--workdir={tmp_path / "run"}',
       f'--config.init_hf={directory}'], capture_output=True, text=True, timeout=300,
      cwd=os.path.dirname(os.path.dirname(__file__)))
  assert result.returncode == 2
  assert 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      "error: config.json: model_type 'falcon' is not supported; supported: llama, mistral, "
      'qwen2, qwen3, gemma3_text')


@pytest.mark.parametrize('family', FAMILIES)
def test_live_transformers_parity_after_export(family, tmp_path):
  """With torch installed (`pip install -e '.[hf-parity]'`): transformers' own model, on a fresh
  prompt, against jaxlm's; and jaxlm's export reloaded by transformers."""
  torch = pytest.importorskip('torch')
  import transformers  # pylint: disable=g-import-not-at-top
  directory = os.path.join(FIXTURES, family)
  model, params, mesh = _load(directory)
  hf_config = hf.read_config(directory)
  hf.export(str(tmp_path), params, hf_config['model_type'], model.config, hf_config)
  tokens = np.random.default_rng(1).integers(0, model.config.vocab_size, (2, 300))
  logits = _logits(model, params, mesh, tokens)
  for source in (directory, str(tmp_path)):
    reference_model = transformers.AutoModelForCausalLM.from_pretrained(
        source, dtype=torch.float32, attn_implementation='eager').eval()
    with torch.no_grad():
      reference = reference_model(torch.tensor(tokens)).logits.numpy()
    assert_logits_match(logits, reference)
