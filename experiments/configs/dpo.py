"""DPO from an SFT workdir (policy and frozen reference): `--config.init_workdir=runs/sft`."""

from experiments.configs import reward_model
from jaxlm.data import world


def get_config():
  c = reward_model.get_config()
  c.beta = 0.1
  c.label_smoothing = 0.0
  c.train.update(steps=150, learning_rate=1e-4, warmup_steps=10)
  c.eval.update(num_prompts=256, batch_size_generation=128, sample_tokens=world.REPLY_TOKENS,
                temperature=0.0, top_k=0, top_p=1.0, num_samples=4)
  c.eval_at_start = True
  return c
