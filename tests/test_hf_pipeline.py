"""Post-training an imported Hugging Face model end to end: SFT -> DPO -> GRPO on JSONL data
through the checkpoint's own chat template and tokenizer, then export, reload and compare."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from experiments import dpo
from experiments import pretrain
from experiments import reward_model
from experiments import rl as rl_binary
from experiments import sft
from jaxlm import chat
from jaxlm import hf
from jaxlm import lm
from jaxlm import model as model_lib
from jaxlm import post_training
from jaxlm import reward
from jaxlm import sharding
from jaxlm import tokenizer as tokenizer_lib
from tests import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN2 = os.path.join(ROOT, 'tests', 'fixtures', 'hf', 'qwen2')


def _write_jsonl(path, records):
  path.write_text('\n'.join(json.dumps(r, ensure_ascii=False) for r in records) + '\n')
  return str(path)


def _sums(n, offset=0):
  return [(f'What is {a} + {a + offset}?', str(2 * a + offset)) for a in range(1, n + 1)]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp('jsonl')
  return {
      'sft': _write_jsonl(d / 'sft.jsonl', [{'prompt': q, 'response': f'Answer: {a}',
                                             'answer': a} for q, a in _sums(48)]),
      'sft_eval': _write_jsonl(d / 'sft_eval.jsonl', [{'prompt': q, 'response': f'Answer: {a}',
                                                       'answer': a} for q, a in _sums(8, 3)]),
      'pairs': _write_jsonl(d / 'pairs.jsonl', [
          {'prompt': q, 'chosen': f'Answer: {a}', 'rejected': f'Answer: {int(a) + 1}'}
          for q, a in _sums(32)]),
      'prompts': _write_jsonl(d / 'prompts.jsonl', [{'prompt': q, 'answer': a}
                                                    for q, a in _sums(16, 1)]),
  }


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def _jsonl(train, evaluation=''):
  # Qwen's template adds a default system message: rows need room for it.
  return {'data.source': 'jsonl', 'data.jsonl_train': train, 'data.jsonl_eval': evaluation,
          'data.seq_len': 192}


def _policy_logits(model, params, tokens):
  return np.asarray(model.apply({'params': params}, jnp.asarray(tokens))[0])


@pytest.fixture(scope='module')
def stages(data, tmp_path_factory):
  """The workdirs of SFT, DPO and GRPO (on the math reward), and the GRPO policy exported."""
  root = tmp_path_factory.mktemp('stages')
  dirs = {s: str(root / s) for s in ('sft', 'dpo', 'grpo', 'exported')}
  sft.train_and_evaluate(tiny_config.sft_config(
      '', steps=8, init_hf=QWEN2, **_jsonl(data['sft'], data['sft_eval'])), dirs['sft'])
  dpo.train_and_evaluate(tiny_config.dpo_config(
      dirs['sft'], steps=4, **_jsonl(data['pairs'], data['pairs'])), dirs['dpo'])
  rl_binary.train_and_evaluate(tiny_config.rl_config(
      dirs['dpo'], steps=3, reward='math', **{'rollout.prompt_len': 160},
      **_jsonl(data['prompts'], data['prompts'])), dirs['grpo'])
  result = subprocess.run([sys.executable, '-m', 'experiments.export_hf',
                           f'--workdir={dirs["grpo"]}', f'--out={dirs["exported"]}'],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  return dirs


def _probe(tokenizer):
  return np.asarray([chat.encode(tokenizer, [{'role': 'user', 'content': 'What is 2 + 2?'},
                                             {'role': 'assistant', 'content': 'Answer: 4'}])[0]])


def _exported_and_trained_logits(stages):
  _, tokenizer, model = lm.load_workdir(stages['grpo'])
  tokens = _probe(tokenizer)
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    trained = lm.load_params(stages['grpo'], model, mesh)
    exported = hf.load_params(stages['exported'], 'qwen2', model.config,
                              lm.abstract_params(model, mesh))
    return tokens, _policy_logits(model, exported, tokens), _policy_logits(model, trained, tokens)


def test_every_stage_trains_through_the_checkpoints_template(stages):
  records = _records(stages['sft'])
  assert records[-1]['eval/loss'] < records[0]['eval/loss']  # the replies are being learnt
  assert 'eval/exact_match' in records[-1]
  tokenizer = tokenizer_lib.load(tokenizer_lib.workdir_path(stages['sft']))
  assert tokenizer.chat_template == tokenizer_lib.load(QWEN2).chat_template
  assert 0.0 <= _records(stages['dpo'])[-1]['eval/pairwise_accuracy'] <= 1.0
  final = _records(stages['grpo'])[-1]
  assert np.isfinite(final['train/loss']) and 'eval/mean_reward' in final


def test_the_export_is_the_trained_policy(stages):
  """Reimported, the exported Qwen2 checkpoint gives the GRPO policy's logits exactly, and its
  tokenizer files render the chat template as the workdir's do."""
  assert hf.read_config(stages['exported'])['model_type'] == 'qwen2'
  _, exported, trained = _exported_and_trained_logits(stages)
  np.testing.assert_array_equal(exported, trained)
  conversation = [{'role': 'user', 'content': 'Hi'}]
  ours = tokenizer_lib.load(tokenizer_lib.workdir_path(stages['grpo']))
  assert (chat.encode(tokenizer_lib.load(stages['exported']), conversation)[0].tolist()
          == chat.encode(ours, conversation)[0].tolist())


