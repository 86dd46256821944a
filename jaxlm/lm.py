"""Language-model pieces shared by the binaries: tokenizer and model from a config, parameter
initialisation, held-out evaluation (loss, bits per byte) and samples."""

import json
import math
import os

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxlm import chat
from jaxlm import checkpoint
from jaxlm import configs
from jaxlm import distributed
from jaxlm import hf
from jaxlm import lora
from jaxlm import losses
from jaxlm import metrics as metrics_lib
from jaxlm import model as model_lib
from jaxlm import sampling
from jaxlm import sharding
from jaxlm import tokenizer as tokenizer_lib
from jaxlm import trainer
from jaxlm.errors import UserError


def tokenizer_for(config, workdir: str, train_documents) -> tokenizer_lib.Tokenizer:
  """The configured tokenizer; otherwise the workdir's; otherwise one trained from the data."""
  if config.tokenizer.path:
    return tokenizer_lib.load(config.tokenizer.path)
  path = os.path.join(workdir, 'tokenizer.model')

  def load_or_train():
    if os.path.exists(path):
      return tokenizer_lib.Tokenizer.load(path)
    count = min(config.tokenizer.train_docs, len(train_documents))
    texts = (train_documents[i] for i in range(count))
    return tokenizer_lib.Tokenizer.train(texts, path, config.tokenizer.vocab_size,
                                         config.tokenizer.type)
  return distributed.main_process_first(load_or_train, 'tokenizer')


def model_config(config, tokenizer) -> model_lib.ModelConfig:
  """The model of a config: an imported model keeps its checkpoint's vocabulary size (and
  predicts every id, as it does there); jaxlm's own pads the vocabulary for sharding."""
  if config.model.get('vocab_size'):
    if tokenizer.vocab_size > config.model.vocab_size:
      raise UserError(f'the tokenizer has {tokenizer.vocab_size} ids but the model\'s embedding '
                      f'only {config.model.vocab_size}: they do not belong together')
    return model_lib.ModelConfig.from_config(config.model, config.model.vocab_size)
  return padded_model_config(config, tokenizer.vocab_size)


def padded_model_config(config, vocab_size: int) -> model_lib.ModelConfig:
  """jaxlm's own model for `vocab_size` token ids, its embedding padded to a multiple of
  `config.model.vocab_multiple` for sharding."""
  vocab = math.ceil(vocab_size / config.model.vocab_multiple) * config.model.vocab_multiple
  return model_lib.ModelConfig.from_config(config.model, vocab, vocab_size)


def with_bos(tokenizer, ids: list[int]) -> list[int]:
  return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + ids


def init_params_fn(model: model_lib.Transformer, seq_len: int):
  def init_params(rng):
    return model.init(rng, jnp.zeros((1, seq_len), jnp.int32))['params']
  return init_params


def fixed_batches(batches, batch_size: int, num_batches: int) -> list[dict]:
  """The first `num_batches` host batches of an iterable; a short last batch is padded with
  weight-0 rows so every batch has one shape (one compiled eval step)."""
  out = []
  for batch in batches:
    pad = batch_size - len(next(iter(batch.values())))
    out.append({k: np.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()})
    if len(out) == num_batches:
      break
  return out


def make_loss_evaluator(model, mesh, batches: list[dict], token_bytes=None):
  """params -> {'eval/loss', 'eval/accuracy'} over fixed batches, plus 'eval/bits_per_byte'
  when `token_bytes` (bytes per token id) is given."""
  if token_bytes is not None:
    token_bytes = jnp.pad(jnp.asarray(token_bytes),
                          (0, model.config.vocab_size - len(token_bytes)))

  @jax.jit
  def eval_step(params, batch):
    logits, _ = model.apply({'params': params}, batch['inputs'], batch['positions'],
                            batch['segment_ids'])
    sums = losses.cross_entropy(logits, batch['targets'], batch['weights'])
    if token_bytes is not None:
      sums['bytes'] = jnp.sum(token_bytes[batch['targets']] * batch['weights'])
    return sums

  def evaluate(params):
    totals = None
    for batch in batches:
      sums = eval_step(params, sharding.put_batch(batch, mesh))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = max(totals['count'], 1.0)
    results = {'eval/loss': totals['nll'] / count, 'eval/accuracy': totals['correct'] / count}
    if token_bytes is not None:
      results['eval/bits_per_byte'] = totals['nll'] / math.log(2) / max(totals['bytes'], 1)
    return results

  return evaluate


