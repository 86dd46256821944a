"""The training machinery every stage shares: state, optimizer, a pure train step, the loop.

A stage (pretraining, SFT, reward model, ...) supplies its parameter initialiser, its loss (a pure
function returning sums), its batches and its evaluation; `train` does the rest: mesh placement,
jit with shardings and donation, resume, checkpoints, metrics and SIGTERM handling.
"""

import dataclasses
import os
import signal
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxlm import checkpoint as checkpoint_lib
from jaxlm import distributed
from jaxlm import host_memory
from jaxlm import lora
from jaxlm import losses
from jaxlm import metrics as metrics_lib
from jaxlm import perf
from jaxlm import sharding
from jaxlm.errors import UserError

# loss_fn(params, batch, rng) -> (scalar to differentiate, dict of sums including 'count').
LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  # Steps whose update was skipped for a non-finite loss, gradient or update: in a row, and in all.
  nonfinite_streak: jax.Array
  nonfinite_steps: jax.Array
  # Parameters that do not train (a LoRA run's base): not in the optimizer nor the checkpoints.
  frozen: Any = flax.struct.field(default_factory=dict)


def all_params(state: TrainState):
  """The model's parameters: the trained ones and the frozen ones together."""
  return lora.join(state.params, state.frozen) if state.frozen else state.params


def checkpointed(state: TrainState) -> dict:
  """What a checkpoint holds: every field but the frozen parameters, which a LoRA run reloads
  from where it started."""
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != 'frozen'}


def with_frozen(loss_fn: Callable) -> Callable:
  """loss(params, ...) -> loss(trained params, frozen params, ...): only the first is
  differentiated."""
  return lambda params, frozen, *args: loss_fn(lora.join(params, frozen) if frozen else params,
                                                *args)


def learning_rate_schedule(train_config) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine decay to `min_lr_ratio` of it."""
  warmup = min(train_config.warmup_steps, train_config.steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train_config.learning_rate, warmup_steps=warmup,
      decay_steps=max(train_config.steps, warmup + 1),
      end_value=train_config.learning_rate * train_config.min_lr_ratio)


def weight_decay_mask(params, decay_embeddings: bool):
  """Decay matrices only: not norm scales, and not embeddings unless asked."""
  def decays(path, leaf):
    names = [getattr(p, 'key', '') for p in path]
    if 'embedding' in names:
      return decay_embeddings
    return names[-1] == 'kernel' and leaf.ndim >= 2
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train_config) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(train_config.grad_clip),
      optax.adamw(learning_rate_schedule(train_config), b1=train_config.b1, b2=train_config.b2,
                  eps=train_config.eps, weight_decay=train_config.weight_decay,
                  mask=lambda p: weight_decay_mask(p, train_config.decay_embeddings)))


def language_model_loss(model: nn.Module, z_loss: float = 0.0,
                        source_names: tuple[str, ...] = ()) -> LossFn:
  """Next-token loss on a packed batch; `weights` selects the counted targets (SFT: the replies).
  With the `source_names` of a data mixture it also reports each source's share of the counted
  tokens (`source_share/<name>`), from the batch's `source_ids`."""
  def loss_fn(params, batch, rng):
    logits, _ = model.apply({'params': params}, batch['inputs'], batch['positions'],
                            batch['segment_ids'], rngs={} if rng is None else {'dropout': rng})
    sums = losses.cross_entropy(logits, batch['targets'], batch['weights'], z_loss)
    for index, name in enumerate(source_names):
      sums[f'source_share/{name}'] = jnp.sum(batch['weights'] * (batch['source_ids'] == index))
    return sums['loss'], sums
  return loss_fn


def update_if_finite(optimizer: optax.GradientTransformation, grads, loss, params, opt_state):
  """(params, opt_state, update norm, finite): the optimizer's step, or no step at all when the
  loss, the gradient or the update is not finite, so that a bad batch or a diverging run can
  never poison the parameters or the optimizer's moments."""
  updates, new_opt_state = optimizer.update(grads, opt_state, params)
  update_norm = optax.tree.norm(updates)
  finite = (jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
            & jnp.isfinite(update_norm))
  new_params, new_opt_state = jax.lax.cond(
      finite, lambda: (optax.apply_updates(params, updates), new_opt_state),
      lambda: (params, opt_state))
  return new_params, new_opt_state, update_norm, finite


