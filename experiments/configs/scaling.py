r"""A compute-optimal scaling ladder: every width in `ladder.d_models` trained for every length in
`ladder.steps`, on the built-in world; the 12 runs take about 2 minutes on 2 CPU cores.

Every other field is a pretraining field shared by all runs (`--config.data.source=text
--config.data.text_glob='corpus/*.txt'`). A width sets d_model, num_heads = num_kv_heads =
d_model / model.head_dim and mlp_dim = ladder.mlp_ratio * d_model. Each run's learning rate decays
over its own length, as the Chinchilla fits need. Tuples from the command line:
`--config.ladder.d_models='(64, 128)'`.

A real ladder, for a TPU slice (`--config=experiments/configs/scaling.py:tpu`): widths 256..2048
at 12 layers (~13M..~800M non-embedding parameters), ~2.6e8..~8.4e9 tokens each, on C4 prepared
as ArrayRecord; ~1e20 FLOPs (6ND) in all, hours on a v5e-64 at 40% MFU.
"""

import ml_collections

from experiments.configs import base
from experiments.configs import tiny


def get_config(ladder_name: str = 'cpu'):
  if ladder_name == 'tpu':
    return get_tpu_config()
  if ladder_name != 'cpu':
    raise ValueError(f"experiments/configs/scaling.py:{ladder_name}: the ladders are 'cpu' "
                     "and 'tpu'")
  c = tiny.get_config()
  c.model.update(num_layers=2, head_dim=16, max_seq_len=64)
  c.data.update(seq_len=64, num_train_docs=10_000, num_validation_docs=200)
  c.train.update(batch_size=16, learning_rate=1e-2)
  c.eval.update(batches=4, batch_size=16, num_samples=0)
  c.ladder = ladder(d_models=(32, 48, 64, 96), steps=(60, 120, 240), mlp_ratio=4,
                    warmup_fraction=0.1)
  c.budget_flops = 1e12  # the budget to split compute-optimally between N and D (C = 6 N D)
  c.log_every = 20
  c.eval_every = 0
  c.checkpoint.update(every=1_000_000, keep=1)  # the final step is always saved
  return c


def get_tpu_config():
  """The same study at a scale where the exponents mean something: 5 widths x 4 lengths."""
  c = base.get_config()
  c.model.update(num_layers=12, head_dim=64, max_seq_len=1024, dtype='bfloat16', remat='dots')
  c.data.update(source='tfds', tfds_name='c4/en', seq_len=1024)
  c.tokenizer.update(vocab_size=32_000, train_docs=200_000)
  c.train.update(batch_size=256, learning_rate=1e-3)
  c.eval.update(batches=32, batch_size=64, num_samples=0)
  # 256 x 1024 tokens a step: 1k .. 32k steps is ~2.6e8 .. ~8.4e9 tokens.
  c.ladder = ladder(d_models=(256, 512, 768, 1024, 2048), steps=(1_000, 4_000, 16_000, 32_000),
                    mlp_ratio=4, warmup_fraction=0.05)
  c.budget_flops = 1e21
  c.log_every = 100
  c.eval_every = 0
  c.checkpoint.update(every=2_000, keep=1)
  c.mesh.update(data=1, fsdp=-1)
  return c


def ladder(d_models, steps, mlp_ratio, warmup_fraction) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(d_models=d_models, steps=steps, mlp_ratio=mlp_ratio,
                                        warmup_fraction=warmup_fraction))
