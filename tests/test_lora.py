"""LoRA: adapters that start as the identity, merge exactly, train alone, checkpoint alone, shard
like the base, resume, and export in the PEFT layout; every post-training stage runs with them."""

import json
import os
import shutil

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file

from experiments import dpo
from experiments import export_hf
from experiments import pretrain
from experiments import reward_model
from experiments import rl
from experiments import sft
from jaxlm import lm
from jaxlm import lora
from jaxlm import model as model_lib
from jaxlm import sharding
from jaxlm import trainer
from jaxlm.errors import UserError
from tests import test_multihost
from tests import tiny_config

LORA = {'lora.rank': 4, 'lora.alpha': 8.0}
CONFIG = model_lib.ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=8, mlp_dim=64, max_seq_len=16)


def _lora_config(**overrides):
  return ml_collections.ConfigDict({
      'rank': 4, 'alpha': 8.0, 'dropout': 0.0,
      'targets': tiny_config.sft_config('').lora.targets, **overrides})


def _flat(tree):
  return {'/'.join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree).items()}


def _tokens(seed=0):
  return jax.random.randint(jax.random.PRNGKey(seed), (2, 12), 0, CONFIG.vocab_size)


@pytest.mark.parametrize('scan_layers, dtype', [(True, 'float32'), (False, 'float32'),
                                               (True, 'bfloat16')])
def test_fresh_adapters_leave_the_logits_exactly_as_the_base(scan_layers, dtype):
  config = model_lib.ModelConfig(**{**CONFIG.__dict__, 'scan_layers': scan_layers,
                                    'dtype': dtype})
  base = model_lib.Transformer(config)
  wrapped = lora.wrap(base, _lora_config())
  params = nn.unbox(wrapped.init(jax.random.PRNGKey(0), _tokens())['params'])
  adapters, base_params = lora.split(params, lora.is_adapter)
  # Every projection of every layer has an adapter, A random and B zero.
  assert len(_flat(adapters)) == 2 * 7 * (1 if scan_layers else config.num_layers)
  assert all(np.all(v == 0) for k, v in _flat(adapters).items() if k.endswith('_lora_b'))
  expected, _ = base.apply({'params': base_params}, _tokens())
  actual, _ = wrapped.apply({'params': params}, _tokens())
  np.testing.assert_array_equal(actual, expected)


def _trained_adapters(model, params, seed=1):
  """Adapters with random B, as if training had moved them."""
  flat = flax.traverse_util.flatten_dict(params)
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), len(flat)))
  for path, value in flat.items():
    if path[-1].endswith('_lora_b'):
      flat[path] = 0.1 * jax.random.normal(next(keys), value.shape)
  return flax.traverse_util.unflatten_dict(flat)


def test_merged_adapters_give_the_unmerged_logits_and_the_float64_delta():
  base = model_lib.Transformer(CONFIG)
  lora_config = _lora_config(targets='.*/(query|out|up)')
  wrapped = lora.wrap(base, lora_config)
  params = _trained_adapters(wrapped, nn.unbox(
      wrapped.init(jax.random.PRNGKey(0), _tokens())['params']))
  merged = lora.merge(params, lora_config.alpha, lora_config.rank)
  assert not lora.split(merged, lora.is_adapter)[0]
  unmerged_logits, _ = wrapped.apply({'params': params}, _tokens())
  merged_logits, _ = base.apply({'params': merged}, _tokens())
  assert float(jnp.max(jnp.abs(unmerged_logits - base.apply(
      {'params': lora.without_adapters(params)}, _tokens())[0]))) > 1e-2  # the adapters matter
  np.testing.assert_allclose(merged_logits, unmerged_logits, atol=1e-5)
  # The merged kernel is W + A @ B * alpha / rank, computed here in float64.
  attention = _flat(params['layers']['attention']['query'])
  np.testing.assert_allclose(
      np.asarray(merged['layers']['attention']['query']['kernel'], np.float64),
      attention['kernel'].astype(np.float64) + np.einsum(
          'lir,lro->lio', attention['kernel_lora_a'].astype(np.float64),
          attention['kernel_lora_b'].astype(np.float64)) * lora_config.alpha / lora_config.rank,
      atol=1e-6)


