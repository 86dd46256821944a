"""The transformer against itself computed another way: masking, packing, scan, remat, KV cache,
bf16 and the parameter count."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import losses
from jaxlm import model as model_lib

VOCAB = 61

# Identical float32 graphs fed different *masked* values: masked keys get softmax weight exactly 0,
# so logits should be bit-identical; 1e-6 only leaves room for XLA reassociating a fusion.
MASKED_ATOL = 1e-6
# The same logits through differently shaped computations (a longer key axis, a cache, scan vs a
# Python loop): float32 sums taken in another order differ by a few ulps of values ~1, while a
# real leak between tokens or documents moves logits by > 1e-2 (asserted where it matters).
REORDER_ATOL = 2e-5


def _config(**overrides):
  fields = dict(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=4,
                head_dim=8, mlp_dim=64, max_seq_len=64)
  return model_lib.ModelConfig(**{**fields, **overrides})


def _param_shapes(config):
  model = model_lib.Transformer(config)
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  return nn.meta.unbox(boxed['params'])


def _params(config, seed=0):
  """Random float32 params with `init`'s tree (drawn in numpy: no init compile per config).

  Norm scales are drawn around 1, not left at 1, so a scale applied wrongly shows in the logits.
  """
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    if path[-1].key == 'scale':
      return jnp.asarray(1 + 0.2 * rng.standard_normal(shape.shape), jnp.float32)
    fan_in = shape.shape[-1] if path[-1].key == 'embedding' else shape.shape[-2]
    return jnp.asarray(rng.standard_normal(shape.shape) / np.sqrt(fan_in), jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, _param_shapes(config))


def _unstack_layers(params, num_layers):
  """Scanned params (`layers` stacked on axis 0) -> the unrolled model's `layer_i` tree."""
  out = {k: v for k, v in params.items() if k != 'layers'}
  for i in range(num_layers):
    out[f'layer_{i}'] = jax.tree.map(lambda a, i=i: a[i], params['layers'])
  return out


@functools.cache
def _forward(config):
  model = model_lib.Transformer(config)

  @jax.jit
  def forward(params, tokens, positions=None, segment_ids=None):
    return model.apply({'params': params}, tokens, positions, segment_ids)[0]

  return forward


@functools.cache
def _cached_forward(config):
  model = model_lib.Transformer(config)

  @jax.jit
  def forward(params, tokens, positions, cache):
    return model.apply({'params': params}, tokens, positions, jnp.ones_like(tokens), cache=cache)

  return forward


# Every full forward uses this [batch, length], so each config compiles once for the whole file.
BATCH, LENGTH = 5, 16


def _tokens(batch=BATCH, length=LENGTH, seed=1):
  return jnp.asarray(np.random.default_rng(seed).integers(3, VOCAB, (batch, length)), jnp.int32)


@pytest.mark.parametrize('scan_layers', [True, False])
def test_changing_a_future_token_changes_only_later_logits(scan_layers):
  config = _config(scan_layers=scan_layers)
  params = _params(config)
  tokens = _tokens()
  t = 9
  changed = tokens.at[:, t].set(3 + (tokens[:, t] - 3 + 1) % (VOCAB - 3))  # another id in [3, V)
  before, after = _forward(config)(params, tokens), _forward(config)(params, changed)
  np.testing.assert_allclose(after[:, :t], before[:, :t], rtol=0, atol=MASKED_ATOL)
  # Every position from t on sees the changed token, so each must move.
  moved = np.abs(np.asarray(after[:, t:] - before[:, t:])).max(axis=-1)
  assert moved.min() > 1e-2, moved


