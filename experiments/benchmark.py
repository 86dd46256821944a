r"""Measures the train step of any config on random tokens: compile time, step time, tokens/s,
MFU, memory and page faults a step.

  python -m experiments.benchmark --config=experiments/configs/gpt2_124m.py \
      --config.train.batch_size=8 --steps=5

On a CPU the MFU denominator is a matmul probe measured in the same run (see `jaxlm.perf`).
With `--config.lora.rank=8` it measures LoRA fine-tuning: adapters train, the base is frozen.
`rl_state_bytes_per_device` adds what RL holds besides: a reference copy of the parameters,
which LoRA does without (its reference is the base with the adapters off). `--memory_only`
compiles the step without running it or allocating the state, for configs larger than the host:
bytes per device from the state's shardings and the compiled program's memory analysis.

`--generate=128,48,32` times the KV-cache sampler instead: RL rollouts of 128 rows, prompts of
up to 48 tokens, 32 new tokens each; generated tokens/s.

`--compare=model.scan_layers=false` (repeatable) times a second config, the first with those
overrides, alternately with the first in one process (`--rounds` times), so that a change is
measured against its base on the same machine at the same time: medians and the speed-up.

`--data_workdir=runs/pipeline/base` times what the data path costs the training loop: the step
fed by that pretraining workdir's own data pipeline, alternately with the same step on one fixed
batch (`loop_rate_over_step_rate`).
"""

import json
import resource
import time

import flax.linen as nn
import jax
import numpy as np
from absl import flags

from jaxlm import cli
from jaxlm import configs
from jaxlm import host_memory
from jaxlm import lm
from jaxlm import lora
from jaxlm import metrics
from jaxlm import model as model_lib
from jaxlm import perf
from jaxlm import sampling
from jaxlm import sharding
from jaxlm import trainer
from jaxlm.data import pipeline
from jaxlm.errors import UserError


def state_bytes_on_first_device(state) -> int:
  """Parameter and optimizer bytes held by one device: what FSDP and TP divide."""
  device = jax.devices()[0]
  return sum(shard.data.nbytes for leaf in jax.tree.leaves(state)
             for shard in leaf.addressable_shards if shard.device == device)


