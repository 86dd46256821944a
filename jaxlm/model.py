"""Decoder-only transformer (LLaMA-style by default) in Flax Linen.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv_heads`, `vocab`,
`layers`); `jaxlm.sharding` maps them onto the device mesh. Kernels are kept 2-D (heads folded
into one dimension) so they shard under `jax.set_mesh` (flax issue 3676).

The forward pass takes explicit positions and segment ids, so packed rows and KV-cache decoding
use the same code: a key is visible to a query when it is not in the future, belongs to the same
segment, and (with a cache) has been written.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import losses

REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    'dots_with_batch': jax.checkpoint_policies.dots_saveable,
}
ATTENTION_IMPLEMENTATIONS = ('xla', 'cudnn')
MLP_ACTIVATIONS = {'silu': nn.silu, 'gelu_tanh': lambda x: nn.gelu(x, approximate=True)}
ROPE_SCALINGS = ('none', 'linear', 'llama3')
LAYER_TYPES = ('global', 'local')
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
  # 'cudnn': cuDNN's fused attention (GPUs) for the cache-free forward; decoding against a KV cache
  # always uses 'xla', which reads the heads-major cache without transposing it.
  attention_impl: str = 'xla'
  # The cache-free 'xla' attention splits its queries into this many blocks, each scored against
  # the keys up to its own end: most of the causal upper triangle is never computed.
  causal_query_blocks: int = 4
  # Ids from here to vocab_size only pad the embedding for sharding: never predicted. 0: none.
  tokenizer_vocab_size: int = 0
  # Switches of the released families jaxlm imports (`jaxlm.hf`); the defaults are Llama's.
  qkv_bias: bool = False  # Qwen2: biases on the query, key and value projections
  qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head's queries and keys
  norm_zero_centered: bool = False  # Gemma: norms scale by (1 + weight)
  post_norms: bool = False  # Gemma 3: also a norm on the attention and MLP outputs
  embed_scale: bool = False  # Gemma: embeddings times sqrt(d_model)
  mlp_activation: str = 'silu'  # of the gate: silu (SwiGLU) or gelu_tanh (GeGLU)
  query_scale: float = 0.0  # attention logits times this; 0: head_dim ** -0.5
  rope_scaling: str = 'none'  # none | linear | llama3 (frequencies stretched for long context)
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0  # llama3 only
  rope_high_freq_factor: float = 4.0  # llama3 only
  rope_original_max_len: int = 8192  # llama3 only
  # Local layers attend to the last `sliding_window` positions only; empty: every layer global.
  layer_types: tuple[str, ...] = ()
  sliding_window: int = 0
  local_rope_theta: float = 0.0  # local layers' unscaled RoPE base; 0: the global RoPE

  @classmethod
  def from_config(cls, config, vocab_size: int, tokenizer_vocab_size: int = 0) -> 'ModelConfig':
    fields = {f.name for f in dataclasses.fields(cls)} - {'vocab_size', 'tokenizer_vocab_size'}
    values = {k: tuple(config[k]) if isinstance(config[k], (list, tuple)) else config[k]
              for k in fields if k in config}
    return cls(vocab_size=vocab_size, tokenizer_vocab_size=tokenizer_vocab_size, **values)

  def is_local(self, layer: int) -> bool:
    return bool(self.layer_types) and self.layer_types[layer] == 'local'

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


class Dense(nn.Dense):
  """`nn.Dense` over tokens flattened to one axis, whose output has the computation dtype even
  where LoRA (`jaxlm.lora`) adds its float32 delta, so that a bfloat16 model's activations stay
  bfloat16.

  Flat: the kernel's gradient then contracts one axis, not batch and length, which XLA:CPU
  otherwise pays for with transposed copies (the MLP's backward ran 1.45x slower).
  """

  def __call__(self, inputs):
    outputs = super().__call__(inputs.reshape(-1, inputs.shape[-1])).astype(self.dtype)
    return outputs.reshape(*inputs.shape[:-1], outputs.shape[-1])


def _dense(features, names, config, name, use_bias=False):
  return Dense(features, use_bias=use_bias, dtype=DTYPES[config.dtype],
                  param_dtype=DTYPES[config.param_dtype],
                  kernel_init=_param(nn.initializers.lecun_normal(), names),
                  bias_init=_param(nn.initializers.zeros, names[1:]), name=name)


class RMSNorm(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    zero_centered = self.config.norm_zero_centered
    scale = self.param('scale', _param(nn.initializers.zeros if zero_centered else
                                       nn.initializers.ones, ('norm',)), (x.shape[-1],),
                       DTYPES[self.config.param_dtype]).astype(jnp.float32)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.norm_eps)
    return (x32 * (1.0 + scale if zero_centered else scale)).astype(DTYPES[self.config.dtype])


def rope_frequencies(config: ModelConfig, local: bool = False) -> np.ndarray:
  """Inverse wavelengths [head_dim / 2] of the rotary embedding, as Hugging Face computes them."""
  half = config.head_dim // 2
  theta = config.local_rope_theta if local and config.local_rope_theta else config.rope_theta
  inv_freq = theta ** (-np.arange(half, dtype=np.float64) / half)
  if (local and config.local_rope_theta) or config.rope_scaling == 'none':
    return inv_freq.astype(np.float32)
  factor = config.rope_scaling_factor
  if config.rope_scaling == 'linear':
    return (inv_freq / factor).astype(np.float32)
  # llama3: long wavelengths are stretched by `factor`, short ones kept, those between blended.
  wavelength = 2 * np.pi / inv_freq
  low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
  original = config.rope_original_max_len
  smooth = np.clip((original / wavelength - low) / (high - low), 0.0, 1.0)
  return ((1 - smooth) * inv_freq / factor + smooth * inv_freq).astype(np.float32)


def rotary(x_BxLxNxH, positions_BxL, inv_freq_H):
  """Rotates split halves (x[:H/2], x[H/2:]): the layout Hugging Face checkpoints store."""
  angles_BxLxH = positions_BxL[..., None].astype(jnp.float32) * inv_freq_H
  sin, cos = jnp.sin(angles_BxLxH)[:, :, None], jnp.cos(angles_BxLxH)[:, :, None]
  x1, x2 = jnp.split(x_BxLxNxH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxNxH.dtype)


def attention_mask(q_pos_BxL, q_seg_BxL, k_pos_BxS, k_seg_BxS):
  """Boolean [B, 1, L, S]: causal within a segment; segment 0 (padding) sees nothing."""
  causal = q_pos_BxL[:, :, None] >= k_pos_BxS[:, None, :]
  same_segment = q_seg_BxL[:, :, None] == k_seg_BxS[:, None, :]
  return (causal & same_segment & (k_seg_BxS[:, None, :] != 0))[:, None]


def heads_major(x_BxSxKxH):
  """[B, S, K, H] <-> [B, K, S, H]: the KV cache's layout, in which each (row, head) reads its
  keys as one [S, H] matrix."""
  return x_BxSxKxH.transpose(0, 2, 1, 3)


def grouped_attention(q_BxLxNxH, k_BxKxSxH, v_BxKxSxH, mask_Bx1xLxS, scale: float):
  """Softmax attention where each of the K key/value heads serves G = N / K query heads.

  Heads-major: the G query heads of a key head are stacked along the query axis, so both
  matmuls are one batched [G*L, H] x [H, S] per (row, key head). XLA:CPU ran this layout's
  forward and backward twice as fast as `jax.nn.dot_product_attention`'s [B, L, K, G, H].
  Scores and softmax are float32, as there; a fully masked row (padding) averages the values.
  """
  B, L, N, H = q_BxLxNxH.shape
  K = k_BxKxSxH.shape[1]
  G = N // K
  q_BxKxQxH = q_BxLxNxH.reshape(B, L, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * L, H)
  scores_BxKxQxS = jnp.einsum('bkqh,bksh->bkqs', q_BxKxQxH, k_BxKxSxH,
                              preferred_element_type=jnp.float32) * scale
  mask_Bx1xQxS = jnp.tile(mask_Bx1xLxS, (1, 1, G, 1))
  scores_BxKxQxS = jnp.where(mask_Bx1xQxS, scores_BxKxQxS, jnp.finfo(jnp.float32).min)
  probs_BxKxQxS = jax.nn.softmax(scores_BxKxQxS, axis=-1).astype(v_BxKxSxH.dtype)
  out_BxKxQxH = jnp.einsum('bkqs,bksh->bkqh', probs_BxKxQxS, v_BxKxSxH)
  return out_BxKxQxH.reshape(B, K, G, L, H).transpose(0, 3, 1, 2, 4).reshape(B, L, N, H)


def causal_blocked_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask_Bx1xLxL, scale: float,
                             num_blocks: int):
  """`grouped_attention` of a cache-free forward, its queries in up to `num_blocks` blocks
  (of at least 32), each against the keys that precede its end. Exact wherever each segment's
  tokens are in position order (packed rows, padded prompts): a key after the block's end is
  then in the query's future or in another segment, masked either way.

  Skips 3/8 of the scores at 4 blocks; on 2 CPU cores the pipeline's pretraining attention
  (4 heads, 128 tokens) ran its forward and backward 2.3x faster than in one block.
  """
  L = q_BxLxNxH.shape[1]
  size = max(-(-L // num_blocks), 32)
  blocks = []
  for start in range(0, L, size):
    end = min(start + size, L)
    blocks.append(grouped_attention(
        q_BxLxNxH[:, start:end], heads_major(k_BxLxKxH[:, :end]), heads_major(v_BxLxKxH[:, :end]),
        mask_Bx1xLxL[:, :, start:end, :end], scale))
  return blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=1)


class Attention(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, cache=None, is_local=False):
    """`is_local` (a bool, or a traced one under `nn.scan`) selects the sliding window and the
    local RoPE."""
    c = self.config
    B, L, _ = x_BxLxD.shape
    q = _dense(c.num_heads * c.head_dim, ('embed', 'heads'), c, 'query', c.qkv_bias)(x_BxLxD)
    k = _dense(c.num_kv_heads * c.head_dim, ('embed', 'kv_heads'), c, 'key', c.qkv_bias)(x_BxLxD)
    v = _dense(c.num_kv_heads * c.head_dim, ('embed', 'kv_heads'), c, 'value',
               c.qkv_bias)(x_BxLxD)
    q_BxLxNxH = q.reshape(B, L, c.num_heads, c.head_dim)
    k_BxLxKxH = k.reshape(B, L, c.num_kv_heads, c.head_dim)
    if c.qk_norm:
      q_BxLxNxH = RMSNorm(c, name='query_norm')(q_BxLxNxH)
      k_BxLxKxH = RMSNorm(c, name='key_norm')(k_BxLxKxH)
    inv_freq_H = jnp.asarray(rope_frequencies(c))
    if c.layer_types:
      inv_freq_H = jnp.where(is_local, rope_frequencies(c, local=True), inv_freq_H)
    q_BxLxNxH = rotary(q_BxLxNxH, positions_BxL, inv_freq_H)
    k_BxLxKxH = rotary(k_BxLxKxH, positions_BxL, inv_freq_H)
    v_BxLxKxH = v.reshape(B, L, c.num_kv_heads, c.head_dim)
    q_BxLxNxH = nn.with_logical_constraint(q_BxLxNxH, ('batch', 'length', 'act_heads', None))

    if cache is None:
      keys, values = k_BxLxKxH, v_BxLxKxH
      k_pos, k_seg = positions_BxL, segment_ids_BxL
    else:
      # Write each row's new keys at its own positions: rows may have different prompt lengths.
      rows = jnp.arange(B)[:, None]
      keys = cache['k'].at[rows, :, positions_BxL].set(k_BxLxKxH.astype(cache['k'].dtype))
      values = cache['v'].at[rows, :, positions_BxL].set(v_BxLxKxH.astype(cache['v'].dtype))
      cache = {'k': keys, 'v': values}
      S = keys.shape[2]
      k_pos = jnp.broadcast_to(jnp.arange(S), (B, S))
      k_seg = jnp.ones((B, S), segment_ids_BxL.dtype)  # stale slots are masked as future
    mask = attention_mask(positions_BxL, segment_ids_BxL, k_pos, k_seg)
    if c.layer_types:
      in_window = positions_BxL[:, :, None] - k_pos[:, None, :] < c.sliding_window
      mask = mask & (in_window | jnp.logical_not(is_local))[:, None]
    keys, values = keys.astype(q_BxLxNxH.dtype), values.astype(q_BxLxNxH.dtype)
    scale = c.query_scale or c.head_dim ** -0.5
    if c.attention_impl == 'cudnn' and cache is None:
      out_BxLxNxH = jax.nn.dot_product_attention(q_BxLxNxH, keys, values, mask=mask, scale=scale,
                                                 implementation='cudnn')
    elif cache is None:
      out_BxLxNxH = causal_blocked_attention(q_BxLxNxH, keys, values, mask, scale,
                                             c.causal_query_blocks)
    else:
      out_BxLxNxH = grouped_attention(q_BxLxNxH, keys, values, mask, scale)
    out = out_BxLxNxH.reshape(B, L, c.num_heads * c.head_dim)
    return _dense(c.d_model, ('heads', 'embed'), c, 'out')(out), cache


class MLP(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    c = self.config
    gate = _dense(c.mlp_dim, ('embed', 'mlp'), c, 'gate')(x_BxLxD)
    up = _dense(c.mlp_dim, ('embed', 'mlp'), c, 'up')(x_BxLxD)
    h_BxLxF = nn.with_logical_constraint(MLP_ACTIVATIONS[c.mlp_activation](gate) * up,
                                         ('batch', 'length', 'act_mlp'))
    return _dense(c.d_model, ('mlp', 'embed'), c, 'down')(h_BxLxF)


class Block(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, cache=None, is_local=False):
    c = self.config
    attn_out, cache = Attention(c, name='attention')(
        RMSNorm(c, name='attention_norm')(x_BxLxD), positions_BxL, segment_ids_BxL, cache,
        is_local)
    if c.post_norms:
      attn_out = RMSNorm(c, name='post_attention_norm')(attn_out)
    x_BxLxD = x_BxLxD + attn_out
    mlp_out = MLP(c, name='mlp')(RMSNorm(c, name='mlp_norm')(x_BxLxD))
    if c.post_norms:
      mlp_out = RMSNorm(c, name='post_mlp_norm')(mlp_out)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD + mlp_out, ('batch', 'length', 'act_embed'))
    return x_BxLxD, cache


class ScannedBlock(Block):
  """`Block` with the (carry, per-layer inputs) signature `nn.scan` needs."""

  def __call__(self, x_BxLxD, layer_cache, is_local, positions_BxL, segment_ids_BxL):
    return super().__call__(x_BxLxD, positions_BxL, segment_ids_BxL, layer_cache, is_local)


class Transformer(nn.Module):
  """Returns logits [B, L, V] and the updated KV cache (None when called without one).

  The KV cache (see `init_cache`) holds keys and values [B, kv_heads, max_len, head_dim] of each
  layer; positions index into it.
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
          in_axes=(0, 0, nn.broadcast, nn.broadcast), length=c.num_layers,
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
    c = self.config
    x = self.embed(tokens_BxL)
    if c.embed_scale:
      x = x * jnp.asarray(c.d_model ** 0.5, DTYPES[c.dtype])
    x = nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))
    if c.scan_layers:
      is_local_L = jnp.asarray([c.is_local(i) for i in range(c.num_layers)])
      x, cache = self.layers(x, cache, is_local_L, positions_BxL, segment_ids_BxL)
    else:
      new_cache = []
      for i, layer in enumerate(self.layers):
        x, layer_cache = layer(x, positions_BxL, segment_ids_BxL,
                               None if cache is None else cache[i], c.is_local(i))
        new_cache.append(layer_cache)
      if cache is not None:
        cache = tuple(new_cache)
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

  def logits_at(self, tokens_BxL, positions_BxL, segment_ids_BxL, cache, index_B):
    """Logits [B, V] at one position of each row (a prompt's last token) and the cache: the
    other positions are never unembedded (in a prefill, the largest matmul of all)."""
    hidden_BxLxD, cache = self.hidden_states(tokens_BxL, positions_BxL, segment_ids_BxL, cache)
    hidden_Bx1xD = jnp.take_along_axis(hidden_BxLxD, index_B[:, None, None], axis=1)
    return self.logits(hidden_Bx1xD)[:, 0], cache


