"""Orbax checkpoints that are verified before they are trusted.

Orbax has no checksums: a step cut off after its directory was finalised, or with damaged bytes,
is still listed by `latest_step()` and can restore wrong values silently. After a save has fully
finished, every process writes a manifest of the files it wrote itself (size and sha256 of each)
into the step directory, so verifying costs each process what it wrote, not the whole
checkpoint. A step is complete when every process's manifest is there; restoring verifies the
manifests spread over the restoring processes and takes the newest step that matches.

A step whose save never finished (no manifest) is set aside with a warning. A damaged newer step
in front of a good older one is set aside with a warning too, and the run resumes from the older
one. When checkpoints exist and none can be restored, resuming stops with an error naming each
step's problem and moves nothing, unless asked to set them aside and start over.
"""

import hashlib
import json
import os
import re
import time

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from jaxlm import distributed
from jaxlm import metrics
from jaxlm.errors import UserError

MANIFEST = 'jaxlm_manifest'
_UNFINISHED = 'no manifest (its save did not finish)'
# Orbax puts each process's own files under `ocdbt.process_<i>/` or `process_<i>`; process 0
# writes the rest.
_WRITER = re.compile(r'(?:^|/)(?:ocdbt\.)?process_(\d+)(?:/|$)')


def manifest_name(process: int) -> str:
  return f'{MANIFEST}.process_{process}.json'


def _files(directory: epath.Path):
  for path in sorted(directory.iterdir()):
    if path.is_dir():
      yield from _files(path)
    else:
      yield path


def _writer(name: str) -> int:
  match = _WRITER.search(name)
  return int(match.group(1)) if match else 0


def _digest(path: epath.Path) -> list:
  sha = hashlib.sha256()
  with path.open('rb') as f:
    for chunk in iter(lambda: f.read(1 << 22), b''):
      sha.update(chunk)
  return [path.stat().length, sha.hexdigest()]


def _own_file_digests(step_dir: epath.Path, process: int) -> dict[str, list]:
  names = (str(path.relative_to(step_dir)) for path in _files(step_dir)
           if not path.name.startswith(MANIFEST))
  return {name: _digest(step_dir / name) for name in names if _writer(name) == process}


def write_manifest(step_dir: epath.Path, process: int, num_processes: int) -> None:
  """Records the files `process` wrote into `step_dir` (after its save has finished)."""
  manifest = {'num_processes': num_processes,
              'files': _own_file_digests(step_dir, process)}
  tmp = step_dir / (manifest_name(process) + '.tmp')
  tmp.write_text(json.dumps(manifest))
  tmp.rename(step_dir / manifest_name(process))


def _read_manifest(step_dir: epath.Path, process: int) -> dict | str:
  path = step_dir / manifest_name(process)
  if not path.exists():
    return _UNFINISHED if process == 0 else f'no manifest from process {process}'
  try:
    return json.loads(path.read_text())
  except ValueError:
    return f'unreadable manifest {path.name}'


def _verify_manifest(step_dir: epath.Path, manifest: dict) -> str | None:
  for name, digest in manifest['files'].items():
    path = step_dir / name
    if not path.exists():
      return f'missing file {name}'
    if _digest(path) != digest:
      return f'file {name} does not match its checksum'
  return None


def verify(step_dir: epath.Path) -> str | None:
  """None if the step matches its manifests, otherwise what is wrong. In a multi-process run
  each process checks its share of the manifests; every process gets the same answer."""
  first = _read_manifest(step_dir, 0)
  if isinstance(first, str):
    problem = first
  else:
    problem = None
    for process in range(jax.process_index(), first['num_processes'], jax.process_count()):
      manifest = first if process == 0 else _read_manifest(step_dir, process)
      problem = manifest if isinstance(manifest, str) else _verify_manifest(step_dir, manifest)
      if problem:
        break
  if jax.process_count() > 1:
    problem = next((p for p in distributed.all_gather_json(problem) if p), None)
  return problem


