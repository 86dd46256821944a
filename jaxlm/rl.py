"""Reinforcement learning on the chat model: rollouts, rewards, and the PPO / GRPO update.

One rollout engine serves both algorithms. Each train step samples replies to a batch of prompts
with the KV-cache sampler (keeping the sampler's own log-probs as the behaviour policy), scores
them, computes advantages, then runs several epochs of minibatch updates of the clipped policy
objective:

- GRPO: several replies per prompt; a reply's advantage is its reward normalised within its
  group; the KL to the reference is a penalty in the loss.
- PPO: a learned critic (a separate scalar-head model); per-token rewards are the reward model's
  score at the last token minus `kl_coef` times the per-token KL; advantages by GAE.
"""

import dataclasses
import functools
import re
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import chat
from jaxlm import lora
from jaxlm import losses
from jaxlm import reward as reward_lib
from jaxlm import sampling
from jaxlm import sharding
from jaxlm import trainer
from jaxlm.data import reasoning
from jaxlm.errors import UserError

ALGORITHMS = ('ppo', 'grpo')
CRITICS = ('separate', 'shared')
# A step's rollout rows end at its longest sequence rounded up to a multiple of this: scoring and
# the update skip the padding after it (the pipeline's PPO update runs 1.5x faster on its usual
# 48 tokens than on all 72), and the few row widths each compile once. Finer multiples trim more
# and compile more.
ROW_MULTIPLE = 16

# Verifiable rewards: (reply, example) -> float. Add one with `@register_reward('name')`.
REWARD_FUNCTIONS: dict[str, Callable[[str, dict], float]] = {}


def register_reward(name: str):
  def register(fn):
    REWARD_FUNCTIONS[name] = fn
    return fn
  return register


@register_reward('exact_match')
def exact_match_reward(reply: str, example: dict) -> float:
  """1 for a well-formed reply with the right answer, else 0."""
  return float(chat.is_correct(reply, example['answer']))


@register_reward('format')
def format_reward(reply: str, example: dict) -> float:
  del example
  return float(chat.parse_answer(reply) is not None)


@register_reward('exact_match_and_format')
def exact_match_and_format_reward(reply: str, example: dict) -> float:
  """Exact match, with a little credit for the format alone: a denser signal early on."""
  return exact_match_reward(reply, example) + 0.1 * format_reward(reply, example)


@register_reward('exact_match_and_policy')
def exact_match_and_policy_reward(reply: str, example: dict) -> float:
  """Exact match, and -1 for breaking the policy: refusing what is not forbidden, or making up
  an answer about an unknown person. Without the penalty a refusal of a benign request scores
  like a wrong answer, and nothing teaches the policy to stop over-refusing."""
  if chat.is_correct(reply, example['answer']):
    return 1.0
  kind = example.get('kind')
  if chat.refuses(reply) and kind != 'forbidden':
    return -1.0
  if kind == 'unknown' and not chat.abstains(reply):
    return -1.0
  return 0.0


@register_reward('honest')
def honest_reward(reply: str, example: dict) -> float:
  """1 for the right reply (answer, refusal or abstention), 0 for an honest "I don't know" to
  what is not forbidden, -1 for anything else. A wrong guess then costs more than abstaining, so
  guessing pays only when it is more likely right than wrong: outcome rewards that score a wrong
  guess like an abstention teach the policy to guess about people nobody knows."""
  if chat.is_correct(reply, example['answer']):
    return 1.0
  if chat.abstains(reply) and example.get('kind') != 'forbidden':
    return 0.0
  return -1.0


_BOXED = re.compile(r'\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}')
_NUMBER = re.compile(r'-?\d[\d,]*(?:\.\d+)?|-?\.\d+')


def final_math_answer(reply: str) -> str | None:
  """The answer of a math reply: the last `\\boxed{...}`, else the `Answer:` format's answer,
  else the last number in the text (thousands separators dropped)."""
  boxed = _BOXED.findall(reply)
  if boxed:
    return boxed[-1].strip()
  parsed = chat.parse_answer(reply.strip())
  if parsed is not None:
    return parsed
  numbers = _NUMBER.findall(reply)
  return numbers[-1].replace(',', '') if numbers else None


