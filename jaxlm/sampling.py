"""Batched sampling with a KV cache, compiled once per shape.

Prompts are right-padded to a common length with per-row lengths. One forward pass over the
padded prompts fills the cache; then each step feeds every row's last token at that row's own
position. Cache slots past a row's prompt hold padding until decoding overwrites them, and the
causal mask (key position <= query position) never lets a row read a slot it has not written.

`generate` runs the whole decode in one `lax.while_loop`. Its pieces, `prefill`, `choose` and
`decode_step`, are also what `jaxlm.serving` calls one step at a time to stream tokens.
"""

import functools
import numbers

import jax
import jax.numpy as jnp

from jaxlm import model as model_lib


def _is_static(value) -> bool:
  """A Python number: settings a Python branch can read. Anything else is per row, [B]."""
  return isinstance(value, numbers.Number)


def _column(value):
  return value if _is_static(value) else jnp.asarray(value)[:, None]


def filter_logits(logits_BxV, temperature, top_k, top_p):
  """Temperature, then top-k, then nucleus (top-p) filtering; masked logits become -inf.

  Each setting is a number, or an array [B] with one value per row (traced, so one compilation
  serves every value; a row's top_k 0 or top_p 1 keeps all its tokens).
  """
  logits = logits_BxV.astype(jnp.float32) / jnp.maximum(_column(temperature), 1e-6)
  if _is_static(top_k):
    if top_k > 0:
      kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
      logits = jnp.where(logits < kth, -jnp.inf, logits)
  else:
    k_Bx1 = _column(top_k)
    descending = jnp.sort(logits, axis=-1)[:, ::-1]
    kth = jnp.take_along_axis(descending, jnp.clip(k_Bx1 - 1, 0, logits.shape[-1] - 1), axis=1)
    logits = jnp.where((k_Bx1 > 0) & (logits < kth), -jnp.inf, logits)
  if not _is_static(top_p) or top_p < 1.0:
    p = _column(top_p)
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(mass_before < p, sorted_logits, jnp.inf), axis=-1,
                     keepdims=True)
    drop = logits < cutoff
    if not _is_static(top_p):
      drop &= p < 1.0  # float32's running sum can reach 1 before the last token
    logits = jnp.where(drop, -jnp.inf, logits)
  return logits


def argmax(x_BxV):
  """`jnp.argmax` over the last axis (the first of equal maxima) from two plain reductions,
  which XLA:CPU runs 3-4x faster than argmax's variadic (value, index) one."""
  V = x_BxV.shape[-1]
  is_max = x_BxV == jnp.max(x_BxV, axis=-1, keepdims=True)
  return jnp.minimum(jnp.min(jnp.where(is_max, jnp.arange(V), V), axis=-1), V - 1)


def categorical(rng, logits_BxV):
  """The draws of `jax.random.categorical` (Gumbel noise plus logits, then the argmax), with
  the faster `argmax`."""
  return argmax(jax.random.gumbel(rng, logits_BxV.shape, logits_BxV.dtype) + logits_BxV)


def choose(logits_BxV, rng, temperature, top_k: int = 0, top_p: float = 1.0):
  """The next token of each row: the argmax where temperature is 0, else a draw from the
  filtered softmax. `rng` is one key for the batch, or one key per row ([B] typed keys) so that
  a row's draws do not depend on the rows beside it. Settings as in `filter_logits`."""
  greedy_B = argmax(logits_BxV)
  if _is_static(temperature) and temperature == 0:
    return greedy_B
  filtered_BxV = filter_logits(logits_BxV, temperature, top_k, top_p)
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) and rng.ndim == 1:
    sampled_B = jax.vmap(categorical)(rng, filtered_BxV)
  else:
    sampled_B = categorical(rng, filtered_BxV)
  if _is_static(temperature):
    return sampled_B
  return jnp.where(temperature == 0, greedy_B, sampled_B)


