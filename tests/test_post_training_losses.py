"""Post-training losses against references computed another way: the SFT loss in float64 numpy,
packed conversations against one per row, Bradley–Terry and its gradient analytically, and the
reward model's read-out against the head applied by hand."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import losses
from jaxlm import model as model_lib
from jaxlm import reward
from jaxlm import trainer
from jaxlm.data import post_training as data_lib
from jaxlm.data import world as world_lib

SEQ_LEN = 64  # reward-model rows
ROW_LEN = 128  # SFT rows: room for several conversations packed together
SFT_BATCH = 3  # every SFT batch here is [SFT_BATCH, ROW_LEN], so each program compiles once
Z_LOSS = 1e-3
# float32 log-softmax over 512 logits is good to ~1e-6 relative per token; sums over ~100 counted
# tokens stay within ~1e-6 relative of float64 (as in test_losses). A missing weight, a wrong
# target or a dropped segment mask moves a sum by > 1e-2.
RTOL = 1e-5
# The same rows through differently shaped programs (packed vs one per row, padded vs alone):
# float32 sums in another order differ by a few ulps of values ~1 per activation; per-token
# losses ~6 then agree to ~1e-5, sums of ~10 of them to ~1e-4 at worst. A leak between packed
# conversations moves a sum by > 1e-1 (asserted below).
REORDER_ATOL = 2e-4
# Rewards ~1 (RMS-normalised hidden states through a head ~1), computed with and without the
# segment mask: float32 rounding ~1e-7. Reading one position off moves a reward by > 1e-3.
REWARD_ATOL = 1e-5
# Masked keys get softmax weight exactly 0: only XLA re-association separates the results.
MASKED_ATOL = 1e-6


@pytest.fixture(scope='module')
def config(tokenizer):
  return model_lib.ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, num_layers=2,
                               num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                               max_seq_len=ROW_LEN)


def _random_params(model, seed):
  """Random float32 params with `init`'s tree, drawn in numpy (no init to compile). Norm scales
  are drawn around 1 and the reward head is random: a zero head would hide a wrong read-out."""
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                        jnp.zeros((1, 8), jnp.int32))['params'])
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name in ('scale', 'likelihood_scale'):
      return jnp.asarray(1 + 0.2 * rng.standard_normal(leaf.shape), jnp.float32)
    if name == 'bias':
      return jnp.full(leaf.shape, 0.3, jnp.float32)
    fan_in = leaf.shape[-1] if name == 'embedding' else leaf.shape[-2]
    return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope='module')
def lm(config):
  model = model_lib.Transformer(config)
  return model, _random_params(model, 0), jax.jit(trainer.language_model_loss(model, Z_LOSS))


@pytest.fixture(scope='module')
def scalar(config):
  model = model_lib.ScalarHeadModel(config)
  # The head alone does not look at where the reply starts.
  score = jax.jit(lambda params, tokens, last: reward.rewards(model, params, tokens, last, last))
  return model, _random_params(model, 1), score


@pytest.fixture(scope='module')
def sft_rows(tokenizer):
  examples = [
      {'messages': [{'role': 'system', 'content': 'Be brief.'},
                    {'role': 'user', 'content': 'What is 1 + 1?'},
                    {'role': 'assistant', 'content': 'Answer: 2'},
                    {'role': 'user', 'content': 'And 2 + 2?'},
                    {'role': 'assistant', 'content': 'Answer: 4'}], 'answer': '4'}
  ] + data_lib.world_sft_examples(world_lib.World(), 'train', 24)
  rows, stats = data_lib.tokenize_conversations(tokenizer, examples, ROW_LEN)
  assert stats['dropped'] == 0
  return rows


def _log_softmax64(logits):
  x = np.asarray(logits, np.float64)
  m = x.max(axis=-1, keepdims=True)
  log_z = m[..., 0] + np.log(np.exp(x - m).sum(axis=-1))
  return x - log_z[..., None], log_z


def test_sft_loss_is_the_masked_mean_of_float64_log_softmax(lm, sft_rows):
  model, params, loss_fn = lm
  batch = next(iter(data_lib.packed_conversation_batches(sft_rows, ROW_LEN, SFT_BATCH, seed=0,
                                                         shuffle=False, repeat=False)))
  assert batch['inputs'].shape == (SFT_BATCH, ROW_LEN)
  assert batch['segment_ids'].max() > 1  # packed: the loss must respect segments and positions
  loss, sums = loss_fn(params, batch, None)

  logits, _ = jax.jit(model.apply)({'params': params}, batch['inputs'], batch['positions'],
                                   batch['segment_ids'])
  log_probs, log_z = _log_softmax64(logits)
  nll = -np.take_along_axis(log_probs, batch['targets'][..., None], -1)[..., 0]
  w = batch['weights'].astype(np.float64)
  assert 0 < w.sum() < (batch['segment_ids'] > 0).sum() / 2  # the replies only
  want_nll = np.sum(nll * w)
  want_loss = want_nll + Z_LOSS * np.sum(log_z**2 * w)
  np.testing.assert_allclose(float(loss), want_loss, rtol=RTOL)
  np.testing.assert_allclose(float(sums['nll']), want_nll, rtol=RTOL)
  np.testing.assert_allclose(float(sums['count']), w.sum(), rtol=0)
  # The trainer divides once by the count: that is the masked mean.
  np.testing.assert_allclose(float(sums['loss'] / sums['count']), want_loss / w.sum(), rtol=RTOL)


def _row(rows, segment_ids_for=lambda i: i + 1):
  """One [1, ROW_LEN] row holding `rows` back to back, then padding (segment 0)."""
  batch = {k: np.zeros((1, ROW_LEN), np.float32 if k == 'weights' else np.int32)
           for k in ('inputs', 'targets', 'weights', 'positions', 'segment_ids')}
  at = 0
  for i, row in enumerate(rows):
    n = len(row['inputs'])
    for k in ('inputs', 'targets', 'weights'):
      batch[k][0, at:at + n] = row[k]
    batch['positions'][0, at:at + n] = np.arange(n)
    batch['segment_ids'][0, at:at + n] = segment_ids_for(i)
    at += n
  assert at < ROW_LEN
  return batch


def _stack(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _segment_sums(loss_fn, params, batch, row_and_segment):
  """Loss sum of each (row, segment id), by weighting that segment only."""
  out = []
  for row, segment in row_and_segment:
    rows = np.arange(len(batch['weights']))[:, None]
    only = (rows == row) & (batch['segment_ids'] == segment)
    out.append(float(loss_fn(params, dict(batch, weights=batch['weights'] * only), None)[0]))
  return np.asarray(out)


def test_packed_conversations_have_the_losses_they_have_alone(lm, sft_rows):
  _, params, loss_fn = lm
  # The multi-turn conversation first, then the shortest world conversations: all in one row.
  rows = sft_rows[:1] + sorted(sft_rows[1:], key=lambda row: len(row['inputs']))[:SFT_BATCH - 1]
  segments = range(1, len(rows) + 1)
  empty = _row([])

  packed = _stack([_row(rows)] + [empty] * (SFT_BATCH - 1))
  alone = _stack([_row([row]) for row in rows])
  got = _segment_sums(loss_fn, params, packed, [(0, s) for s in segments])
  want = _segment_sums(loss_fn, params, alone, [(r, 1) for r in range(len(rows))])
  assert np.all(want > 1)
  np.testing.assert_allclose(got, want, rtol=0, atol=REORDER_ATOL)
  # The total is the sum of the parts, and the empty rows add nothing.
  np.testing.assert_allclose(float(loss_fn(params, packed, None)[0]), want.sum(), rtol=RTOL)

  # One segment id for the whole row lets conversations attend to each other (positions restart,
  # so even the first sees later ones): the comparison above would notice a loss that dropped
  # segment ids.
  leaky = _stack([_row(rows, segment_ids_for=lambda i: 1)] + [empty] * (SFT_BATCH - 1))
  leaked = np.asarray([
      float(loss_fn(params, dict(leaky, weights=leaky['weights'] * (packed['segment_ids'] == s)),
                    None)[0]) for s in segments])
  assert np.all(np.abs(leaked[1:] - want[1:]) > 1e-1), (leaked, want)


@pytest.fixture
def rewards_pair():
  rng = np.random.default_rng(0)
  chosen = rng.standard_normal(9).astype(np.float32)
  rejected = rng.standard_normal(9).astype(np.float32)
  rejected[0] = chosen[0]  # a tie is not counted as correct
  chosen[1], rejected[1] = 30.0, -30.0  # confidently right
  chosen[2], rejected[2] = -30.0, 30.0  # confidently wrong: -log σ(-60) ≈ 60, no overflow
  return chosen, rejected


def _sigmoid64(x):
  return 0.5 * (1 + np.tanh(0.5 * x))


@pytest.mark.parametrize('margin, centering', [(0.0, 0.0), (0.5, 0.0), (0.0, 0.1), (0.7, 0.05)])
def test_bradley_terry_matches_float64_numpy_and_its_analytic_gradient(rewards_pair, margin,
                                                                       centering):
  chosen, rejected = rewards_pair
  rc, rr = chosen.astype(np.float64), rejected.astype(np.float64)
  gap = rc - rr
  x = gap - margin
  # -log σ(x) = log(1 + e^-x), written stably for large |x|.
  want = {'loss': np.sum(np.logaddexp(0, -x) + centering * (rc + rr)**2),
          'correct': np.sum(gap > 0), 'reward_gap': np.sum(gap), 'count': len(gap)}
  got = losses.bradley_terry(jnp.asarray(chosen), jnp.asarray(rejected), margin, centering)
  assert set(got) == set(want)
  assert want['correct'] == np.sum(gap > 0) and 0 < want['correct'] < len(gap) - 1
  for key in want:
    # Loss terms are O(1) to 60 in float32: relative error ~1e-7 each.
    np.testing.assert_allclose(float(got[key]), want[key], rtol=RTOL, err_msg=key)

  grads = jax.grad(
      lambda c, r: losses.bradley_terry(c, r, margin, centering)['loss'], argnums=(0, 1))(
          jnp.asarray(chosen), jnp.asarray(rejected))
  centre = 2 * centering * (rc + rr)
  want_dc = -_sigmoid64(-x) + centre
  want_dr = _sigmoid64(-x) + centre
  # Gradient entries are within [-1, 1] plus the centring term; float32 sigmoid is good to ~1e-7.
  np.testing.assert_allclose(np.asarray(grads[0]), want_dc, rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(grads[1]), want_dr, rtol=0, atol=1e-6)


def test_bradley_terry_takes_bfloat16_rewards_in_float32(rewards_pair):
  chosen, rejected = rewards_pair
  c16, r16 = jnp.asarray(chosen, jnp.bfloat16), jnp.asarray(rejected, jnp.bfloat16)
  got = losses.bradley_terry(c16, r16, 0.5, 0.1)
  want = losses.bradley_terry(c16.astype(jnp.float32), r16.astype(jnp.float32), 0.5, 0.1)
  for key in ('loss', 'reward_gap', 'count'):
    assert got[key].dtype == jnp.float32, key
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])  # the same float32 program


@pytest.fixture(scope='module')
def pair_batch(tokenizer):
  pairs = data_lib.world_preference_pairs(world_lib.World(), 'train', 4,
                                          {'wrong': 1, 'off_format': 1, 'rambling': 1}, seed=0)
  rows = reward.pair_rows(tokenizer, pairs, SEQ_LEN, 'test')
  assert len(rows) == 4
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _hidden(model, params, tokens_BxL):
  return model.apply({'params': params}, tokens_BxL,
                     method=lambda m, t: m.transformer.hidden_states(t)[0])


def test_reward_is_the_head_on_the_last_tokens_hidden_state(scalar, pair_batch):
  model, params, score = scalar
  tokens, last = pair_batch['chosen'], pair_batch['chosen_last']
  assert len(set(last.tolist())) > 1  # rows of different lengths
  got = np.asarray(score(params, tokens, last))

  # The backbone without any segment mask: causal attention alone keeps the padding after
  # `last` out of position `last`. The head is applied by hand, in float64.
  hidden = np.asarray(jax.jit(_hidden, static_argnums=0)(model, params, jnp.asarray(tokens)),
                      np.float64)
  kernel = np.asarray(params['head']['kernel'], np.float64)[:, 0]
  bias = float(params['head']['bias'][0])
  want = hidden[np.arange(len(last)), last] @ kernel + bias
  assert np.ptp(want) > 1e-1  # rewards differ between rows, so a wrong position would show
  np.testing.assert_allclose(got, want, rtol=0, atol=REWARD_ATOL)

  # A position one off reads another value.
  off = np.asarray(score(params, tokens, last - 1))
  assert np.all(np.abs(off - want) > 1e-3)


def test_reply_likelihood_reward_adds_the_scaled_float64_reply_log_likelihood(config, pair_batch):
  model = model_lib.ScalarHeadModel(config, reply_likelihood=True)
  params = _random_params(model, 2)
  params['likelihood_scale'] = jnp.float32(0.7)
  tokens, start, last = (pair_batch['rejected'], pair_batch['rejected_start'],
                         pair_batch['rejected_last'])
  got = np.asarray(jax.jit(functools.partial(reward.rewards, model))(params, tokens, start, last))

  # The head by hand, plus 0.7 x the reply's log-likelihood from the language model's own
  # logits in float64, summed over tokens start..last.
  hidden = np.asarray(jax.jit(_hidden, static_argnums=0)(model, params, jnp.asarray(tokens)),
                      np.float64)
  kernel = np.asarray(params['head']['kernel'], np.float64)[:, 0]
  head = hidden[np.arange(len(last)), last] @ kernel + float(params['head']['bias'][0])
  logits, _ = model_lib.Transformer(config).apply({'params': params['transformer']},
                                                  jnp.asarray(tokens))
  log_probs, _ = _log_softmax64(logits)
  likelihood = np.array([sum(log_probs[row, t - 1, tokens[row, t]]
                             for t in range(start[row], last[row] + 1))
                         for row in range(len(last))])
  assert np.all(start < last) and np.all(likelihood < -1)
  # Sums of a few float32 log-probs ~6 each: ~1e-6 relative.
  np.testing.assert_allclose(got, head + 0.7 * likelihood, rtol=0, atol=1e-4)
  # One token more or less in the sum moves a reward by a whole token's log-probability.
  shifted = np.asarray(jax.jit(functools.partial(reward.rewards, model))(params, tokens,
                                                                         start - 1, last))
  assert np.all(np.abs(shifted - got) > 1e-2)


def test_reward_does_not_depend_on_the_padding(scalar, pair_batch, config):
  _, params, score = scalar
  tokens, last = pair_batch['chosen'], pair_batch['chosen_last']
  padding = np.arange(SEQ_LEN)[None, :] > last[:, None]
  assert padding.any(axis=1).all()
  noisy = np.where(padding, np.random.default_rng(0).integers(7, config.vocab_size, tokens.shape),
                   tokens).astype(np.int32)
  before, after = score(params, tokens, last), score(params, noisy, last)
  np.testing.assert_allclose(np.asarray(after), np.asarray(before), rtol=0, atol=MASKED_ATOL)


def test_reward_model_loss_is_bradley_terry_of_separately_scored_rows(scalar, pair_batch):
  model, params, score = scalar
  margin, centering = 0.2, 0.05
  batch = pair_batch
  loss, sums = jax.jit(reward.bradley_terry_loss(model, margin, centering))(params, batch, None)

  chosen = score(params, batch['chosen'], batch['chosen_last'])
  rejected = score(params, batch['rejected'], batch['rejected_last'])
  assert np.all(np.abs(np.asarray(chosen - rejected)) > 1e-2)  # swapping halves would show
  want = losses.bradley_terry(chosen, rejected, margin, centering)
  # One forward pass over 8 rows against two over 4: float32 reordering only.
  np.testing.assert_allclose(float(loss), float(want['loss']), rtol=RTOL)
  for key in want:
    np.testing.assert_allclose(float(sums[key]), float(want[key]), rtol=RTOL, atol=REWARD_ATOL,
                               err_msg=key)


def test_pairwise_accuracy_per_kind_counts_each_kind_and_skips_padding(tokenizer):
  pairs = data_lib.world_preference_pairs(world_lib.World(), 'heldout', 30,
                                          {'wrong': 1, 'off_format': 1, 'rambling': 1}, seed=0)
  pairs.append({**pairs[0], 'kind': 'from a JSONL file'})
  rows = reward.pair_rows(tokenizer, pairs, 2 * SEQ_LEN, 'test')
  assert len(rows) == len(pairs)  # every pair fits, so the flags below line up with the pairs
  batches = reward.padded_pair_batches(rows, 8)
  assert len(pairs) % 8 and len(batches) == -(-len(pairs) // 8)  # the last batch is padded
  rng = np.random.default_rng(0)
  right = [rng.random(8) < 0.5 for _ in batches]
  sums = jax.tree.map(lambda *x: sum(x), *[
      reward.kind_counts(jnp.asarray(r, jnp.float32), b) for r, b in zip(right, batches)])
  got = reward.pairwise_accuracy(7.0, 10.0, jax.device_get(sums))

  flags = np.concatenate(right)[:len(pairs)]
  want = {'eval/pairwise_accuracy': 0.7}
  for kind in {p['kind'] for p in pairs} & set(reward.PAIR_KINDS):
    chosen = [f for f, p in zip(flags, pairs) if p['kind'] == kind]
    want[f'eval/pairwise_accuracy/{kind}'] = sum(chosen) / len(chosen)
  assert len(want) >= 5  # several policy kinds and rejection kinds
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-6, err_msg=key)
