"""The command line every binary shares: `--config` (with `--config.a.b=v` overrides),
`--workdir`, and the multi-process flags."""

import contextlib
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from jaxlm import distributed
from jaxlm import errors
from jaxlm import metrics


def define_distributed_flags():
  """Defines the multi-process flags; returns a function that starts `jax.distributed` from
  them (call it first in `main`)."""
  coordinator = flags.DEFINE_string(
      'coordinator_address', '', 'host:port of process 0, for a multi-process run on a cluster '
      'JAX does not detect by itself; with --num_processes and --process_id.')
  num_processes = flags.DEFINE_integer('num_processes', 0, 'Processes in the run.')
  process_id = flags.DEFINE_integer('process_id', -1, 'This process, from 0.')
  multiprocess = flags.DEFINE_bool(
      'multiprocess', False, 'Start jax.distributed with what JAX detects (Cloud TPU pod '
      'slices, SLURM, Open MPI); SLURM, Open MPI and multi-worker TPU are also seen unasked.')
  return lambda: distributed.initialize(coordinator.value, num_processes.value, process_id.value,
                                        multiprocess.value)


def run(train_and_evaluate, default_config: str) -> None:
  """Defines the flags and runs `train_and_evaluate(config, workdir)` as an absl app.

  Flags are defined here, when a binary runs, not at import: other programs (the pipeline,
  tests) import several binaries at once.
  """
  config = config_flags.DEFINE_config_file('config', default_config, 'Path to a config file.')
  workdir = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and logs go here.',
                                required=True)
  initialize_distributed = define_distributed_flags()

  def main(argv):
    del argv
    initialize_distributed()
    metrics.configure_logging()
    with exit_on_user_error():
      train_and_evaluate(config.value, workdir.value)

  app.run(main)


@contextlib.contextmanager
def exit_on_user_error():
  """Ends the program with a `UserError`'s message as one line (exit status 2), no traceback."""
  try:
    yield
  except errors.UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