def _as_number(text: str) -> float | None:
  try:
    return float(text.replace(',', '').strip().rstrip('.'))
  except ValueError:
    return None


@register_reward('math')
def math_reward(reply: str, example: dict) -> float:
  """1 when the reply's final answer (`final_math_answer`) equals the reference, numerically
  when both are numbers (12 and 12.0 agree, 1,200 and 1200 too), else as text."""
  answer = final_math_answer(reply)
  if answer is None:
    return 0.0
  got, want = _as_number(answer), _as_number(str(example['answer']))
  if got is not None and want is not None:
    return float(abs(got - want) <= 1e-6 * max(1.0, abs(want)))
  return float(answer.strip().lower() == str(example['answer']).strip().lower())


@register_reward('scratchpad')
def scratchpad_reward(reply: str, example: dict) -> float:
  """1 when the reply ends with `Answer: <the reference>`, whatever working comes before it
  (the replies of `jaxlm.data.reasoning`); a reply cut off mid-working scores 0."""
  return float(reasoning.final_answer(reply) == str(example['answer']).strip())


@dataclasses.dataclass(frozen=True)
class Rollouts:
  """Sampled replies as teacher-forcing rows; the `_BxT` arrays are aligned with `targets`."""
  inputs_BxT: jax.Array
  targets_BxT: jax.Array
  segment_ids_BxT: jax.Array
  response_mask_BxT: jax.Array  # 1 on reply tokens (incl. end-of-turn) as targets
  log_probs_BxT: jax.Array  # the sampling policy's log-probs of the targets
  last_index_B: jax.Array  # index (in targets) of each reply's last token
  replies: list[str]
  generated_tokens: int = 0  # this process's sampled tokens, end-of-turn included


def encode_prompts(tokenizer, examples: list[dict], width: int):
  """Right-padded prompt ids [B, width] (ending with the assistant role token) and lengths."""
  tokens = np.zeros((len(examples), width), np.int32)
  lengths = np.zeros(len(examples), np.int32)
  for row, example in enumerate(examples):
    ids, _ = chat.encode(tokenizer, example['messages'], add_generation_prompt=True)
    if len(ids) > width:
      raise UserError(f'a prompt of {len(ids)} tokens exceeds config.rollout.prompt_len={width}:'
                       f' {example["messages"][-1]["content"][:80]!r}')
    tokens[row, :len(ids)], lengths[row] = ids, len(ids)
  return tokens, lengths


def rollout(model, params, tokenizer, examples: list[dict], rng, *, prompt_len: int,
            max_new_tokens: int, temperature: float, mesh) -> Rollouts:
  """Samples one reply per example (repeat examples for several per prompt)."""
  prompts, prompt_lengths = encode_prompts(tokenizer, examples, prompt_len)
  placed = sharding.put_batch({'prompts': prompts, 'lengths': prompt_lengths}, mesh)
  tokens, ends, log_probs = sampling.generate(
      model, params, placed['prompts'], placed['lengths'], rng, max_new_tokens=max_new_tokens,
      temperature=temperature, eos_id=chat.end_of_turn_id(tokenizer), return_log_probs=True)
  host_tokens, host_ends = sharding.local_rows(tokens, mesh), sharding.local_rows(ends, mesh)
  replies = [tokenizer.decode(t for t in host_tokens[row, prompt_lengths[row]:host_ends[row]]
                              if t != chat.end_of_turn_id(tokenizer))
             for row in range(len(examples))]
  positions_T = jnp.arange(tokens.shape[1] - 1)
  starts_B, ends_B = placed['lengths'], ends
  # Target j is token j + 1: a reply token when prompt_length <= j + 1 < end.
  response = ((positions_T + 1 >= starts_B[:, None]) & (positions_T + 1 < ends_B[:, None]))
  return Rollouts(
      inputs_BxT=tokens[:, :-1], targets_BxT=tokens[:, 1:],
      segment_ids_BxT=(positions_T < ends_B[:, None]).astype(jnp.int32),
      response_mask_BxT=response.astype(jnp.float32), log_probs_BxT=log_probs[:, 1:],
      last_index_B=ends_B - 2, replies=replies,
      generated_tokens=int(np.sum(host_ends - prompt_lengths)))


