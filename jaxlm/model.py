"""Decoder-only transformer (LLaMA-style by default) in Flax Linen.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv_heads`, `vocab`,
`layers`); `jaxlm.sharding` maps them onto the device mesh. Kernels are kept 2-D (heads folded
into one dimension) so they shard under `jax.set_mesh` (flax issue 3676).

The forward pass takes explicit positions and segment ids, so packed rows and KV-cache decoding
use the same code: a key is visible to a query when it is not in the future, belongs to the same
segment, and (with a cache) has been written.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm import losses

REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    'dots_with_batch': jax.checkpoint_policies.dots_saveable,
}
ATTENTION_IMPLEMENTATIONS = ('xla', 'cudnn')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 8
  num_kv_heads: int = 8
  head_dim: int = 32
  mlp_dim: int = 1024
  max_seq_len: int = 256
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  scan_layers: bool = True
  remat: str = 'none'
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  attention_impl: str = 'xla'
  # Ids from here to vocab_size only pad the embedding for sharding: never predicted. 0: none.
  tokenizer_vocab_size: int = 0

  @classmethod
  def from_config(cls, config, vocab_size: int, tokenizer_vocab_size: int = 0) -> 'ModelConfig':
    fields = {f.name for f in dataclasses.fields(cls)} - {'vocab_size', 'tokenizer_vocab_size'}
    return cls(vocab_size=vocab_size, tokenizer_vocab_size=tokenizer_vocab_size,
               **{k: config[k] for k in fields if k in config})

  def num_params(self, include_embeddings: bool = True) -> int:
    attn = self.d_model * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    mlp = 3 * self.d_model * self.mlp_dim
    per_layer = attn + mlp + 2 * self.d_model
    embeddings = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
    total = self.num_layers * per_layer + self.d_model
    return total + (embeddings if include_embeddings else 0)

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6N plus attention scores."""
    matmul_params = self.num_params(include_embeddings=False) + self.vocab_size * self.d_model
    attention = 12 * self.num_layers * self.num_heads * self.head_dim * seq_len / 2  # causal half
    return 6 * matmul_params + attention


def _param(init, names):
  return nn.with_logical_partitioning(init, names)


def _dense(features, names, config, name):
  return nn.Dense(features, use_bias=False, dtype=DTYPES[config.dtype],
                  param_dtype=DTYPES[config.param_dtype],
                  kernel_init=_param(nn.initializers.lecun_normal(), names), name=name)


class RMSNorm(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', _param(nn.initializers.ones, ('norm',)), (x.shape[-1],),
                       DTYPES[self.config.param_dtype])
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.norm_eps)
    return (x32 * scale).astype(DTYPES[self.config.dtype])


def rotary(x_BxLxNxH, positions_BxL, theta):
  half = x_BxLxNxH.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles_BxLxH = positions_BxL[..., None].astype(jnp.float32) * inv_freq
  sin, cos = jnp.sin(angles_BxLxH)[:, :, None], jnp.cos(angles_BxLxH)[:, :, None]
  x1, x2 = jnp.split(x_BxLxNxH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxNxH.dtype)


def attention_mask(q_pos_BxL, q_seg_BxL, k_pos_BxS, k_seg_BxS):
  """Boolean [B, 1, L, S]: causal within a segment; segment 0 (padding) sees nothing."""
  causal = q_pos_BxL[:, :, None] >= k_pos_BxS[:, None, :]
  same_segment = q_seg_BxL[:, :, None] == k_seg_BxS[:, None, :]
  return (causal & same_segment & (k_seg_BxS[:, None, :] != 0))[:, None]


