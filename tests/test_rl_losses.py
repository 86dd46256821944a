"""RL losses in `losses` against float64 numpy references: hand-checked cases, the sums, the
counts and the gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import losses

EPS = 0.2  # PPO clip range used throughout


def _sums_and_grads(loss_fn, argnums):
  """jit(loss_fn -> (grads of sums['loss'] w.r.t. argnums, sums)); one compile instead of many
  op-by-op ones keeps the file fast."""
  def loss(*args):
    sums = loss_fn(*args)
    return sums['loss'], sums
  return jax.jit(jax.grad(loss, argnums=argnums, has_aux=True))


PPO = _sums_and_grads(losses.ppo_policy_loss, (0, 1, 2))
VALUE = _sums_and_grads(losses.value_loss, (0, 1, 2))
DPO = _sums_and_grads(losses.dpo_loss, (0, 1, 2, 3))
KL = jax.jit(losses.kl_estimate, static_argnames='kind')
KL_GRADS = jax.jit(jax.grad(lambda a, b, w, kind: jnp.sum(losses.kl_estimate(a, b, kind) * w),
                            argnums=(0, 1)), static_argnums=3)
GAE = jax.jit(losses.gae)
GROUP_ADVANTAGES = jax.jit(losses.group_advantages, static_argnums=1)


def _f32(x):
  return jnp.asarray(np.asarray(x, np.float32))


def _prefix_mask(lengths, length):
  return (np.arange(length)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def _log_sigmoid64(x):
  return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def _sigmoid64(x):
  return np.exp(_log_sigmoid64(x))


# --- kl_estimate ---------------------------------------------------------------------------------


def _kl_reference(logp, ref_logp, kind):
  log_r = np.asarray(ref_logp, np.float64) - np.asarray(logp, np.float64)
  return {'k1': -log_r, 'k2': 0.5 * log_r**2, 'k3': np.expm1(log_r) - log_r}[kind]


@pytest.mark.parametrize('kind', losses.KL_KINDS)
def test_kl_estimate_and_its_gradient_match_float64_numpy(kind):
  rng = np.random.default_rng(0)
  logp = rng.uniform(-6, 0, (3, 11)).astype(np.float32)
  ref_logp = rng.uniform(-6, 0, (3, 11)).astype(np.float32)
  got = KL(_f32(logp), _f32(ref_logp), kind=kind)
  assert got.shape == (3, 11) and got.dtype == jnp.float32
  # |log r| <= 6, so terms are at most e^6 ~ 400; float32 exp is good to ~1e-7 relative of that.
  np.testing.assert_allclose(np.asarray(got), _kl_reference(logp, ref_logp, kind),
                             rtol=1e-5, atol=1e-6)

  weights = rng.standard_normal((3, 11)).astype(np.float32)
  grad_logp, grad_ref = KL_GRADS(_f32(logp), _f32(ref_logp), _f32(weights), kind)
  log_r = ref_logp.astype(np.float64) - logp
  # d estimate / d log r; log r = ref - logp, so d/d ref = +that and d/d logp = -that.
  d_log_r = {'k1': -np.ones_like(log_r), 'k2': log_r, 'k3': np.exp(log_r) - 1}[kind]
  np.testing.assert_allclose(np.asarray(grad_ref), d_log_r * weights, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(grad_logp), -d_log_r * weights, rtol=1e-5, atol=1e-6)


def test_kl_k3_is_nonnegative_and_accurate_when_the_policies_are_close():
  gaps = np.array([-30, -5, -1, -1e-2, -1e-3, -1e-4, 0, 1e-4, 1e-3, 1e-2, 1, 5, 30], np.float32)
  got = np.asarray(KL(jnp.zeros_like(gaps), _f32(gaps), kind='k3'))
  assert np.all(got >= 0)
  assert got[gaps == 0] == 0
  # k3 ~ r^2 / 2 for small gaps r. expm1(r) - r is off by ~ulp(r) ~ 1.2e-7 r, i.e. 2.4e-7 / r
  # relative: 2.4e-3 at r = 1e-4. A naive exp(r) - r - 1 is off by ~ulp(1) ~ 1.2e-7, i.e.
  # 2.4e-7 / r^2 relative: 24% at r = 1e-3. 5e-3 separates the two.
  np.testing.assert_allclose(got, _kl_reference(0 * gaps, gaps, 'k3'), rtol=5e-3)


def test_unbiased_kl_estimates_average_to_the_exact_kl_of_two_categoricals():
  p = np.array([0.9, 0.05, 0.05])
  q = np.array([0.3, 0.35, 0.35])
  kl_pq = np.sum(p * np.log(p / q))
  kl_qp = np.sum(q * np.log(q / p))
  n = 200_000
  tokens = np.random.default_rng(1).choice(len(p), size=n, p=p)  # samples from the policy p
  logp, ref_logp = np.log(p)[tokens][None], np.log(q)[tokens][None]
  for kind in ('k1', 'k3'):
    estimate = np.asarray(KL(_f32(logp), _f32(ref_logp), kind=kind), np.float64)
    per_value = _kl_reference(np.log(p), np.log(q), kind)  # the estimator on each category
    # Standard error of the sample mean from the estimator's exact variance under p; a correct
    # unbiased estimator lands within 5 standard errors except with probability ~6e-7.
    stderr = math.sqrt(np.sum(p * (per_value - kl_pq)**2) / n)
    tol = 5 * stderr
    assert tol < abs(kl_pq - kl_qp) / 4  # an estimate of KL(q || p) would be caught
    assert abs(estimate.mean() - kl_pq) < tol, (kind, estimate.mean(), kl_pq, tol)


def test_kl_estimate_names_the_allowed_kinds():
  with pytest.raises(ValueError, match='k1, k2, k3'):
    losses.kl_estimate(jnp.zeros(3), jnp.zeros(3), 'k4')


# --- gae -----------------------------------------------------------------------------------------


def _gae_reference(rewards, values, mask, gamma, lam):
  """A backwards loop per row; a masked token ends the episode (nothing flows back across it)."""
  advantages = np.zeros(rewards.shape)
  returns = np.zeros(rewards.shape)
  for b in range(rewards.shape[0]):
    next_value, next_advantage = 0.0, 0.0
    for t in reversed(range(rewards.shape[1])):
      if mask[b, t] == 0:
        next_value, next_advantage = 0.0, 0.0
        continue
      delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
      advantages[b, t] = delta + gamma * lam * next_advantage
      returns[b, t] = advantages[b, t] + float(values[b, t])
      next_value, next_advantage = float(values[b, t]), advantages[b, t]
  return advantages, returns


# Row 0 is a whole response; row 1 ends after two tokens, with junk where it is masked.
HAND_REWARDS = [[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]]
HAND_VALUES = [[0.5, 0.2, 0.7], [0.5, 0.2, 9.0]]
HAND_MASK = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]


@pytest.mark.parametrize('gamma, lam, want_advantages, want_returns', [
    # gamma = lam = 1: A_t = (reward-to-go) - V_t and returns are the reward-to-go.
    # Reward-to-go: row 0 [1, 1, 1]; row 1 [1, 1, -] (the 5 is after the episode ended).
    (1.0, 1.0, [[1 - 0.5, 1 - 0.2, 1 - 0.7], [1 - 0.5, 1 - 0.2, 0]], [[1, 1, 1], [1, 1, 0]]),
    # lam = 0: one-step TD errors r_t + gamma V_{t+1} - V_t, with V after the last token = 0
    # (row 1's t=1 must not bootstrap from the masked value 9).
    (0.5, 0.0,
     [[0 + 0.5 * 0.2 - 0.5, 0 + 0.5 * 0.7 - 0.2, 1 + 0 - 0.7],
      [0 + 0.5 * 0.2 - 0.5, 1 + 0 - 0.2, 0]],
     [[0.1, 0.35, 1.0], [0.1, 1.0, 0]]),
])
def test_gae_on_hand_checked_sequences(gamma, lam, want_advantages, want_returns):
  advantages, returns = GAE(_f32(HAND_REWARDS), _f32(HAND_VALUES), _f32(HAND_MASK), gamma, lam)
  # O(1) values through three float32 steps: rounding ~1e-7.
  np.testing.assert_allclose(np.asarray(advantages), want_advantages, rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(returns), want_returns, rtol=0, atol=1e-6)
  # The hand values agree with the loop reference, so the reference is checked too.
  ref_advantages, ref_returns = _gae_reference(np.array(HAND_REWARDS), np.array(HAND_VALUES),
                                               np.array(HAND_MASK), gamma, lam)
  np.testing.assert_allclose(ref_advantages, want_advantages, atol=1e-12)
  np.testing.assert_allclose(ref_returns, want_returns, atol=1e-12)


GAMMA, LAM = 0.99, 0.95
# A full row, one that ends early, a single token, an empty row, and two responses packed in
# one row (each run of ones is its own episode: nothing flows back across the gap).
GAE_MASK = np.array([[1, 1, 1, 1, 1, 1, 1, 1, 1],
                     [1, 1, 1, 1, 1, 0, 0, 0, 0],
                     [1, 0, 0, 0, 0, 0, 0, 0, 0],
                     [0, 0, 0, 0, 0, 0, 0, 0, 0],
                     [1, 1, 1, 0, 0, 1, 1, 1, 0]], np.float32)


@pytest.fixture
def rollout():
  rng = np.random.default_rng(2)
  rewards = rng.standard_normal(GAE_MASK.shape).astype(np.float32)
  values = rng.standard_normal(GAE_MASK.shape).astype(np.float32)
  return rewards, values, GAE_MASK


def test_gae_matches_the_backward_loop_under_jit(rollout):
  rewards, values, mask = rollout
  advantages, returns = GAE(_f32(rewards), _f32(values), _f32(mask), GAMMA, LAM)
  want_advantages, want_returns = _gae_reference(rewards, values, mask, GAMMA, LAM)
  assert advantages.shape == returns.shape == mask.shape
  assert advantages.dtype == returns.dtype == jnp.float32
  # Sums of <= 9 O(1) terms in float32: ~1e-6 absolute.
  np.testing.assert_allclose(np.asarray(advantages), want_advantages, rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(returns), want_returns, rtol=0, atol=1e-5)
  assert np.all(np.asarray(advantages)[mask == 0] == 0)
  assert np.all(np.asarray(returns)[mask == 0] == 0)


def test_gae_gradient_is_the_transposed_jacobian_of_the_loop(rollout):
  """GAE is linear in (rewards, values): the loop applied to unit inputs gives the Jacobian's
  columns exactly, with no finite-difference error."""
  rewards, values, mask = rollout
  rng = np.random.default_rng(3)
  cot_advantages = rng.standard_normal(mask.shape)
  cot_returns = rng.standard_normal(mask.shape)
  @jax.jit
  def vjp(rewards, values, cotangents):
    return jax.vjp(lambda r, v: losses.gae(r, v, _f32(mask), GAMMA, LAM), rewards, values)[1](
        cotangents)
  got_rewards, got_values = vjp(_f32(rewards), _f32(values),
                                (_f32(cot_advantages), _f32(cot_returns)))

  want_rewards = np.zeros(mask.shape)
  want_values = np.zeros(mask.shape)
  zeros = np.zeros(mask.shape)
  for b, t in np.ndindex(*mask.shape):
    unit = zeros.copy()
    unit[b, t] = 1
    for want, args in ((want_rewards, (unit, zeros)), (want_values, (zeros, unit))):
      advantages, returns = _gae_reference(*args, mask, GAMMA, LAM)
      want[b, t] = np.sum(cot_advantages * advantages + cot_returns * returns)
  # Entries are sums of <= 18 O(1) products in float32.
  np.testing.assert_allclose(np.asarray(got_rewards), want_rewards, rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got_values), want_values, rtol=0, atol=1e-5)
  assert np.all(np.asarray(got_rewards)[mask == 0] == 0)
  assert np.all(np.asarray(got_values)[mask == 0] == 0)


# --- ppo_policy_loss -----------------------------------------------------------------------------

# (ratio, advantage, mask, expected per-token loss, clipped term active, d loss / d logp).
# The unclipped objective is ratio * A, so its gradient w.r.t. logp is ratio * A.
PPO_TABLE = [
    (1.1, +1.0, 1.0, -1.1, False, -1.1),  # inside the range: unclipped
    (1.5, +1.0, 1.0, -1.2, True, 0.0),  # A > 0, ratio above 1 + eps: capped at 1.2
    (0.5, +1.0, 1.0, -0.5, False, -0.5),  # A > 0, ratio below 1 - eps: 0.5 < 0.8, unclipped
    (1.5, -1.0, 1.0, +1.5, False, +1.5),  # A < 0, ratio above 1 + eps: -1.5 < -1.2, unclipped
    (0.5, -1.0, 1.0, +0.8, True, 0.0),  # A < 0, ratio below 1 - eps: floored at -0.8
    (0.9, -1.0, 1.0, +0.9, False, +0.9),  # inside the range: unclipped
    (3.0, +1.0, 0.0, 0.0, False, 0.0),  # masked: nothing
]


@pytest.mark.parametrize('ratio, advantage, mask, want_loss, want_clipped, want_grad', PPO_TABLE)
def test_ppo_active_term_clip_fraction_and_gradient_per_token(ratio, advantage, mask, want_loss,
                                                               want_clipped, want_grad):
  (grad, _, _), sums = PPO(_f32([[math.log(ratio)]]), _f32([[0.0]]), _f32([[advantage]]),
                           _f32([[mask]]), EPS)
  # exp(log(ratio)) in float32 is within ~2e-7 of ratio.
  np.testing.assert_allclose(float(sums['loss']), want_loss, rtol=0, atol=1e-6)
  assert float(sums['clip_fraction']) == float(want_clipped)
  assert float(sums['count']) == mask
  if want_grad == 0:
    assert float(grad[0, 0]) == 0.0  # exactly zero where the clipped term is active, or masked
  else:
    np.testing.assert_allclose(float(grad[0, 0]), want_grad, rtol=0, atol=1e-6)


def test_ppo_table_sums_over_a_row():
  ratio, advantage, mask, want_loss, want_clipped, _ = map(np.array, zip(*PPO_TABLE))
  _, sums = PPO(_f32(np.log(ratio)[None]), _f32(np.zeros((1, len(ratio)))),
                _f32(advantage[None]), _f32(mask[None]), EPS)
  np.testing.assert_allclose(float(sums['loss']), want_loss.sum(), rtol=0, atol=1e-5)
  assert float(sums['clip_fraction']) == 2 and float(sums['count']) == 6


def _ppo_reference(logp, old_logp, advantages, mask, eps):
  logp, old_logp = np.asarray(logp, np.float64), np.asarray(old_logp, np.float64)
  ratio = np.exp(logp - old_logp)
  unclipped = ratio * advantages
  clipped = np.clip(ratio, 1 - eps, 1 + eps) * advantages
  active = clipped < unclipped
  return {
      'loss': -np.sum(np.minimum(unclipped, clipped) * mask),
      'clip_fraction': np.sum(active * mask),
      'approx_kl': np.sum(((ratio - 1) - np.log(ratio)) * mask),
      'count': np.sum(mask),
  }, np.where(active, 0.0, -unclipped) * mask  # d loss / d logp


def test_ppo_sums_and_gradient_match_float64_numpy():
  rng = np.random.default_rng(4)
  shape = (4, 16)
  old_logp = rng.uniform(-5, 0, shape).astype(np.float32)
  logp = (old_logp + 0.3 * rng.standard_normal(shape)).astype(np.float32)
  advantages = rng.standard_normal(shape).astype(np.float32)
  mask = _prefix_mask([16, 11, 3, 0], 16)
  ratio = np.exp(logp.astype(np.float64) - old_logp)
  # No ratio within float32 rounding of a clip edge, so both precisions pick the same term.
  assert np.min(np.abs(np.abs(ratio - 1) - EPS)) > 1e-4

  args = _f32(logp), _f32(old_logp), _f32(advantages), _f32(mask)
  grads, got = PPO(*args, EPS)
  want, want_grad = _ppo_reference(logp, old_logp, advantages, mask, EPS)
  assert set(got) == set(want)
  for key in want:
    # Sums of ~30 O(1) terms; float32 exp/log ~1e-7 relative each.
    np.testing.assert_allclose(float(got[key]), want[key], rtol=1e-5, atol=1e-6, err_msg=key)
  assert 0 < want['clip_fraction'] < want['count']  # both regimes are exercised

  np.testing.assert_allclose(np.asarray(grads[0]), want_grad, rtol=1e-5, atol=1e-6)
  # Old log-probs and advantages are constants of the update.
  assert not np.any(np.asarray(grads[1])) and not np.any(np.asarray(grads[2]))


def test_ppo_first_epoch_with_old_logp_equal_to_logp_is_the_policy_gradient():
  """old_logp = logp (the same traced value) gives ratio 1 and the gradient -A per token;
  without the stop_gradient on old_logp the gradient would vanish."""
  rng = np.random.default_rng(5)
  logp = _f32(rng.uniform(-5, 0, (2, 6)))
  advantages = rng.standard_normal((2, 6)).astype(np.float32)
  mask = _prefix_mask([6, 4], 6)
  fn = lambda x: losses.ppo_policy_loss(x, x, _f32(advantages), _f32(mask), EPS)['loss']
  loss, grad = jax.jit(jax.value_and_grad(fn))(logp)
  np.testing.assert_allclose(float(loss), -np.sum(advantages * mask), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), -advantages * mask, rtol=1e-6)


# --- value_loss ----------------------------------------------------------------------------------

# (value, return, mask, expected loss, clipped term active, d loss / d value); old value 0, so
# the clipped value lies in [-0.2, 0.2].
VALUE_TABLE = [
    (0.1, 1.0, 1.0, 0.5 * 0.9**2, False, -0.9),  # inside the range: plain squared error
    (0.5, 1.0, 1.0, 0.5 * 0.8**2, True, 0.0),  # moved towards R past the range: no credit
    (0.5, 0.0, 1.0, 0.5 * 0.5**2, False, 0.5),  # moved away from R past the range: full error
    (-0.5, -1.0, 1.0, 0.5 * 0.8**2, True, 0.0),  # mirror of the second row
    (-0.5, 1.0, 1.0, 0.5 * 1.5**2, False, -1.5),  # mirror of the third row
    (5.0, -5.0, 0.0, 0.0, False, 0.0),  # masked
]


@pytest.mark.parametrize('value, ret, mask, want_loss, want_clipped, want_grad', VALUE_TABLE)
def test_value_loss_clip_behaviour_per_token(value, ret, mask, want_loss, want_clipped,
                                             want_grad):
  (grad, _, _), sums = VALUE(_f32([[value]]), _f32([[0.0]]), _f32([[ret]]), _f32([[mask]]), EPS)
  np.testing.assert_allclose(float(sums['loss']), want_loss, rtol=0, atol=1e-6)
  assert float(sums['clip_fraction']) == float(want_clipped)
  assert float(sums['count']) == mask
  if want_grad == 0:
    assert float(grad[0, 0]) == 0.0
  else:
    np.testing.assert_allclose(float(grad[0, 0]), want_grad, rtol=0, atol=1e-6)


def test_value_loss_sums_and_gradient_match_float64_numpy():
  rng = np.random.default_rng(6)
  shape = (3, 10)
  old_values = rng.standard_normal(shape).astype(np.float32)
  values = (old_values + 0.4 * rng.standard_normal(shape)).astype(np.float32)
  returns = rng.standard_normal(shape).astype(np.float32)
  mask = _prefix_mask([10, 7, 2], 10)
  v, old, ret = (x.astype(np.float64) for x in (values, old_values, returns))
  assert np.min(np.abs(np.abs(v - old) - EPS)) > 1e-4  # no value at a clip edge

  unclipped = (v - ret)**2
  clipped = (np.clip(v, old - EPS, old + EPS) - ret)**2
  active = clipped > unclipped
  want = {'loss': np.sum(0.5 * np.maximum(unclipped, clipped) * mask),
          'clip_fraction': np.sum(active * mask), 'count': np.sum(mask)}
  want_grad = np.where(active, 0.0, v - ret) * mask

  args = _f32(values), _f32(old_values), _f32(returns), _f32(mask)
  grads, got = VALUE(*args, EPS)
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_allclose(float(got[key]), want[key], rtol=1e-5, atol=1e-6, err_msg=key)
  assert 0 < want['clip_fraction'] < want['count']
  # Gradient entries are differences of O(1) float32 numbers: ~1e-7.
  np.testing.assert_allclose(np.asarray(grads[0]), want_grad, rtol=0, atol=1e-6)
  assert not np.any(np.asarray(grads[1])) and not np.any(np.asarray(grads[2]))


# --- group_advantages ----------------------------------------------------------------------------

GROUP = 4


def _group_reference(rewards, group_size, eps=1e-6):
  rewards = np.asarray(rewards, np.float64)
  out = np.zeros_like(rewards)
  for start in range(0, len(rewards), group_size):
    group = rewards[start:start + group_size]
    mean = sum(group) / group_size
    std = math.sqrt(sum((r - mean)**2 for r in group) / group_size)
    out[start:start + group_size] = (group - mean) / (std + eps)
  return out


@pytest.fixture
def group_rewards():
  return np.random.default_rng(7).standard_normal(3 * GROUP).astype(np.float32)


def test_group_advantages_match_float64_numpy_and_are_standardised_per_group(group_rewards):
  got = np.asarray(GROUP_ADVANTAGES(_f32(group_rewards), GROUP))
  assert got.shape == group_rewards.shape and got.dtype == np.float32
  # O(1) values through a mean, a std and a division in float32.
  np.testing.assert_allclose(got, _group_reference(group_rewards, GROUP), rtol=0, atol=1e-5)
  per_group = got.astype(np.float64).reshape(-1, GROUP)
  np.testing.assert_allclose(per_group.mean(-1), 0, atol=1e-6)
  # std is s / (s + 1e-6) with group stds s ~ 1: 1 within ~1e-6.
  np.testing.assert_allclose(per_group.std(-1), 1, atol=1e-5)


def test_group_advantages_are_invariant_to_a_constant_per_group(group_rewards):
  shifted = group_rewards + np.repeat(np.float32([3.0, -2.0, 0.5]), GROUP)
  base = np.asarray(GROUP_ADVANTAGES(_f32(group_rewards), GROUP))
  got = np.asarray(GROUP_ADVANTAGES(_f32(shifted), GROUP))
  # Adding constants ~3 rounds each reward by ~2e-7; standardising scales that by ~1/std.
  np.testing.assert_allclose(got, base, rtol=0, atol=1e-5)
  # The constants differ between groups, so normalising over the whole batch would fail this.
  assert not np.allclose(_group_reference(shifted, len(shifted)),
                         _group_reference(group_rewards, len(shifted)), atol=1e-2)


def test_group_of_equal_rewards_gets_zero_advantages():
  got = np.asarray(GROUP_ADVANTAGES(_f32([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]), GROUP))
  np.testing.assert_array_equal(got[:GROUP], 0)
  np.testing.assert_allclose(got[GROUP:], [-1, 1, -1, 1], atol=1e-5)


def test_group_advantages_gradient_matches_finite_differences(group_rewards):
  weights = np.random.default_rng(8).standard_normal(group_rewards.shape)
  got = jax.jit(jax.grad(lambda r: jnp.sum(losses.group_advantages(r, GROUP) * _f32(weights))))(
      _f32(group_rewards))
  want = np.zeros(group_rewards.shape)
  h = 1e-5
  for i in range(len(group_rewards)):
    step = np.zeros(group_rewards.shape)
    step[i] = h
    plus = np.sum(_group_reference(group_rewards + step, GROUP) * weights)
    minus = np.sum(_group_reference(group_rewards - step, GROUP) * weights)
    want[i] = (plus - minus) / (2 * h)
  # Central differences in float64: truncation ~h^2 = 1e-10, rounding ~1e-16 / h = 1e-11. The
  # float32 gradient has O(1) entries good to ~1e-6.
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)


def test_group_advantages_reject_a_batch_that_does_not_split_into_groups():
  with pytest.raises(ValueError, match='group_size=4'):
    losses.group_advantages(jnp.zeros(6), 4)


# --- dpo_loss and sequence_log_probs -------------------------------------------------------------

BETA = 0.1


def _dpo_reference(pc, pr, rc, rr, beta, ls):
  pc, pr, rc, rr = (np.asarray(x, np.float64) for x in (pc, pr, rc, rr))
  m = (pc - pr) - (rc - rr)
  loss = -(1 - ls) * _log_sigmoid64(beta * m) - ls * _log_sigmoid64(-beta * m)
  # d loss / d m; m rises with policy_chosen and falls with policy_rejected.
  d_m = beta * (-(1 - ls) * _sigmoid64(-beta * m) + ls * _sigmoid64(beta * m))
  sums = {'loss': loss.sum(), 'correct': np.sum(m > 0), 'reward_margin': np.sum(beta * m),
          'count': len(m)}
  return sums, d_m


@pytest.mark.parametrize('label_smoothing', [0.0, 0.1])
def test_dpo_sums_and_gradient_match_float64_numpy(label_smoothing):
  rng = np.random.default_rng(9)
  n = 16
  ref_chosen = rng.uniform(-80, -20, n).astype(np.float32)
  ref_rejected = rng.uniform(-80, -20, n).astype(np.float32)
  policy_chosen = (ref_chosen + 5 * rng.standard_normal(n) + 2).astype(np.float32)
  policy_rejected = (ref_rejected + 5 * rng.standard_normal(n)).astype(np.float32)
  args = tuple(_f32(x) for x in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
  grads, got = DPO(*args, BETA, label_smoothing)
  want, d_m = _dpo_reference(policy_chosen, policy_rejected, ref_chosen, ref_rejected, BETA,
                             label_smoothing)
  assert set(got) == set(want)
  # Log-probs ~-50 in float32 are exact inputs, but their differences round at ~4e-6, times
  # beta; the loss sums 16 O(1) terms.
  for key in want:
    np.testing.assert_allclose(float(got[key]), want[key], rtol=1e-5, atol=1e-5, err_msg=key)
  assert 0 < want['correct'] < n

  np.testing.assert_allclose(np.asarray(grads[0]), d_m, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(grads[1]), -d_m, rtol=1e-5, atol=1e-7)
  assert not np.any(np.asarray(grads[2])) and not np.any(np.asarray(grads[3]))  # reference fixed


@pytest.mark.parametrize('label_smoothing', [0.0, 0.1])
def test_dpo_with_policy_equal_to_reference_is_log2_per_pair(label_smoothing):
  rng = np.random.default_rng(10)
  chosen = rng.uniform(-80, -20, 8).astype(np.float32)
  rejected = rng.uniform(-80, -20, 8).astype(np.float32)
  args = _f32(chosen), _f32(rejected), _f32(chosen), _f32(rejected)
  (grad_chosen, grad_rejected, _, _), got = DPO(*args, BETA, label_smoothing)
  # m = 0 exactly, so -log σ(0) = log 2 whatever the smoothing.
  np.testing.assert_allclose(float(got['loss']), 8 * math.log(2), rtol=1e-6)
  assert float(got['correct']) == 0 and float(got['reward_margin']) == 0
  assert float(got['count']) == 8
  _, d_m = _dpo_reference(chosen, rejected, chosen, rejected, BETA, label_smoothing)
  np.testing.assert_allclose(d_m, -BETA * (1 - 2 * label_smoothing) / 2, rtol=1e-12)
  np.testing.assert_allclose(np.asarray(grad_chosen), d_m, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grad_rejected), -d_m, rtol=1e-6)


def test_sequence_log_probs_sum_the_masked_tokens():
  rng = np.random.default_rng(11)
  token_logp = rng.uniform(-8, 0, (3, 7)).astype(np.float32)
  mask = _prefix_mask([7, 4, 0], 7)
  want = [sum(float(token_logp[b, t]) for t in range(7) if mask[b, t]) for b in range(3)]
  got = jax.jit(losses.sequence_log_probs)(_f32(token_logp), _f32(mask))
  assert got.shape == (3,) and got.dtype == jnp.float32
  # Sums of <= 7 terms ~-4 in float32.
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
  weights = rng.standard_normal(3).astype(np.float32)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(losses.sequence_log_probs(x, _f32(mask)) * weights)))(
      _f32(token_logp))
  np.testing.assert_array_equal(np.asarray(grad), weights[:, None] * mask)
