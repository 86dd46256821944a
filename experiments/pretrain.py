r"""Pretraining: next-token prediction on the built-in world, local text, a TFDS dataset or
data pretokenized by experiments.tokenize_data.

  python -m experiments.pretrain --config=experiments/configs/tiny.py --workdir=/tmp/tiny \
      --config.train.steps=2000

Rerunning with the same workdir resumes from its latest verified checkpoint.
"""

import os

import flax.linen as nn
import jax

from jaxlm import cli
from jaxlm import configs
from jaxlm import lm
from jaxlm import lora
from jaxlm import metrics
from jaxlm import model as model_lib
from jaxlm import sharding
from jaxlm import trainer
from jaxlm.data import mixture
from jaxlm.data import pipeline
from jaxlm.data import shards
from jaxlm.data import tokenized
from jaxlm.errors import UserError


def validate(config) -> None:
  configs.validate(config, {'data.source': pipeline.SOURCES})
  if lora.enabled(config) and not config.init_hf:
    raise UserError('config.lora.rank > 0 trains adapters on a frozen model: continued '
                    'pretraining needs config.init_hf to start from')
  if config.tokenizer.path and not os.path.exists(config.tokenizer.path):
    raise UserError(f'config.tokenizer.path: no such file or directory: {config.tokenizer.path}')


def train_and_evaluate(config, workdir: str) -> trainer.TrainState:
  validate(config)
  tokenizer = lm.start_from_hf(config, workdir) if config.init_hf else None
  if config.data.source == 'tokens':
    # The tokenizer that made the tokens; the saved config names it for the later stages.
    config.tokenizer.path = tokenized.tokenizer_path(config.data.token_dir)
  train_docs, validation_docs = pipeline.pretraining_sources(config.data, workdir)
  configs.save(config, workdir)
  tokenizer = tokenizer or lm.tokenizer_for(config, workdir, train_docs)
  base_model = model_lib.Transformer(lm.model_config(config, tokenizer))
  model = lora.for_config(base_model, config)
  mesh = sharding.make_mesh(config.mesh)
  metrics.log(f'{model.config.num_params():,} parameters; vocabulary {tokenizer.vocab_size} '
              f'(embedding {model.config.vocab_size}); mesh {dict(mesh.shape)}.')
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    eval_batches = lm.fixed_batches(
        pipeline.packed_batches(validation_docs, tokenizer, config.data.seq_len,
                                config.eval.batch_size, seed=0, shuffle=False, repeat=False),
        config.eval.batch_size, config.eval.batches)
    evaluate_loss = lm.make_loss_evaluator(model, mesh, eval_batches, tokenizer.token_bytes())
    prompts = lm.sample_prompts(validation_docs, tokenizer, config.eval.num_samples,
                                config.eval.prompt_tokens)

    def evaluate(params, step):
      texts = lm.sample(model, params, tokenizer, prompts, jax.random.PRNGKey(step),
                        **lm.sampling_options(config.eval))
      for prompt, text in zip(prompts, texts):
        metrics.log(f'sample at step {step}: {prompt!r} -> {text!r}')
      return evaluate_loss(params)
    stage = trainer.Stage(
        init_params=lm.init_params_fn(model, config.data.seq_len),
        load_params=lm.initial_params_loader(config) if config.init_hf else None,
        loss_fn=trainer.language_model_loss(lora.for_config(base_model, config, training=True),
                                            config.train.z_loss, mixture.source_names(train_docs)),
        train_batches=shards.ShardedBatches(
            lambda shard, num_shards, rows: pipeline.packed_batches(
                train_docs, tokenizer, config.data.seq_len, rows, seed=config.seed,
                shard_index=shard, num_shards=num_shards),
            config.data.num_shards, config.train.batch_size, mesh),
        evaluate=evaluate,
        flops_per_token=model.config.flops_per_token(config.data.seq_len),
        tokens_per_row=config.data.seq_len)
    return trainer.train(config, workdir, stage, mesh)


if __name__ == '__main__':
  cli.run(train_and_evaluate, 'experiments/configs/tiny.py')