def trimmed(rollouts: Rollouts) -> Rollouts:
  """`rollouts` with every `_BxT` array cut after the longest sequence (`row_width`): what
  follows it is padding, which no reply token attends to and no loss counts."""
  total = rollouts.inputs_BxT.shape[1] + 1
  width = row_width(int(jnp.max(rollouts.last_index_B)) + 2, total)
  return dataclasses.replace(rollouts, **{
      field.name: getattr(rollouts, field.name)[:, :width - 1]
      for field in dataclasses.fields(rollouts) if field.name.endswith('_BxT')})


def row_width(longest: int, total: int) -> int:
  """Tokens kept of each rollout row: `longest` rounded up to `ROW_MULTIPLE`, at most `total`."""
  return min(total, -(-longest // ROW_MULTIPLE) * ROW_MULTIPLE)


def sequence_token_log_probs(model, params, inputs_BxT, targets_BxT, segment_ids_BxT):
  logits, _ = model.apply({'params': params}, inputs_BxT, None, segment_ids_BxT)
  return losses.token_log_probs(logits, targets_BxT), logits


def entropy(logits_BxTxV):
  log_p = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32))
  return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def critic_params(params, rl_config):
  """The critic's parameters: its own model (`critic='separate'`), or the policy's backbone
  under a value head (`critic='shared'`: one transformer, trained by both losses)."""
  if rl_config.critic == 'shared':
    return {'transformer': params['policy'], 'head': params['value_head']}
  return params['value']


def make_loss(policy, critic, rl_config):
  """The minibatch loss of both algorithms: clipped policy objective, plus the KL penalty
  (GRPO) or the clipped value loss (PPO). Returns sums, like every jaxlm loss."""
  is_ppo = rl_config.algorithm == 'ppo'

  def forward(params, batch):
    """(log-probs of the targets, logits, PPO's values or None)."""
    if is_ppo and rl_config.critic == 'shared':  # one pass through the backbone feeds both heads
      hidden, _ = policy.apply({'params': params['policy']}, batch['inputs'], None,
                               batch['segment_ids'], method='hidden_states')
      logits = policy.apply({'params': params['policy']}, hidden, method='logits')
      values = critic.apply({'params': critic_params(params, rl_config)}, hidden,
                            method='head_values')
      return losses.token_log_probs(logits, batch['targets']), logits, values
    logp, logits = sequence_token_log_probs(policy, params['policy'], batch['inputs'],
                                            batch['targets'], batch['segment_ids'])
    values = (critic.apply({'params': critic_params(params, rl_config)}, batch['inputs'], None,
                           batch['segment_ids']) if is_ppo else None)
    return logp, logits, values

  def loss_fn(params, batch):
    logp, logits, values = forward(params, batch)
    mask = batch['mask']
    policy_sums = losses.ppo_policy_loss(logp, batch['old_log_probs'], batch['advantages'], mask,
                                         rl_config.clip_eps)
    # Off the mask the reference log-prob is a placeholder: keep its estimate out entirely.
    kl_sum = jnp.sum(jnp.where(mask > 0, losses.kl_estimate(logp, batch['ref_log_probs'],
                                                            rl_config.kl_estimator), 0.0))
    total = policy_sums['loss']
    sums = {'policy_loss': policy_sums['loss'], 'clip_fraction': policy_sums['clip_fraction'],
            'approx_kl': policy_sums['approx_kl'],
            'kl': kl_sum, 'entropy': jnp.sum(entropy(logits) * mask),
            'count': policy_sums['count']}
    if values is None:  # GRPO
      total = total + batch['kl_coef'] * kl_sum
    else:
      value_sums = losses.value_loss(values, batch['old_values'], batch['returns'], mask,
                                     rl_config.value_clip_eps)
      total = total + rl_config.value_coef * value_sums['loss']
      sums['value_loss'] = value_sums['loss']
    sums['loss'] = total
    return total, sums
  return loss_fn


