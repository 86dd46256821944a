"""`sampling` against references computed another way: greedy decoding against a cache-free
argmax loop, the logit filters against numpy, and sampled tokens against the softmax."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxlm import model as model_lib
from jaxlm import sampling

VOCAB = 61
CONFIG = model_lib.ModelConfig(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=8, mlp_dim=64, max_seq_len=64)
MODEL = model_lib.Transformer(CONFIG)
PROMPT_LEN, MAX_NEW = 6, 8
PROMPT_LENGTHS = np.array([6, 2, 4])


@pytest.fixture(scope='module')
def params():
  """Random float32 params with `init`'s tree, drawn in numpy (no init compile).

  Weights ~ N(0, 1/fan_in) give logits of std ~1: top-2 margins of ~1e-1, far above the ~1e-6
  by which cached and cache-free logits differ, so greedy choices cannot flip on rounding.
  """
  shapes = nn.meta.unbox(jax.eval_shape(MODEL.init, jax.random.PRNGKey(0),
                                        jnp.zeros((1, 8), jnp.int32))['params'])
  rng = np.random.default_rng(0)

  def draw(path, shape):
    if path[-1].key == 'scale':
      return jnp.asarray(1 + 0.2 * rng.standard_normal(shape.shape), jnp.float32)
    fan_in = shape.shape[-1] if path[-1].key == 'embedding' else shape.shape[-2]
    return jnp.asarray(rng.standard_normal(shape.shape) / np.sqrt(fan_in), jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope='module')
def prompts():
  """Right-padded prompts (pad id 0) of lengths PROMPT_LENGTHS."""
  tokens = np.random.default_rng(1).integers(3, VOCAB, (len(PROMPT_LENGTHS), PROMPT_LEN))
  return np.where(np.arange(PROMPT_LEN) < PROMPT_LENGTHS[:, None], tokens, 0).astype(np.int32)


@jax.jit
def _full_logits(params, tokens_1xT, length):
  """Cache-free forward of one row whose first `length` tokens are real (the rest: segment 0)."""
  segment_ids = (jnp.arange(tokens_1xT.shape[1]) < length).astype(jnp.int32)[None]
  return MODEL.apply({'params': params}, tokens_1xT, None, segment_ids)[0][0]


def _naive_greedy(params, prompt, steps):
  """Recompute the whole forward each step and append its argmax; also returns top-2 margins."""
  seq = np.zeros(PROMPT_LEN + MAX_NEW, np.int32)
  seq[:len(prompt)] = prompt
  n, new, margins = len(prompt), [], []
  for _ in range(steps):
    logits = np.asarray(_full_logits(params, jnp.asarray(seq[None]), n)[n - 1])
    top2 = np.sort(logits)[-2:]
    margins.append(top2[1] - top2[0])
    seq[n] = int(logits.argmax())
    new.append(seq[n])
    n += 1
  return new, min(margins)


def _generate(params, prompts, lengths, rng=jax.random.PRNGKey(0), **kwargs):
  tokens, ends = sampling.generate(MODEL, params, jnp.asarray(prompts), jnp.asarray(lengths), rng,
                                   max_new_tokens=kwargs.pop('max_new_tokens', MAX_NEW), **kwargs)
  return np.asarray(tokens), np.asarray(ends)


def _expected_rows(prompts, continuations):
  rows = np.zeros((len(prompts), PROMPT_LEN + MAX_NEW), np.int32)
  for row, (n, new) in enumerate(zip(PROMPT_LENGTHS, continuations)):
    rows[row, :n] = prompts[row, :n]
    rows[row, n:n + len(new)] = new
  return rows


def test_greedy_generate_matches_a_cache_free_argmax_loop(params, prompts):
  reference = [_naive_greedy(params, prompts[row, :n], MAX_NEW)
               for row, n in enumerate(PROMPT_LENGTHS)]
  # Cached logits differ from cache-free ones by ~1e-6 (see test_model): a tie closer than that
  # could flip an argmax, so the reference must have clear winners for the test to be exact.
  assert min(margin for _, margin in reference) > 1e-4
  tokens, lengths = _generate(params, prompts, PROMPT_LENGTHS, temperature=0.0)
  np.testing.assert_array_equal(tokens, _expected_rows(prompts, [new for new, _ in reference]))
  np.testing.assert_array_equal(lengths, PROMPT_LENGTHS + MAX_NEW)


def test_eos_stops_a_row_and_sets_its_length(params, prompts):
  free, _ = _generate(params, prompts, PROMPT_LENGTHS, temperature=0.0)
  continuations = [free[row, n:n + MAX_NEW] for row, n in enumerate(PROMPT_LENGTHS)]
  # eos: a token some row first emits at a step k in the middle, so that row must stop early.
  row, k = next((row, k) for row, new in enumerate(continuations) for k in range(1, MAX_NEW - 1)
                if new[k] not in new[:k])
  eos_id = int(continuations[row][k])

  tokens, lengths = _generate(params, prompts, PROMPT_LENGTHS, temperature=0.0, eos_id=eos_id)
  expected_new = []
  for new in continuations:
    hits = np.flatnonzero(new == eos_id)
    expected_new.append(new[:hits[0] + 1] if len(hits) else new)  # up to and including eos
  assert len(expected_new[row]) == k + 1
  assert any(len(new) == MAX_NEW for new in expected_new)  # and another row runs to the end
  np.testing.assert_array_equal(tokens, _expected_rows(prompts, expected_new))  # zeros after eos
  np.testing.assert_array_equal(lengths, PROMPT_LENGTHS + [len(new) for new in expected_new])


def test_temperature_scales_the_logits():
  logits = np.random.default_rng(2).standard_normal((4, 50)).astype(np.float32)
  np.testing.assert_allclose(sampling.filter_logits(jnp.asarray(logits), 0.5, 0, 1.0),
                             logits / 0.5, rtol=1e-6)  # one float32 division


def test_top_k_keeps_exactly_the_k_largest():
  logits = np.random.default_rng(3).standard_normal((4, 50)).astype(np.float32)
  out = np.asarray(sampling.filter_logits(jnp.asarray(logits), 0.7, 5, 1.0))
  for row in range(len(logits)):
    kept = np.flatnonzero(np.isfinite(out[row]))
    np.testing.assert_array_equal(np.sort(kept), np.sort(np.argsort(logits[row])[-5:]))
    np.testing.assert_allclose(out[row, kept], logits[row, kept] / 0.7, rtol=1e-6)
    assert np.all(out[row][~np.isfinite(out[row])] == -np.inf)


def _nucleus(probs, top_p):
  """numpy reference: the smallest set of most likely tokens whose mass reaches top_p."""
  order = np.argsort(-probs, kind='stable')
  mass = np.cumsum(probs[order])
  return set(order[:np.searchsorted(mass, top_p) + 1].tolist())


# Mass of the sorted prefix: 0.4, 0.7, 0.85, 0.95, 1.0. Each top_p sits away from those edges
# so float32 rounding of the cumulative sum cannot move the answer.
KNOWN_PROBS = np.array([0.05, 0.4, 0.1, 0.3, 0.15])


@pytest.mark.parametrize('top_p,keep', [(1e-9, {1}), (0.1, {1}), (0.5, {1, 3}),
                                        (0.75, {1, 3, 4}), (0.9, {1, 3, 4, 2}),
                                        (0.97, {0, 1, 2, 3, 4})])
def test_top_p_keeps_the_smallest_set_reaching_p_on_a_known_distribution(top_p, keep):
  assert _nucleus(KNOWN_PROBS, top_p) == keep  # the reference agrees with the hand-worked set
  logits = np.log(KNOWN_PROBS)[None].astype(np.float32)
  out = np.asarray(sampling.filter_logits(jnp.asarray(logits), 1.0, 0, top_p))[0]
  assert set(np.flatnonzero(np.isfinite(out)).tolist()) == keep
  np.testing.assert_allclose(out[sorted(keep)], logits[0, sorted(keep)], rtol=1e-6)


def test_top_p_on_random_rows_after_temperature():
  logits = (2 * np.random.default_rng(4).standard_normal((16, 40))).astype(np.float32)
  temperature, top_p = 0.7, 0.8
  out = np.asarray(sampling.filter_logits(jnp.asarray(logits), temperature, 0, top_p))
  tempered = logits.astype(np.float64) / temperature
  probs = np.exp(tempered - tempered.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  for row in range(len(logits)):
    mass = np.cumsum(np.sort(probs[row])[::-1])
    assert np.abs(mass - top_p).min() > 1e-4  # no edge case the float32 sum could decide
    assert set(np.flatnonzero(np.isfinite(out[row])).tolist()) == _nucleus(probs[row], top_p)


def test_top_p_applies_to_the_top_k_renormalised_distribution():
  """Top-k leaves 0.4 and 0.3, renormalised to 0.57 and 0.43: 0.57 alone reaches p = 0.55
  (without renormalising, 0.4 would not, and two tokens would be kept)."""
  logits = np.log(KNOWN_PROBS)[None].astype(np.float32)
  out = np.asarray(sampling.filter_logits(jnp.asarray(logits), 1.0, 2, 0.55))[0]
  assert np.flatnonzero(np.isfinite(out)).tolist() == [1]


NUM_SAMPLES = 8192
TEMPERATURE, TOP_K = 0.8, 20


@pytest.fixture(scope='module')
def first_tokens(params, prompts):
  """The first sampled token of NUM_SAMPLES copies of prompt 0, for keys 0, 0 again and 1.

  Temperature 0.8 and top-k 20 rather than plain sampling, so the test also sees that
  `generate` applies the filters before drawing.
  """
  batch = np.repeat(prompts[:1], NUM_SAMPLES, axis=0)
  lengths = np.full(NUM_SAMPLES, PROMPT_LENGTHS[0])
  out = {}
  for name, key in [('a', 0), ('a_again', 0), ('b', 1)]:
    tokens, _ = _generate(params, batch, lengths, jax.random.PRNGKey(key),
                          temperature=TEMPERATURE, top_k=TOP_K, max_new_tokens=1)
    out[name] = tokens[:, PROMPT_LENGTHS[0]]
  return out


def test_sampling_with_a_fixed_key_is_deterministic(first_tokens):
  np.testing.assert_array_equal(first_tokens['a'], first_tokens['a_again'])
  assert np.mean(first_tokens['a'] != first_tokens['b']) > 0.5  # another key, other samples


def _chi2_p_value(samples, probs):
  """Pearson chi-square goodness of fit; categories expecting < 5 counts are pooled."""
  observed = np.bincount(samples, minlength=len(probs))
  expected = probs * len(samples)
  small = expected < 5
  if small.any():
    observed = np.append(observed[~small], observed[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
  return stats.chisquare(observed, expected).pvalue


def _softmax(logits):
  p = np.exp(logits - logits.max())
  return p / p.sum()


def test_sampled_first_tokens_follow_the_filtered_softmax(params, prompts, first_tokens):
  n = PROMPT_LENGTHS[0]
  logits = np.asarray(_full_logits(params, jnp.asarray(prompts[:1]), n)[n - 1], np.float64)
  top_k = np.argsort(logits)[-TOP_K:]
  rank = np.full(VOCAB, -1)
  rank[top_k] = np.arange(TOP_K)  # token -> its index in top_k; -1 for filtered-out tokens
  probs = _softmax(logits[top_k] / TEMPERATURE)
  for name in ('a', 'b'):
    samples = rank[first_tokens[name]]
    assert np.all(samples >= 0), name  # never a token that top-k removed
    # With the right distribution the p-value is uniform on [0, 1]: below 1e-6 one run in a
    # million (and the keys are fixed, so a pass stays a pass).
    assert _chi2_p_value(samples, probs) > 1e-6, name
  # The test has power: the same samples reject temperature 1 or 0.64, and the uniform.
  samples = rank[first_tokens['a']]
  for wrong in (_softmax(logits[top_k]), _softmax(logits[top_k] / TEMPERATURE**2),
                np.full(TOP_K, 1 / TOP_K)):
    assert _chi2_p_value(samples, wrong) < 1e-6


def test_argmax_is_jnp_argmax_including_ties():
  rng = np.random.default_rng(0)
  logits = rng.integers(0, 4, (64, 50)).astype(np.float32)  # many rows with tied maxima
  logits[0] = -np.inf
  logits[1, [3, 7]] = np.inf
  np.testing.assert_array_equal(sampling.argmax(jnp.asarray(logits)), np.argmax(logits, -1))


@pytest.mark.parametrize('per_row_keys', [False, True])
def test_categorical_draws_what_jax_random_categorical_draws(per_row_keys):
  logits = jnp.asarray(np.random.default_rng(1).standard_normal((256, 40)), jnp.float32)
  logits = logits.at[:, 5:].set(-jnp.inf)  # filtered ids are never drawn
  if per_row_keys:
    keys = jax.random.split(jax.random.key(3), logits.shape[0])
    ours, reference = (jax.vmap(f)(keys, logits)
                       for f in (sampling.categorical, jax.random.categorical))
  else:
    key = jax.random.PRNGKey(3)
    ours, reference = sampling.categorical(key, logits), jax.random.categorical(key, logits)
  np.testing.assert_array_equal(ours, reference)
  assert int(ours.max()) < 5 and len(np.unique(ours)) == 5
