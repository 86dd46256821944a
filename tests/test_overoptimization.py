"""Reward-model over-optimisation: a tiny run end to end whose report holds what its PPO run
logged, the peak and divergence on a curve whose answer is known, and one-line user errors."""

import json
import os
import subprocess
import sys

import pytest

from experiments import overoptimization
from experiments.configs import overoptimization as overoptimization_config
from jaxlm import metrics
from jaxlm.errors import UserError
from tests import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(sft_workdir: str = '', base_workdir: str = ''):
  config = overoptimization_config.get_config()
  config.init_workdir = sft_workdir
  config.base_workdir = base_workdir
  config.sft = tiny_config.sft_config('', steps=2)
  # One reward model: a second would only repeat the compilations.
  config.reward_model_steps = (2,)
  config.reward_model = tiny_config.reward_config('', steps=2)
  config.ppo = tiny_config.rl_config('', steps=4, algorithm='ppo', reward='model', eval_every=2,
                                     eval_at_start=True, **{'kl.coef': 0.01})
  return config


def test_the_report_holds_what_the_ppo_run_logged(sft_workdir, tmp_path):
  workdir = str(tmp_path)
  with open(os.path.join(sft_workdir, 'config.json'), encoding='utf-8') as f:
    base_workdir = json.load(f)['init_workdir']  # the fixture's pretrained base
  report = overoptimization.main(_config(base_workdir=base_workdir), workdir)
  # The experiment's own SFT, from the base, is where the reward model and PPO start.
  sft_dir = os.path.join(workdir, 'sft')
  assert report['init_workdir'] == sft_dir
  with open(os.path.join(sft_dir, 'config.json'), encoding='utf-8') as f:
    assert json.load(f)['init_workdir'] == base_workdir
  assert [r['step'] for r in metrics.read(sft_dir) if 'train/loss' in r] == [1, 2]
  [variant] = report['variants']
  assert variant['reward_model_steps'] == 2
  with open(tmp_path / 'ppo_2' / 'metrics.jsonl', encoding='utf-8') as f:
    logged = [r for r in map(json.loads, f) if 'eval/gold_reward' in r]
  # Evaluated at the start and every 2 steps: the curve is exactly what the run logged.
  assert [r['step'] for r in logged] == [p['step'] for p in variant['curve']] == [0, 2, 4]
  for record, point in zip(logged, variant['curve']):
    assert (point['kl'], point['proxy'], point['gold']) == (
        record['eval/kl'], record['eval/mean_reward'], record['eval/gold_reward'])
  assert variant['curve'][0]['kl'] == 0.0  # at step 0 the policy is the SFT model itself
  golds = [p['gold'] for p in variant['curve']]
  best, end = variant['curve'][golds.index(max(golds))], variant['curve'][-1]
  peak = variant['peak']
  assert (peak['step'], peak['kl'], peak['gold']) == (best['step'], best['kl'], best['gold'])
  assert peak['proxy_change_after_peak'] == end['proxy'] - best['proxy']
  with open(tmp_path / 'rm_2' / 'metrics.jsonl', encoding='utf-8') as f:
    final = json.loads(f.readlines()[-1])
  assert variant['reward_model_accuracy'] == final['eval/pairwise_accuracy']
  for stage in ('rm_2', 'ppo_2'):
    with open(tmp_path / stage / 'config.json', encoding='utf-8') as f:
      assert json.load(f)['init_workdir'] == sft_dir
  with open(tmp_path / 'ppo_2' / 'config.json', encoding='utf-8') as f:
    assert json.load(f)['reward_workdir'] == os.path.join(workdir, 'rm_2')
  assert report['wall_seconds'] == report['sft_wall_seconds'] + sum(
      variant['wall_seconds'].values())
  assert report['sft_wall_seconds'] > 0
  with open(tmp_path / 'overoptimization.json', encoding='utf-8') as f:
    assert json.load(f) == report
  assert (tmp_path / 'overoptimization.md').read_text().count('| 2 steps |') == 1 + 3
  assert (tmp_path / 'overoptimization.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

  # A rerun reuses the finished runs: the same numbers, nothing retrained.
  assert overoptimization.main(_config(base_workdir=base_workdir), workdir) == report


def _point(step, kl, proxy, gold):
  return dict(step=step, kl=kl, proxy=proxy, gold=gold)


def test_gold_peaks_at_its_first_maximum_and_the_divergence_is_measured_from_there(tmp_path):
  points = [_point(0, 0.0, 0.1, 0.50), _point(10, 0.4, 0.3, 0.60), _point(20, 0.9, 0.5, 0.55),
            _point(30, 1.5, 0.6, 0.60), _point(40, 2.5, 0.9, 0.40)]
  peak = overoptimization.gold_peak(points)
  assert (peak['step'], peak['kl'], peak['gold'], peak['proxy']) == (10, 0.4, 0.60, 0.3)
  assert (peak['gold_start'], peak['gold_end'], peak['kl_end']) == (0.50, 0.40, 2.5)
  assert peak['proxy_change_after_peak'] == pytest.approx(0.9 - 0.3)
  assert peak['gold_change_after_peak'] == pytest.approx(0.40 - 0.60)
  # Two reward models: a summary row and a row per evaluation each, and a curve each in the plot.
  variants = [dict(reward_model_steps=steps, reward_model_accuracy=0.9, curve=points, peak=peak,
                   wall_seconds={'reward_model': 1.0, 'ppo': 2.0}) for steps in (25, 400)]
  table = overoptimization.format_tables(variants)
  assert table.count('| 25 steps |') == table.count('| 400 steps |') == 1 + len(points)
  assert '| 25 steps | 0.900 | 0.500 | 0.600 | 10 | 0.400 | 0.400 | 2.500 | +0.600 | -0.200 |' \
      in table
  overoptimization.plot(variants, str(tmp_path / 'curve.png'))
  assert (tmp_path / 'curve.png').stat().st_size > 10_000


def test_bad_configs_fail_before_anything_trains(tmp_path):
  with pytest.raises(UserError, match=r'^config\.base_workdir must name a pretrained workdir'):
    overoptimization.main(_config(), str(tmp_path))
  config = _config(base_workdir='runs/base')
  config.sft.data.noise_wrong = 2.0
  with pytest.raises(UserError, match=r'^config\.sft: config\.data\.noise_wrong must be in'):
    overoptimization.main(config, str(tmp_path))
  config = _config('runs/sft')
  config.reward_model_steps = (4, 4)
  with pytest.raises(UserError, match=r'reward_model_steps.*repeats'):
    overoptimization.main(config, str(tmp_path))
  config = _config('runs/sft')
  config.ppo.minibatches = 3  # 16 rollout rows do not split in 3
  with pytest.raises(UserError, match=r'^config\.ppo: .*minibatches'):
    overoptimization.main(config, str(tmp_path))
  assert not os.listdir(tmp_path)


def test_an_empty_variant_list_is_one_line_from_the_command_line(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.overoptimization', f'--workdir={tmp_path}',
       '--config.reward_model_steps=()'],
      cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().splitlines() == [
      'error: config.reward_model_steps must be one or more positive step counts, e.g. '
      '(25, 100, 400); got ()']
