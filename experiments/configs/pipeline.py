"""The whole pipeline on the built-in world: 26 minutes on 2 CPU cores.

Each stage is its binary's config under its own name (`--config.sft.train.steps=400`);
`init_workdir` and `reward_workdir` are filled in by the pipeline.
"""

import ml_collections

from experiments.configs import dpo
from experiments.configs import reward_model
from experiments.configs import rl
from experiments.configs import sft
from experiments.configs import tiny
from jaxlm.data import world


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.pretrain = tiny.get_config()
  # Long enough for the base model to know most held-out facts: RL can only draw out what
  # pretraining put in (after 600 steps GRPO gained at most 4 points over SFT, after 1600 13).
  # Greedy completions of 256 held-out problems in the documents' form (`71 + 26 =`) and of the
  # 52 held-out facts' shortest statements: 1000 steps 88% / 88%, 1200 94% / 87%, 1600 92% / 85%.
  c.pretrain.train.steps = 1200
  c.sft = sft.get_config()
  c.sft.train.steps = 200
  # "I don't know" is learnt for names the model never read, not for the train split's 47.
  # From this base (greedy; 256 questions drawn from the 256 held-out unknown people), SFT with 64
  # more unknown people made up 8.6% of answers (exact match 0.770), with 256 more 2.0% (0.781).
  c.sft.data.extra_unknown_people = 256
  c.reward_model = reward_model.get_config()
  # Held-out pairwise accuracy (on a 1600-step base) 0.999 after 100 steps, 1.000 after 200.
  c.reward_model.train.steps = 100
  # Preference rows are padded, and world replies short: all but the longest rambling rejections
  # fit in 96 tokens (31 of the 20,000 training pairs do not; the log counts them).
  c.reward_model.data.seq_len = 96
  c.grpo = rl.get_config()
  # RL's learning rate is constant after warm-up, so a shorter run is the longer one's start:
  # on a 1600-step base the 60-step GRPO and assistant read 0.875 and 0.859 held-out exact match
  # at step 40, 0.805 and 0.777 at 60. PPO read 0.805 at 40 and 0.852 at 60 and keeps its 60.
  c.grpo.train.steps = 40
  c.ppo = rl.get_config()
  c.ppo.update(algorithm='ppo', reward='model')
  c.ppo.kl.coef = 0.2  # the reward model is imperfect: a tighter leash limits reward hacking
  c.dpo = dpo.get_config()
  c.dpo.train.steps = 100
  c.dpo.data.seq_len = 96
  c.dpo.beta = 0.3
  c.dpo.train.learning_rate = 2e-5
  # The assistant: GRPO after PPO (RLHF), on a verifiable reward that also scores the policy
  # (a made-up answer about an unknown person or a refused benign request costs 1), asked
  # about many people nobody knows (a fifth of its prompts, 256 names beyond the RL split's
  # 5). The same GRPO from SFT on a 1600-step base (held-out exact match, hallucination on the
  # held-out split's own 12 unknown people, before it asked about 256):
  # 0.871, 4.7%; with 'honest' (a wrong guess about anyone costs 1) 0.832, 0.8%; exact match
  # alone on the world's RL prompts with the 256 names 0.879, 27%.
  c.assistant = rl.get_config()
  c.assistant.reward = 'exact_match_and_policy'
  c.assistant.data.update(unknown_share=0.2, extra_unknown_people=256)
  c.assistant.train.steps = 40
  # Held-out evaluations during training draw the report's learning curves; the report then
  # evaluates every stage (and the base model) the same way at the end.
  for stage, every in (('sft', 50), ('reward_model', 100), ('grpo', 20), ('ppo', 20),
                       ('assistant', 20), ('dpo', 50)):
    c[stage].eval_every = every
    c[stage].eval_at_start = False
  # The report: every policy on the same held-out prompts and preference pairs.
  c.report = ml_collections.ConfigDict(dict(
      num_prompts=256, num_policy_prompts=128, num_pairs=512, batch_size=128, seq_len=128,
      prompt_len=48, max_new_tokens=world.REPLY_TOKENS))
  return c
