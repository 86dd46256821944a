"""A ~1.1B LLaMA-style model for GPU/TPU: GQA, untied embeddings, scanned and rematerialised
layers, bf16 compute over fp32 parameters, FSDP across all devices."""

from experiments.configs import base


def get_config():
  c = base.get_config()
  c.model.update(d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                 mlp_dim=8192, max_seq_len=2048, rope_theta=500_000.0, dtype='bfloat16',
                 remat='dots')
  c.tokenizer.update(vocab_size=32_000)
  c.data.update(seq_len=2048)
  c.train.update(steps=100_000, batch_size=512, learning_rate=3e-4, warmup_steps=2000)
  c.eval.update(batches=16, batch_size=64)
  c.eval_every = 2000
  c.checkpoint.every = 1000
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  return c