def from_json(value):
  """JSON stores tuples as lists; Grain's iterator states compare against tuples (a packer's
  `(-1, -1)` "no remainder"), so a restored state needs them back."""
  if isinstance(value, dict):
    return {k: from_json(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(from_json(v) for v in value)
  return value


class _CheckpointMismatch(UserError):
  """The checkpoint is intact but holds other parameters than the model needs."""


def _check_shapes(saved_tree, abstract_tree, where, prefix: str = 'params') -> None:
  def path_name(path):  # dict keys and dataclass fields alike, as saved and as in memory
    return ''.join(f"['{getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))}']"
                   for k in path)

  def shapes(tree):
    return {path_name(path): tuple(v.shape)
            for path, v in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(v, 'shape')}
  saved, wanted = shapes(saved_tree), shapes(abstract_tree)
  for name, shape in wanted.items():
    if name not in saved:
      raise _CheckpointMismatch(f'{where} has no {prefix}{name}; it holds another model (a '
                                'changed config?)')
    if saved[name] != shape:
      raise _CheckpointMismatch(
          f'{prefix}{name} has shape {saved[name]} in {where} but the model needs {shape} '
          '(another architecture or vocabulary?)')


def _pytree_restore(abstract, partial: bool = False):
  return ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=partial)


class CheckpointSaveFailed(UserError):
  """A save did not reach the disk; the newest verified step is still the one resumed from."""


class UnusableCheckpoints(UserError):
  """Checkpoints exist but none of them can be restored."""


class Checkpointer:
  """Saves and restores {'state': pytree, 'data': JSON-able iterator state}."""

  def __init__(self, directory: str, keep: int, async_save: bool = True):
    # Orbax needs absolute paths; gs:// and other URLs already are.
    self.directory = epath.Path(directory if '://' in directory else os.path.abspath(directory))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                             enable_async_checkpointing=async_save),
        item_handlers={'state': ocp.PyTreeCheckpointHandler(),
                       'data': ocp.JsonCheckpointHandler()})
    self._unverified: list[int] = []
    self._newest_good: int | None = None
    self._failed = False

  def save(self, step: int, state, data_state: dict) -> None:
    self._write_manifests()
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state)), force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._fail(step, e)
    self._unverified.append(step)

  def wait(self) -> None:
    """Blocks until pending saves are on disk and manifested."""
    self._write_manifests()

  def _write_manifests(self) -> None:
    if not self._unverified:
      return
    step = self._unverified[-1]
    try:
      self._manager.wait_until_finished()
      for step in self._unverified:
        step_dir = self.directory / str(step)
        if step_dir.exists():  # may already be rotated out by max_to_keep
          write_manifest(step_dir, jax.process_index(), jax.process_count())
          self._newest_good = step
    except Exception as e:  # pylint: disable=broad-except
      self._fail(step, e)
    self._unverified = []

  def _fail(self, step: int, error: Exception) -> None:
    self._failed = True
    self._unverified = []
    newest = (f'step {self._newest_good} is the newest verified checkpoint and the one a rerun '
              'resumes from' if self._newest_good is not None else
              'no verified checkpoint was written before it')
    raise CheckpointSaveFailed(f'saving step {step} to {self.directory} failed '
                               f'({type(error).__name__}: {error}); {newest}') from error

  def restore_latest(self, abstract_state, start_over: bool = False):
    """(state, data_state, step) from the newest verified step, or None if there is none.

    `abstract_state` holds `jax.ShapeDtypeStruct`s with shardings: arrays are restored straight
    onto the current mesh, whatever mesh they were saved from. Steps newer than the one restored
    that fail verification are set aside. If steps exist and none can be restored this raises
    `UnusableCheckpoints`, moving nothing, unless `start_over` sets them all aside.
    """
    restored = self._restore_newest(lambda step: self._restore_state(step, abstract_state),
                                    set_aside=True, start_over=start_over)
    if restored is not None:
      self._newest_good = restored[2]
    return restored

  def restore_params(self, abstract_params=None, sharding=None):
    """(params, step) from the newest verified step: the parameters only, for generation or for
    starting a later stage. From an RL checkpoint ({'policy': ..., 'value': ...}) this is the
    policy. Without `abstract_params`: the parameters as they were saved (a LoRA run's adapters
    and heads), each placed with `sharding`. None if there is no checkpoint. Nothing in the
    directory is moved."""
    def restore(step):
      saved = self._manager.item_metadata(step)['state'].tree['params']
      is_rl = 'policy' in saved and (abstract_params is None or 'policy' not in abstract_params)
      saved = saved['policy'] if is_rl else saved
      if abstract_params is None:
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), saved)
      else:
        _check_shapes(saved, abstract_params, self.directory / str(step))
        abstract = abstract_params
      item = {'policy': abstract} if is_rl else abstract
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=_pytree_restore({'params': item}, partial=True)))
      params = restored['state']['params']
      return (params['policy'] if is_rl else params), step
    return self._restore_newest(restore, set_aside=False, start_over=False)

  def _restore_state(self, step, abstract_state):
    # Another model in the same workdir (a changed config) is the user's error, not damage.
    _check_shapes(self._manager.item_metadata(step)['state'].tree, abstract_state,
                  self.directory / str(step), prefix='')
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=_pytree_restore(abstract_state), data=ocp.args.JsonRestore()))
    return restored['state'], from_json(restored['data']), step

  def _restore_newest(self, restore, set_aside: bool, start_over: bool):
    problems = []  # (step, what is wrong), newest first
    for step in sorted(self._manager.all_steps(), reverse=True):
      problem = verify(self.directory / str(step))
      if problem is None:
        try:
          result = restore(step)
        except _CheckpointMismatch:
          raise
        except Exception as e:  # pylint: disable=broad-except
          problem = f'restore failed: {type(e).__name__}: {e}'
        else:
          for bad_step, bad_problem in problems:
            self._warn_unusable(bad_step, bad_problem, set_aside)
          if problems:
            metrics.log(f'Resuming from step {step}, the newest usable checkpoint in '
                        f'{self.directory}.')
          return result
      problems.append((step, problem))
    if not problems:
      return None
    unfinished = all(problem == _UNFINISHED for _, problem in problems)
    if not (start_over or unfinished):
      listed = '; '.join(f'step {step}: {problem}' for step, problem in problems)
      raise UnusableCheckpoints(
          f'{self.directory} has checkpoints but none can be restored ({listed}). Nothing was '
          'moved. Repair or remove them, or rerun with --config.checkpoint.start_over=true to '
          'set them aside and start from step 0.')
    for step, problem in problems:
      self._warn_unusable(step, problem, set_aside)
    return None

  def _warn_unusable(self, step: int, problem: str, set_aside: bool) -> None:
    if not set_aside:
      logging.warning('Checkpoint %s is not usable (%s); skipping it.',
                      self.directory / str(step), problem)
      return
    aside = self.directory.parent / f'{self.directory.name}_rejected' / f'{step}-{int(time.time())}'
    logging.warning('Checkpoint %s is not usable (%s); moving it to %s.',
                    self.directory / str(step), problem, aside)
    metrics.log(f'warning: checkpoint {self.directory / str(step)} is not usable ({problem}); '
                f'moved it to {aside}.')
    if jax.process_index() == 0:
      aside.parent.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'jaxlm_checkpoint_set_aside_{step}')
    self._manager.reload()

  def close(self) -> None:
    if self._failed:  # the save's error is already on its way; do not wait on it again
      self._manager.close()
      return
    self.wait()
    self._manager.close()