@pytest.mark.parametrize('scan_layers,num_kv_heads', [(True, 4), (False, 4), (True, 2), (False, 2)])
def test_packed_documents_match_each_document_alone(scan_layers, num_kv_heads):
  config = _config(scan_layers=scan_layers, num_kv_heads=num_kv_heads)
  params = _params(config)
  lengths = (5, 6, 3)  # then 2 padding slots
  docs = [np.asarray(_tokens(1, n, seed=10 + i)[0]) for i, n in enumerate(lengths)]
  starts = np.cumsum((0,) + lengths)

  # Row 0: the documents packed (segments 1, 2, 3, positions restarting, padding segment 0).
  # Row 1: the same with one segment for all, so documents 2 and 3 see earlier ones (a leak).
  # Rows 2-4: each document alone from position 0, segment 1, then padding.
  tokens = np.zeros((BATCH, LENGTH), np.int32)
  positions = np.zeros((BATCH, LENGTH), np.int32)
  segment_ids = np.zeros((BATCH, LENGTH), np.int32)
  for i, doc in enumerate(docs):
    packed = slice(starts[i], starts[i + 1])
    tokens[0:2, packed] = doc
    positions[0:2, packed] = np.arange(len(doc))
    segment_ids[0, packed] = i + 1
    tokens[2 + i, :len(doc)] = doc
    positions[2 + i] = np.arange(LENGTH)
    segment_ids[2 + i, :len(doc)] = 1
  segment_ids[1, :starts[-1]] = 1
  logits = np.asarray(_forward(config)(params, jnp.asarray(tokens), jnp.asarray(positions),
                                       jnp.asarray(segment_ids)))
  assert np.isfinite(logits).all()  # padding queries see no key; they must not be NaN

  for i, n in enumerate(lengths):
    packed, alone = logits[0, starts[i]:starts[i + 1]], logits[2 + i, :n]
    np.testing.assert_allclose(packed, alone, rtol=0, atol=REORDER_ATOL,
                               err_msg=f'document {i + 1}')
    if i > 0:  # the comparison is sensitive to a leak between documents, so it can fail
      assert np.abs(logits[1, starts[i]:starts[i + 1]] - alone).max() > 1e-2


@pytest.mark.parametrize('num_kv_heads', [4, 2])
def test_scanned_and_unrolled_layers_agree_on_the_same_params(num_kv_heads):
  scanned = _config(num_kv_heads=num_kv_heads, scan_layers=True)
  unrolled = dataclasses.replace(scanned, scan_layers=False)
  params = _params(scanned)
  unrolled_params = _unstack_layers(params, scanned.num_layers)
  assert (jax.tree.map(jnp.shape, unrolled_params) ==
          jax.tree.map(lambda s: s.shape, _param_shapes(unrolled)))
  tokens = _tokens()
  want = np.asarray(_forward(scanned)(params, tokens))
  np.testing.assert_allclose(_forward(unrolled)(unrolled_params, tokens), want, rtol=0,
                             atol=REORDER_ATOL)
  # Swapping the two layers must change the output, or the comparison above proves nothing.
  swapped = dict(unrolled_params, layer_0=unrolled_params['layer_1'],
                 layer_1=unrolled_params['layer_0'])
  assert np.abs(_forward(unrolled)(swapped, tokens) - want).max() > 1e-2


@pytest.mark.parametrize('scan_layers', [True, False])
def test_full_remat_gives_the_same_loss_and_gradients(scan_layers):
  plain = _config(scan_layers=scan_layers)
  params = _params(plain)
  tokens = _tokens(2, 12)
  targets = jnp.roll(tokens, -1, axis=1)
  weights = jnp.ones(tokens.shape).at[:, -1].set(0)

  def loss_and_grads(config):
    model = model_lib.Transformer(config)

    def loss_fn(p):
      logits = model.apply({'params': p}, tokens)[0]
      return losses.cross_entropy(logits, targets, weights)['loss']

    return jax.jit(jax.value_and_grad(loss_fn))(params)

  loss, grads = loss_and_grads(plain)
  remat_loss, remat_grads = loss_and_grads(dataclasses.replace(plain, remat='full'))
  # Recomputing the forward in the backward pass is the same float32 arithmetic; only fusion
  # order may differ, a few ulps on a loss of ~100 and gradients of ~1.
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               remat_grads, grads)
  assert all(np.abs(g).max() > 1e-4 for g in jax.tree.leaves(grads))  # every param is used