def test_the_reward_models_adapters_reach_its_read_out():
  scorer = model_lib.ScalarHeadModel(CONFIG, reply_likelihood=True)
  wrapped = lora.wrap(scorer, _lora_config())
  tokens = _tokens()
  params = _trained_adapters(wrapped, nn.unbox(wrapped.init(jax.random.PRNGKey(0),
                                                            tokens)['params']))
  args = (tokens, jnp.ones_like(tokens), jnp.array([3, 4]), jnp.array([10, 11]))
  with_adapters = wrapped.apply({'params': params}, *args, method='reward')
  without = scorer.apply({'params': lora.without_adapters(params)}, *args, method='reward')
  merged = scorer.apply({'params': lora.merge(params, 8.0, 4)}, *args, method='reward')
  assert float(jnp.max(jnp.abs(with_adapters - without))) > 1e-3
  np.testing.assert_allclose(merged, with_adapters, atol=1e-4)


def _checkpoint_bytes(workdir, step):
  directory = os.path.join(workdir, 'checkpoints', str(step), 'state')
  return sum(os.path.getsize(os.path.join(root, f))
             for root, _, files in os.walk(directory) for f in files)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """A pretrained base and a LoRA SFT run from it."""
  base, sft_dir = (str(tmp_path_factory.mktemp(n)) for n in ('base', 'sft_lora'))
  base_state = pretrain.train_and_evaluate(tiny_config.config(steps=8), base)
  sft_state = sft.train_and_evaluate(tiny_config.sft_config(base, steps=6, **LORA), sft_dir)
  return {'base': base, 'base_params': jax.device_get(base_state.params), 'sft': sft_dir,
          'sft_state': jax.device_get(sft_state)}


def test_lora_sft_trains_and_saves_the_adapters_only(runs):
  state = runs['sft_state']
  # The base is bit-identical after training; only adapters are trained and in the optimizer.
  assert _flat(state.frozen).keys() == _flat(runs['base_params']).keys()
  for name, value in _flat(state.frozen).items():
    np.testing.assert_array_equal(value, _flat(runs['base_params'])[name], err_msg=name)
  adapters = _flat(state.params)
  assert adapters and all(lora.is_adapter(tuple(name.split('/'))) for name in adapters)
  assert all(np.any(v != 0) for k, v in adapters.items() if k.endswith('_lora_b'))
  moments = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
  assert sum(np.size(x) for x in moments) == 2 * sum(v.size for v in adapters.values())
  # The checkpoint holds them and nothing of the base.
  lora_bytes = _checkpoint_bytes(runs['sft'], 6)
  base_bytes = _checkpoint_bytes(runs['base'], 8)
  assert lora_bytes < base_bytes / 5, (lora_bytes, base_bytes)
  with open(os.path.join(runs['sft'], 'checkpoints', '6', 'state', '_METADATA'),
            encoding='utf-8') as f:
    saved = f.read()
  assert 'kernel_lora_a' in saved and 'embedding' not in saved


def test_a_lora_workdir_loads_as_its_base_with_the_adapters_merged(runs):
  _, _, base_model = lm.load_workdir(runs['sft'])
  config = tiny_config.sft_config(runs['base'], **LORA)
  wrapped = lora.for_config(base_model, config)
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    merged = lm.load_params(runs['sft'], base_model, mesh)
  tokens = jnp.arange(24, dtype=jnp.int32).reshape(2, 12) % 300
  expected, _ = wrapped.apply({'params': trainer.all_params(runs['sft_state'])}, tokens)
  actual, _ = base_model.apply({'params': jax.device_get(merged)}, tokens)
  np.testing.assert_allclose(actual, expected, atol=1e-5)


def test_a_resumed_lora_run_ends_where_the_uninterrupted_one_did(runs, tmp_path):
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(runs['sft'], resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '6'))
  state = sft.train_and_evaluate(tiny_config.sft_config(runs['base'], steps=6, **LORA), resumed)
  for name, value in _flat(jax.device_get(state.params)).items():
    np.testing.assert_array_equal(value, _flat(runs['sft_state'].params)[name], err_msg=name)


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [r['train/loss'] for r in map(json.loads, f) if 'train/loss' in r]