def count_nonfinite(state: TrainState, finite: jax.Array) -> dict:
  """The non-finite counters of `state` after a step that was (or was not) finite."""
  return dict(nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
              nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32))


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    grad_accum_steps: int):
  """A pure `(state, batch) -> (state, metrics)`.

  With accumulation the batch arrives as [grad_accum_steps, micro_batch, ...]; gradients of the
  summed losses are added over microbatches and divided once by the total weight, so the update
  equals the one from the whole batch at once.
  """
  grad_fn = jax.value_and_grad(with_frozen(loss_fn), has_aux=True)

  def train_step(state: TrainState, batch):
    rng, step_rng = jax.random.split(state.rng)
    if grad_accum_steps == 1:
      (_, sums), grads = grad_fn(state.params, state.frozen, batch, step_rng)
    else:
      def accumulate(carry, micro):
        index, micro_batch = micro
        (_, micro_sums), micro_grads = grad_fn(state.params, state.frozen, micro_batch,
                                               jax.random.fold_in(step_rng, index))
        return jax.tree.map(jnp.add, carry, (micro_grads, micro_sums)), None
      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
          lambda: grad_fn(state.params, state.frozen, jax.tree.map(lambda x: x[0], batch),
                          step_rng)))
      (grads, sums), _ = jax.lax.scan(
          accumulate, (zeros[1], zeros[0][1]), (jnp.arange(grad_accum_steps), batch))
    count = jnp.maximum(sums['count'], 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    params, opt_state, update_norm, finite = update_if_finite(
        optimizer, grads, sums['loss'], state.params, state.opt_state)
    metrics = {f'train/{k}': v / count for k, v in sums.items() if k != 'count'}
    counters = count_nonfinite(state, finite)
    metrics.update({
        'train/tokens': sums['count'],
        'train/grad_norm': optax.tree.norm(grads),
        'train/update_norm': update_norm,
        'train/param_norm': optax.tree.norm(params),
        'train/nonfinite_steps': counters['nonfinite_steps'],
    })
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng,
                         **counters), metrics

  return train_step


@dataclasses.dataclass
class Stage:
  """What a training stage supplies to `train`."""
  init_params: Callable[[jax.Array], Any]  # rng -> logically-partitioned (boxed) params
  loss_fn: LossFn
  train_batches: Any  # a grain IterDataset of this process's rows, shaped [batch, ...]
  evaluate: Callable[[Any, int], dict[str, float]]  # (params, step) -> metrics
  flops_per_token: float
  tokens_per_row: int
  # freshly initialised params -> starting params (e.g. from a previous stage's checkpoint).
  load_params: Callable[[Any], Any] | None = None
  # optimizer -> a pure (state, batch) -> (state, metrics); default: `make_train_step`.
  make_step: Callable[[optax.GradientTransformation], Callable] | None = None
  # (state, host batch) -> device batch; default: place the rows on the mesh. RL generates its
  # rollouts here, from the current policy.
  prepare_batch: Callable[[TrainState, dict], dict] | None = None
  # seconds since the last logged step -> host-side metrics of that window (RL: generation).
  window_metrics: Callable[[float], dict[str, float]] | None = None
  # prepared batch -> the tokens it trains on, where batches differ in width (RL's rollouts);
  # default: `tokens_per_row` for every row.
  batch_tokens: Callable[[dict], int] | None = None


def abstract_params(boxed_shapes, mesh):
  """(ShapeDtypeStructs carrying their shardings, the shardings) for an `eval_shape`d tree of
  logically-partitioned values."""
  shardings = sharding.logical_shardings(boxed_shapes, mesh)
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  unboxed = jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x,
                         boxed_shapes, is_leaf=is_box)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          unboxed, shardings)
  return abstract, shardings


def abstract_state(init_params, optimizer, mesh, rng, trainable=None, frozen_dtype: str = ''):
  """(ShapeDtypeStructs carrying shardings, shardings, init fn) of the train state. With a
  `trainable(path)` predicate the other parameters go to `frozen`, stored as `frozen_dtype`
  (e.g. 'bfloat16'; empty: as initialised)."""
  def init_boxed(rng):
    init_rng, state_rng = jax.random.split(rng)
    params, frozen = init_params(init_rng), {}
    if trainable is not None:
      params, frozen = lora.split(params, trainable)
    if frozen_dtype:
      frozen = lora.cast(frozen, frozen_dtype)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(zero, params, optimizer.init(params), state_rng, zero, zero, frozen)
  abstract, shardings = abstract_params(jax.eval_shape(init_boxed, rng), mesh)
  return abstract, shardings, lambda rng: nn.meta.unbox(init_boxed(rng))


