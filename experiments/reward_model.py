r"""Reward-model training on preference pairs (Bradley–Terry), and scoring.

  python -m experiments.reward_model --config=experiments/configs/reward_model.py \
      --workdir=runs/rm --config.init_workdir=runs/sft
  python -m experiments.reward_model --workdir=runs/rm --score=conversations.jsonl

The backbone starts from the given workdir; a scalar head reads the reply's last token, and by
default a learned multiple of the reply's log-likelihood is added (`config.reply_likelihood`).
Held-out pairwise accuracy is reported over all pairs and per kind of rejected reply. At the end
the mean and std of rewards over training pairs go to `reward_stats.json` for RL.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from jaxlm import cli
from jaxlm import configs
from jaxlm import lm
from jaxlm import lora
from jaxlm import metrics
from jaxlm import model as model_lib
from jaxlm import post_training
from jaxlm import reward
from jaxlm import sharding
from jaxlm import trainer
from jaxlm.data import post_training as data_lib
from jaxlm.data import shards


def _pair_metrics(model, mesh, batches):
  """params -> (pairwise accuracy (overall and per kind), reward gap and loss over fixed
  batches, [rewards of each batch's rows])."""
  @jax.jit
  def eval_step(params, batch):
    chosen, rejected = reward.pair_rewards(model, params, batch)
    valid = batch['valid']
    gap = (chosen - rejected) * valid
    return {'correct': jnp.sum((gap > 0) * valid), 'gap': jnp.sum(gap),
            'nll': jnp.sum(-jax.nn.log_sigmoid(chosen - rejected) * valid),
            'count': jnp.sum(valid), 'rewards': jnp.concatenate([chosen, rejected]),
            **reward.kind_counts((chosen > rejected).astype(jnp.float32), batch)}

  def evaluate(params):
    totals, values = None, []
    for batch in batches:
      out = eval_step(params, sharding.put_batch(batch, mesh))
      values.append(out.pop('rewards'))
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    return {**reward.pairwise_accuracy(totals['correct'], totals['count'], totals),
            'eval/reward_gap': totals['gap'] / totals['count'],
            'eval/loss': totals['nll'] / totals['count']}, values

  return evaluate


def validate(config) -> None:
  configs.validate(config, {'data.source': data_lib.SOURCES})
  post_training.world_question_options(config.data)  # checked before anything is written
  lora.check(config, dropout_allowed=False)


def train_and_evaluate(config, workdir: str) -> trainer.TrainState:
  validate(config)
  tokenizer, base_model, world = post_training.start_from(config, workdir)
  configs.validate(config)
  model = lora.for_config(model_lib.ScalarHeadModel(base_model.config,
                                                    reply_likelihood=config.reply_likelihood),
                          config)
  seq_len = config.data.seq_len
  pairs = {split: post_training.examples(config.data, split, world,
                                         data_lib.preference_from_record,
                                         reward.world_pairs(config.data, config.seed))
           for split in ('train', 'eval')}
  configs.save(config, workdir)
  train_rows = reward.pair_rows(tokenizer, pairs['train'], seq_len, 'train')
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    evaluate_pairs = None
    if pairs['eval']:
      evaluate_pairs = _pair_metrics(model, mesh, reward.padded_pair_batches(
          reward.pair_rows(tokenizer, pairs['eval'], seq_len, 'eval'), config.eval.batch_size))
    load_backbone = lm.initial_params_loader(config)
    stage = trainer.Stage(
        init_params=lm.init_params_fn(model, seq_len),
        load_params=lambda params: {**params, 'transformer': load_backbone(params['transformer'])},
        loss_fn=reward.bradley_terry_loss(model, config.loss_margin, config.loss_centering),
        train_batches=shards.ShardedBatches(
            lambda shard, num_shards, rows: reward.pair_batches(
                train_rows, rows, seed=config.seed, shard_index=shard, num_shards=num_shards),
            config.data.num_shards, config.train.batch_size, mesh),
        evaluate=lambda params, step: evaluate_pairs(params)[0] if evaluate_pairs else {},
        flops_per_token=model.config.flops_per_token(seq_len),
        tokens_per_row=2 * seq_len)
    state = trainer.train(config, workdir, stage, mesh)
    # Statistics over training pairs, for RL to normalise rewards with.
    stats_batches = reward.padded_pair_batches(train_rows[:config.eval.stats_pairs],
                                               config.eval.batch_size)
    _, values = _pair_metrics(model, mesh, stats_batches)(trainer.all_params(state))
    valid = np.concatenate([np.tile(b['valid'], 2) for b in stats_batches]) > 0
    stats = reward.save_stats(
        workdir, np.concatenate([sharding.local_rows(v, mesh) for v in values])[valid])
    metrics.log(f'reward statistics over {stats["num_scored"]} training replies: mean '
                f'{stats["mean"]:.3f}, std {stats["std"]:.3f}')
  return state


def score_or_train(config, workdir: str) -> None:
  if _SCORE.value:
    records = data_lib.from_jsonl(_SCORE.value, data_lib.conversation_from_record)
    for result in reward.score(workdir, [r['messages'] for r in records]):
      print(json.dumps(result))
  else:
    train_and_evaluate(config, workdir)


if __name__ == '__main__':
  _SCORE = flags.DEFINE_string(
      'score', None, 'Score this JSONL file of conversations ({"messages": [...]} ending in the '
      'reply, or {"prompt": ..., "response": ...}) with the model in --workdir; prints JSON lines.')
  cli.run(score_or_train, 'experiments/configs/reward_model.py')
