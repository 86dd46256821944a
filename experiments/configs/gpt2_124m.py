"""GPT-2-small-sized (~124M parameters with a 50k vocabulary), in the LLaMA style."""

from experiments.configs import base


def get_config():
  c = base.get_config()
  c.model.update(d_model=768, num_layers=12, num_heads=12, num_kv_heads=12, head_dim=64,
                 mlp_dim=2048, max_seq_len=1024, tie_embeddings=True, dtype='bfloat16')
  c.tokenizer.update(vocab_size=50_304)
  c.data.update(seq_len=1024)
  c.train.update(steps=20_000, batch_size=256, learning_rate=6e-4, warmup_steps=1000)
  c.eval.update(batches=16, batch_size=64)
  c.eval_every = 1000
  c.checkpoint.every = 1000
  return c
