"""Reward-model training from an SFT (or pretraining) workdir: `--config.init_workdir=runs/sft`."""

from experiments.configs import sft


def get_config():
  c = sft.get_config()
  c.data.update(num_train=20_000, num_eval=512)
  del c.data.noise_wrong, c.data.noise_off_format  # SFT's label noise
  # Preference pairs of the built-in world: what the rejected reply is, in these proportions.
  # Abstentions on answerable questions teach that "I don't know" is not a safe bet: without
  # them PPO against the reward model learns to abstain on facts it is unsure of.
  c.data.rejection_proportions = dict(wrong=0.4, off_format=0.2, rambling=0.2, abstain=0.2)
  c.train.update(steps=300, batch_size=32, learning_rate=3e-4, warmup_steps=20)
  # The reward adds a learned multiple of the reply's log-likelihood to the head's read-out
  # (see ScalarHeadModel): held-out pairs with a wrong answer go from ~60% to ~80% right.
  c.reply_likelihood = True
  c.loss_margin = 0.0
  c.loss_centering = 0.01  # keeps rewards centred on zero
  # Every held-out pair is evaluated; reward statistics come from `stats_pairs` training pairs.
  c.eval = c.eval.__class__(dict(batch_size=64, stats_pairs=1024))
  c.eval_at_start = False
  return c
