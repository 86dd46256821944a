"""Language-model pieces shared by the binaries: tokenizer and model from a config, parameter
initialisation, held-out evaluation (loss, bits per byte) and samples."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import losses
from jaxlm import model as model_lib
from jaxlm import sampling
from jaxlm import sharding
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.data import pipeline


def tokenizer_for(config, workdir: str, train_documents) -> tokenizer_lib.Tokenizer:
  """The configured tokenizer; otherwise the workdir's; otherwise one trained from the data."""
  if config.tokenizer.path:
    return tokenizer_lib.Tokenizer.load(config.tokenizer.path)
  path = os.path.join(workdir, 'tokenizer.model')
  if os.path.exists(path):
    return tokenizer_lib.Tokenizer.load(path)
  count = min(config.tokenizer.train_docs, len(train_documents))
  texts = (train_documents[i] for i in range(count))
  return tokenizer_lib.Tokenizer.train(texts, path, config.tokenizer.vocab_size,
                                       config.tokenizer.type)


def model_config(config, tokenizer) -> model_lib.ModelConfig:
  vocab = math.ceil(tokenizer.vocab_size / config.model.vocab_multiple) * config.model.vocab_multiple
  return model_lib.ModelConfig.from_config(config.model, vocab)


def init_params_fn(model: model_lib.Transformer, seq_len: int):
  def init_params(rng):
    return model.init(rng, jnp.zeros((1, seq_len), jnp.int32))['params']
  return init_params


def eval_batches(documents, tokenizer, seq_len: int, batch_size: int, num_batches: int):
  """A fixed list of host batches from the start of the held-out split; the last one is padded
  with weight-0 rows so every batch has the same shape."""
  batches = []
  for batch in pipeline.packed_batches(documents, tokenizer, seq_len, batch_size, seed=0,
                                       shuffle=False, repeat=False):
    pad = batch_size - len(batch['inputs'])
    batches.append({k: np.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()})
    if len(batches) == num_batches:
      break
  return batches


def make_evaluate(model, tokenizer, mesh, batches, sample_prompts, eval_config, log):
  """(params, step) -> {'eval/loss', 'eval/bits_per_byte', 'eval/accuracy'}; logs samples."""
  token_bytes = jnp.asarray(tokenizer.token_bytes())
  token_bytes = jnp.pad(token_bytes, (0, model.config.vocab_size - len(token_bytes)))

  @jax.jit
  def eval_step(params, batch):
    logits, _ = model.apply({'params': params}, batch['inputs'], batch['positions'],
                            batch['segment_ids'])
    sums = losses.cross_entropy(logits, batch['targets'], batch['weights'])
    sums['bytes'] = jnp.sum(token_bytes[batch['targets']] * batch['weights'])
    return sums

  def evaluate(params, step):
    totals = None
    for batch in batches:
      sums = eval_step(params, sharding.put_batch(batch, mesh))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    results = {
        'eval/loss': totals['nll'] / totals['count'],
        'eval/accuracy': totals['correct'] / totals['count'],
        'eval/bits_per_byte': totals['nll'] / math.log(2) / max(totals['bytes'], 1),
    }
    if sample_prompts:
      for prompt, text in zip(sample_prompts, sample(model, params, tokenizer, sample_prompts,
                                                     eval_config, jax.random.PRNGKey(step))):
        log(f'sample at step {step}: {prompt!r} -> {text!r}')
    return results

  return evaluate


def complete(model, params, tokenizer, prompts: list, sample_config, rng,
             eos_id: int = tokenizer_lib.EOS_ID) -> list[list[int]]:
  """Generated ids (without eos) for each prompt (a list of ids).

  Prompts go in fixed-size batches padded to a multiple of 32 tokens, so repeated evaluations
  reuse one compiled sampler.
  """
  batch_size = sample_config.get('batch_size', 64)
  width = -(-max(len(p) for p in prompts) // 32) * 32
  results = []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    padded = np.zeros((batch_size, width), np.int32)
    lengths = np.ones(batch_size, np.int32)
    for row, ids in enumerate(chunk):
      padded[row, :len(ids)], lengths[row] = ids, len(ids)
    tokens, ends = jax.device_get(sampling.generate(
        model, params, jnp.asarray(padded), jnp.asarray(lengths), jax.random.fold_in(rng, start),
        max_new_tokens=sample_config.sample_tokens, temperature=sample_config.temperature,
        top_k=sample_config.top_k, top_p=sample_config.top_p, eos_id=eos_id,
        vocab_size=tokenizer.vocab_size))
    results += [[int(t) for t in tokens[row, lengths[row]:ends[row]] if t != eos_id]
                for row in range(len(chunk))]
  return results


def sample(model, params, tokenizer, prompts: list[str], sample_config, rng) -> list[str]:
  """Continuations of text `prompts` (each starts from bos), decoded up to eos."""
  encoded = [[tokenizer_lib.BOS_ID] + tokenizer.encode(p) for p in prompts]
  return [tokenizer.decode(ids)
          for ids in complete(model, params, tokenizer, encoded, sample_config, rng)]


def sample_prompts(documents, tokenizer, num: int, prompt_tokens: int) -> list[str]:
  """The first `prompt_tokens` tokens of the first held-out documents, as text."""
  return [tokenizer.decode(tokenizer.encode(documents[i])[:prompt_tokens])
          for i in range(min(num, len(documents)))]