@pytest.mark.parametrize('scan_layers,num_kv_heads', [(True, 4), (False, 2)])
def test_token_by_token_decoding_with_a_cache_matches_the_full_forward(scan_layers, num_kv_heads):
  config = _config(scan_layers=scan_layers, num_kv_heads=num_kv_heads)
  params = _params(config)
  tokens = _tokens()
  full = np.asarray(_forward(config)(params, tokens))

  cache = model_lib.init_cache(config, BATCH, LENGTH)
  step_logits = []
  for i in range(LENGTH):
    logits, cache = _cached_forward(config)(params, tokens[:, i:i + 1],
                                            jnp.full((BATCH, 1), i, jnp.int32), cache)
    step_logits.append(np.asarray(logits[:, 0]))
  np.testing.assert_allclose(np.stack(step_logits, axis=1), full, rtol=0, atol=REORDER_ATOL)


@pytest.mark.parametrize('scan_layers,num_kv_heads', [(True, 4), (False, 2)])
def test_prefill_then_steps_at_per_row_positions_matches_the_full_forward(scan_layers,
                                                                          num_kv_heads):
  """Rows with prompts of different lengths, right-padded with junk, as `sampling` runs them."""
  config = _config(scan_layers=scan_layers, num_kv_heads=num_kv_heads)
  params = _params(config)
  prompt_lengths = np.array([4, 7, 1, 5, 2])
  prompt_len = prompt_lengths.max()
  steps = LENGTH - prompt_len  # the longest prompt fills the cache
  tokens = _tokens()
  full = np.asarray(_forward(config)(params, tokens))

  junk = np.asarray(_tokens(BATCH, prompt_len, seed=99))
  prompts = np.where(np.arange(prompt_len) < prompt_lengths[:, None],
                     np.asarray(tokens[:, :prompt_len]), junk)
  cache = model_lib.init_cache(config, BATCH, LENGTH)
  logits, cache = _cached_forward(config)(
      params, jnp.asarray(prompts), jnp.broadcast_to(jnp.arange(prompt_len), (BATCH, prompt_len)),
      cache)
  for row, n in enumerate(prompt_lengths):
    np.testing.assert_allclose(logits[row, :n], full[row, :n], rtol=0, atol=REORDER_ATOL)

  rows = np.arange(BATCH)
  for i in range(steps):
    positions = prompt_lengths + i
    logits, cache = _cached_forward(config)(
        params, jnp.asarray(np.asarray(tokens)[rows, positions][:, None]),
        jnp.asarray(positions[:, None], jnp.int32), cache)
    np.testing.assert_allclose(logits[:, 0], full[rows, positions], rtol=0, atol=REORDER_ATOL,
                               err_msg=f'step {i}')


