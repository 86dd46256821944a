"""A config small enough for end-to-end tests to train in seconds."""

from experiments.configs import dpo
from experiments.configs import reward_model
from experiments.configs import rl
from experiments.configs import sft
from experiments.configs import tiny


def config(steps=8, **overrides):
  c = tiny.get_config()
  # Scanned, the layout of accelerator runs; the pipeline test runs the CPU configs' unrolled.
  c.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 mlp_dim=128, max_seq_len=128, scan_layers=True)
  c.data.update(seq_len=64, num_train_docs=400, num_validation_docs=40)
  c.tokenizer.update(vocab_size=320, train_docs=400)
  c.train.update(steps=steps, batch_size=8, warmup_steps=2)
  c.eval.update(batches=1, batch_size=8, num_samples=0)
  c.log_every = 1
  c.eval_every = 0
  c.checkpoint.update(every=4, keep=3)
  c.mesh.update(data=-1, fsdp=1, tensor=1, num_devices=1)
  return _override(c, overrides)


def _override(c, overrides):
  for dotted, value in overrides.items():
    target = c
    *parents, leaf = dotted.split('.')
    for part in parents:
      target = target[part]
    target[leaf] = value
  return c


def _post_training(c, init_workdir, steps, overrides):
  c.init_workdir = init_workdir
  c.data.update(seq_len=64, num_train=256, num_eval=16, num_eval_policy=4)
  c.train.update(steps=steps, batch_size=8, warmup_steps=2)
  c.log_every = 1
  c.eval_every = 0
  c.checkpoint.update(every=4, keep=2)
  c.mesh.update(data=-1, fsdp=1, tensor=1, num_devices=1)
  return _override(c, overrides)


def sft_config(init_workdir, steps=4, **overrides):
  c = sft.get_config()
  c.eval.update(batches=1, batch_size=8, num_prompts=8, batch_size_generation=8, num_samples=0)
  return _post_training(c, init_workdir, steps, overrides)


def reward_config(init_workdir, steps=4, **overrides):
  c = reward_model.get_config()
  c.eval.update(batch_size=8, stats_pairs=16)
  return _post_training(c, init_workdir, steps, overrides)


def get_config(stage: str = 'pretrain'):
  """Lets the binaries load this file: --config=tests/tiny_config.py (or ...py:sft, :reward,
  :rl, :dpo, with --config.init_workdir=...)."""
  makers = {'pretrain': config, 'sft': lambda: sft_config(''),
            'reward': lambda: reward_config(''), 'rl': lambda: rl_config(''),
            'dpo': lambda: dpo_config('')}
  return makers[stage]()


def rl_config(init_workdir, steps=4, **overrides):
  c = rl.get_config()
  c.rollout.update(prompts_per_step=4, samples_per_prompt=4, prompt_len=64, max_new_tokens=8)
  c.eval.update(num_prompts=8, batch_size=8, num_samples=0)
  c = _post_training(c, init_workdir, steps, overrides)
  c.train.batch_size = c.rollout.prompts_per_step
  return c


def dpo_config(init_workdir, steps=4, **overrides):
  c = dpo.get_config()
  c.eval.update(batch_size=8, stats_pairs=16, num_prompts=8,
                batch_size_generation=8, num_samples=0)
  return _post_training(c, init_workdir, steps, overrides)
