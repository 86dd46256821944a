"""Reward models: preference pairs as padded rows, the Bradley–Terry loss, scoring.

A conversation's reward is the scalar head's output at its last token (the reply's end-of-turn),
plus, with `config.reply_likelihood`, a learned multiple of the reply's log-likelihood under the
backbone's language-model head (`model.ScalarHeadModel.reward`).
"""

import json
import os

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import chat
from jaxlm import configs
from jaxlm import lm
from jaxlm import losses
from jaxlm import metrics
from jaxlm import model as model_lib
from jaxlm import sharding
from jaxlm.data import post_training as data_lib
from jaxlm.data import world as world_lib
from jaxlm.errors import UserError

STATS_FILE = 'reward_stats.json'
# What a preference pair's rejected reply is (see world_preference_pairs): per-kind accuracies.
PAIR_KINDS = data_lib.REJECTION_KINDS + world_lib.POLICY_KINDS


def encode_scored(tokenizer, messages: list[dict], seq_len: int):
  """(tokens padded to seq_len, last index, index of the reply's first token) of a conversation
  ending in the reply scored; None when it does not fit. The row ends at the reply's end-of-turn
  token (a template may write more after it), which is where RL reads the rewards of sampled
  replies too."""
  tokens, mask = chat.encode(tokenizer, messages)
  last = len(mask) - 1 - int(np.argmax(mask[::-1]))
  if last + 1 > seq_len:
    return None
  return np.pad(tokens[:last + 1], (0, seq_len - last - 1)), last, int(np.argmax(mask))


def pair_rows(tokenizer, pairs: list[dict], seq_len: int, what: str) -> list[dict]:
  """Padded chosen/rejected rows, with the pair's kind as an index into PAIR_KINDS (-1 for
  another kind or none); pairs that do not fit are counted and left out."""
  rows = []
  for pair in pairs:
    chosen = encode_scored(tokenizer, pair['messages'] + [
        {'role': 'assistant', 'content': pair['chosen']}], seq_len)
    rejected = encode_scored(tokenizer, pair['messages'] + [
        {'role': 'assistant', 'content': pair['rejected']}], seq_len)
    if chosen and rejected:
      rows.append({'chosen': chosen[0], 'chosen_last': np.int32(chosen[1]),
                   'chosen_start': np.int32(chosen[2]), 'rejected': rejected[0],
                   'rejected_last': np.int32(rejected[1]),
                   'rejected_start': np.int32(rejected[2]),
                   'kind': np.int32(PAIR_KINDS.index(pair['kind'])
                                    if pair.get('kind') in PAIR_KINDS else -1)})
  metrics.log(f'{what}: {len(pairs)} preference pairs, {len(pairs) - len(rows)} left out '
              f'(longer than {seq_len} tokens).')
  if not rows:
    raise UserError(f'no {what} preference pair fits in {seq_len} tokens')
  return rows


def pair_batches(rows: list[dict], batch_size: int, seed: int, shuffle: bool = True,
                 repeat: bool = True, shard_index: int = 0, num_shards: int = 1):
  ds = grain.MapDataset.source(rows)[shard_index::num_shards]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat(None)
  return ds.batch(batch_size, drop_remainder=repeat).to_iter_dataset()


