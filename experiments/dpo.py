r"""Direct preference optimisation against the frozen starting model.

  python -m experiments.dpo --config=experiments/configs/dpo.py --workdir=runs/dpo \
      --config.init_workdir=runs/sft

Evaluation: held-out preference accuracy of the implicit reward (the policy's log-likelihood
margin over the reference's), and the format and exact-match rates of greedy replies.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm import cli
from jaxlm import configs
from jaxlm import dpo
from jaxlm import lm
from jaxlm import lora
from jaxlm import post_training
from jaxlm import reward
from jaxlm import sharding
from jaxlm import trainer
from jaxlm.data import post_training as data_lib
from jaxlm.data import shards
from jaxlm.errors import UserError


def validate(config) -> None:
  configs.validate(config, {'data.source': data_lib.SOURCES})
  post_training.world_question_options(config.data)  # checked before anything is written
  lora.check(config, dropout_allowed=False)
  if config.train.grad_accum_steps != 1:
    raise UserError('config.train.grad_accum_steps must be 1 for DPO (reference log-probs are '
                     'computed per batch); lower config.train.batch_size instead')


def train_and_evaluate(config, workdir: str) -> trainer.TrainState:
  validate(config)
  tokenizer, base_model, world = post_training.start_from(config, workdir)
  configs.validate(config)
  model = lora.for_config(base_model, config)
  seq_len = config.data.seq_len
  pairs = {split: post_training.examples(config.data, split, world,
                                         data_lib.preference_from_record,
                                         reward.world_pairs(config.data, config.seed))
           for split in ('train', 'eval')}
  configs.save(config, workdir)
  train_rows = reward.pair_rows(tokenizer, pairs['train'], seq_len, 'train')
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    add_reference = dpo.reference_adder(base_model)
    reference = post_training.load_initial_params(config, base_model, mesh)
    eval_batches = []
    if pairs['eval']:
      eval_batches = [add_reference(reference, sharding.put_batch(b, mesh))
                      for b in reward.padded_pair_batches(
                          reward.pair_rows(tokenizer, pairs['eval'], seq_len, 'eval'),
                          config.eval.batch_size)]
    if lora.enabled(config):  # the reference is the frozen base itself: no copy is kept
      reference = None

    @jax.jit
    def eval_step(params, batch):
      chosen, rejected = dpo.pair_log_probs(model, params, batch)
      margin = (chosen - batch['ref_chosen']) - (rejected - batch['ref_rejected'])
      return {'correct': jnp.sum((margin > 0) * batch['valid']), 'count': jnp.sum(batch['valid']),
              **reward.kind_counts((margin > 0).astype(jnp.float32), batch)}

    evaluate_answers = post_training.make_answer_evaluator(
        model, tokenizer, data_lib.world_held_out(
            data_lib.world_sft_examples, world, config.eval.num_prompts,
            config.data.num_eval_policy)
        if config.data.source == 'world' else [], config.eval)

    def evaluate(params, step):
      results = evaluate_answers(params, step)
      if eval_batches:
        totals = jax.device_get(jax.tree.map(lambda *x: sum(x),
                                             *[eval_step(params, b) for b in eval_batches]))
        results.update(reward.pairwise_accuracy(totals['correct'], totals['count'], totals))
      return results

    stage = trainer.Stage(
        init_params=lm.init_params_fn(model, seq_len),
        load_params=lm.initial_params_loader(config),
        loss_fn=dpo.dpo_loss(model, config.beta, config.label_smoothing),
        train_batches=shards.ShardedBatches(
            lambda shard, num_shards, rows: reward.pair_batches(
                train_rows, rows, seed=config.seed, shard_index=shard, num_shards=num_shards),
            config.data.num_shards, config.train.batch_size, mesh),
        evaluate=evaluate,
        flops_per_token=model.config.flops_per_token(seq_len) * 4 / 3,  # + reference forward
        tokens_per_row=2 * seq_len,
        prepare_batch=lambda state, local: add_reference(
            state.frozen if reference is None else reference, sharding.put_batch(local, mesh)))
    return trainer.train(config, workdir, stage, mesh)


if __name__ == '__main__':
  cli.run(train_and_evaluate, 'experiments/configs/dpo.py')