def make_step(loss_fn, optimizer, epochs: int, minibatches: int):
  """A pure `(state, batch) -> (state, metrics)`: `epochs` passes over the rollout batch in
  `minibatches` shuffled minibatches, one optimizer update each."""
  grad_fn = jax.value_and_grad(trainer.with_frozen(loss_fn), has_aux=True)
  per_example = ('inputs', 'targets', 'segment_ids', 'mask', 'old_log_probs', 'ref_log_probs',
                 'advantages', 'old_values', 'returns')

  def step(state, batch):
    rng, shuffle_rng = jax.random.split(state.rng)
    rows = batch['inputs'].shape[0]
    order = jnp.concatenate([jax.random.permutation(jax.random.fold_in(shuffle_rng, e), rows)
                             for e in range(epochs)]).reshape(epochs * minibatches, -1)

    def update(carry, indices):
      params, opt_state = carry
      minibatch = {k: v[indices] if k in per_example else v for k, v in batch.items()}
      (_, sums), grads = grad_fn(params, state.frozen, minibatch)
      count = jnp.maximum(sums['count'], 1.0)
      grads = jax.tree.map(lambda g: g / count, grads)
      params, opt_state, _, finite = trainer.update_if_finite(optimizer, grads, sums['loss'],
                                                            params, opt_state)
      return (params, opt_state), (sums, finite)

    (params, opt_state), (sums, finite) = jax.lax.scan(update, (state.params, state.opt_state),
                                                       order)
    counters = trainer.count_nonfinite(state, jnp.all(finite))
    totals = jax.tree.map(jnp.sum, sums)
    count = jnp.maximum(totals.pop('count'), 1.0)
    metrics = {f'train/{k}': v / count for k, v in totals.items()}
    mask = batch['mask']
    responses = jnp.maximum(jnp.sum(batch['response_present']), 1.0)
    metrics.update({
        'rollout/mean_reward': jnp.mean(batch['rewards']),
        'rollout/response_length': jnp.sum(mask) / responses,
        'rollout/kl': jnp.sum((batch['old_log_probs'] - batch['ref_log_probs']) * mask)
                      / responses,
        'rollout/kl_coef': batch['kl_coef'],
        'train/nonfinite_steps': counters['nonfinite_steps'],
    })
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng,
                         **counters), metrics

  return step


class AdaptiveKL:
  """Fixed KL coefficient, or the proportional controller of Ziegler et al. (2019) that steers
  the per-reply KL towards `target`. Its value travels with the data state in checkpoints."""

  def __init__(self, kl_config):
    self.config = kl_config
    self.value = float(kl_config.coef)

  def update(self, observed_kl: float, batch_size: int) -> None:
    if self.config.adaptive:
      error = float(np.clip(observed_kl / self.config.target - 1.0, -0.2, 0.2))
      self.value *= 1.0 + error * batch_size / self.config.horizon


class PromptIterator:
  """Batches of prompt indices, with the KL controller's state alongside the data position so
  that both resume exactly."""

  def __init__(self, grain_dataset, kl: AdaptiveKL):
    self._iterator = iter(grain_dataset)
    self.kl = kl

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._iterator)

  def get_state(self):
    return {'data': self._iterator.get_state(), 'kl_coef': self.kl.value}

  def set_state(self, state):
    self._iterator.set_state(state['data'])
    self.kl.value = state['kl_coef']


