"""RL from an SFT workdir: GRPO on verifiable rewards (default) or PPO against a reward model.

  --config.init_workdir=runs/sft                      # policy and frozen reference
  --config.algorithm=ppo --config.reward=model --config.reward_workdir=runs/rm
"""

import ml_collections

from experiments.configs import sft
from jaxlm.data import world


def get_config() -> ml_collections.ConfigDict:
  c = sft.get_config()
  c.algorithm = 'grpo'  # grpo | ppo
  c.reward = 'exact_match'  # a name in jaxlm.rl.REWARD_FUNCTIONS, or 'model'
  # The reward model (reward='model').
  c.reward_workdir = ''
  # PPO's value function: a model of its own ('separate', starting as the reward model, or as the
  # policy's backbone without one), or a value head on the policy's own backbone ('shared': half
  # the parameters and optimizer state, and one backbone pass for both heads: its loss and gradient
  # take 1.8x less time on the pipeline's model; the value loss also trains the policy's layers).
  c.critic = 'separate'
  # RL prompts: the world's questions kept apart from SFT and evaluation.
  c.data.update(num_train=20_000, num_eval=256, world_train_split='rl')
  del c.data.noise_wrong, c.data.noise_off_format  # SFT's label noise
  c.rollout = ml_collections.ConfigDict(dict(
      prompts_per_step=16, samples_per_prompt=8, prompt_len=48, max_new_tokens=world.REPLY_TOKENS,
      temperature=1.0))
  c.clip_eps = 0.2
  c.value_clip_eps = 0.2
  c.value_coef = 0.5
  c.epochs = 2
  c.minibatches = 2
  c.ppo = ml_collections.ConfigDict(dict(gamma=1.0, lam=0.95))
  c.kl_estimator = 'k3'
  # A fixed coefficient, or adaptive: steered towards `target` nats per reply.
  c.kl = ml_collections.ConfigDict(dict(coef=0.05, adaptive=False, target=2.0, horizon=10_000))
  c.train.update(steps=60, learning_rate=5e-5, warmup_steps=5, min_lr_ratio=1.0,
                 weight_decay=0.0)
  c.eval.update(num_prompts=256, batch_size=128, num_samples=4)
  c.eval_every = 20
  c.log_every = 5
  c.checkpoint.every = 20
  return c
