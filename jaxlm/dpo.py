"""Direct preference optimisation: the policy's log-likelihood margin between chosen and
rejected replies, measured against a frozen reference, trained with `losses.dpo_loss`."""

import jax
import jax.numpy as jnp

from jaxlm import losses


def reply_log_probs(model, params, tokens_BxL, start_B, last_B):
  """Sum of log p(token) over each row's reply: tokens start..last (inclusive)."""
  inputs, targets = tokens_BxL[:, :-1], tokens_BxL[:, 1:]
  segment_ids = (jnp.arange(inputs.shape[1]) <= last_B[:, None]).astype(jnp.int32)
  logits, _ = model.apply({'params': params}, inputs, None, segment_ids)
  return losses.sequence_log_probs(losses.token_log_probs(logits, targets),
                                   losses.reply_mask(start_B, last_B, targets.shape[1]))


def pair_log_probs(model, params, batch):
  """(chosen [B], rejected [B]) reply log-probs, from one forward pass over both halves."""
  both = reply_log_probs(
      model, params, jnp.concatenate([batch['chosen'], batch['rejected']]),
      jnp.concatenate([batch['chosen_start'], batch['rejected_start']]),
      jnp.concatenate([batch['chosen_last'], batch['rejected_last']]))
  return jnp.split(both, 2)


def reference_adder(model):
  """(reference params, batch) -> batch with the frozen reference's reply log-probs added."""
  @jax.jit
  def add(params, batch):
    chosen, rejected = pair_log_probs(model, params, batch)
    return dict(batch, ref_chosen=chosen, ref_rejected=rejected)
  return add


def dpo_loss(model, beta: float, label_smoothing: float):
  def loss_fn(params, batch, rng):
    del rng
    chosen, rejected = pair_log_probs(model, params, batch)
    sums = losses.dpo_loss(chosen, rejected, batch['ref_chosen'], batch['ref_rejected'], beta,
                           label_smoothing)
    return sums['loss'], sums
  return loss_fn
