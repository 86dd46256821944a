"""Losses as pure functions, shared by every training stage.

Each returns *sums* and the count they were taken over, so that averages stay exact when a batch
is split across packed rows, microbatches, devices or hosts: divide once, at the end.
"""

import jax
import jax.numpy as jnp


def cross_entropy(logits_BxLxV, targets_BxL, weights_BxL, z_loss: float = 0.0):
  """Next-token cross entropy with a weight mask (1 = counted, 0 = ignored).

  Returns a dict of sums: `loss` (what is optimised: NLL plus `z_loss * log(Z)^2`), `nll`,
  `z_loss`, `correct` (argmax hits) and `count` (sum of weights).
  """
  logits = logits_BxLxV.astype(jnp.float32)
  weights = weights_BxL.astype(jnp.float32)
  log_z_BxL = jax.nn.logsumexp(logits, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
  nll_BxL = log_z_BxL - target_logit_BxL
  z_BxL = z_loss * jnp.square(log_z_BxL)
  # A hit: the target's logit is the largest (argmax, but ties count; a reduce XLA:CPU runs
  # several times faster than argmax's variadic one).
  correct_BxL = target_logit_BxL >= jnp.max(logits, axis=-1)
  return {
      'loss': jnp.sum((nll_BxL + z_BxL) * weights),
      'nll': jnp.sum(nll_BxL * weights),
      'z_loss': jnp.sum(z_BxL * weights),
      'correct': jnp.sum(correct_BxL * weights),
      'count': jnp.sum(weights),
  }


def token_log_probs(logits_BxLxV, targets_BxL):
  """log p(target) per position, float32 [B, L]."""
  logits = logits_BxLxV.astype(jnp.float32)
  return (jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
          - jax.nn.logsumexp(logits, axis=-1))


def bradley_terry(reward_chosen_B, reward_rejected_B, margin: float = 0.0,
                  centering: float = 0.0):
  """Pairwise preference loss `-log σ(r_chosen − r_rejected − margin)`, plus
  `centering * (r_chosen + r_rejected)^2`, which keeps rewards near zero.

  Returns sums over pairs: `loss`, `correct` (r_chosen > r_rejected), `reward_gap`, `count`.
  """
  chosen = reward_chosen_B.astype(jnp.float32)
  rejected = reward_rejected_B.astype(jnp.float32)
  gap = chosen - rejected
  loss = -jax.nn.log_sigmoid(gap - margin) + centering * jnp.square(chosen + rejected)
  return {
      'loss': jnp.sum(loss),
      'correct': jnp.sum((gap > 0).astype(jnp.float32)),
      'reward_gap': jnp.sum(gap),
      'count': jnp.asarray(gap.shape[0], jnp.float32),
  }


# --- Reinforcement learning from samples of the policy (PPO, GRPO, DPO) -------------------------
#
# Masks are float arrays over response tokens: 1 = a sampled response token, 0 = prompt or padding.
# Quantities that are fixed targets of an update (old log-probs, advantages, old values, returns,
# reference log-probs) pass through `jax.lax.stop_gradient` inside the losses, so a caller that
# computes them in the same graph (e.g. `old_logp = logp` on the first PPO epoch, or returns from
# the current value head) cannot leak gradient into them.

KL_KINDS = ('k1', 'k2', 'k3')


def kl_estimate(logp_BxT, ref_logp_BxT, kind: str = 'k3'):
  """Per-token estimate of KL(policy || ref) from tokens sampled from the policy, float32 [B, T].

  With log r = ref_logp - logp (Schulman, "Approximating KL divergence"):
    'k1': -log r               unbiased, but negative on some tokens;
    'k2': (log r)^2 / 2        biased, low variance, nonnegative;
    'k3': (r - 1) - log r      unbiased and nonnegative (computed with expm1, so it stays
                               accurate when the two log-probs are close).
  Gradient flows into both arguments; the losses below decide what is a constant.
  """
  if kind not in KL_KINDS:
    raise ValueError(f'kl_estimate: kind={kind!r} is not one of {", ".join(KL_KINDS)}')
  log_r_BxT = ref_logp_BxT.astype(jnp.float32) - logp_BxT.astype(jnp.float32)
  if kind == 'k1':
    return -log_r_BxT
  if kind == 'k2':
    return 0.5 * jnp.square(log_r_BxT)
  return jnp.expm1(log_r_BxT) - log_r_BxT


def gae(rewards_BxT, values_BxT, mask_BxT, gamma, lam):
  """Generalised advantage estimation, returning (advantages_BxT, returns_BxT) in float32.

  A response is a run of ones in the mask (prompt zeros may precede it, padding zeros follow),
  and is one episode:
    delta_t = r_t + gamma * V_{t+1} - V_t,     A_t = delta_t + gamma * lam * A_{t+1},
  with V and A after its last token taken as 0 (the episode ends there, so the final token's
  reward is not bootstrapped). A row holding several responses (runs of ones separated by zeros)
  is several episodes: nothing flows back across a zero.
  Rewards and values on masked positions are ignored; advantages and returns (= advantages +
  values) are 0 there. Runs as a reverse `jax.lax.scan` over T.
  """
  mask = mask_BxT.astype(jnp.float32)
  rewards = rewards_BxT.astype(jnp.float32) * mask
  values = values_BxT.astype(jnp.float32) * mask
  next_mask_BxT = jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))
  next_values_BxT = jnp.pad(values[:, 1:], ((0, 0), (0, 1)))  # 0 after a response ends
  deltas_BxT = rewards + gamma * next_values_BxT - values

  def step(next_advantage_B, inputs):
    delta_B, next_mask_B = inputs
    advantage_B = delta_B + gamma * lam * next_mask_B * next_advantage_B
    return advantage_B, advantage_B

  _, advantages_TxB = jax.lax.scan(step, jnp.zeros(mask.shape[:1], jnp.float32),
                                   (deltas_BxT.T, next_mask_BxT.T), reverse=True)
  advantages_BxT = advantages_TxB.T * mask
  return advantages_BxT, advantages_BxT + values