def padded_pair_batches(rows: list[dict], batch_size: int) -> list[dict]:
  """All rows as fixed evaluation batches with a `valid` row flag; the last one padded to full
  size."""
  return lm.fixed_batches(
      ({**b, 'valid': np.ones(len(b['chosen']), np.float32)}
       for b in pair_batches(rows, batch_size, seed=0, shuffle=False, repeat=False)),
      batch_size, -(-len(rows) // batch_size))


def kind_counts(correct_B, batch) -> dict:
  """Per-kind sums of right and valid rows of a padded pair batch, for `pairwise_accuracy`."""
  return {'correct_by_kind': jax.ops.segment_sum(correct_B * batch['valid'], batch['kind'],
                                                 len(PAIR_KINDS)),
          'count_by_kind': jax.ops.segment_sum(batch['valid'], batch['kind'], len(PAIR_KINDS))}


def pairwise_accuracy(correct: float, count: float, counts_by_kind: dict) -> dict[str, float]:
  """`eval/pairwise_accuracy` over all held-out pairs and `eval/pairwise_accuracy/<kind>` for
  each kind present (a wrong answer is the hard kind: telling it apart takes knowing the fact)."""
  results = {'eval/pairwise_accuracy': correct / count}
  for kind, right, total in zip(PAIR_KINDS, counts_by_kind['correct_by_kind'],
                                counts_by_kind['count_by_kind']):
    if total:
      results[f'eval/pairwise_accuracy/{kind}'] = right / total
  return results


def world_pairs(data_config, seed: int):
  """The world's preference pairs in the configured rejection proportions, as the
  `world_examples` function of `post_training.examples`."""
  return lambda world, split, num, kinds=world_lib.QUESTION_KINDS, **question_options: (
      data_lib.world_preference_pairs(world, split, num, dict(data_config.rejection_proportions),
                                      seed, kinds, **question_options))


def reward_model(workdir: str, model_config) -> model_lib.ScalarHeadModel:
  """The module of the reward model trained in `workdir` (its read-out is in its config)."""
  return model_lib.ScalarHeadModel(
      model_config, reply_likelihood=configs.load(workdir).get('reply_likelihood', False))


def rewards(model, params, tokens_BxL, reply_start_B, last_B):
  """Reward of each padded row whose reply spans tokens reply_start..last (see
  `ScalarHeadModel.reward`)."""
  segment_ids = (jnp.arange(tokens_BxL.shape[1]) <= last_B[:, None]).astype(jnp.int32)
  return model.apply({'params': params}, tokens_BxL, segment_ids, reply_start_B, last_B,
                     method='reward')  # by name: LoRA's wrapped class intercepts it


def pair_rewards(model, params, batch):
  """(r_chosen, r_rejected), from one forward pass over both halves."""
  both = rewards(model, params, jnp.concatenate([batch['chosen'], batch['rejected']]),
                 jnp.concatenate([batch['chosen_start'], batch['rejected_start']]),
                 jnp.concatenate([batch['chosen_last'], batch['rejected_last']]))
  return jnp.split(both, 2)


def bradley_terry_loss(model, margin: float, centering: float):
  def loss_fn(params, batch, rng):
    del rng
    sums = losses.bradley_terry(*pair_rewards(model, params, batch), margin, centering)
    return sums['loss'], sums
  return loss_fn


def save_stats(workdir: str, values: np.ndarray) -> dict:
  """Mean and std of rewards on training data: RL normalises rewards with them."""
  stats = {'mean': float(np.mean(values)), 'std': float(np.std(values)),
           'num_scored': int(values.size)}
  if jax.process_index() == 0:
    tmp = os.path.join(workdir, STATS_FILE + '.tmp')
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(stats, f)
    os.replace(tmp, os.path.join(workdir, STATS_FILE))
  return stats


def load_stats(workdir: str) -> dict:
  path = os.path.join(workdir, STATS_FILE)
  if not os.path.exists(path):
    raise UserError(f'no reward statistics at {path}: did reward-model training finish?')
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def score(workdir: str, conversations: list[list[dict]], batch_size: int = 64) -> list[dict]:
  """Rewards of conversations (each ending in the assistant reply scored) under the reward model
  in `workdir`: `{'reward': raw, 'normalized': (raw - mean) / std}` for each."""
  config, tokenizer, base = lm.load_workdir(workdir)
  model = reward_model(workdir, base.config)
  stats = load_stats(workdir)
  seq_len = config.data.seq_len
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    params = lm.load_params(workdir, model, mesh)
    score_batch = jax.jit(lambda p, t, s, l: rewards(model, p, t, s, l))
    results = []
    for start in range(0, len(conversations), batch_size):
      chunk = conversations[start:start + batch_size]
      tokens = np.zeros((batch_size, seq_len), np.int32)
      last, reply_start = np.zeros(batch_size, np.int32), np.zeros(batch_size, np.int32)
      for row, messages in enumerate(chunk):
        encoded = encode_scored(tokenizer, messages, seq_len)
        if encoded is None:
          raise UserError(f'conversation {start + row} is longer than {seq_len} tokens')
        tokens[row], last[row], reply_start[row] = encoded
      values = jax.device_get(score_batch(params, *map(jnp.asarray, (tokens, reply_start, last))))
      results += [{'reward': float(v), 'normalized': float((v - stats['mean']) / stats['std'])}
                  for v in values[:len(chunk)]]
  return results
