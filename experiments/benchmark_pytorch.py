r"""The PyTorch reference of `experiments.benchmark` on a CPU: a nanoGPT-style GPT (pre-LayerNorm,
learned positions, GELU MLP of 4x width, tied embeddings, `scaled_dot_product_attention`) trained
eagerly with AdamW and gradient clipping, timed per step, with its own fp32 matmul probe as the
MFU denominator.

Needs torch, which jaxlm does not install (`pip install torch==2.13.0` in another environment
gives the CPU wheel). Compare with jaxlm at the same shape and a parameter-matched SwiGLU width
(8/3 of d_model), alternating the two:

  python experiments/benchmark_pytorch.py --layers=4 --d_model=128 --heads=4 --seq_len=64 \
      --batch_size=12 --vocab_size=512 --steps=50
  python -m experiments.benchmark --config=experiments/configs/tiny.py --vocab_size=512 \
      --config.model.num_layers=4 --config.model.d_model=128 --config.model.num_heads=4 \
      --config.model.num_kv_heads=4 --config.model.head_dim=32 --config.model.mlp_dim=344 \
      --config.data.seq_len=64 --config.train.batch_size=12 --steps=50

Prints one JSON line: step seconds (median of `--rounds`), tokens/s, model FLOP/s, MFU.
"""

import argparse
import json
import math
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):

  def __init__(self, d_model: int, heads: int):
    super().__init__()
    self.heads = heads
    self.attention_norm = nn.LayerNorm(d_model, bias=False)
    self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
    self.out = nn.Linear(d_model, d_model, bias=False)
    self.mlp_norm = nn.LayerNorm(d_model, bias=False)
    self.up = nn.Linear(d_model, 4 * d_model, bias=False)
    self.down = nn.Linear(4 * d_model, d_model, bias=False)

  def forward(self, x):
    B, L, D = x.shape
    q, k, v = (t.view(B, L, self.heads, D // self.heads).transpose(1, 2)
               for t in self.qkv(self.attention_norm(x)).split(D, dim=2))
    attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + self.out(attended.transpose(1, 2).reshape(B, L, D))
    return x + self.down(F.gelu(self.up(self.mlp_norm(x))))


class GPT(nn.Module):

  def __init__(self, vocab_size: int, seq_len: int, layers: int, d_model: int, heads: int):
    super().__init__()
    self.token_embedding = nn.Embedding(vocab_size, d_model)
    self.position_embedding = nn.Embedding(seq_len, d_model)
    self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
    self.final_norm = nn.LayerNorm(d_model, bias=False)
    for module in self.modules():  # nanoGPT's initialisation
      if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)

  def forward(self, tokens, targets):
    positions = torch.arange(tokens.shape[1])
    x = self.token_embedding(tokens) + self.position_embedding(positions)
    for block in self.blocks:
      x = block(x)
    logits = self.final_norm(x) @ self.token_embedding.weight.T
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def matmul_flops_per_sec(size: int = 2048, repeats: int = 10) -> float:
  a, b = torch.randn(size, size), torch.randn(size, size)
  a @ b
  start = time.perf_counter()
  for _ in range(repeats):
    a @ b
  return 2 * size ** 3 * repeats / (time.perf_counter() - start)


def flops_per_token(vocab_size: int, seq_len: int, layers: int, d_model: int) -> float:
  """6N (matmul parameters, unembedding included) plus causal attention, as jaxlm counts."""
  matmul_params = layers * 12 * d_model ** 2 + vocab_size * d_model
  return 6 * matmul_params + 12 * layers * d_model * seq_len / 2


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  for name, default in (('layers', 4), ('d_model', 128), ('heads', 4), ('seq_len', 64),
                        ('batch_size', 12), ('vocab_size', 512), ('steps', 50), ('rounds', 3),
                        ('seed', 0)):
    parser.add_argument(f'--{name}', type=int, default=default)
  args = parser.parse_args()
  torch.manual_seed(args.seed)
  model = GPT(args.vocab_size, args.seq_len, args.layers, args.d_model, args.heads)
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95),
                                weight_decay=0.1)
  tokens = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1))
  inputs, targets = tokens[:, :-1], tokens[:, 1:]

  def step():
    loss = model(inputs, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss

  step()  # warm-up
  rounds = []
  for _ in range(args.rounds):
    start = time.perf_counter()
    for _ in range(args.steps):
      loss = step()
    rounds.append((time.perf_counter() - start) / args.steps)
  step_seconds = statistics.median(rounds)
  peak = matmul_flops_per_sec()
  tokens_per_sec = args.batch_size * args.seq_len / step_seconds
  model_flops = tokens_per_sec * flops_per_token(args.vocab_size, args.seq_len, args.layers,
                                                 args.d_model)
  print(json.dumps({
      'torch': torch.__version__, 'threads': torch.get_num_threads(),
      'params': sum(p.numel() for p in model.parameters()),
      'step_seconds': step_seconds, 'round_step_seconds': rounds,
      'tokens_per_sec': tokens_per_sec, 'model_flops_per_sec': model_flops,
      'peak_flops_per_sec': peak, 'mfu': model_flops / peak, 'final_loss': loss.item(),
      'initial_loss_expected': math.log(args.vocab_size)}))


if __name__ == '__main__':
  main()