def ppo_policy_loss(logp_BxT, old_logp_BxT, advantages_BxT, mask_BxT, clip_eps: float):
  """PPO clipped surrogate, `-min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)` per token,
  with ratio = exp(logp - old_logp).

  Returns sums over masked tokens: `loss`; `clip_fraction`, the tokens where the clipped term is
  strictly the smaller, i.e. active (these get exactly zero gradient; a ratio outside the range
  whose unclipped term is the smaller one, e.g. ratio > 1 + eps with A < 0, is not counted);
  `approx_kl`, the k3 estimate of KL(old || new) from the old policy's samples,
  (ratio - 1) - log ratio, nonnegative; and `count`.
  """
  mask = mask_BxT.astype(jnp.float32)
  logp = logp_BxT.astype(jnp.float32)
  old_logp = jax.lax.stop_gradient(old_logp_BxT.astype(jnp.float32))
  advantages = jax.lax.stop_gradient(advantages_BxT.astype(jnp.float32))
  ratio_BxT = jnp.exp(logp - old_logp)
  unclipped_BxT = ratio_BxT * advantages
  clipped_BxT = jnp.clip(ratio_BxT, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
  clip_active_BxT = clipped_BxT < unclipped_BxT
  objective_BxT = jnp.where(clip_active_BxT, clipped_BxT, unclipped_BxT)
  return {
      'loss': -jnp.sum(objective_BxT * mask),
      'clip_fraction': jnp.sum(clip_active_BxT * mask),
      'approx_kl': jnp.sum(kl_estimate(old_logp, logp, 'k3') * mask),
      'count': jnp.sum(mask),
  }


def value_loss(values_BxT, old_values_BxT, returns_BxT, mask_BxT, clip_eps: float):
  """PPO clipped value loss, `0.5 * max((v - R)^2, (clip(v, old - eps, old + eps) - R)^2)`.

  Returns sums over masked tokens: `loss`; `clip_fraction`, the tokens where the clipped term is
  strictly the larger, i.e. active (zero gradient there); `count`.
  """
  mask = mask_BxT.astype(jnp.float32)
  values = values_BxT.astype(jnp.float32)
  old_values = jax.lax.stop_gradient(old_values_BxT.astype(jnp.float32))
  returns = jax.lax.stop_gradient(returns_BxT.astype(jnp.float32))
  clipped_values_BxT = jnp.clip(values, old_values - clip_eps, old_values + clip_eps)
  unclipped_BxT = jnp.square(values - returns)
  clipped_BxT = jnp.square(clipped_values_BxT - returns)
  clip_active_BxT = clipped_BxT > unclipped_BxT
  loss_BxT = 0.5 * jnp.where(clip_active_BxT, clipped_BxT, unclipped_BxT)
  return {
      'loss': jnp.sum(loss_BxT * mask),
      'clip_fraction': jnp.sum(clip_active_BxT * mask),
      'count': jnp.sum(mask),
  }


def group_advantages(rewards_B, group_size: int, eps: float = 1e-6):
  """GRPO advantages, float32 [B]: each reward standardised within its group,
  `(r - group mean) / (group std + eps)`, with the population std (so a group's advantages have
  mean 0 and std ~1, and a group of equal rewards gets all zeros).

  Layout: the B = num_prompts * group_size rewards come as consecutive groups, one per prompt:
  rewards_B[i * group_size:(i + 1) * group_size] are the samples for prompt i.
  """
  batch = rewards_B.shape[0]
  if group_size < 1 or batch % group_size:
    raise ValueError(f'group_advantages: {batch} rewards do not split into groups of '
                     f'group_size={group_size}; expected num_prompts * group_size rewards')
  rewards_PxG = rewards_B.astype(jnp.float32).reshape(batch // group_size, group_size)
  mean_Px1 = jnp.mean(rewards_PxG, axis=-1, keepdims=True)
  std_Px1 = jnp.std(rewards_PxG, axis=-1, keepdims=True)
  return ((rewards_PxG - mean_Px1) / (std_Px1 + eps)).reshape(batch)


def dpo_loss(policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B, beta: float,
             label_smoothing: float = 0.0):
  """Direct preference optimisation on sequence log-probs (see `sequence_log_probs`).

  With m = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected), per pair
  `-(1 - ls) * log σ(β m) - ls * log σ(-β m)` (ls = label_smoothing: the probability that a
  label is flipped, the conservative DPO of Mitchell 2023). Reference log-probs are constants.
  Returns sums over pairs: `loss`, `correct` (m > 0, the implicit reward prefers the chosen),
  `reward_margin` (β m), `count`.
  """
  ref_chosen = jax.lax.stop_gradient(ref_chosen_B.astype(jnp.float32))
  ref_rejected = jax.lax.stop_gradient(ref_rejected_B.astype(jnp.float32))
  margin_B = ((policy_chosen_B.astype(jnp.float32) - policy_rejected_B.astype(jnp.float32))
              - (ref_chosen - ref_rejected))
  logits_B = beta * margin_B
  loss_B = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits_B)
            - label_smoothing * jax.nn.log_sigmoid(-logits_B))
  return {
      'loss': jnp.sum(loss_B),
      'correct': jnp.sum((margin_B > 0).astype(jnp.float32)),
      'reward_margin': jnp.sum(logits_B),
      'count': jnp.asarray(margin_B.shape[0], jnp.float32),
  }


def reply_mask(reply_start_B, last_B, num_targets: int):
  """[B, num_targets] float mask of the targets that are reply tokens, for targets shifted by
  one (target j is token j + 1) and replies spanning tokens reply_start..last."""
  positions = jnp.arange(num_targets) + 1
  return ((positions >= reply_start_B[:, None])
          & (positions <= last_B[:, None])).astype(jnp.float32)


def sequence_log_probs(token_logp_BxT, mask_BxT):
  """log p(response) per row, float32 [B]: the sum of token log-probs over masked tokens."""
  return jnp.sum(token_logp_BxT.astype(jnp.float32) * mask_BxT.astype(jnp.float32), axis=-1)
