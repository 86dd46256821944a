"""Reward-model over-optimisation on the built-in world, sized for ~17 minutes on 2 CPU cores.

For each length in `reward_model_steps` a reward model is trained from `init_workdir` (an SFT
workdir), then PPO optimises the SFT policy against it. `reward_model` and `ppo` are those
binaries' configs (`--config.ppo.kl.coef=0.01`); `init_workdir` and `reward_workdir` are filled in
by the experiment. Tuples from the command line: `--config.reward_model_steps='(50, 200)'`.
"""

import ml_collections

from experiments.configs import reward_model
from experiments.configs import rl


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.init_workdir = 'runs/pipeline/sft'  # the policy, and PPO's reference for the KL
  # One reward model per length: fewer steps see fewer preference pairs and leave a proxy that
  # is easier to exploit (held-out accuracy 78% after 25 steps, 82% after 100 and after 400).
  c.reward_model_steps = (25, 100, 400)
  c.reward_model = reward_model.get_config()
  c.reward_model.data.seq_len = 80  # as in the pipeline: the longest world pair is under 80
  # The head alone: the reply-likelihood term ties the reward to the SFT model's own greedy
  # replies; with it, 40 PPO steps at 2e-4 left the proxy of held-out replies flat (0.42 ->
  # 0.41) while gold fell (0.63 -> 0.52): a drift, not an optimisation.
  c.reward_model.reply_likelihood = False
  c.reward_model.eval_every = 0
  c.ppo = rl.get_config()
  c.ppo.update(algorithm='ppo', reward='model')
  # A loose leash and a brisk learning rate, so that the policy travels far enough from SFT for
  # the reward model's errors to pay (the pipeline's PPO: coef 0.2, 5e-5, 60 steps, KL 0.18).
  c.ppo.kl.coef = 0.01
  c.ppo.train.update(steps=40, learning_rate=1e-4)
  c.ppo.eval_every = 2  # and at step 0: each evaluation (448 prompts) takes seconds
  c.ppo.eval_at_start = True
  c.ppo.eval.num_samples = 2
  c.ppo.log_every = 5
  c.ppo.checkpoint.every = 20
  return c
