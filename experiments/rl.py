r"""Reinforcement learning of the chat model: GRPO on verifiable rewards, or PPO against a
reward model with a KL penalty to the reference (the starting SFT model).

  python -m experiments.rl --config=experiments/configs/rl.py --workdir=runs/grpo \
      --config.init_workdir=runs/sft
  python -m experiments.rl --config=experiments/configs/rl.py --workdir=runs/ppo \
      --config.init_workdir=runs/sft --config.algorithm=ppo --config.reward=model \
      --config.reward_workdir=runs/rm
"""

import flax.linen as nn
import grain
import jax
import numpy as np

from jaxlm import cli
from jaxlm import configs
from jaxlm import lm
from jaxlm import lora
from jaxlm import losses
from jaxlm import metrics
from jaxlm import model as model_lib
from jaxlm import post_training
from jaxlm import reward as reward_lib
from jaxlm import rl
from jaxlm import sharding
from jaxlm import trainer
from jaxlm.data import post_training as data_lib
from jaxlm.data import shards
from jaxlm.errors import UserError


def validate(config) -> None:
  """Checks an RL config, whose training batch is the prompts of a step (every rollout of
  `rollout.prompts_per_step` prompts trains in one step)."""
  with config.unlocked():
    config.train.batch_size = config.rollout.prompts_per_step
    config.train.grad_accum_steps = 1
  configs.validate(config, {'data.source': data_lib.SOURCES, 'algorithm': rl.ALGORITHMS,
                            'critic': rl.CRITICS,
                            'reward': tuple(rl.REWARD_FUNCTIONS) + ('model',),
                            'kl_estimator': losses.KL_KINDS})
  lora.check(config, dropout_allowed=False)
  if config.reward == 'model' and not config.reward_workdir:
    raise UserError('config.reward_workdir must name a reward-model workdir when '
                     'config.reward is "model"')
  rows = config.rollout.prompts_per_step * config.rollout.samples_per_prompt
  if rows % config.minibatches:
    raise UserError(f'config.rollout.prompts_per_step * samples_per_prompt ({rows}) must be '
                     f'divisible by config.minibatches ({config.minibatches})')
  post_training.world_question_options(config.data)  # checked before anything is written
  if config.rollout.temperature != 1.0:
    raise UserError('config.rollout.temperature must be 1.0: the importance ratios and the KL '
                     'are taken under the policy itself, which is what samples at 1.0')
  if config.kl.adaptive and not (config.kl.target > 0 and config.kl.horizon > 0):
    raise UserError('config.kl.target and config.kl.horizon must be positive with '
                     'config.kl.adaptive')
  if config.algorithm == 'grpo' and config.rollout.samples_per_prompt < 2:
    raise UserError('config.rollout.samples_per_prompt must be >= 2 for GRPO (advantages are '
                     'relative to the other replies to the same prompt)')


def train_and_evaluate(config, workdir: str) -> trainer.TrainState:
  validate(config)
  tokenizer, base_policy, world = post_training.start_from(config, workdir)
  configs.validate(config)
  policy = lora.for_config(base_policy, config)
  if config.rollout.prompt_len + config.rollout.max_new_tokens > config.model.max_seq_len:
    raise UserError(f'config.rollout.prompt_len + max_new_tokens exceeds the model\'s '
                     f'max_seq_len ({config.model.max_seq_len})')
  # A separate critic starts as the reward model (when there is one), so it has its module.
  reward_model = (reward_lib.reward_model(config.reward_workdir, policy.config)
                  if config.reward == 'model' and config.critic == 'separate'
                  else model_lib.ScalarHeadModel(policy.config))
  critic = lora.for_config(reward_model, config)
  prompts = post_training.examples(config.data, 'train', world, data_lib.prompt_from_record,
                                   data_lib.world_prompts)
  eval_prompts = post_training.examples(config.data, 'eval', world, data_lib.prompt_from_record,
                                        data_lib.world_prompts)
  if config.reward != 'model' and not all(p.get('answer') for p in prompts):
    raise UserError(f'config.reward={config.reward!r} checks answers: every RL prompt needs an '
                     '"answer" (or use config.reward="model")')
  configs.save(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    # With LoRA the reference is the policy with its adapters off: no second copy.
    reference = (None if lora.enabled(config) else
                 post_training.load_initial_params(config, policy, mesh))
    uses_reward_model = config.reward == 'model'
    scorer = rl.Scorer(
        config, policy, critic, reward_model, reference,
        lm.load_params(config.reward_workdir, reward_model, mesh) if uses_reward_model else None,
        reward_lib.load_stats(config.reward_workdir) if uses_reward_model else None, mesh,
        reference_model=base_policy)
    iterator = rl.PromptIterator(shards.ShardedBatches(
        lambda shard, num_shards, rows: grain.MapDataset.source(np.arange(len(prompts)))[
            shard::num_shards].shuffle(seed=config.seed).repeat(None).batch(rows)
        .map(lambda indices: {'indices': indices}).to_iter_dataset(),
        config.data.num_shards, config.rollout.prompts_per_step, mesh), rl.AdaptiveKL(config.kl))
    is_ppo = config.algorithm == 'ppo'

    def init_params(rng):
      policy_rng, value_rng = jax.random.split(rng)
      params = {'policy': lm.init_params_fn(policy, 8)(policy_rng)}
      if is_ppo and config.critic == 'shared':
        params['value_head'] = lm.init_params_fn(critic, 8)(value_rng)['head']
      elif is_ppo:
        params['value'] = lm.init_params_fn(critic, 8)(value_rng)
      return params

    load_policy = lm.initial_params_loader(config)

    def load_params(params):
      loaded = {**params, 'policy': load_policy(params['policy'])}
      if not is_ppo or config.critic == 'shared':  # a shared critic's head starts at zero
        return loaded
      if config.reward_workdir:  # the critic starts as the reward model
        loaded['value'] = lm.params_loader(config.reward_workdir)(params['value'])
      else:  # or as the policy's backbone with a fresh head
        loaded['value'] = {**params['value'],
                           'transformer': load_policy(params['value']['transformer'])}
      return loaded

    sequence = config.rollout.prompt_len + config.rollout.max_new_tokens
    generation = rl.GenerationTimer()
    stage = trainer.Stage(
        init_params=init_params, load_params=load_params, loss_fn=None,
        train_batches=iterator,
        evaluate=rl.make_evaluator(config, tokenizer, policy, scorer, eval_prompts, mesh,
                                   metrics.log),
        # Per prompt: its sampled rows, each trained `epochs` times (generation not counted).
        flops_per_token=policy.config.flops_per_token(sequence) * config.epochs
        * (2 if is_ppo else 1),
        tokens_per_row=sequence * config.rollout.samples_per_prompt,
        batch_tokens=lambda batch: batch['inputs'].shape[0] * (batch['inputs'].shape[1] + 1),
        make_step=lambda optimizer: rl.make_step(rl.make_loss(policy, critic, config),
                                                 optimizer, config.epochs, config.minibatches),
        prepare_batch=rl.make_prepare_batch(config, tokenizer, policy, scorer, prompts,
                                            iterator, mesh, generation),
        window_metrics=generation.metrics)
    return trainer.train(config, workdir, stage, mesh)


if __name__ == '__main__':
  cli.run(train_and_evaluate, 'experiments/configs/rl.py')
