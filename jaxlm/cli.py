"""The command line every binary shares: `--config` (with `--config.a.b=v` overrides),
`--workdir`, the multi-process flags, and how a binary ends on a user's mistake.

A user's mistake (a `UserError`, a malformed flag or config override) ends the binary with one
line, `error: ...`, and exit status 2; `--traceback` adds the Python traceback. Anything else is
a bug in jaxlm and keeps its traceback.
"""

import contextlib
import re
import sys
import traceback

from absl import app
from absl import flags
from ml_collections import config_flags

from jaxlm import distributed
from jaxlm import errors
from jaxlm import locking
from jaxlm import metrics
from jaxlm import perf

USER_ERROR_EXIT = 2


def _wants_traceback() -> bool:
  # Read from argv: a parse error or a bad override happens before absl has parsed the flag.
  return any(re.fullmatch(r'--traceback(=(true|1))?', arg, re.IGNORECASE) for arg in sys.argv)


def fail(message: str) -> None:
  """Ends the program with `message` as one line."""
  print(f'error: {" ".join(str(message).split())}', file=sys.stderr)
  sys.exit(USER_ERROR_EXIT)


def _adopt_as_main_module_flags(names) -> None:
  """`--help` lists the main module's flags only; these are defined here, so declare them."""
  for name in names:
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])


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
  _adopt_as_main_module_flags(('coordinator_address', 'num_processes', 'process_id',
                               'multiprocess'))
  return lambda: distributed.initialize(coordinator.value, num_processes.value, process_id.value,
                                        multiprocess.value)


def _config_override_culprit(missing: str) -> str:
  """The `--config.a.b=v` argument whose path holds the missing field `missing`."""
  for arg in sys.argv[1:]:
    match = re.match(r'--(config\.[\w.]+)', arg)
    if match and missing in match.group(1).split('.')[1:]:
      return f'--{match.group(1)}'
  return '--config'


def define_config(default_config: str, help_text: str = 'Path to a config file.'):
  """`--config` (a config file, overridable field by field); a bad override is one line."""
  try:
    config = config_flags.DEFINE_config_file('config', default_config, help_text)
  except (KeyError, AttributeError) as e:  # an override names a field the config lacks
    if _wants_traceback():
      raise
    # ml_collections' message: the quoted key, then perhaps a "Did you mean" line.
    while e.args and isinstance(e.args[0], Exception):  # an AttributeError wrapping a KeyError
      e = e.args[0]
    key, *hint = str(e.args[0] if e.args else e).splitlines()
    missing = key.strip('"\'')
    fail(f'{_config_override_culprit(missing)}: the config has no field {missing!r}; '
         f'an override can only set a field the config file defines. {" ".join(hint)}')
  _adopt_as_main_module_flags(('config',))
  return config


def config_value(config_holder):
  """The config a `define_config` flag names; a file that does not load is one line."""
  try:
    config = config_holder.value
    config.keys()  # ml_collections reports a file that failed to load on first use only
  except OSError as e:
    if _wants_traceback():
      raise
    fail(f'--config: {_first_and_last_lines(e.__cause__ or e)}')
  return config


def _first_and_last_lines(error) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[0] if len(lines) < 2 else f'{lines[0]} ... {lines[-1]}'


def _where(error: BaseException) -> str:
  """file:line where a config file's own code failed."""
  if isinstance(error, SyntaxError):
    return f'{error.filename}:{error.lineno}'
  frame = traceback.extract_tb(error.__traceback__)[-1]
  return f'{frame.filename}:{frame.lineno}'


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    if _wants_traceback():
      raise
    fail(f'{_first_and_last_lines(e)} (--help lists the flags)')
  except Exception as e:  # pylint: disable=broad-except
    if _wants_traceback():
      raise
    fail(f'--config: the config file failed at {_where(e)}: {type(e).__name__}: {e}')


@contextlib.contextmanager
def exit_on_user_error():
  """Ends the program with a `UserError`'s message as one line (exit status 2), no traceback."""
  try:
    yield
  except errors.UserError as e:
    if _wants_traceback():
      traceback.print_exc()
    fail(str(e))


def start(main) -> None:
  """Runs `main(argv)` as an absl app: what every binary calls instead of `app.run`."""
  flags.DEFINE_bool('traceback', False,
                    "On a user's error, print the Python traceback as well as the message.")
  _adopt_as_main_module_flags(('traceback',))

  def main_on_user_error(argv):
    with exit_on_user_error():
      return main(argv)
  try:
    app.run(main_on_user_error, flags_parser=_parse_flags)
  except SystemExit as e:
    # absl ends a --help run with status 1; asking for help is not a failure.
    if e.code == 1 and any(a in ('--help', '--helpshort', '--helpfull', '-h', '-?')
                           for a in sys.argv[1:]):
      sys.exit(0)
    raise


def run(train_and_evaluate, default_config: str) -> None:
  """Defines the flags and runs `train_and_evaluate(config, workdir)` as an absl app, holding
  the workdir's lock.

  Flags are defined here, when a binary runs, not at import: other programs (the pipeline,
  tests) import several binaries at once.
  """
  config = define_config(default_config)
  workdir = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and logs go here.',
                                required=True)
  _adopt_as_main_module_flags(('workdir',))
  initialize_distributed = define_distributed_flags()

  def main(argv):
    del argv
    initialize_distributed()
    metrics.configure_logging()
    perf.cache_compilations(workdir.value)
    with locking.hold(workdir.value):
      train_and_evaluate(config_value(config), workdir.value)

  start(main)
