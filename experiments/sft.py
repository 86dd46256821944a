r"""Supervised fine-tuning: teaches a pretrained model to answer in the chat format.

  python -m experiments.sft --config=experiments/configs/sft.py --workdir=runs/sft \
      --config.init_workdir=runs/tiny

The loss counts assistant tokens only. Evaluation reports held-out loss, and the format-following
rate and exact-match accuracy of greedy replies to held-out prompts (before training too).
"""

import flax.linen as nn
import jax

from jaxlm import cli
from jaxlm import configs
from jaxlm import lm
from jaxlm import lora
from jaxlm import metrics
from jaxlm import post_training
from jaxlm import sharding
from jaxlm import trainer
from jaxlm.data import post_training as data_lib
from jaxlm.data import shards
from jaxlm.errors import UserError


def conversation_rows(tokenizer, examples, seq_len, what):
  rows, stats = data_lib.tokenize_conversations(tokenizer, examples, seq_len)
  if not rows:
    raise UserError(f'no {what} conversation has a reply token within {seq_len} tokens')
  metrics.log(f'{what}: {stats["conversations"]} conversations, {stats["truncated"]} truncated '
              f'to {seq_len} tokens, {stats["dropped"]} dropped (no reply token left).')
  return rows


def validate(config) -> None:
  configs.validate(config, {'data.source': data_lib.SOURCES})
  post_training.world_question_options(config.data)  # checked before anything is written
  noise = {f'config.data.{k}': config.data[k] for k in ('noise_wrong', 'noise_off_format')}
  for field, share in noise.items():
    if not 0 <= share <= 1:
      raise UserError(f'{field} must be in [0, 1], got {share!r}')
    if share and config.data.source != 'world':
      raise UserError(f"{field} needs config.data.source='world', got "
                      f'{config.data.source!r}')
  if sum(noise.values()) > 1:
    raise UserError(f'config.data.noise_wrong + config.data.noise_off_format must be at most 1, '
                    f'got {" + ".join(map(str, noise.values()))}')


def train_and_evaluate(config, workdir: str) -> trainer.TrainState:
  validate(config)
  tokenizer, base_model, world = post_training.start_from(config, workdir)
  configs.validate(config)
  model = lora.for_config(base_model, config)  # the model section now comes from the starting workdir
  train_examples = post_training.examples(config.data, 'train', world,
                                          data_lib.conversation_from_record,
                                          data_lib.world_sft_examples)
  if config.data.noise_wrong or config.data.noise_off_format:
    train_examples = data_lib.with_label_noise(train_examples, config.data.noise_wrong,
                                               config.data.noise_off_format, config.seed)
  eval_examples = post_training.examples(config.data, 'eval', world,
                                         data_lib.conversation_from_record,
                                         data_lib.world_sft_examples)
  configs.save(config, workdir)
  seq_len = config.data.seq_len
  train_rows = conversation_rows(tokenizer, train_examples, seq_len, 'train')
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    evaluate_loss = lambda params: {}
    if eval_examples:
      eval_batches = lm.fixed_batches(
          data_lib.packed_conversation_batches(
              conversation_rows(tokenizer, eval_examples, seq_len, 'eval'), seq_len,
              config.eval.batch_size, seed=0, shuffle=False, repeat=False),
          config.eval.batch_size, config.eval.batches)
      evaluate_loss = lm.make_loss_evaluator(model, mesh, eval_batches)
    evaluate_answers = post_training.make_answer_evaluator(model, tokenizer, eval_examples,
                                                           config.eval)
    stage = trainer.Stage(
        init_params=lm.init_params_fn(model, seq_len),
        load_params=lm.initial_params_loader(config),
        loss_fn=trainer.language_model_loss(lora.for_config(base_model, config, training=True),
                                            config.train.z_loss),
        train_batches=shards.ShardedBatches(
            lambda shard, num_shards, rows: data_lib.packed_conversation_batches(
                train_rows, seq_len, rows, seed=config.seed, shard_index=shard,
                num_shards=num_shards),
            config.data.num_shards, config.train.batch_size, mesh),
        evaluate=lambda params, step: {**evaluate_loss(params),
                                       **evaluate_answers(params, step)},
        flops_per_token=model.config.flops_per_token(seq_len),
        tokens_per_row=seq_len)
    return trainer.train(config, workdir, stage, mesh)


if __name__ == '__main__':
  cli.run(train_and_evaluate, 'experiments/configs/sft.py')