class Scorer:
  """Turns rollouts into a training batch: rewards, reference log-probs, values, advantages."""

  def __init__(self, rl_config, policy, critic, reward_model, reference_params, reward_params,
               reward_stats, mesh, reference_model=None):
    """`reference_params` None: the reference is `reference_model` (the policy without its
    LoRA adapters) on the policy's own parameters without adapters, so no copy is held."""
    self.config, self.mesh = rl_config, mesh
    self.policy, self.critic, self.reward_model = policy, critic, reward_model
    self.reference_model = reference_model or policy
    self.reference_params, self.reward_params = reference_params, reward_params
    self.reward_stats = reward_stats
    self._score = jax.jit(self._score_on_device)
    self._reward_model_scores = jax.jit(functools.partial(reward_lib.rewards, reward_model))

  def rewards(self, rollouts: Rollouts, examples: list[dict]):
    """[B] rewards: a verifiable function of the decoded replies, or the reward model's score
    normalised with its training statistics."""
    if self.config.reward != 'model':
      fn = REWARD_FUNCTIONS[self.config.reward]
      local = np.asarray([fn(reply, ex) for reply, ex in zip(rollouts.replies, examples)],
                         np.float32)
      return sharding.put_batch({'rewards': local}, self.mesh)['rewards']
    # Token j + 1 of the scored rows is target j.
    tokens = jnp.concatenate([rollouts.inputs_BxT[:, :1], rollouts.targets_BxT], axis=1)
    raw = self._reward_model_scores(self.reward_params, tokens,
                                    jnp.argmax(rollouts.response_mask_BxT, axis=1) + 1,
                                    rollouts.last_index_B + 1)
    return (raw - self.reward_stats['mean']) / self.reward_stats['std']

  def reference(self, policy_params):
    """The reference policy's parameters, given the current policy's."""
    if self.reference_params is None:
      return lora.without_adapters(policy_params)
    return self.reference_params

  def _score_on_device(self, reference_params, arrays, rewards_B, kl_coef, value_params):
    c = self.config
    mask = arrays['mask']
    ref_logp, _ = sequence_token_log_probs(self.reference_model, reference_params,
                                           arrays['inputs'],
                                           arrays['targets'], arrays['segment_ids'])
    batch = dict(arrays, ref_log_probs=ref_logp * mask, rewards=rewards_B, kl_coef=kl_coef,
                 response_present=(jnp.sum(mask, axis=1) > 0).astype(jnp.float32))
    if c.algorithm == 'grpo':
      advantages = losses.group_advantages(rewards_B, c.rollout.samples_per_prompt)
      batch.update(advantages=advantages[:, None] * mask, old_values=jnp.zeros_like(mask),
                   returns=jnp.zeros_like(mask))
    else:
      values = self.critic.apply({'params': value_params}, arrays['inputs'], None,
                                 arrays['segment_ids']) * mask
      last = jax.nn.one_hot(arrays['last_index'], mask.shape[1]) * mask
      token_rewards = -kl_coef * (arrays['old_log_probs'] - ref_logp) * mask
      token_rewards = token_rewards + last * rewards_B[:, None]
      advantages, returns = losses.gae(token_rewards, values, mask, c.ppo.gamma, c.ppo.lam)
      mean = jnp.sum(advantages * mask) / jnp.maximum(jnp.sum(mask), 1.0)
      std = jnp.sqrt(jnp.sum(jnp.square(advantages - mean) * mask)
                     / jnp.maximum(jnp.sum(mask), 1.0))
      batch.update(advantages=(advantages - mean) / (std + 1e-6) * mask, old_values=values,
                   returns=returns)
    return batch

  def batch(self, state, rollouts: Rollouts, examples: list[dict], kl_coef: float):
    arrays = _arrays(rollouts)
    params = trainer.all_params(state)
    value_params = critic_params(params, self.config) if self.config.algorithm == 'ppo' else None
    return self._score(self.reference(params['policy']), arrays, self.rewards(rollouts, examples),
                       jnp.float32(kl_coef), value_params)


def _arrays(rollouts: Rollouts) -> dict:
  return {'inputs': rollouts.inputs_BxT, 'targets': rollouts.targets_BxT,
              'segment_ids': rollouts.segment_ids_BxT, 'mask': rollouts.response_mask_BxT,
              'old_log_probs': rollouts.log_probs_BxT * rollouts.response_mask_BxT,
          'last_index': rollouts.last_index_B}


class GenerationTimer:
  """Wall time and tokens of the rollouts sampled between two logged steps: how fast the sampler
  runs and what share of the run it takes (the rest is scoring and the update)."""

  def __init__(self):
    self.seconds, self.tokens = 0.0, 0

  def add(self, seconds: float, tokens: int) -> None:
    self.seconds += seconds
    self.tokens += tokens

  def metrics(self, window_seconds: float) -> dict[str, float]:
    """The window's `perf/generation_share` and `perf/generated_tokens_per_sec`; then resets."""
    result = {'perf/generation_share': self.seconds / max(window_seconds, 1e-9),
              'perf/generated_tokens_per_sec': self.tokens / max(self.seconds, 1e-9)}
    self.seconds, self.tokens = 0.0, 0
    return result