class _Preemption:
  """Turns SIGTERM (TPU maintenance, job schedulers) into a flag the loop checks."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


class Preempted(SystemExit):
  """SIGTERM during training, the checkpoint saved: the program ends here (status 0) rather
  than go on with an unfinished model, as to a pipeline's next stage."""


class NonFiniteTraining(UserError):
  """Too many steps in a row had a non-finite loss, gradient or update."""


def _check_nonfinite(state: TrainState, step: int, max_in_a_row: int, reported: int) -> int:
  """Logs newly skipped updates and stops the run after `max_in_a_row` in a row; returns the
  number skipped so far. Reads two device scalars: call it where the loop syncs anyway."""
  streak, total = (int(x) for x in jax.device_get((state.nonfinite_streak,
                                                   state.nonfinite_steps)))
  if total > reported:
    metrics_lib.log(f'step {step}: skipped {total - reported} update(s) with a non-finite loss, '
                    f'gradient or update ({total} in all, {streak} in a row).')
  if streak >= max_in_a_row:
    raise NonFiniteTraining(
        f'step {step - streak + max_in_a_row}: {max_in_a_row} steps in a row had a non-finite '
        'loss, gradient or update (config.train.max_nonfinite_steps); their updates were skipped '
        'and the checkpoints hold only finite parameters. Lower config.train.learning_rate or '
        'check the data.')
  return total


