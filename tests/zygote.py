"""Runs many `python -m experiments.<binary>` processes, each forked from one that has already
imported the libraries they share, so that a case costs its own work, not 3-4 s of imports.

A child is a fresh process as far as the binary can tell: it imports the binary as `__main__`
(its flags are defined in the child alone), with its own argv, stdout and stderr, and exits with
the binary's status. Nothing here initialises a JAX backend or starts a thread before forking.

Reads a JSON list of jobs `{"argv": [...], "stdout": path, "stderr": path}` on stdin, runs them
`--parallel` at a time, and writes a JSON list of `{"returncode": int | null, "seconds": float}`
(null: killed after `--timeout` seconds).
"""

import argparse
import atexit
import importlib
import json
import os
import pkgutil
import runpy
import signal
import sys
import threading
import time
import traceback


def preload():
  import jaxlm  # pylint: disable=g-import-not-at-top
  for module in pkgutil.walk_packages(jaxlm.__path__, 'jaxlm.'):
    importlib.import_module(module.name)
  if threading.active_count() != 1:
    raise RuntimeError(f'threads before fork: {threading.enumerate()}')


def run_in_child(job) -> None:
  """Becomes `python -m <module> <args>`; never returns."""
  for fd, path in ((1, job['stdout']), (2, job['stderr'])):
    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
  module_flag, module, *args = job['argv']
  assert module_flag == '-m', job['argv']
  sys.argv = [module, *args]
  status = 0
  try:
    runpy.run_module(module, run_name='__main__', alter_sys=True)
  except SystemExit as e:
    if isinstance(e.code, int) or e.code is None:
      status = e.code or 0
    else:
      print(e.code, file=sys.stderr)
      status = 1
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
    status = 1
  atexit._run_exitfuncs()  # pylint: disable=protected-access
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)  # pylint: disable=protected-access


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--parallel', type=int, default=2)
  parser.add_argument('--timeout', type=float, default=60)
  options = parser.parse_args()
  jobs = json.load(sys.stdin)
  preload()
  results = [None] * len(jobs)
  running = {}  # pid: (job index, start)
  pending = list(range(len(jobs)))
  while pending or running:
    while pending and len(running) < options.parallel:
      index = pending.pop(0)
      sys.stdout.flush()
      sys.stderr.flush()
      pid = os.fork()
      if pid == 0:
        run_in_child(jobs[index])
      running[pid] = (index, time.perf_counter())
    pid, status = os.waitpid(-1, os.WNOHANG)
    if pid:
      index, start = running.pop(pid)
      results[index] = {'returncode': os.waitstatus_to_exitcode(status),
                        'seconds': time.perf_counter() - start}
      continue
    for pid, (index, start) in running.items():
      if time.perf_counter() - start > options.timeout:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        results[index] = {'returncode': None, 'seconds': time.perf_counter() - start}
        del running[pid]
        break
    else:
      time.sleep(0.02)
  json.dump(results, sys.stdout)


if __name__ == '__main__':
  main()
