"""Reward-model over-optimisation on the built-in world, sized for ~17 minutes on 2 CPU cores.

First `sft` fine-tunes `base_workdir` (a pretrained workdir), unless `init_workdir` names an SFT
workdir to start from. Then for each length in `reward_model_steps` a reward model is trained from
the SFT model, and PPO optimises the SFT policy against it. `sft`, `reward_model` and `ppo` are
those binaries' configs (`--config.ppo.kl.coef=0.01`); their `init_workdir` and `reward_workdir`
are filled in by the experiment. Tuples from the command line:
`--config.reward_model_steps='(50, 200)'`.
"""

import ml_collections

from experiments.configs import reward_model
from experiments.configs import rl
from experiments.configs import sft


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.base_workdir = 'runs/pipeline/base'
  # The policy, and PPO's reference for the KL; empty: `sft` trains it from `base_workdir`.
  c.init_workdir = ''
  # A short SFT leaves PPO something to gain: from the pipeline's 200-step SFT model every PPO
  # step cost gold, and gold peaked at step 0 against every reward model; from this one (exact
  # match 0.34, hallucination 0.75 on the held-out prompts) a better reward model lets gold
  # rise for longer before it falls.
  c.sft = sft.get_config()
  c.sft.train.steps = 50
  c.sft.eval_every = 0  # once, at the end
  c.sft.eval_at_start = False
  # One reward model per length: fewer steps see fewer preference pairs and leave a proxy that
  # is easier to exploit (held-out accuracy 76% after 25 steps, 81% after 100, 83% after 400).
  c.reward_model_steps = (25, 100, 400)
  c.reward_model = reward_model.get_config()
  c.reward_model.data.seq_len = 96  # as in the pipeline
  # The head alone: the reply-likelihood term ties the reward to the SFT model's own greedy
  # replies; with it, 40 PPO steps at 2e-4 left the proxy of held-out replies flat (0.42 ->
  # 0.41) while gold fell (0.63 -> 0.52): a drift, not an optimisation.
  c.reward_model.reply_likelihood = False
  c.reward_model.eval_every = 0
  c.ppo = rl.get_config()
  c.ppo.update(algorithm='ppo', reward='model')
  # A loose leash and a brisk learning rate, so that the policy travels far enough from SFT for
  # the reward model's errors to pay (the pipeline's PPO: coef 0.2, 5e-5, 60 steps, KL 0.09–0.19).
  c.ppo.kl.coef = 0.01
  c.ppo.train.update(steps=40, learning_rate=1e-4)
  c.ppo.eval_every = 2  # and at step 0: each evaluation (448 prompts) takes seconds
  c.ppo.eval_at_start = True
  c.ppo.eval.num_samples = 2
  c.ppo.log_every = 5
  c.ppo.checkpoint.every = 20
  return c