def init_cache(config: ModelConfig, batch_size: int, max_len: int):
  """Zero keys and values, `k` and `v`: for scanned layers one dict of arrays [layers, B,
  kv_heads, max_len, head_dim], else a tuple of one dict per layer of arrays [B, kv_heads,
  max_len, head_dim]. Every array ends in [B, kv_heads, max_len, head_dim] (`CACHE_BATCH_AXIS`).

  Heads-major, so that a decoding step's attention reads each row's and head's keys as one
  matrix where they lie; and one array per unrolled layer, which a decoding loop updates in
  place: slicing one stacked array per layer and stacking them again copied the whole cache at
  every step (with the transposes, a third of a sampler's step on a CPU).
  """
  shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
  if config.scan_layers:
    shape = (config.num_layers, *shape)
  zeros = lambda: {'k': jnp.zeros(shape, DTYPES[config.dtype]),
                   'v': jnp.zeros(shape, DTYPES[config.dtype])}
  return zeros() if config.scan_layers else tuple(zeros() for _ in range(config.num_layers))


CACHE_BATCH_AXIS = -4  # of every array of the cache


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
    return self.head_values(hidden_BxLxD)

  def head_values(self, hidden_BxLxD):
    """The read-out [B, L] of final hidden states, e.g. of a backbone shared with a policy."""
    return self.head(hidden_BxLxD.astype(jnp.float32))[..., 0]

  def reward(self, tokens_BxL, segment_ids_BxL, reply_start_B, last_B):
    """[B] rewards of padded rows whose reply is tokens reply_start..last (inclusive)."""
    hidden_BxLxD, _ = self.transformer.hidden_states(tokens_BxL, None, segment_ids_BxL)
    values_BxL = self.head_values(hidden_BxLxD)
    reward_B = jnp.take_along_axis(values_BxL, last_B[:, None], axis=1)[:, 0]
    if not self.reply_likelihood:
      return reward_B
    token_logp = losses.token_log_probs(self.transformer.logits(hidden_BxLxD[:, :-1]),
                                        tokens_BxL[:, 1:])
    return reward_B + self.likelihood_scale * losses.sequence_log_probs(
        token_logp, losses.reply_mask(reply_start_B, last_B, tokens_BxL.shape[1] - 1))
