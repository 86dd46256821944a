"""`losses` against float64 numpy: the sums, the count, and the gradient w.r.t. the logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import losses

B, L, V = 3, 7, 13
Z_LOSS = 1e-2
# float32 log-softmax of logits ~3 has relative error ~1e-7 per term; summed over 21 positions
# the sums stay within ~1e-6 relative of float64. 1e-5 leaves margin and is still far below any
# real error (a wrong target, a missed weight or a dropped z term moves a sum by > 1e-2).
RTOL = 1e-5


def _log_softmax64(logits):
  x = np.asarray(logits, np.float64)
  m = x.max(axis=-1, keepdims=True)
  log_z = m[..., 0] + np.log(np.exp(x - m).sum(axis=-1))
  return x - log_z[..., None], log_z


@pytest.fixture
def batch():
  rng = np.random.default_rng(0)
  logits = (3 * rng.standard_normal((B, L, V))).astype(np.float32)
  targets = rng.integers(0, V, (B, L))
  targets[0] = logits[0].argmax(-1)  # some hits, so `correct` is not trivially 0
  weights = rng.choice([0.0, 1.0, 0.5], size=(B, L), p=[0.3, 0.5, 0.2]).astype(np.float32)
  weights[0, :3] = 0  # zero weight on some of the hits too
  return logits, targets, weights


def _reference(logits, targets, weights, z_loss):
  log_probs, log_z = _log_softmax64(logits)
  nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  z = z_loss * log_z**2
  w = weights.astype(np.float64)
  return {
      'loss': np.sum((nll + z) * w),
      'nll': np.sum(nll * w),
      'z_loss': np.sum(z * w),
      'correct': np.sum((logits.argmax(-1) == targets) * w),
      'count': np.sum(w),
  }


@pytest.mark.parametrize('z_loss', [0.0, Z_LOSS])
def test_cross_entropy_sums_match_float64_numpy(batch, z_loss):
  logits, targets, weights = batch
  got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights),
                             z_loss=z_loss)
  want = _reference(logits, targets, weights, z_loss)
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_allclose(float(got[key]), want[key], rtol=RTOL, err_msg=key)
  assert want['correct'] > 0 and want['correct'] < want['count']
  assert (want['z_loss'] > 0) == (z_loss > 0)


def test_cross_entropy_is_stable_for_huge_logits(batch):
  """Logits ~3000 overflow a naive exp; logsumexp must not."""
  logits, targets, weights = batch
  logits = logits * 1000
  got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights),
                             z_loss=Z_LOSS)
  want = _reference(logits, targets, weights, Z_LOSS)
  for key in want:
    np.testing.assert_allclose(float(got[key]), want[key], rtol=RTOL, err_msg=key)


def test_cross_entropy_takes_bfloat16_logits_in_float32(batch):
  logits, targets, weights = batch
  bf16 = jnp.asarray(logits, jnp.bfloat16)
  got = losses.cross_entropy(bf16, jnp.asarray(targets), jnp.asarray(weights), z_loss=Z_LOSS)
  # The reference sees the same bf16-rounded values, so only float32 rounding separates them.
  want = _reference(np.asarray(bf16.astype(jnp.float32)), targets, weights, Z_LOSS)
  for key in want:
    assert got[key].dtype == jnp.float32, key
    np.testing.assert_allclose(float(got[key]), want[key], rtol=RTOL, err_msg=key)


@pytest.mark.parametrize('z_loss', [0.0, Z_LOSS])
def test_cross_entropy_gradient_matches_the_analytic_gradient(batch, z_loss):
  logits, targets, weights = batch
  grad = jax.grad(lambda x: losses.cross_entropy(x, jnp.asarray(targets), jnp.asarray(weights),
                                                 z_loss=z_loss)['loss'])(jnp.asarray(logits))
  log_probs, log_z = _log_softmax64(logits)
  probs = np.exp(log_probs)
  onehot = np.eye(V)[targets]
  # d/dx [logZ - x_t + z logZ^2] = softmax - onehot + 2 z logZ softmax, times the weight.
  want = (probs - onehot + 2 * z_loss * log_z[..., None] * probs) * weights[..., None]
  # Gradient entries are O(1); float32 softmax is good to ~1e-7 absolute.
  np.testing.assert_allclose(np.asarray(grad), want, rtol=0, atol=1e-6)
  assert np.all(np.asarray(grad)[weights == 0] == 0)  # ignored positions get exactly no gradient


def test_token_log_probs_match_float64_numpy(batch):
  logits, targets, _ = batch
  got = losses.token_log_probs(jnp.asarray(logits), jnp.asarray(targets))
  log_probs, _ = _log_softmax64(logits)
  want = np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  assert got.shape == (B, L) and got.dtype == jnp.float32
  # log-probs down to ~-20 in float32: absolute error ~1e-6 at most.
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)
