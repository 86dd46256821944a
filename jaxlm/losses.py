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
  correct_BxL = jnp.argmax(logits, axis=-1) == targets_BxL
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
      'correct': jnp.sum(gap > 0),
      'reward_gap': jnp.sum(gap),
      'count': jnp.asarray(gap.shape[0], jnp.float32),
  }