def sampling_options(eval_config) -> dict:
  """`complete`'s keyword arguments from an eval config."""
  return dict(max_new_tokens=eval_config.sample_tokens, temperature=eval_config.temperature,
              top_k=eval_config.top_k, top_p=eval_config.top_p,
              batch_size=eval_config.get('batch_size_generation', 64))


def complete(model, params, tokenizer, prompts: list, rng, *, max_new_tokens: int,
             temperature: float, top_k: int, top_p: float, batch_size: int,
             eos_id: int | None = None) -> list[list[int]]:
  """Generated ids (without eos; by default the tokenizer's) for each prompt (a list of ids).

  Prompts go in fixed-size batches padded to a multiple of 32 tokens, so repeated evaluations
  reuse one compiled sampler.
  """
  if not prompts:
    return []
  eos_id = tokenizer.eos_id if eos_id is None else eos_id
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
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        eos_id=eos_id))
    results += [[int(t) for t in tokens[row, lengths[row]:ends[row]] if t != eos_id]
                for row in range(len(chunk))]
  return results


def sample(model, params, tokenizer, prompts: list[str], rng, **options) -> list[str]:
  """Continuations of text `prompts` (each starts from bos), decoded up to eos."""
  encoded = [with_bos(tokenizer, tokenizer.encode(p)) for p in prompts]
  return [tokenizer.decode(ids) for ids in complete(model, params, tokenizer, encoded, rng,
                                                    **options)]


def replies(model, params, tokenizer, conversations: list[list[dict]], rng,
            **options) -> list[str]:
  """The assistant's next reply to each conversation, generated up to its end-of-turn token."""
  prompts = [chat.encode(tokenizer, messages, add_generation_prompt=True)[0].tolist()
             for messages in conversations]
  return [tokenizer.decode(ids) for ids in complete(
      model, params, tokenizer, prompts, rng, eos_id=chat.end_of_turn_id(tokenizer), **options)]


def load_workdir(workdir: str):
  """(config, tokenizer, model) of a finished run, to start a later stage from it."""
  config = configs.load(workdir)
  tokenizer = tokenizer_lib.load(config.tokenizer.path or tokenizer_lib.workdir_path(workdir))
  return config, tokenizer, model_lib.Transformer(model_config(config, tokenizer))


def has_checkpoint(workdir: str) -> bool:
  """Whether `workdir` has saved a step at all (whether it restores, restoring tells)."""
  directory = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def params_loader(workdir: str):
  """params -> the params of the newest verified checkpoint in `workdir`, with the shapes and
  shardings of the given ones (whose LoRA adapters, if any, are kept as they are). A LoRA run's
  parameters are its starting point's with its adapters merged in. A missing checkpoint or
  another architecture is an error."""
  def load(like_params):
    adapters, like_base = lora.split(like_params, lora.is_adapter)
    abstract_params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like_base)
    checkpointer = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=1)
    run_config = (configs.load(workdir) if os.path.exists(os.path.join(workdir, 'config.json'))
                  else None)
    if run_config is not None and lora.enabled(run_config):
      restored = _load_lora_run(checkpointer, run_config, abstract_params)
    else:
      restored = checkpointer.restore_params(abstract_params)
    checkpointer.close()
    if restored is None:
      raise UserError(f'no usable checkpoint in {workdir}/checkpoints')
    params, step = restored
    metrics_lib.log(f'Loaded the parameters of {workdir} at step {step}.')
    return lora.join(params, adapters)
  return load


