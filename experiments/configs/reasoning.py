"""Multi-step arithmetic on a scratchpad (`jaxlm.data.reasoning`): pretraining on single-step
facts, SFT on a few worked examples, then GRPO on RL-split problems; sized for under 20 minutes
on 2 CPU cores.

Each stage is its binary's config under its own name (`--config.grpo.train.steps=40`);
`experiments.reasoning` writes the data files and fills in the paths and `init_workdir`.
"""

import ml_collections

from experiments.configs import rl
from experiments.configs import sft
from experiments.configs import tiny

# Replies take up to 66 tokens (3-digit sums: three steps and the answer); prompts under 24.
_PROMPT_LEN, _MAX_NEW_TOKENS = 32, 72


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict(dict(
      seed=0,
      num_pretrain_docs=20_000, num_validation_docs=200,
      # Pretraining documents that work problems out, and their kinds: 3-digit sums are left to
      # SFT's few examples and RL (jaxlm.data.reasoning.ReasoningConfig).
      worked_fraction=0.5, worked_kinds=('sum2', 'chain'),
      # "A few" worked examples: SFT teaches the format and the order of the steps, not the facts.
      num_sft=120,
      num_rl=20_000,  # RL prompts, drawn from problems no other split holds
      num_eval_per_kind=128,  # held-out problems of each kind in the before/after table
  ))

  c.pretrain = tiny.get_config()
  c.pretrain.data.update(source='jsonl', text_field='text')
  c.pretrain.train.steps = 500
  c.pretrain.eval.num_samples = 2

  c.sft = sft.get_config()
  c.sft.data.source = 'jsonl'
  # Few steps: a policy fitted longer samples nearly its greedy reply (0.02 nats a token after
  # 100 steps), so GRPO's groups rarely disagree (it then added 4 points, after 40 steps 8, in one
  # paired comparison).
  c.sft.train.update(steps=40, batch_size=16)
  # experiments.reasoning evaluates every stage on the same prompts; the stages log their loss.
  c.sft.eval.num_prompts = 0

  c.grpo = rl.get_config()
  c.grpo.data.source = 'jsonl'
  c.grpo.reward = 'scratchpad'
  c.grpo.rollout.update(prompt_len=_PROMPT_LEN, max_new_tokens=_MAX_NEW_TOKENS)
  c.grpo.train.update(steps=60, learning_rate=1e-4)

  for stage in ('sft', 'grpo'):
    c[stage].eval_every = 0
    c[stage].eval_at_start = False

  c.report = ml_collections.ConfigDict(dict(
      batch_size=128, max_new_tokens=_MAX_NEW_TOKENS,
      num_replies=2,  # shown per kind, the same problems for every stage
  ))
  return c
