"""Orbax checkpoints that are verified before they are trusted.

Orbax has no checksums: a step cut off after its directory was finalised, or with damaged bytes,
is still listed by `latest_step()` and can restore wrong values silently. After a save has fully
finished, process 0 writes a manifest (size and sha256 of every file) into the step directory;
restoring walks the steps newest first and takes the first one whose files match their manifest.
A step that fails is moved aside (never deleted) with a warning.
"""

import hashlib
import json
import os
import time

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

MANIFEST = 'jaxlm_manifest.json'


def _files(directory: epath.Path):
  for path in sorted(directory.iterdir()):
    if path.is_dir():
      yield from _files(path)
    else:
      yield path


def _file_digests(step_dir: epath.Path) -> dict[str, list]:
  digests = {}
  for path in _files(step_dir):
    if path.name.startswith(MANIFEST):
      continue
    sha = hashlib.sha256()
    with path.open('rb') as f:
      for chunk in iter(lambda: f.read(1 << 22), b''):
        sha.update(chunk)
    digests[str(path.relative_to(step_dir))] = [path.stat().length, sha.hexdigest()]
  return digests


def verify(step_dir: epath.Path) -> str | None:
  """None if the step matches its manifest, otherwise what is wrong."""
  manifest = step_dir / MANIFEST
  if not manifest.exists():
    return 'no manifest (the save did not finish)'
  try:
    expected = json.loads(manifest.read_text())
  except ValueError:
    return 'unreadable manifest'
  actual = _file_digests(step_dir)
  for name, digest in expected.items():
    if name not in actual:
      return f'missing file {name}'
    if actual[name] != digest:
      return f'file {name} does not match its checksum'
  return None


def from_json(value):
  """JSON stores tuples as lists; Grain's iterator states compare against tuples (a packer's
  `(-1, -1)` "no remainder"), so a restored state needs them back."""
  if isinstance(value, dict):
    return {k: from_json(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(from_json(v) for v in value)
  return value


class _CheckpointMismatch(ValueError):
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

  def save(self, step: int, state, data_state: dict) -> None:
    self._write_manifests()
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state)), force=True)
    self._unverified.append(step)

  def wait(self) -> None:
    """Blocks until pending saves are on disk and manifested."""
    self._write_manifests()

  def _write_manifests(self) -> None:
    self._manager.wait_until_finished()
    if jax.process_index() == 0:
      for step in self._unverified:
        step_dir = self.directory / str(step)
        if step_dir.exists():  # may already be rotated out by max_to_keep
          tmp = step_dir / (MANIFEST + '.tmp')
          tmp.write_text(json.dumps(_file_digests(step_dir)))
          tmp.rename(step_dir / MANIFEST)
    self._unverified = []

  def restore_latest(self, abstract_state):
    """(state, data_state, step) from the newest verified step, or None if there is none.

    `abstract_state` holds `jax.ShapeDtypeStruct`s with shardings: arrays are restored straight
    onto the current mesh, whatever mesh they were saved from.
    """
    return self._restore_newest(lambda step: self._restore_state(step, abstract_state),
                                on_error=_CheckpointMismatch)

  def restore_params(self, abstract_params):
    """(params, step) from the newest verified step: the parameters only, for generation or for
    starting a later stage. From an RL checkpoint ({'policy': ..., 'value': ...}) this is the
    policy. None if there is no checkpoint."""
    def restore(step):
      saved = self._manager.item_metadata(step)['state'].tree['params']
      is_rl = 'policy' in saved and 'policy' not in abstract_params
      _check_shapes(saved['policy'] if is_rl else saved, abstract_params,
                    self.directory / str(step))
      item = {'policy': abstract_params} if is_rl else abstract_params
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=_pytree_restore({'params': item}, partial=True)))
      params = restored['state']['params']
      return (params['policy'] if is_rl else params), step
    return self._restore_newest(restore, on_error=_CheckpointMismatch)

  def _restore_state(self, step, abstract_state):
    # Another model in the same workdir (a changed config) is the user's error, not damage.
    _check_shapes(self._manager.item_metadata(step)['state'].tree, abstract_state,
                  self.directory / str(step), prefix='')
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=_pytree_restore(abstract_state), data=ocp.args.JsonRestore()))
    return restored['state'], from_json(restored['data']), step

  def _restore_newest(self, restore, on_error=()):
    for step in sorted(self._manager.all_steps(), reverse=True):
      problem = verify(self.directory / str(step))
      if problem is None:
        try:
          return restore(step)
        except on_error:
          raise
        except Exception as e:  # pylint: disable=broad-except
          problem = f'restore failed: {e}'
      self._set_aside(step, problem)
    return None

  def _set_aside(self, step: int, problem: str) -> None:
    aside = self.directory.parent / f'{self.directory.name}_rejected' / f'{step}-{int(time.time())}'
    logging.warning('Checkpoint %s is not usable (%s); moving it to %s and trying an older one.',
                    self.directory / str(step), problem, aside)
    if jax.process_index() == 0:
      aside.parent.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'jaxlm_checkpoint_set_aside_{step}')
    self._manager.reload()

  def close(self) -> None:
    self.wait()
    self._manager.close()