def make_prepare_batch(rl_config, tokenizer, policy, scorer: Scorer, prompts: list[dict],
                       iterator: PromptIterator, mesh, timer: GenerationTimer | None = None):
  """(state, {'indices': this process's prompt indices}) -> training batch, sampling replies
  from the current policy."""
  c = rl_config

  def prepare(state, batch):
    examples = [prompts[int(i)] for i in batch['indices']
                for _ in range(c.rollout.samples_per_prompt)]
    # Sampling needs the updated policy anyway; waiting for it here times generation alone.
    params = jax.block_until_ready(trainer.all_params(state)['policy'])
    start = time.perf_counter()
    rollouts = rollout(policy, params, tokenizer, examples,
                       jax.random.fold_in(state.rng, 1), prompt_len=c.rollout.prompt_len,
                       max_new_tokens=c.rollout.max_new_tokens,
                       temperature=c.rollout.temperature, mesh=mesh)
    if timer is not None:  # rollout ends on the host, with the replies decoded
      timer.add(time.perf_counter() - start, rollouts.generated_tokens)
    rollouts = trimmed(rollouts)
    batch = scorer.batch(state, rollouts, examples, iterator.kl.value)
    if c.kl.adaptive:  # one host sync per step, only when the controller needs the KL
      replies = len(examples) * jax.process_count()
      per_reply = float(jnp.sum((batch['old_log_probs'] - batch['ref_log_probs'])) / replies)
      iterator.kl.update(per_reply, replies)
    return batch

  return prepare


def make_evaluator(rl_config, tokenizer, policy, scorer: Scorer, examples: list[dict], mesh,
                   log):
  """params, step -> held-out format rate, exact match and policy rates
  (`chat.evaluation_metrics`), mean reward and KL to the reference of greedy replies."""
  c = rl_config
  checkable = all(e.get('answer') for e in examples)
  examples = (chat.evaluation_subset(examples, c.eval.num_prompts) if checkable
              else examples[:c.eval.num_prompts])
  kl = jax.jit(lambda params, ref, a: jnp.sum(
      (sequence_token_log_probs(policy, params, a['inputs'], a['targets'], a['segment_ids'])[0]
       - sequence_token_log_probs(scorer.reference_model, ref, a['inputs'], a['targets'],
                                  a['segment_ids'])[0]) * a['mask']))

  def evaluate(params, step):
    if not examples:
      return {}
    results = {}
    replies, rewards, kl_total = [], [], 0.0
    batch_size = c.eval.batch_size
    for start in range(0, len(examples), batch_size):
      chunk = examples[start:start + batch_size]
      padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
      rollouts = rollout(policy, params['policy'], tokenizer, padded, jax.random.PRNGKey(step),
                         prompt_len=c.rollout.prompt_len, max_new_tokens=c.rollout.max_new_tokens,
                         temperature=0.0, mesh=mesh)
      keep = len(chunk)
      replies += rollouts.replies[:keep]
      rewards += list(sharding.local_rows(scorer.rewards(rollouts, padded), mesh)[:keep])
      arrays = _arrays(rollouts)
      kept = sharding.put_batch({'kept': (np.arange(batch_size) < keep).astype(np.float32)},
                                mesh)['kept']
      arrays['mask'] = arrays['mask'] * kept[:, None]
      kl_total += float(kl(params['policy'], scorer.reference(params['policy']), arrays))
    for example, reply in list(zip(examples, replies))[:c.eval.num_samples]:
      log(f'reply at step {step}: {example["messages"][-1]["content"]!r} -> {reply!r}')
    if checkable:
      results.update(chat.evaluation_metrics(replies, examples))
    results['eval/mean_reward'] = float(np.mean(rewards))
    # Every process sampled the same prompts, so the global sums count each one once per process.
    results['eval/kl'] = kl_total / len(examples) / jax.process_count()
    return results

  return evaluate