def _count(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


def _place(local, mesh, grad_accum_steps: int):
  if grad_accum_steps > 1:
    local = {k: v.reshape(grad_accum_steps, -1, *v.shape[1:]) for k, v in local.items()}
  return sharding.put_batch(local, mesh, batch_axis=1 if grad_accum_steps > 1 else 0)


class _CompiledSteps:
  """The step compiled once per batch shape (one for most stages; RL's rows end at each batch's
  longest reply, so it sees a few). On a CPU host malloc keeps the memory the largest of them
  frees for the next step, if its temporaries are small enough (`jaxlm.host_memory`)."""

  def __init__(self, train_step):
    self._train_step = train_step
    self._compiled = {}
    self._temp_bytes = 0

  def __call__(self, state: TrainState, batch):
    shapes = tuple((path, jnp.shape(leaf)) for path, leaf in jax.tree.leaves_with_path(batch))
    if shapes not in self._compiled:
      compiled = self._train_step.lower(state, batch).compile()
      temp_bytes = getattr(compiled.memory_analysis(), 'temp_size_in_bytes', None)
      if temp_bytes is not None and temp_bytes > self._temp_bytes:
        self._temp_bytes = temp_bytes
        host_memory.keep_freed_memory(temp_bytes)
      self._compiled[shapes] = compiled
    return self._compiled[shapes](state, batch)


def train(config, workdir: str, stage: Stage, mesh) -> TrainState:
  """Runs (or resumes) training; returns the final state. On SIGTERM it saves a checkpoint and
  raises `Preempted`. Call under `jax.set_mesh(mesh)`."""
  tc = config.train
  optimizer = make_optimizer(tc)
  trainable = lora.trainable(config.lora) if lora.enabled(config) else None
  abstract, shardings, init_state = abstract_state(
      stage.init_params, optimizer, mesh, jax.random.PRNGKey(config.seed), trainable,
      config.lora.frozen_dtype if trainable else '')
  if trainable is not None and not lora.split(abstract.params, lora.is_adapter)[0]:
    raise UserError(f'config.lora.targets ({config.lora.targets!r}) matches no projection of the '
                    'model (module paths look like layers/attention/query)')
  checkpointer = checkpoint_lib.Checkpointer(
      os.path.join(workdir, 'checkpoints'), keep=config.checkpoint.keep,
      async_save=config.checkpoint.async_save)
  data_iterator = iter(stage.train_batches)
  restored = checkpointer.restore_latest(checkpointed(abstract), config.checkpoint.start_over)
  if restored is None or trainable is not None:  # a LoRA run loads its base on resume too
    state = jax.jit(init_state, out_shardings=shardings)(jax.random.PRNGKey(config.seed))
    if stage.load_params is not None:
      params = stage.load_params(all_params(state))
      if trainable is not None:
        params, frozen = lora.split(params, trainable)
        state = state.replace(frozen=frozen)
      state = state.replace(params=params)
  if restored is None:
    metrics_lib.log(f'Starting a new run in {workdir}.')
  else:
    saved, data_state, step = restored
    state = TrainState(**saved, frozen=state.frozen if trainable is not None else {})
    data_iterator.set_state(data_state)
    metrics_lib.log(f'Resuming from the checkpoint at step {step} in {workdir}.')
  if trainable is not None:
    metrics_lib.log(f'LoRA: training {_count(state.params):,} parameters; '
                    f'{_count(state.frozen):,} frozen.')

  step_fn = (stage.make_step(optimizer) if stage.make_step else
             make_train_step(stage.loss_fn, optimizer, tc.grad_accum_steps))
  train_step = jax.jit(step_fn, out_shardings=(shardings, None), donate_argnums=(0,))
  prepare_batch = stage.prepare_batch or (
      lambda state, local: _place(local, mesh, tc.grad_accum_steps))
  start_step = int(state.step)
  writer = metrics_lib.MetricsWriter(workdir,
                                     resumed_step=-1 if restored is None else start_step)
  if restored is None and config.get('eval_at_start'):
    scalars = stage.evaluate(all_params(state), 0)
    writer.write(0, scalars)
    metrics_lib.log('before training: ' + ', '.join(f'{k} {v:.4f}' for k, v in scalars.items()))
  progress = metrics_lib.Progress(tc.steps, start_step)
  peak, _ = perf.peak_flops_per_device()
  if jax.devices()[0].platform != 'cpu':
    peak *= jax.device_count()  # a CPU probe already measures every core at once
  preemption = _Preemption()
  batch_tokens = stage.batch_tokens or (lambda _: tc.batch_size * stage.tokens_per_row)
  window_tokens, last_time = 0, time.time()
  nonfinite = int(state.nonfinite_steps)
  compiled_step = _CompiledSteps(train_step)
  try:
    for step in range(start_step + 1, tc.steps + 1):
      batch = prepare_batch(state, next(data_iterator))
      state, train_metrics = compiled_step(state, batch)
      window_tokens += batch_tokens(batch)
      evaluate = (config.eval_every and step % config.eval_every == 0) or step == tc.steps
      if step % config.log_every == 0 or evaluate:
        scalars = {k: float(v) for k, v in jax.device_get(train_metrics).items()}
        nonfinite = _check_nonfinite(state, step, tc.max_nonfinite_steps, nonfinite)
        now = time.time()
        tokens_per_sec = window_tokens / (now - last_time)
        scalars.update({
            'train/learning_rate': float(learning_rate_schedule(tc)(step - 1)),
            'perf/tokens_per_sec': tokens_per_sec,
            'perf/mfu': tokens_per_sec * stage.flops_per_token / peak,
        })
        if stage.window_metrics is not None:
          scalars.update(stage.window_metrics(now - last_time))
        window_tokens, last_time = 0, now
        if evaluate:
          scalars.update(stage.evaluate(all_params(state), step))
          last_time = time.time()  # evaluation is not training throughput
        writer.write(step, scalars)
        metrics_lib.log(progress.line(step, scalars))
      # Every host stops at the same step, whichever of them got the signal. Agreeing is a host
      # sync, so several hosts agree at logged steps only, which sync anyway.
      preempted = ((jax.process_count() == 1 or step % config.log_every == 0)
                   and distributed.any_process(preemption.requested))
      if step % config.checkpoint.every == 0 or step == tc.steps or preempted:
        nonfinite = _check_nonfinite(state, step, tc.max_nonfinite_steps, nonfinite)
        checkpointer.save(step, checkpointed(state), data_iterator.get_state())
      if preempted:
        checkpointer.wait()
        metrics_lib.log(f'SIGTERM: saved the checkpoint at step {step}; exiting.')
        raise Preempted(0)
  finally:
    preemption.restore()
    checkpointer.close()
    writer.close()
  return state