def _load_lora_run(checkpointer, run_config, abstract_params):
  """(params, step) of a LoRA run: what it started from, with what it trained (heads, fully
  trained parameters) in place and its adapters folded in."""
  shardings = jax.tree.map(lambda x: x.sharding, abstract_params)
  some_sharding = jax.tree.leaves(shardings)[0]
  restored = checkpointer.restore_params(
      sharding=sharding.replicated(some_sharding.mesh))
  if restored is None:
    return None
  trained, step = restored
  wanted = flax.traverse_util.flatten_dict(abstract_params)
  for path, leaf in flax.traverse_util.flatten_dict(trained).items():
    if not lora.is_adapter(path) and (path not in wanted or wanted[path].shape != leaf.shape):
      raise UserError(f'the LoRA checkpoint\'s {"/".join(path)} {list(leaf.shape)} has no place '
                      'in this model: it holds another model')
  saved = set(flax.traverse_util.flatten_dict(trained))
  abstract_base = lora.split(abstract_params, lambda path: path not in saved)[0]
  start = initial_params_loader(run_config)
  if 'transformer' in abstract_base:  # a reward model's or critic's backbone
    base = {'transformer': start(abstract_base['transformer'])}
  else:
    base = start(abstract_base)
  merge = jax.jit(lambda base, trained: lora.merge(lora.join(base, trained),
                                                   run_config.lora.alpha, run_config.lora.rank),
                  out_shardings=shardings)
  return merge(base, trained), step


def load_params(workdir: str, model, mesh):
  """The newest verified params of `workdir` for `model`, sharded over `mesh` by the logical
  rules. Call under `jax.set_mesh(mesh)` and the rules."""
  return params_loader(workdir)(abstract_params(model, mesh))


def abstract_params(model, mesh):
  boxed = jax.eval_shape(init_params_fn(model, 1), jax.random.PRNGKey(0))
  return trainer.abstract_params(boxed, mesh)[0]


HF_CONFIG = 'hf_config.json'  # a workdir's copy of the imported checkpoint's config.json


def start_from_hf(config, workdir: str):
  """The tokenizer of the Hugging Face checkpoint `config.init_hf`; `config.model` becomes its
  architecture and `config.tokenizer` points at the workdir's copy of its tokenizer."""
  directory = hf.resolve(config.init_hf)
  hf_config = hf.read_config(directory)
  fields = hf.model_fields(hf_config)
  tokenizer = tokenizer_lib.HFTokenizer(directory)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    tokenizer.save(workdir)
    with open(os.path.join(workdir, HF_CONFIG), 'w', encoding='utf-8') as f:
      json.dump(hf_config, f, indent=2)
  with config.unlocked():
    config.model = ml_collections.ConfigDict({**fields, 'family': hf_config['model_type']})
    config.tokenizer = ml_collections.ConfigDict({'path': ''})
  return tokenizer


def initial_params_loader(config):
  """params -> the parameters a run starts from: those of the Hugging Face checkpoint
  `config.init_hf`, or of the newest checkpoint of `config.init_workdir`."""
  if not config.get('init_hf'):
    return params_loader(config.init_workdir)
  directory = hf.resolve(config.init_hf)
  model_config = model_lib.ModelConfig.from_config(config.model, config.model.vocab_size)

  def load(like_params):
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like_params)
    params = hf.load_params(directory, config.model.family, model_config, abstract)
    metrics_lib.log(f'Loaded the parameters of {directory}.')
    return params
  return load


def sample_prompts(documents, tokenizer, num: int, prompt_tokens: int) -> list[str]:
  """The first `prompt_tokens` tokens of the first held-out documents (strings, or tokenized:
  their targets are the document's ids then eos), as text."""
  def ids(doc):
    return doc['targets'][:-1] if isinstance(doc, dict) else tokenizer.encode(doc)
  return [tokenizer.decode(ids(documents[i])[:prompt_tokens])
          for i in range(min(num, len(documents)))]