def test_transformers_loads_the_export_with_the_same_logits(stages):
  torch = pytest.importorskip('torch')  # the live comparison: pip install -e '.[hf-parity]'
  import transformers  # pylint: disable=g-import-not-at-top
  tokens, exported, _ = _exported_and_trained_logits(stages)
  model = transformers.AutoModelForCausalLM.from_pretrained(stages['exported'],
                                                            dtype=torch.float32).eval()
  with torch.no_grad():
    reference = model(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(exported, reference, rtol=0, atol=1e-4)


def test_continued_pretraining_from_an_imported_model(tmp_path):
  workdir = str(tmp_path / 'pretrain')
  pretrain.train_and_evaluate(tiny_config.config(steps=4, init_hf=QWEN2), workdir)
  records = _records(workdir)
  assert np.isfinite(records[-1]['eval/bits_per_byte'])
  config, _, model = lm.load_workdir(workdir)
  assert config.model.family == 'qwen2' and model.config.qkv_bias
  assert model.config == model_lib.ModelConfig(**hf.model_fields(hf.read_config(QWEN2)))


def test_reward_model_and_ppo_start_from_an_imported_model(data, tmp_path):
  """The reward model's backbone, and PPO's policy, reference and critic, all from init_hf."""
  rm_dir, ppo_dir = str(tmp_path / 'rm'), str(tmp_path / 'ppo')
  reward_model.train_and_evaluate(tiny_config.reward_config(
      '', steps=3, init_hf=QWEN2, **_jsonl(data['pairs'], data['pairs'])), rm_dir)
  assert 0.0 <= _records(rm_dir)[-1]['eval/pairwise_accuracy'] <= 1.0
  rl_binary.train_and_evaluate(tiny_config.rl_config(
      '', steps=2, init_hf=QWEN2, algorithm='ppo', reward='model', reward_workdir=rm_dir,
      **{'rollout.prompt_len': 160}, **_jsonl(data['prompts'], data['prompts'])), ppo_dir)
  final = _records(ppo_dir)[-1]
  assert np.isfinite(final['train/loss']) and np.isfinite(final['eval/kl'])
  # Its reward adds the reply's likelihood, which no sequence classifier computes.
  result = subprocess.run([sys.executable, '-m', 'experiments.export_hf', f'--workdir={rm_dir}',
                           f'--out={tmp_path / "out"}'], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert 'config.reply_likelihood' in result.stderr.strip().splitlines()[-1]


def test_a_model_trained_from_scratch_exports_as_llama(tmp_path):
  workdir, out = str(tmp_path / 'tiny'), str(tmp_path / 'exported')
  pretrain.train_and_evaluate(tiny_config.config(steps=2), workdir)
  result = subprocess.run([sys.executable, '-m', 'experiments.export_hf', f'--workdir={workdir}',
                           f'--out={out}'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  _, tokenizer, model = lm.load_workdir(workdir)
  hf_config = hf.read_config(out)
  assert hf_config['model_type'] == 'llama'
  assert hf_config['vocab_size'] == tokenizer.vocab_size < model.config.vocab_size  # unpadded
  assert os.path.exists(os.path.join(out, 'tokenizer.model'))
  exported_config = model_lib.ModelConfig(**hf.model_fields(hf_config))
  exported_model = model_lib.Transformer(exported_config)
  tokens = np.asarray([lm.with_bos(tokenizer, tokenizer.encode('Gemo Kiges lives in'))])
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    trained = lm.load_params(workdir, model, mesh)
    exported = hf.load_params(out, 'llama', exported_config,
                              lm.abstract_params(exported_model, mesh))
    ours = _policy_logits(model, trained, tokens)[..., :tokenizer.vocab_size]
    np.testing.assert_array_equal(_policy_logits(exported_model, exported, tokens), ours)
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  reference = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  with torch.no_grad():
    np.testing.assert_allclose(reference(torch.tensor(tokens)).logits.numpy(), ours, atol=1e-4)


def test_a_hub_name_without_network_is_one_clear_error(tmp_path, monkeypatch):
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf_home'))
  with pytest.raises(hf.UserError, match="config.init_hf: 'Qwen/Qwen2.5-0.5B' is not a local "
                                         'directory and could not be fetched'):
    hf.resolve('Qwen/Qwen2.5-0.5B')


def test_a_reward_model_exports_as_a_sequence_classifier(data, tmp_path):
  rm_dir, out = str(tmp_path / 'rm'), str(tmp_path / 'exported')
  reward_model.train_and_evaluate(tiny_config.reward_config(
      '', steps=3, init_hf=QWEN2, reply_likelihood=False,
      **_jsonl(data['pairs'], data['pairs'])), rm_dir)
  result = subprocess.run([sys.executable, '-m', 'experiments.export_hf', f'--workdir={rm_dir}',
                           f'--out={out}'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  exported_config = hf.read_config(out)
  assert exported_config['architectures'] == ['Qwen2ForSequenceClassification']
  tensors = {}
  for name in os.listdir(out):
    if name.endswith('.safetensors'):
      tensors.update(load_file(os.path.join(out, name)))
  assert 'lm_head.weight' not in tensors
  _, _, base = lm.load_workdir(rm_dir)
  scorer = reward.reward_model(rm_dir, base.config)
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    head = jax.device_get(lm.load_params(rm_dir, scorer, mesh)['head'])
  np.testing.assert_array_equal(tensors['score.weight'], head['kernel'].T)
  assert exported_config['jaxlm_score_bias'] == float(head['bias'][0])

  conversation = [{'role': 'user', 'content': 'What is 3 + 4?'},
                  {'role': 'assistant', 'content': 'Answer: 7'}]
  expected = reward.score(rm_dir, [conversation])[0]['reward']
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  tokenizer = tokenizer_lib.load(out)
  tokens, last, _ = reward.encode_scored(tokenizer, conversation, 256)
  classifier = transformers.AutoModelForSequenceClassification.from_pretrained(
      out, dtype=torch.float32).eval()
  with torch.no_grad():
    score = float(classifier(torch.tensor([tokens[:last + 1]])).logits[0, 0])
  np.testing.assert_allclose(score + exported_config['jaxlm_score_bias'], expected, atol=1e-4)


def test_a_missing_local_checkpoint_is_named():
  with pytest.raises(hf.UserError, match='config.init_hf: no such directory /no/such/model'):
    hf.resolve('/no/such/model')


def test_a_stage_may_change_how_the_imported_model_runs_not_what_it_is(tmp_path):
  config = tiny_config.sft_config('', init_hf=QWEN2)
  config.model.update(dtype='bfloat16', remat='full')
  _, model, _ = post_training.start_from(config, str(tmp_path))
  expected = model_lib.ModelConfig(**{**hf.model_fields(hf.read_config(QWEN2)),
                                      'dtype': 'bfloat16', 'remat': 'full'})
  assert model.config == expected