class Attention(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, cache=None):
    c = self.config
    B, L, _ = x_BxLxD.shape
    q = _dense(c.num_heads * c.head_dim, ('embed', 'heads'), c, 'query')(x_BxLxD)
    k = _dense(c.num_kv_heads * c.head_dim, ('embed', 'kv_heads'), c, 'key')(x_BxLxD)
    v = _dense(c.num_kv_heads * c.head_dim, ('embed', 'kv_heads'), c, 'value')(x_BxLxD)
    q_BxLxNxH = rotary(q.reshape(B, L, c.num_heads, c.head_dim), positions_BxL, c.rope_theta)
    k_BxLxKxH = rotary(k.reshape(B, L, c.num_kv_heads, c.head_dim), positions_BxL, c.rope_theta)
    v_BxLxKxH = v.reshape(B, L, c.num_kv_heads, c.head_dim)
    q_BxLxNxH = nn.with_logical_constraint(q_BxLxNxH, ('batch', 'length', 'act_heads', None))

    if cache is None:
      keys, values = k_BxLxKxH, v_BxLxKxH
      k_pos, k_seg = positions_BxL, segment_ids_BxL
    else:
      # Write each row's new keys at its own positions: rows may have different prompt lengths.
      rows = jnp.arange(B)[:, None]
      keys = cache['k'].at[rows, positions_BxL].set(k_BxLxKxH.astype(cache['k'].dtype))
      values = cache['v'].at[rows, positions_BxL].set(v_BxLxKxH.astype(cache['v'].dtype))
      cache = {'k': keys, 'v': values}
      S = keys.shape[1]
      k_pos = jnp.broadcast_to(jnp.arange(S), (B, S))
      k_seg = jnp.ones((B, S), segment_ids_BxL.dtype)  # stale slots are masked as future
    mask = attention_mask(positions_BxL, segment_ids_BxL, k_pos, k_seg)
    out_BxLxNxH = jax.nn.dot_product_attention(
        q_BxLxNxH, keys.astype(q_BxLxNxH.dtype), values.astype(q_BxLxNxH.dtype), mask=mask,
        implementation=c.attention_impl if c.attention_impl == 'cudnn' else None)
    out = out_BxLxNxH.reshape(B, L, c.num_heads * c.head_dim)
    return _dense(c.d_model, ('heads', 'embed'), c, 'out')(out), cache


class MLP(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    c = self.config
    gate = _dense(c.mlp_dim, ('embed', 'mlp'), c, 'gate')(x_BxLxD)
    up = _dense(c.mlp_dim, ('embed', 'mlp'), c, 'up')(x_BxLxD)
    h_BxLxF = nn.with_logical_constraint(nn.silu(gate) * up, ('batch', 'length', 'act_mlp'))
    return _dense(c.d_model, ('mlp', 'embed'), c, 'down')(h_BxLxF)


class Block(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, cache=None):
    attn_out, cache = Attention(self.config, name='attention')(
        RMSNorm(self.config, name='attention_norm')(x_BxLxD), positions_BxL, segment_ids_BxL,
        cache)
    x_BxLxD = x_BxLxD + attn_out
    x_BxLxD = x_BxLxD + MLP(self.config, name='mlp')(RMSNorm(self.config, name='mlp_norm')(x_BxLxD))
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ('batch', 'length', 'act_embed'))
    return x_BxLxD, cache


class ScannedBlock(Block):
  """`Block` with the (carry, per-layer input) signature `nn.scan` needs."""

  def __call__(self, x_BxLxD, layer_cache, positions_BxL, segment_ids_BxL):
    return super().__call__(x_BxLxD, positions_BxL, segment_ids_BxL, layer_cache)


class Transformer(nn.Module):
  """Returns logits [B, L, V] and the updated KV cache (None when called without one).

  The cache is a dict of arrays `k`, `v` shaped [layers, B, max_len, kv_heads, head_dim]
  (see `init_cache`); positions index into it.
  """
  config: ModelConfig

  def setup(self):
    c = self.config
    self.embed = nn.Embed(c.vocab_size, c.d_model, dtype=DTYPES[c.dtype],
                          param_dtype=DTYPES[c.param_dtype],
                          embedding_init=_param(nn.initializers.normal(c.d_model**-0.5),
                                                 ('vocab', 'embed')))
    policy = REMAT_POLICIES[c.remat]
    block_cls = ScannedBlock if c.scan_layers else Block
    if c.remat != 'none':
      block_cls = nn.remat(block_cls, policy=policy, prevent_cse=not c.scan_layers)
    if c.scan_layers:
      self.layers = nn.scan(
          block_cls, variable_axes={'params': 0}, split_rngs={'params': True},
          in_axes=(0, nn.broadcast, nn.broadcast), length=c.num_layers,
          metadata_params={nn.PARTITION_NAME: 'layers'})(c, name='layers')
    else:
      self.layers = [block_cls(c, name=f'layer_{i}') for i in range(c.num_layers)]
    self.final_norm = RMSNorm(c, name='final_norm')
    if not c.tie_embeddings:
      self.unembed = _dense(c.vocab_size, ('embed', 'vocab'), c, 'unembed')

  def hidden_states(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, cache=None):
    """Final-norm hidden states [B, L, D] (reward and value heads read these)."""
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones_like(tokens_BxL)
    x = nn.with_logical_constraint(self.embed(tokens_BxL), ('batch', 'length', 'act_embed'))
    if self.config.scan_layers:
      x, cache = self.layers(x, cache, positions_BxL, segment_ids_BxL)
    else:
      new_cache = []
      for i, layer in enumerate(self.layers):
        layer_cache = None if cache is None else jax.tree.map(lambda a, i=i: a[i], cache)
        x, layer_cache = layer(x, positions_BxL, segment_ids_BxL, layer_cache)
        new_cache.append(layer_cache)
      if cache is not None:
        cache = jax.tree.map(lambda *a: jnp.stack(a), *new_cache)
    return self.final_norm(x), cache

  def logits(self, hidden_BxLxD):
    if self.config.tie_embeddings:
      logits = self.embed.attend(hidden_BxLxD)
    else:
      logits = self.unembed(hidden_BxLxD)
    logits = logits.astype(jnp.float32)
    if 0 < self.config.tokenizer_vocab_size < self.config.vocab_size:
      # Finite, so that entropies (p * log p) stay 0 rather than NaN on these ids.
      logits = jnp.where(jnp.arange(self.config.vocab_size) < self.config.tokenizer_vocab_size,
                         logits, -1e9)
    return nn.with_logical_constraint(logits, ('batch', 'length', 'act_vocab'))

  def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, cache=None):
    hidden, cache = self.hidden_states(tokens_BxL, positions_BxL, segment_ids_BxL, cache)
    return self.logits(hidden), cache