def prefill(model: model_lib.Transformer, params, prompts_BxP, prompt_lengths_B, cache):
  """Runs right-padded prompts through the model into `cache` (positions from 0); returns the
  logits [B, V] after each row's last prompt token, and the cache."""
  B, P = prompts_BxP.shape
  positions = jnp.broadcast_to(jnp.arange(P), (B, P))
  return model.apply({'params': params}, prompts_BxP, positions, jnp.ones_like(prompts_BxP),
                     cache, prompt_lengths_B - 1, method='logits_at')


def decode_step(model: model_lib.Transformer, params, tokens_B, positions_B, cache):
  """Feeds each row's token at that row's own position; returns the next logits [B, V] and the
  cache."""
  logits_Bx1xV, cache = model.apply({'params': params}, tokens_B[:, None], positions_B[:, None],
                                    jnp.ones_like(tokens_B)[:, None], cache=cache)
  return logits_Bx1xV[:, 0], cache


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'temperature', 'top_k',
                                             'top_p', 'eos_id', 'return_log_probs'))
def generate(model: model_lib.Transformer, params, prompts_BxP, prompt_lengths_B, rng, *,
             max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: int | None = None, return_log_probs: bool = False):
  """Samples continuations; temperature 0 is greedy.

  Returns (tokens [B, P + max_new_tokens] with each row's continuation starting at its prompt
  length, lengths [B] of prompt plus generated tokens up to and including eos). With
  `return_log_probs`, also float32 [B, P + max_new_tokens]: log p(token | prefix) of each
  generated token under the model itself (before temperature and filtering), 0 elsewhere: what
  RL needs as the behaviour policy's log-probs.
  """
  B, P = prompts_BxP.shape
  total = P + max_new_tokens
  last_logits_BxV, cache = prefill(model, params, prompts_BxP, prompt_lengths_B,
                                   model_lib.init_cache(model.config, B, total))
  tokens = jnp.zeros((B, total), prompts_BxP.dtype).at[:, :P].set(prompts_BxP)
  log_probs = jnp.zeros((B, total), jnp.float32)

  def step(carry):
    i, tokens, log_probs, cache, logits_BxV, done_B, rng = carry
    rng, step_rng = jax.random.split(rng)
    next_B = choose(logits_BxV, step_rng, temperature, top_k, top_p).astype(tokens.dtype)
    position_B = prompt_lengths_B + i
    tokens = tokens.at[jnp.arange(B), position_B].set(jnp.where(done_B, 0, next_B))
    next_log_prob_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV.astype(jnp.float32)),
                                          next_B[:, None], axis=1)[:, 0]
    log_probs = log_probs.at[jnp.arange(B), position_B].set(
        jnp.where(done_B, 0.0, next_log_prob_B))
    if eos_id is not None:
      done_B = done_B | (next_B == eos_id)
    logits_BxV, cache = decode_step(model, params, next_B, position_B, cache)
    return i + 1, tokens, log_probs, cache, logits_BxV, done_B, rng

  def not_finished(carry):
    i, done_B = carry[0], carry[5]
    return (i < max_new_tokens) & ~jnp.all(done_B)

  done = jnp.zeros((B,), bool)
  _, tokens, log_probs, _, _, done, _ = jax.lax.while_loop(
      not_finished, step, (jnp.int32(0), tokens, log_probs, cache, last_logits_BxV, done, rng))
  lengths = _lengths(tokens, prompt_lengths_B, max_new_tokens, eos_id)
  if return_log_probs:
    return tokens, lengths, log_probs
  return tokens, lengths


def _lengths(tokens_BxT, prompt_lengths_B, max_new_tokens, eos_id):
  offsets = jnp.arange(max_new_tokens)
  positions_BxN = prompt_lengths_B[:, None] + offsets
  new_BxN = jnp.take_along_axis(tokens_BxT, positions_BxN, axis=1)
  if eos_id is None:
    return prompt_lengths_B + max_new_tokens
  is_eos = new_BxN == eos_id
  first_eos = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, max_new_tokens)
  return prompt_lengths_B + first_eos
