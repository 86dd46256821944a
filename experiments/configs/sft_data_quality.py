r"""Instruction data, quality vs quantity: SFT of one pretrained workdir on every number of world
training conversations in `grid.num_train` x every label-noise rate in `grid.noise`, the same
number of steps each. The 12 runs took 15 minutes on 2 CPU cores.

A noise rate r replaces the reply of a share r * grid.wrong_share of the training conversations
with a wrong one and of r * (1 - grid.wrong_share) with the right answer out of format (SFT's
data.noise_wrong and data.noise_off_format). Every other field is an SFT field shared by all
runs. Tuples from the command line: `--config.grid.num_train='(500, 5000)'`.
"""

import ml_collections

from experiments.configs import sft


def get_config() -> ml_collections.ConfigDict:
  c = sft.get_config()
  c.init_workdir = 'runs/pipeline/base'
  # 150 steps of 32 rows, ~4 conversations a row: ~1 pass over 16,000 conversations, ~75 over 250.
  c.train.steps = 150
  # Twice the default held-out questions, so that exact match depends less on which of the ~50
  # held-out facts happen to be asked; 128 requests of each policy kind, as the pipeline's report.
  c.data.update(num_eval=512, num_eval_policy=128)
  c.eval.num_prompts = 512
  c.eval_every = 0
  c.eval_at_start = False
  c.checkpoint.update(every=1_000_000, keep=1)  # the final step is always saved
  return with_grid(c, num_train=(250, 1000, 4000, 16_000), noise=(0.0, 0.25, 0.5),
                   wrong_share=0.5)


def with_grid(c: ml_collections.ConfigDict, num_train, noise,
              wrong_share: float) -> ml_collections.ConfigDict:
  """The SFT config `c` as this study's: the grid, not `c.data`, sets the size and the noise."""
  del c.data.num_train, c.data.noise_wrong, c.data.noise_off_format
  c.grid = ml_collections.ConfigDict(dict(num_train=num_train, noise=noise,
                                          wrong_share=wrong_share))
  return c
