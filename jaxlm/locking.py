"""One writer per workdir: a lock file naming its holder (host, pid, start time, heartbeat).

A second run on a held workdir stops with an error naming the holder. A lock whose holder is
gone is taken over with a warning: on the same host, when its pid no longer runs; from another
host, when its heartbeat is older than `STALE_AFTER_SECONDS`. In a multi-process run process 0
holds the lock for all of them.
"""

import contextlib
import json
import os
import socket
import threading
import time

import jax
from absl import logging

from jaxlm import distributed
from jaxlm.errors import UserError

LOCK_FILE = 'jaxlm.lock'
HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 600.0

_held: dict[str, int] = {}  # lock path -> nesting depth in this process


def _read(path: str) -> dict | None:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _pid_runs(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # runs, as another user
    return True
  return True


def _describe(holder: dict) -> str:
  started = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('started', 0)))
  return f"pid {holder.get('pid')} on {holder.get('host')}, started {started}"


def _why_stale(holder: dict | None, path: str) -> str | None:
  """Why the holder is gone, or None if it may still be running."""
  if holder is None:
    # Unreadable: a holder cut off while writing it, or one writing it right now.
    age = time.time() - os.path.getmtime(path)
    return f'unreadable for {age:.0f} s' if age > HEARTBEAT_SECONDS else None
  if holder.get('host') == socket.gethostname():
    return None if _pid_runs(int(holder.get('pid', -1))) else f'{_describe(holder)} is not running'
  silent = time.time() - float(holder.get('heartbeat', 0))
  if silent > STALE_AFTER_SECONDS:
    return f'{_describe(holder)} has not updated it for {silent:.0f} s'
  return None


def _write(path: str, info: dict, exclusive: bool) -> None:
  if exclusive:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      json.dump(info, f)
  else:
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(info, f)
    os.replace(tmp, path)


def _is_mine(holder: dict | None, info: dict) -> bool:
  return holder is not None and all(holder.get(k) == info[k] for k in ('host', 'pid', 'started'))


def _acquire(workdir: str, path: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  info = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.time()}
  info['heartbeat'] = info['started']
  while True:
    try:
      _write(path, info, exclusive=True)
      return info
    except FileExistsError:
      pass
    holder = _read(path)
    why = _why_stale(holder, path)
    if why is None:
      raise UserError(f'{workdir} is in use by {_describe(holder or {})} (lock file {path}); '
                      'wait for that run to end, or stop it, or use another --workdir')
    # Move it aside before taking over, so two runs that both judge it stale cannot both win:
    # only one rename succeeds, and the exclusive create above decides between the rest.
    aside = f'{path}.stale.{os.getpid()}'
    try:
      os.rename(path, aside)
    except FileNotFoundError:
      continue
    if _read(aside) != holder:  # someone took it over between our read and the rename
      os.rename(aside, path)
      continue
    os.remove(aside)
    logging.warning('Taking over the lock on %s: %s.', workdir, why)
    print(f'warning: taking over the lock on {workdir}: {why}', flush=True)


def _heartbeat(path: str, info: dict, stop: threading.Event) -> None:
  while not stop.wait(HEARTBEAT_SECONDS):
    if not _is_mine(_read(path), info):
      logging.warning('The lock %s is no longer held by this run.', path)
      return
    _write(path, {**info, 'heartbeat': time.time()}, exclusive=False)


@contextlib.contextmanager
def hold(workdir: str):
  """Holds `workdir`'s lock for the duration (re-entrant within a process)."""
  path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
  if '://' in workdir or path in _held:
    # A lock needs an atomic exclusive create, which object stores do not offer.
    _held[path] = _held.get(path, 0) + 1
    try:
      yield
    finally:
      _held[path] -= 1
      if not _held[path]:
        del _held[path]
    return
  info, problem = None, None
  if jax.process_index() == 0:
    try:
      info = _acquire(workdir, path)
    except UserError as e:
      problem = e
  if distributed.any_process(problem is not None):
    raise problem or UserError(f'{workdir}: process 0 could not lock this workdir')
  stop = threading.Event()
  if info is not None:
    threading.Thread(target=_heartbeat, args=(path, info, stop), daemon=True).start()
  _held[path] = 1
  try:
    yield
  finally:
    del _held[path]
    stop.set()
    if info is not None and _is_mine(_read(path), info):
      os.remove(path)