def init_cache(config: ModelConfig, batch_size: int, max_len: int) -> dict[str, Any]:
  shape = (config.num_layers, batch_size, max_len, config.num_kv_heads, config.head_dim)
  return {'k': jnp.zeros(shape, DTYPES[config.dtype]), 'v': jnp.zeros(shape, DTYPES[config.dtype])}


class ScalarHeadModel(nn.Module):
  """The transformer with a scalar read-out per position: reward models read it at a sequence's
  last token, value functions at every token. Parameters: {'transformer': ..., 'head': ...}, so
  the backbone loads from any language-model checkpoint.

  With `reply_likelihood`, a reward (`reward`) also adds a learned multiple of the reply's
  log-likelihood under the backbone's own language-model head: whether an answer is right is
  what that likelihood knows, and a head trained on pairs about facts the model memorised learns
  a lookup that does not carry over to facts it was never asked about.
  """
  config: ModelConfig
  reply_likelihood: bool = False

  def setup(self):
    self.transformer = Transformer(self.config)
    self.head = nn.Dense(1, dtype=jnp.float32, param_dtype=DTYPES[self.config.param_dtype],
                         kernel_init=_param(nn.initializers.zeros, ('embed', None)))
    if self.reply_likelihood:
      # Below 1 at first: the likelihood's margins (tens of nats) would otherwise swamp the head
      # where the two disagree, as on benign requests the model is inclined to refuse.
      self.likelihood_scale = self.param(
          'likelihood_scale', _param(nn.initializers.constant(0.3), ()), (), jnp.float32)

  def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None):
    if self.is_initializing():  # create the unembedding too, to match language-model checkpoints
      self.transformer(tokens_BxL, positions_BxL, segment_ids_BxL)
    hidden_BxLxD, _ = self.transformer.hidden_states(tokens_BxL, positions_BxL, segment_ids_BxL)
    return self.head(hidden_BxLxD.astype(jnp.float32))[..., 0]

  def reward(self, tokens_BxL, segment_ids_BxL, reply_start_B, last_B):
    """[B] rewards of padded rows whose reply is tokens reply_start..last (inclusive)."""
    hidden_BxLxD, _ = self.transformer.hidden_states(tokens_BxL, None, segment_ids_BxL)
    values_BxL = self.head(hidden_BxLxD.astype(jnp.float32))[..., 0]
    reward_B = jnp.take_along_axis(values_BxL, last_B[:, None], axis=1)[:, 0]
    if not self.reply_likelihood:
      return reward_B
    token_logp = losses.token_log_probs(self.transformer.logits(hidden_BxLxD[:, :-1]),
                                        tokens_BxL[:, 1:])
    return reward_B + self.likelihood_scale * losses.sequence_log_probs(
        token_logp, losses.reply_mask(reply_start_B, last_B, tokens_BxL.shape[1] - 1))