def test_lora_on_a_2x2x2_mesh_matches_one_device(runs, tmp_path):
  mesh = {'mesh.num_devices': 0, 'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2}
  sharded = sft.train_and_evaluate(tiny_config.sft_config(runs['base'], steps=6, **LORA, **mesh),
                                   str(tmp_path))
  np.testing.assert_allclose(_losses(tmp_path), _losses(runs['sft']), rtol=1e-4)
  # Adapters shard like their kernels: A's input axis as the kernel's, B's output axis too.
  query = sharded.params['layers']['attention']['query']
  kernel = sharded.frozen['layers']['attention']['query']['kernel']
  assert query['kernel_lora_a'].sharding.spec[:2] == kernel.sharding.spec[:2]
  assert query['kernel_lora_b'].sharding.spec[2] == kernel.sharding.spec[2]
  assert kernel.sharding.spec[2] is not None  # heads split over the tensor axis
  for name, value in _flat(jax.device_get(sharded.params)).items():
    np.testing.assert_allclose(value, _flat(runs['sft_state'].params)[name], atol=1e-5,
                               err_msg=name)


@pytest.mark.slow
def test_lora_on_two_processes_matches_one(runs, tmp_path):
  test_multihost._two_processes_match_one(  # pylint: disable=protected-access
      tmp_path, 'sft', 'sft', f'--config.init_workdir={runs["base"]}',
      '--config.train.steps=2', '--config.lora.rank=4')


def test_every_stage_trains_with_lora_and_rl_references_the_base(runs, tmp_path):
  sft_dir = runs['sft']
  rm_dir, grpo_dir, ppo_dir, dpo_dir = (str(tmp_path / n) for n in ('rm', 'grpo', 'ppo', 'dpo'))
  rm = reward_model.train_and_evaluate(
      tiny_config.reward_config(sft_dir, steps=2, **LORA), rm_dir)
  assert {'head', 'likelihood_scale'} <= set(rm.params)  # heads train beside the adapters
  grpo = rl.train_and_evaluate(tiny_config.rl_config(
      sft_dir, steps=2, eval_at_start=True, **LORA,
      **{'lora.train_fully': 'embed/embedding'}), grpo_dir)
  with open(os.path.join(grpo_dir, 'metrics.jsonl'), encoding='utf-8') as f:
    records = [json.loads(line) for line in f]
  # The reference is the starting policy: the same replies have no KL to it before training.
  assert records[0]['step'] == 0 and records[0]['eval/kl'] == 0.0
  assert set(_flat(grpo.params['policy'])) - {'embed/embedding'} == {
      k for k in _flat(grpo.params['policy']) if lora.is_adapter(tuple(k.split('/')))}
  # Loaded, the run is its start with the new embedding and the adapters merged.
  _, _, base_model = lm.load_workdir(grpo_dir)
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    loaded = jax.device_get(lm.load_params(grpo_dir, base_model, mesh))
  tokens = jnp.arange(24, dtype=jnp.int32).reshape(2, 12) % 300
  expected, _ = lora.for_config(base_model, tiny_config.sft_config('', **LORA)).apply(
      {'params': jax.device_get(trainer.all_params(grpo))['policy']}, tokens)
  np.testing.assert_allclose(base_model.apply({'params': loaded}, tokens)[0], expected, atol=1e-5)
  ppo = rl.train_and_evaluate(tiny_config.rl_config(
      sft_dir, steps=2, algorithm='ppo', reward='model', reward_workdir=rm_dir, **LORA), ppo_dir)
  assert {'head', 'likelihood_scale'} <= set(ppo.params['value'])
  # The frozen base (DPO's reference) may be stored in bfloat16.
  dpo_state = dpo.train_and_evaluate(tiny_config.dpo_config(
      sft_dir, steps=2, **LORA, **{'lora.frozen_dtype': 'bfloat16'}), dpo_dir)
  assert {x.dtype for x in jax.tree.leaves(dpo_state.frozen)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(dpo_state.params)} == {jnp.dtype(jnp.float32)}
  for workdir in (rm_dir, grpo_dir, ppo_dir, dpo_dir):
    assert np.all(np.isfinite(_losses(workdir)))


def test_peft_export_holds_the_adapters_as_peft_expects(runs, tmp_path):
  merged_dir, base_dir, peft_dir = (str(tmp_path / n) for n in ('merged', 'base', 'peft'))
  export_hf.export(runs['sft'], merged_dir, 1 << 30)
  export_hf.export(runs['base'], base_dir, 1 << 30)
  export_hf.export_adapters(runs['sft'], peft_dir)
  with open(os.path.join(peft_dir, 'adapter_config.json'), encoding='utf-8') as f:
    adapter_config = json.load(f)
  assert adapter_config['r'] == 4 and adapter_config['lora_alpha'] == 8.0
  assert adapter_config['target_modules'] == ['down_proj', 'gate_proj', 'k_proj', 'o_proj',
                                              'q_proj', 'up_proj', 'v_proj']
  adapters = load_file(os.path.join(peft_dir, 'adapter_model.safetensors'))
  merged = load_file(os.path.join(merged_dir, 'model.safetensors'))
  base = load_file(os.path.join(base_dir, 'model.safetensors'))
  assert len(adapters) == 2 * 7 * 2
  # PEFT's forward adds x @ A.T @ B.T * alpha / r: the merged weight is W + B @ A * alpha / r.
  for name, weight in base.items():
    stem = 'base_model.model.' + name[:-len('.weight')]
    if f'{stem}.lora_A.weight' not in adapters:
      np.testing.assert_array_equal(merged[name], weight, err_msg=name)
      continue
    delta = adapters[f'{stem}.lora_B.weight'] @ adapters[f'{stem}.lora_A.weight'] * 8.0 / 4
    np.testing.assert_allclose(merged[name], weight + delta, atol=1e-6, err_msg=name)


def test_peft_loads_the_adapters_onto_the_base_like_jaxlm(runs, tmp_path):
  torch = pytest.importorskip('torch')
  peft = pytest.importorskip('peft')
  transformers = pytest.importorskip('transformers')
  base_dir, peft_dir = str(tmp_path / 'base'), str(tmp_path / 'peft')
  export_hf.export(runs['base'], base_dir, 1 << 30)
  export_hf.export_adapters(runs['sft'], peft_dir)
  model = peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
      peft_dir).eval()
  tokens = np.arange(24, dtype=np.int64).reshape(2, 12) % 300
  with torch.no_grad():
    theirs = model(torch.from_numpy(tokens)).logits.numpy()
  _, _, base_model = lm.load_workdir(runs['sft'])
  ours, _ = lora.for_config(base_model, tiny_config.sft_config('', **LORA)).apply(
      {'params': trainer.all_params(runs['sft_state'])}, jnp.asarray(tokens, jnp.int32))
  vocab = theirs.shape[-1]
  np.testing.assert_allclose(theirs, np.asarray(ours)[..., :vocab], atol=1e-4)


@pytest.mark.parametrize('overrides, message', [
    ({'lora.rank': -1}, 'config.lora.rank must be >= 0'),
    ({'lora.rank': 4, 'lora.alpha': 0.0}, 'config.lora.alpha must be positive'),
    ({'lora.rank': 4, 'lora.targets': 'nothing/like/this'}, 'matches no projection'),
    ({'lora.rank': 4, 'lora.targets': '(('}, 'config.lora.targets is not a regular expression'),
    ({'lora.rank': 4, 'lora.frozen_dtype': 'int8'}, 'config.lora.frozen_dtype must be one of'),
])
def test_bad_lora_settings_are_errors_naming_the_field(runs, tmp_path, overrides, message):
  with pytest.raises(UserError, match=message):
    sft.train_and_evaluate(tiny_config.sft_config(runs['base'], steps=1, **overrides),
                           str(tmp_path))


def test_adapter_dropout_is_refused_where_the_loss_has_no_rng(runs, tmp_path):
  with pytest.raises(UserError, match='config.lora.dropout must be 0 in this stage'):
    rl.train_and_evaluate(tiny_config.rl_config(runs['sft'], steps=1, **LORA,
                                                **{'lora.dropout': 0.1}), str(tmp_path))
