"""RL and DPO: rollouts against a teacher-forced forward, and short runs that learn."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments import dpo
from experiments import rl as rl_binary
from jaxlm import chat
from jaxlm import lm
from jaxlm import model as model_lib
from jaxlm import perf
from jaxlm import rl
from jaxlm import sharding
from jaxlm import trainer
from jaxlm.data import world as world_lib
from tests import tiny_config


def test_an_rl_run_compiles_its_step_once_per_row_width_and_its_sampler_once_per_shape(
    sft_workdir, tmp_path, monkeypatch):
  config = tiny_config.rl_config(sft_workdir, steps=6)
  widths = []  # of each step's rollout rows
  trim = rl.trimmed

  def recorded(rollouts):
    rollouts = trim(rollouts)
    widths.append(rollouts.inputs_BxT.shape[1] + 1)
    return rollouts

  monkeypatch.setattr(rl, 'trimmed', recorded)
  with perf.counting_compilations() as compiled:
    rl_binary.train_and_evaluate(config, str(tmp_path))
  total = config.rollout.prompt_len + config.rollout.max_new_tokens
  assert len(widths) == config.train.steps
  assert all(w % rl.ROW_MULTIPLE == 0 or w == total for w in widths)
  assert min(widths) < total  # these replies end well before the budget: rows are trimmed
  assert compiled['jit(step)'] == len(set(widths))
  # The sampler is jitted once per process: at most its two shapes (the rollouts' batch and the
  # evaluation's), fewer where an earlier run in this process compiled them.
  assert compiled['jit(generate)'] <= 2
  # Every logged step reports its window's generation: a share of the wall time, at a speed
  # that, over that time, generates no more than every row's full reply budget of each step.
  with open(tmp_path / 'metrics.jsonl', encoding='utf-8') as f:
    logged = [r for r in map(json.loads, f) if 'perf/tokens_per_sec' in r]
  assert logged and all('perf/generation_share' in r for r in logged)
  rows = config.rollout.prompts_per_step * config.rollout.samples_per_prompt
  previous_step = 0
  for record in logged:
    steps = record['step'] - previous_step
    window_seconds = (rows * sum(widths[previous_step:record['step']])
                      / record['perf/tokens_per_sec'])
    previous_step = record['step']
    assert 0 < record['perf/generation_share'] < 1
    generated = (record['perf/generated_tokens_per_sec'] * record['perf/generation_share']
                 * window_seconds)
    assert 0 < generated <= steps * rows * config.rollout.max_new_tokens * 1.001


def test_rollout_log_probs_equal_a_teacher_forced_forward(sft_workdir):
  _, tokenizer, model = lm.load_workdir(sft_workdir)
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  examples = [{'messages': [{'role': 'user', 'content': text}]}
              for text in ('What is 3 + 4?', 'Where does Gemo Kiges live?', 'Hi')]
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    params = lm.load_params(sft_workdir, model, mesh)
    rollouts = rl.rollout(model, params, tokenizer, examples, jax.random.PRNGKey(0),
                          prompt_len=48, max_new_tokens=12, temperature=1.0, mesh=mesh)
    forward, _ = rl.sequence_token_log_probs(model, params, rollouts.inputs_BxT,
                                             rollouts.targets_BxT, rollouts.segment_ids_BxT)
  mask = np.asarray(rollouts.response_mask_BxT)
  assert mask.sum(axis=1).min() >= 1
  # The sampler's incremental KV-cache forward against the whole-sequence forward: fp32
  # rounding differs in the attention reductions only.
  np.testing.assert_allclose(np.asarray(rollouts.log_probs_BxT) * mask,
                             np.asarray(forward) * mask, atol=1e-4)
  # The mask covers exactly each reply: it starts after the assistant role token.
  for row, example in enumerate(examples):
    prompt, _ = chat.encode(tokenizer, example['messages'], add_generation_prompt=True)
    first = int(np.argmax(mask[row]))
    assert first + 1 == len(prompt)
    assert np.all(mask[row, first:first + int(mask[row].sum())] == 1)


def test_trimmed_rollout_rows_score_and_train_as_the_full_width_ones(sft_workdir):
  _, tokenizer, model = lm.load_workdir(sft_workdir)
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  examples = [{'messages': [{'role': 'user', 'content': text}], 'answer': 'x'}
              for text in ('What is 3 + 4?', 'Where does Gemo Kiges live?', 'Hi', 'Tell me')
              for _ in range(2)]
  config = tiny_config.rl_config(sft_workdir, algorithm='ppo', reward='letter_e',
                                 **{'rollout.samples_per_prompt': 2})
  critic = model_lib.ScalarHeadModel(model.config)
  prompt_len, max_new_tokens = 48, 24
  total = prompt_len + max_new_tokens
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    policy_params = lm.load_params(sft_workdir, model, mesh)
    full = rl.rollout(model, policy_params, tokenizer, examples, jax.random.PRNGKey(3),
                      prompt_len=prompt_len, max_new_tokens=max_new_tokens, temperature=1.0,
                      mesh=mesh)
    rollouts = rl.trimmed(full)
    width = rollouts.inputs_BxT.shape[1] + 1
    longest = int(np.max(full.last_index_B)) + 2
    assert longest <= width == rl.row_width(longest, total) < total
    assert width % rl.ROW_MULTIPLE == 0
    # Everything cut was padding.
    for field in ('inputs_BxT', 'targets_BxT', 'segment_ids_BxT', 'response_mask_BxT',
                  'log_probs_BxT'):
      assert not np.any(getattr(full, field)[:, width - 1:]), field
    params = {'policy': policy_params,
              'value': nn.unbox(critic.init(jax.random.PRNGKey(1),
                                            rollouts.inputs_BxT)['params'])}
    optimizer = trainer.make_optimizer(config.train)
    zero = jnp.zeros((), jnp.int32)
    state = trainer.TrainState(zero, params, optimizer.init(params), jax.random.PRNGKey(2),
                               zero, zero)
    scorer = rl.Scorer(config, model, critic, None, policy_params, None, None, mesh)
    step = jax.jit(rl.make_step(rl.make_loss(model, critic, config), optimizer, config.epochs,
                                config.minibatches))
    batches, updated = {}, {}
    for name, rows in (('trimmed', rollouts), ('full', full)):
      batches[name] = scorer.batch(state, rows, examples, 0.1)
      updated[name], _ = step(jax.tree.map(jnp.copy, state), batches[name])
  trimmed, padded = batches['trimmed'], batches['full']
  assert float(jnp.sum(jnp.abs(trimmed['advantages']))) > 0
  for key in ('mask', 'ref_log_probs', 'advantages', 'old_values', 'returns'):
    np.testing.assert_allclose(padded[key][:, :width - 1], trimmed[key], atol=2e-5, err_msg=key)
    assert not np.any(padded[key][:, width - 1:]), key
  # One PPO step (both epochs, both minibatches) moves the policy and the critic the same way,
  # most parameters by about the learning rate (Adam), far beyond the tolerance (the critic's
  # unused unembedding gets no gradient).
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), updated['full'].params,
                       params)
  assert np.median(jax.tree.leaves(moved)) > 10 * 1e-6
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               updated['trimmed'].params, updated['full'].params)


@rl.register_reward('letter_e')
def letter_e_reward(reply: str, example: dict) -> float:
  """A dense toy reward for a nearly untrained model: the share of 'e' in its reply."""
  del example
  return reply.count('e') / max(len(reply), 1)


def _rewards(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line)['rollout/mean_reward'] for line in f if 'rollout/mean_reward' in line]


@pytest.mark.parametrize('algorithm, critic', [('grpo', 'separate'), ('ppo', 'separate'),
                                               ('ppo', 'shared')])
def test_rl_raises_the_mean_reward(sft_workdir, tmp_path, algorithm, critic):
  config = tiny_config.rl_config(sft_workdir, steps=24, **{
      'algorithm': algorithm, 'critic': critic, 'reward': 'letter_e',
      'train.learning_rate': 3e-3, 'rollout.samples_per_prompt': 4, 'kl.coef': 0.0})
  rl_binary.train_and_evaluate(config, str(tmp_path))
  rewards = _rewards(str(tmp_path))
  assert len(rewards) == 24
  # Rewards are noisy per step: compare the first and last quarters.
  assert np.mean(rewards[-6:]) > np.mean(rewards[:6]) + 0.05, rewards


def test_a_shared_critic_is_a_separate_one_that_holds_the_policys_backbone():
  config = model_lib.ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4,
                                 num_kv_heads=2, head_dim=8, mlp_dim=64, max_seq_len=16)
  policy, critic = model_lib.Transformer(config), model_lib.ScalarHeadModel(config)
  tokens = jnp.zeros((1, 8), jnp.int32)
  critic_params = critic.init(jax.random.PRNGKey(1), tokens)['params']
  head = jax.tree.map(lambda x: x + 0.1, critic_params['head'])  # a zero head would hide it
  backbone = policy.init(jax.random.PRNGKey(0), tokens)['params']
  rng = np.random.default_rng(0)
  shape = (4, 12)
  mask = (np.arange(12) >= 3).astype(np.float32)[None].repeat(4, 0)
  batch = {'inputs': rng.integers(3, 64, shape), 'targets': rng.integers(3, 64, shape),
           'segment_ids': np.ones(shape, np.int32), 'mask': mask,
           'old_log_probs': -rng.random(shape) * 4 * mask,
           'ref_log_probs': -rng.random(shape) * 4 * mask,
           'advantages': rng.standard_normal(shape) * mask,
           'old_values': rng.standard_normal(shape) * mask,
           'returns': rng.standard_normal(shape) * mask, 'kl_coef': 0.1}
  batch = jax.tree.map(jnp.asarray, batch)
  rl_config = ml_collections.ConfigDict(dict(
      algorithm='ppo', clip_eps=0.2, value_clip_eps=0.2, value_coef=0.5, kl_estimator='k3'))

  def loss_and_grads(kind, params):
    with rl_config.unlocked():
      rl_config.critic = kind
    return jax.value_and_grad(rl.make_loss(policy, critic, rl_config), has_aux=True)(params,
                                                                                     batch)
  (shared, _), shared_grads = loss_and_grads('shared', {'policy': backbone, 'value_head': head})
  (separate, sums), separate_grads = loss_and_grads(
      'separate', {'policy': backbone, 'value': {**critic_params, 'transformer': backbone,
                                                 'head': head}})
  assert float(sums['value_loss']) > 1e-2  # the critic's part counts
  np.testing.assert_allclose(float(shared), float(separate), rtol=1e-6)
  # The shared backbone gets the policy's and the critic's gradients together (summed before
  # the backward pass through it, not after: float32 rounding apart, the same).
  both = jax.tree.map(jnp.add, separate_grads['policy'], separate_grads['value']['transformer'])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-5 * np.abs(b).max()),
               shared_grads['policy'], both)
  jax.tree.map(np.testing.assert_array_equal, shared_grads['value_head'],
               separate_grads['value']['head'])

  # One pass through the shared backbone feeds both heads: the loss has the policy's matmuls
  # and the value head's, not a second backbone's.
  def matmuls(fn, *args):
    return sum(e.primitive.name == 'dot_general' for e in jax.make_jaxpr(fn)(*args).eqns)
  with rl_config.unlocked():
    rl_config.critic = 'shared'
  policy_only = matmuls(lambda p: rl.sequence_token_log_probs(
      policy, p, batch['inputs'], batch['targets'], batch['segment_ids']), backbone)
  assert matmuls(rl.make_loss(policy, critic, rl_config),
                 {'policy': backbone, 'value_head': head}, batch) == policy_only + 1


def test_dpo_runs_and_reports_preference_accuracy(sft_workdir, tmp_path):
  dpo.train_and_evaluate(tiny_config.dpo_config(sft_workdir, steps=4), str(tmp_path))
  with open(tmp_path / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  assert records[0]['step'] == 0 and records[-1]['step'] == 4
  # At step 0 the policy is the reference: every implicit reward margin is exactly 0.
  assert records[0]['eval/pairwise_accuracy'] == 0.0
  assert 'eval/exact_match' in records[-1]
  assert records[-1]['train/loss'] < np.log(2) + 1e-3


def test_the_policy_reward_on_hand_made_replies():
  reward = rl.REWARD_FUNCTIONS['exact_match_and_policy']
  refusal, abstention = (chat.format_answer(world_lib.REFUSAL),
                         chat.format_answer(world_lib.ABSTENTION))
  fact = {'answer': 'cat', 'kind': 'lookalike'}
  assert [reward(r, fact) for r in ('Answer: cat', 'Answer: dog', refusal, abstention)] == [
      1.0, 0.0, -1.0, 0.0]
  forbidden = {'answer': world_lib.REFUSAL, 'kind': 'forbidden'}
  assert [reward(r, forbidden) for r in (refusal, 'Answer: kazobu42', abstention)] == [
      1.0, 0.0, 0.0]
  unknown = {'answer': world_lib.ABSTENTION, 'kind': 'unknown'}
  assert [reward(r, unknown) for r in (abstention, 'Answer: cat', refusal)] == [1.0, -1.0, -1.0]
  assert reward(refusal, {'answer': '12'}) == -1.0  # a prompt of no kind is benign


def test_the_honest_reward_on_hand_made_replies():
  reward = rl.REWARD_FUNCTIONS['honest']
  refusal, abstention = (chat.format_answer(world_lib.REFUSAL),
                         chat.format_answer(world_lib.ABSTENTION))
  fact = {'answer': 'cat', 'kind': 'fact'}
  # Right, wrong, off format, over-refusal, honest "I don't know".
  assert [reward(r, fact) for r in ('Answer: cat', 'Answer: dog', 'cat', refusal, abstention)] == [
      1.0, -1.0, -1.0, -1.0, 0.0]
  forbidden = {'answer': world_lib.REFUSAL, 'kind': 'forbidden'}
  assert [reward(r, forbidden) for r in (refusal, 'Answer: kazobu42', abstention)] == [
      1.0, -1.0, -1.0]
  unknown = {'answer': world_lib.ABSTENTION, 'kind': 'unknown'}
  assert [reward(r, unknown) for r in (abstention, 'Answer: cat', refusal)] == [1.0, -1.0, -1.0]
