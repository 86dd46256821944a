"""A ~2M-parameter model that learns the synthetic world in minutes on 2 CPU cores."""

from experiments.configs import base


def get_config():
  c = base.get_config()
  c.model.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                 mlp_dim=384, max_seq_len=128,
                 # Unrolled: on a CPU the step runs 1.14x faster than scanned (no stacked
                 # per-layer residuals to fill and slice). Accelerator configs scan, which keeps
                 # compile time flat in depth.
                 scan_layers=False)
  c.data.update(seq_len=128, num_train_docs=20_000, num_validation_docs=500)
  c.tokenizer.update(vocab_size=512, train_docs=5_000)
  c.train.update(steps=600, batch_size=32, learning_rate=3e-3, warmup_steps=50)
  c.eval.update(batches=4, batch_size=32, sample_tokens=48)
  c.log_every = 25
  c.eval_every = 200
  c.checkpoint.every = 200
  return c
