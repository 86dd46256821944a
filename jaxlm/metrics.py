"""One metrics writer for every stage: a progress line, TensorBoard events and metrics.jsonl.

`metrics.jsonl` holds one JSON object per logged step (`{"step": 100, "train/loss": ...}`) so
runs can be read by scripts. Only process 0 writes.
"""

import contextlib
import json
import logging as std_logging
import os
import time

import jax
from absl import flags
from absl import logging


def _keep_records_up_to(path: str, step: int) -> None:
  """Drops what a run that stopped after `step` had logged beyond it, and a line a killed run
  left half-written, so that a resumed run's metrics.jsonl has one record per step."""
  if not os.path.exists(path):
    return
  kept = []
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if record.get('step', 0) <= step:
        kept.append(line if line.endswith('\n') else line + '\n')
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.writelines(kept)
  os.replace(tmp, path)


def read(workdir: str) -> list[dict]:
  """The records of `workdir`'s metrics.jsonl, in step order (none if it has none)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


class StageTimes:
  """Each stage's wall seconds in a run of several stages (the pipeline's, the reasoning
  experiment's), summed over the launches that resumed it and kept in `<workdir>/timings.json`,
  so a rerun of a finished run still reports what training took."""

  FILE = 'timings.json'

  def __init__(self, workdir: str):
    self._path = os.path.join(workdir, self.FILE)
    self.seconds = {}
    if os.path.exists(self._path):
      with open(self._path, encoding='utf-8') as f:
        self.seconds = json.load(f)

  @contextlib.contextmanager
  def timing(self, stage: str):
    start = time.perf_counter()
    yield
    self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
    if jax.process_index() == 0:
      with open(self._path, 'w', encoding='utf-8') as f:
        json.dump(self.seconds, f, indent=2)


class MetricsWriter:
  """Appends to `workdir`'s metrics; `resumed_step` (the step a run starts after) drops the
  records a previous run wrote beyond it."""

  def __init__(self, workdir: str, resumed_step: int | None = None):
    self.enabled = jax.process_index() == 0
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, 'metrics.jsonl')
      if resumed_step is not None:
        _keep_records_up_to(path, resumed_step)
      self._jsonl = open(path, 'a', encoding='utf-8')
      # tensorboardX writes standard event files without pulling in TensorFlow.
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({'step': int(step), **scalars}) + '\n')
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


class Progress:
  """Formats the one-line progress report: step, loss, tokens/s, MFU, ETA."""

  def __init__(self, total_steps: int, start_step: int):
    self.total_steps = total_steps
    self._start_step, self._start_time = start_step, time.time()

  def line(self, step: int, metrics: dict[str, float]) -> str:
    elapsed = time.time() - self._start_time
    done = step - self._start_step
    eta = elapsed / done * (self.total_steps - step) if done > 0 else float('nan')
    parts = [f'step {step}/{self.total_steps}']
    for key, fmt in (('train/loss', 'loss {:.4f}'), ('rollout/mean_reward', 'reward {:.3f}'),
                     ('eval/loss', 'eval_loss {:.4f}'), ('eval/exact_match', 'exact {:.3f}'),
                     ('perf/tokens_per_sec', '{:,.0f} tok/s'), ('perf/mfu', 'MFU {:.1%}')):
      if key in metrics:
        parts.append(fmt.format(metrics[key]))
    parts.append(f'ETA {_duration(eta)}')
    return ' | '.join(parts)


def _duration(seconds: float) -> str:
  if seconds != seconds:  # NaN before the first interval
    return '?'
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}:{minutes:02d}:{seconds:02d}'


def log(message: str) -> None:
  """A line for the user on process 0, whatever the logging verbosity."""
  if jax.process_index() == 0:
    print(f'{time.strftime("%H:%M:%S")} {message}', flush=True)


class _DropLibraryChatter(std_logging.Filter):
  """Keeps warnings from jaxlm itself; drops tfds' notes about custom builder configs."""

  def filter(self, record):
    return 'tensorflow_datasets' not in record.pathname or record.levelno >= std_logging.ERROR


def configure_logging() -> None:
  """For binaries: library INFO logs (Orbax writes dozens per save) off unless -v is given."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  logging.get_absl_handler().addFilter(_DropLibraryChatter())
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