def abstract_bytes_on_first_device(abstract) -> int:
  """What `state_bytes_on_first_device` would measure, from ShapeDtypeStructs with shardings."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
             for x in jax.tree.leaves(abstract))


def memory_without_running(config, model, optimizer, trainable, mesh, batch) -> dict:
  """Per-device bytes of the train step, compiled on abstract arguments (nothing allocated)."""
  tc = config.train
  abstract, shardings, _ = trainer.abstract_state(
      lm.init_params_fn(model, config.data.seq_len), optimizer, mesh, jax.random.PRNGKey(0),
      trainable, config.lora.frozen_dtype if trainable else '')
  step_fn = jax.jit(trainer.make_train_step(trainer.language_model_loss(model, tc.z_loss),
                                            optimizer, tc.grad_accum_steps),
                    out_shardings=(shardings, None), donate_argnums=(0,))
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                       batch)
  start = time.perf_counter()
  analysis = step_fn.lower(abstract, batch).compile().memory_analysis()
  state_bytes = abstract_bytes_on_first_device(abstract)
  return {
      'compile_seconds': time.perf_counter() - start,
      'trained_params': sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params)),
      'state_bytes_per_device': state_bytes,
      'trained_state_bytes_per_device': abstract_bytes_on_first_device(
          (abstract.params, abstract.opt_state)),
      'rl_state_bytes_per_device': state_bytes + (
          0 if trainable else abstract_bytes_on_first_device(abstract.params)),
      'compiled_temp_bytes': getattr(analysis, 'temp_size_in_bytes', None),
  }


def benchmark(config, steps: int, vocab_size: int, memory_only: bool = False) -> dict:
  configs.validate(config, {'data.source': pipeline.SOURCES})
  tc, seq_len = config.train, config.data.seq_len
  model_config = lm.padded_model_config(config, vocab_size)
  base_model = model_lib.Transformer(model_config)
  model = lora.for_config(base_model, config)
  trainable = lora.trainable(config.lora) if lora.enabled(config) else None
  mesh = sharding.make_mesh(config.mesh)
  optimizer = trainer.make_optimizer(tc)
  rng = np.random.default_rng(config.seed)
  local_rows = sharding.batch_size_per_process(tc.batch_size, mesh)
  tokens = rng.integers(3, vocab_size, (local_rows, seq_len + 1), dtype=np.int32)
  local_batch = {
      'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
      'positions': np.broadcast_to(np.arange(seq_len, dtype=np.int32), (local_rows, seq_len)),
      'segment_ids': np.ones((local_rows, seq_len), np.int32),
      'weights': np.ones((local_rows, seq_len), np.float32),
  }
  if tc.grad_accum_steps > 1:
    local_batch = {k: v.reshape(tc.grad_accum_steps, -1, seq_len) for k, v in local_batch.items()}
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    batch = sharding.put_batch(local_batch, mesh, batch_axis=int(tc.grad_accum_steps > 1))
    summary = {'device': jax.devices()[0].device_kind, 'num_devices': jax.device_count(),
               'mesh': dict(mesh.shape), 'params': model_config.num_params(),
               'lora_rank': config.lora.rank if trainable else 0,
               'batch_size': tc.batch_size, 'seq_len': seq_len,
               'malloc_huge_pages': host_memory.maps_huge_pages()}
    if memory_only:
      return {**summary, **memory_without_running(config, model, optimizer, trainable, mesh,
                                                  batch)}
    _, shardings, init_state = trainer.abstract_state(
        lm.init_params_fn(model, seq_len), optimizer, mesh, jax.random.PRNGKey(0), trainable,
        config.lora.frozen_dtype if trainable else '')
    state = jax.jit(init_state, out_shardings=shardings)(jax.random.PRNGKey(0))
    step_fn = jax.jit(trainer.make_train_step(trainer.language_model_loss(model, tc.z_loss),
                                              optimizer, tc.grad_accum_steps),
                      out_shardings=(shardings, None), donate_argnums=(0,))
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    keeps_freed_memory = host_memory.keep_freed_memory(  # as the trainer does
        getattr(compiled.memory_analysis(), 'temp_size_in_bytes', 0))
    state, out = compiled(state, batch)  # warm-up
    jax.block_until_ready(out)
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for _ in range(steps):
      state, out = compiled(state, batch)
    jax.block_until_ready(out)
    step_seconds = (time.perf_counter() - start) / steps
    page_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    state_bytes = state_bytes_on_first_device(state)
    trained_bytes = state_bytes_on_first_device((state.params, state.opt_state))
    reference_bytes = 0 if trainable else state_bytes_on_first_device(state.params)
  peak, peak_source = perf.peak_flops_per_device()
  if jax.devices()[0].platform != 'cpu':
    peak *= jax.device_count()
  tokens_per_sec = tc.batch_size * seq_len / step_seconds
  memory = compiled.memory_analysis()
  return {
      **summary,
      'compile_seconds': compile_seconds, 'step_seconds': step_seconds,
      'tokens_per_sec': tokens_per_sec,
      'model_flops_per_sec': tokens_per_sec * model_config.flops_per_token(seq_len),
      'peak_flops_per_sec': peak, 'peak_source': peak_source,
      'mfu': tokens_per_sec * model_config.flops_per_token(seq_len) / peak,
      'trained_params': sum(x.size for x in jax.tree.leaves(state.params)),
      'state_bytes_per_device': state_bytes,
      'trained_state_bytes_per_device': trained_bytes,
      'rl_state_bytes_per_device': state_bytes + reference_bytes,
      'compiled_temp_bytes': getattr(memory, 'temp_size_in_bytes', None),
      'keeps_freed_memory': keeps_freed_memory,
      'page_faults_per_step': page_faults / steps,
      'peak_bytes_in_use': perf.peak_memory_bytes(),
      'final_loss': float(out['train/loss']),
  }


def benchmark_generation(config, rows: int, prompt_len: int, max_new_tokens: int,
                         vocab_size: int, rounds: int = 3) -> dict:
  """The KV-cache sampler (`sampling.generate`, as RL rollouts call it: temperature 1, log-probs
  returned) on random prompts of random lengths, every row generating `max_new_tokens`:
  generated tokens/s, the best of `rounds` after a compiling call."""
  model = model_lib.Transformer(lm.padded_model_config(config, vocab_size))
  mesh = sharding.make_mesh(config.mesh)
  rng = np.random.default_rng(config.seed)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    params = jax.jit(lm.init_params_fn(model, prompt_len))(jax.random.PRNGKey(0))
    placed = sharding.put_batch({
        'prompts': rng.integers(3, vocab_size, (rows, prompt_len), dtype=np.int32),
        'lengths': rng.integers(prompt_len // 2, prompt_len + 1, rows, dtype=np.int32)}, mesh)

    def generate(seed):
      return jax.block_until_ready(sampling.generate(
          model, params, placed['prompts'], placed['lengths'], jax.random.PRNGKey(seed),
          max_new_tokens=max_new_tokens, temperature=1.0, return_log_probs=True))

    start = time.perf_counter()
    generate(0)
    compile_seconds = time.perf_counter() - start
    times = []
    for seed in range(1, rounds + 1):
      start = time.perf_counter()
      generate(seed)
      times.append(time.perf_counter() - start)
  best = min(times)
  return {'device': jax.devices()[0].device_kind, 'rows': rows, 'prompt_len': prompt_len,
          'max_new_tokens': max_new_tokens, 'first_call_seconds': compile_seconds,
          'generate_seconds': times, 'generated_tokens_per_sec': rows * max_new_tokens / best}


def benchmark_data_path(workdir: str, steps: int, rounds: int) -> dict:
  """The train step of a pretraining workdir's config fed as its training loop feeds it (the
  next batch read, tokenized, packed and placed while the step runs), alternated `rounds` times
  with the same step on one fixed batch: the loop's rate over the step's. The pipeline's first
  epoch reads the storage; later ones the documents it kept tokenized."""
  config = configs.load(workdir)
  train_documents, _ = pipeline.pretraining_sources(config.data, workdir)
  tokenizer = lm.tokenizer_for(config, workdir, train_documents)
  model = model_lib.Transformer(lm.model_config(config, tokenizer))
  mesh = sharding.make_mesh(config.mesh)
  optimizer = trainer.make_optimizer(config.train)
  rows = sharding.batch_size_per_process(config.train.batch_size, mesh)
  batches = iter(pipeline.packed_batches(train_documents, tokenizer, config.data.seq_len, rows,
                                         seed=config.seed))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    _, shardings, init_state = trainer.abstract_state(
        lm.init_params_fn(model, config.data.seq_len), optimizer, mesh, jax.random.PRNGKey(0))
    state = jax.jit(init_state, out_shardings=shardings)(jax.random.PRNGKey(0))
    step_fn = jax.jit(trainer.make_train_step(
        trainer.language_model_loss(model, config.train.z_loss), optimizer, 1),
                      out_shardings=(shardings, None), donate_argnums=(0,))
    fixed = sharding.put_batch(next(batches), mesh)
    state, out = step_fn(state, fixed)
    jax.block_until_ready(out)

    def seconds_per_step(next_batch):
      nonlocal state
      start = time.perf_counter()
      for _ in range(steps):
        state, out = step_fn(state, next_batch())
      jax.block_until_ready(out)
      return (time.perf_counter() - start) / steps

    fixed_seconds, loop_seconds = [], []
    for _ in range(rounds):
      fixed_seconds.append(seconds_per_step(lambda: fixed))
      loop_seconds.append(seconds_per_step(lambda: sharding.put_batch(next(batches), mesh)))
  return {'workdir': workdir, 'batch_size': config.train.batch_size,
          'seq_len': config.data.seq_len, 'fixed_batch_step_seconds': fixed_seconds,
          'loop_step_seconds': loop_seconds,
          'documents_read': batches.get_state()['next_document'],
          'loop_rate_over_step_rate': float(np.median(fixed_seconds) / np.median(loop_seconds))}


def compare(configs_by_name: dict, steps: int, vocab_size: int | None, rounds: int) -> dict:
  """Each config's benchmark, alternated `rounds` times in this process so that both see the
  same machine; medians per config and the speed-up of the last over the first."""
  runs = {name: [] for name in configs_by_name}
  for _ in range(rounds):
    for name, config in configs_by_name.items():
      runs[name].append(benchmark(config, steps, vocab_size or config.tokenizer.vocab_size))
  result = {}
  for name, results in runs.items():
    result[name] = {
        'step_seconds': [r['step_seconds'] for r in results],
        **{f'median_{key}': float(np.median([r[key] for r in results]))
           for key in ('step_seconds', 'tokens_per_sec', 'mfu', 'page_faults_per_step')},
        'final_loss': results[-1]['final_loss'],
    }
  first, last = (result[name]['median_step_seconds'] for name in (list(runs)[0], list(runs)[-1]))
  result['speedup'] = first / last
  return result


def main(argv):
  del argv
  _INITIALIZE_DISTRIBUTED()
  metrics.configure_logging()
  config = cli.config_value(_CONFIG)
  if _GENERATE.value:
    if len(_GENERATE.value) != 3 or not all(v.isdigit() and int(v) > 0
                                            for v in _GENERATE.value):
      raise UserError(f'--generate={",".join(_GENERATE.value)}: expected ROWS,PROMPT_LEN,'
                      'MAX_NEW_TOKENS, three positive integers (such as 128,48,32)')
    rows, prompt_len, max_new_tokens = (int(v) for v in _GENERATE.value)
    result = benchmark_generation(config, rows, prompt_len, max_new_tokens,
                                  _VOCAB.value or config.tokenizer.vocab_size, _ROUNDS.value)
  elif _DATA_WORKDIR.value:
    result = benchmark_data_path(_DATA_WORKDIR.value, _STEPS.value, _ROUNDS.value)
  elif _COMPARE.value:
    if _MEMORY_ONLY.value:
      raise UserError('--compare times steps; it cannot be combined with --memory_only')
    other = configs.overridden(config, _COMPARE.value)
    result = compare({'base': config, 'compared': other}, _STEPS.value, _VOCAB.value,
                     _ROUNDS.value)
    result['compared']['overrides'] = _COMPARE.value
  else:
    result = benchmark(config, _STEPS.value, _VOCAB.value or config.tokenizer.vocab_size,
                       _MEMORY_ONLY.value)
  if jax.process_index() == 0:
    print(json.dumps(result, indent=2))


if __name__ == '__main__':
  # Flags live here so that other programs (and tests) can import several binaries.
  _CONFIG = cli.define_config('experiments/configs/tiny.py')
  _STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps, after one warm-up step.',
                                lower_bound=1)
  _VOCAB = flags.DEFINE_integer('vocab_size', None,
                                'Vocabulary size; default: config.tokenizer.vocab_size.')
  _MEMORY_ONLY = flags.DEFINE_bool('memory_only', False, 'Compile the step on abstract '
                                    'arguments and report its memory; run nothing.')
  _COMPARE = flags.DEFINE_multi_string(
      'compare', [], 'An override (dotted.key=value, repeatable) of a second config, timed '
      'alternately with --config in this process; prints both and the speed-up.')
  _ROUNDS = flags.DEFINE_integer('rounds', 3, 'Alternations of --compare and --data_workdir; '
                                 'timed calls of --generate.', lower_bound=1)
  _DATA_WORKDIR = flags.DEFINE_string(
      'data_workdir', '', 'A pretraining workdir: time its step fed by its data pipeline, '
      'alternately with the step on one fixed batch (--steps each, --rounds times).')
  _GENERATE = flags.DEFINE_list(
      'generate', [], 'ROWS,PROMPT_LEN,MAX_NEW_TOKENS: time the KV-cache sampler instead of '
      'the train step (RL rollouts of the pipeline: 128,48,32); --rounds calls.')
  _INITIALIZE_DISTRIBUTED = cli.define_distributed_flags()
  cli.start(main)