def _attention_float64(q, k, v, mask, scale):
  """Grouped-query softmax attention in float64 numpy, one query head at a time."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  group = q.shape[2] // k.shape[2]
  out = np.zeros_like(q)
  for head in range(q.shape[2]):
    scores = np.einsum('blh,bsh->bls', q[:, :, head], k[:, :, head // group]) * scale
    scores = np.where(mask[:, 0], scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True, initial=-1e300))
    weights = np.where(mask[:, 0].any(-1, keepdims=True), weights, 1.0)  # padding: uniform
    out[:, :, head] = np.einsum('bls,bsh->blh', weights / weights.sum(-1, keepdims=True),
                                v[:, :, head // group])
  return out


def _attention_inputs(num_heads, num_kv_heads, seed=0):
  """Two packed documents, then padding, in a row; a second row with one document."""
  rng = np.random.default_rng(seed)
  B, L, H = 2, 12, 8
  q, k, v = (rng.standard_normal((B, L, n, H)).astype(np.float32)
             for n in (num_heads, num_kv_heads, num_kv_heads))
  segments = np.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * L])
  positions = np.array([list(range(5)) + list(range(4)) + [0] * 3, list(range(L))])
  mask = np.asarray(model_lib.attention_mask(positions, segments, positions, segments))
  return q, k, v, mask


def _grouped_attention(q, k, v, mask, scale):
  """`grouped_attention` with keys and values in the layout of q, [B, L, heads, H]."""
  return model_lib.grouped_attention(q, model_lib.heads_major(k), model_lib.heads_major(v), mask,
                                     scale)


@pytest.mark.parametrize('num_heads,num_kv_heads', [(4, 4), (4, 2), (6, 1)])
def test_grouped_attention_matches_float64_and_jax_reference(num_heads, num_kv_heads):
  q, k, v, mask = _attention_inputs(num_heads, num_kv_heads)
  scale = 0.3
  out = _grouped_attention(q, k, v, mask, scale)
  # float32 against float64: a few ulps of outputs of order 1.
  np.testing.assert_allclose(out, _attention_float64(q, k, v, mask, scale), rtol=0, atol=1e-5)

  def loss(attention, q, k, v):
    return jnp.sum(jnp.sin(attention(q, k, v)))
  ours = jax.grad(functools.partial(loss, lambda q, k, v: _grouped_attention(
      q, k, v, mask, scale)), argnums=(0, 1, 2))(q, k, v)
  reference = jax.grad(functools.partial(loss, lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, mask=mask, scale=scale)), argnums=(0, 1, 2))(q, k, v)
  for got, want in zip(ours, reference):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def _long_packed_inputs(num_heads, num_kv_heads, seed=1):
  """Rows of 100 tokens (four query blocks of 32, the last of 4): packed documents that cross
  block ends, then padding; and one document. Also the [B, L] mask of real (non-padding) tokens."""
  rng = np.random.default_rng(seed)
  B, L, H = 2, 100, 8
  q, k, v = (rng.standard_normal((B, L, n, H)).astype(np.float32)
             for n in (num_heads, num_kv_heads, num_kv_heads))
  lengths = [(1, 30), (2, 41), (3, 20), (0, 9)]
  segments = np.array([np.repeat([s for s, _ in lengths], [n for _, n in lengths]), [1] * L])
  positions = np.array([np.concatenate([np.arange(n) for _, n in lengths]), np.arange(L)])
  mask = np.asarray(model_lib.attention_mask(positions, segments, positions, segments))
  return q, k, v, mask, segments != 0


@pytest.mark.parametrize('num_heads,num_kv_heads', [(4, 4), (4, 2)])
def test_causal_blocked_attention_matches_float64_and_one_block(num_heads, num_kv_heads):
  """On real tokens. A padding query sees no key and averages the values its block holds, where
  one block averages them all: a difference nothing reads, as no query attends to padding."""
  q, k, v, mask, real = _long_packed_inputs(num_heads, num_kv_heads)
  scale = 0.3
  blocked = functools.partial(model_lib.causal_blocked_attention, mask_Bx1xLxL=mask,
                              scale=scale, num_blocks=4)
  one_block = functools.partial(_grouped_attention, mask=mask, scale=scale)
  np.testing.assert_allclose(np.asarray(blocked(q, k, v))[real],
                             _attention_float64(q, k, v, mask, scale)[real], rtol=0, atol=1e-5)

  def loss(attention, q, k, v):
    return jnp.sum(jnp.sin(attention(q, k, v)) * real[:, :, None, None])
  ours = jax.grad(functools.partial(loss, blocked), argnums=(0, 1, 2))(q, k, v)
  reference = jax.grad(functools.partial(loss, one_block), argnums=(0, 1, 2))(q, k, v)
  for got, want in zip(ours, reference):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_causal_query_blocks_leave_packed_logits_unchanged():
  one_block = _config(causal_query_blocks=1)
  params = _params(one_block)
  rng = np.random.default_rng(3)
  tokens = jnp.asarray(rng.integers(0, VOCAB, (2, 64)), jnp.int32)
  segments = jnp.asarray(np.repeat([[1, 2, 3], [1, 1, 1]], [20, 30, 14], axis=1), jnp.int32)
  positions = jnp.asarray(np.stack([np.concatenate([np.arange(n) for n in (20, 30, 14)]),
                                    np.arange(64)]), jnp.int32)
  ref = _forward(one_block)(params, tokens, positions, segments)
  for blocks in (2, 4):
    out = _forward(_config(causal_query_blocks=blocks))(params, tokens, positions, segments)
    np.testing.assert_allclose(out, ref, rtol=0, atol=REORDER_ATOL)


def test_grouped_attention_in_bfloat16_is_close_to_float64():
  q, k, v, mask = _attention_inputs(4, 2)
  out = _grouped_attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)), mask, 8 ** -0.5)
  assert out.dtype == jnp.bfloat16
  # Inputs rounded to 8 bits (relative 2^-9) and probabilities rounded once more: outputs (values
  # of order 1) within 3e-2; a wrong mask or scale moves them by far more.
  err = np.abs(np.asarray(out, np.float32) - _attention_float64(q, k, v, mask, 8 ** -0.5))
  assert err.max() < 3e-2, err.max()


def test_bfloat16_compute_is_close_to_float32():
  fp32 = _config()
  bf16 = dataclasses.replace(fp32, dtype='bfloat16')
  params = _params(fp32)
  tokens = _tokens()
  ref = np.asarray(_forward(fp32)(params, tokens))
  out = _forward(bf16)(params, tokens)
  assert out.dtype == jnp.float32  # logits are returned in float32 whatever the compute dtype
  err = np.abs(np.asarray(out) - ref)
  # bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2%); after the dozen roundings of
  # two layers the typical error is ~1% of the logit scale (std ~1) and the worst of 5x16x61
  # logits ~10%. A wrong cast or a dropped norm would be of the order of the scale itself.
  scale = ref.std()
  assert err.mean() < 0.03 * scale, err.mean()
  assert err.max() < 0.3 * scale, err.max()
  assert err.max() > 1e-4  # bf16 really was used: float32 would agree to ~1e-6


@pytest.mark.parametrize('overrides', [
    dict(tie_embeddings=False),
    dict(tie_embeddings=True),
    dict(num_kv_heads=2, num_layers=3, mlp_dim=48),
    dict(num_kv_heads=1, tie_embeddings=True, scan_layers=False),
])
def test_num_params_counts_the_actual_parameters(overrides):
  config = _config(**overrides)
  shapes = _param_shapes(config)
  actual = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
  embeddings = int(np.prod(shapes['embed']['embedding'].shape))
  if 'unembed' in shapes:
    embeddings += int(np.prod(shapes['unembed']['kernel'].shape))
  assert ('unembed' in shapes) == (not config.tie_embeddings)
  assert config.num_params() == actual
  assert config.num_params(include_embeddings=False) == actual - embeddings


def test_ids_that_only_pad_the_embedding_get_no_probability():
  padded = _config(tokenizer_vocab_size=VOCAB - 5)
  params = _params(padded)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB - 5, (2, 6)), jnp.int32)
  logits, _ = model_lib.Transformer(padded).apply({'params': params}, tokens)
  full, _ = model_lib.Transformer(_config()).apply({'params': params}, tokens)
  probs = jax.nn.softmax(logits)
  assert float(jnp.max(probs[..., VOCAB - 5:])) == 0.0
  # The real ids keep their logits; only the normaliser loses the padding ids.
  np.testing.assert_array_equal(logits[..., :VOCAB - 5], full[..., :VOCAB - 5])
