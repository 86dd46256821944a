r"""Reward-model over-optimisation (Gao et al., 2022), measured: PPO against a learned reward
model with a loose KL leash, the proxy (the reward model's normalised score) and the gold reward
(the world's own verdict: right answer, right refusal, right abstention) of greedy held-out
replies recorded against their KL to the SFT model, for reward models trained for several
lengths.

  python -m experiments.overoptimization --workdir=runs/overopt \
      --config.base_workdir=runs/pipeline/base

A short SFT of the pretrained base is trained in `<workdir>/sft` (or `--config.init_workdir`
names an SFT workdir to start from); each length's reward model is trained from it in
`<workdir>/rm_<steps>` and its PPO run in `<workdir>/ppo_<steps>`; rerunning resumes (finished
runs are not retrained). Writes `overoptimization.json` (every evaluation and each curve's gold
peak), `overoptimization.md` (the tables) and `overoptimization.png` (proxy and gold against KL)
to the workdir.
"""

import json
import os
import time

from experiments import reward_model
from experiments import rl as rl_binary
from experiments import sft
from jaxlm import cli
from jaxlm import locking
from jaxlm import metrics
from jaxlm.errors import UserError

# Curve columns: name -> the PPO evaluation's metric. The rates say how the replies changed.
CURVE = {'kl': 'eval/kl', 'proxy': 'eval/mean_reward', 'gold': 'eval/gold_reward',
         'exact_match': 'eval/exact_match', 'refusal_rate': 'eval/refusal_rate',
         'over_refusal_rate': 'eval/over_refusal_rate',
         'hallucination_rate': 'eval/hallucination_rate'}


def sft_stage(config, workdir: str):
  """(The SFT workdir that the reward models and PPO start from, the config that trains it there
  or None when `config.init_workdir` names one); raises UserError if it is invalid."""
  if config.init_workdir:
    return config.init_workdir, None
  if not config.base_workdir:
    raise UserError('config.base_workdir must name a pretrained workdir to fine-tune (e.g. '
                    'runs/pipeline/base), or config.init_workdir an SFT workdir to start from')
  stage_config = config.sft.copy_and_resolve_references()
  stage_config.init_workdir = config.base_workdir
  try:
    sft.validate(stage_config.copy_and_resolve_references())
  except UserError as e:
    raise UserError(f'config.sft: {e}') from e
  return os.path.join(workdir, 'sft'), stage_config


def run_configs(config, init_workdir: str, workdir: str) -> dict[int, tuple]:
  """{reward-model steps: (reward-model config, PPO config)}, all starting from `init_workdir`;
  raises UserError before anything trains if one of them is invalid."""
  lengths = tuple(config.reward_model_steps)
  if not lengths or not all(isinstance(s, int) and s > 0 for s in lengths):
    raise UserError(f'config.reward_model_steps must be one or more positive step counts, e.g. '
                    f'(25, 100, 400); got {lengths!r}')
  if len(set(lengths)) < len(lengths):
    raise UserError(f'config.reward_model_steps: {lengths!r} repeats a length')
  runs = {}
  for steps in lengths:
    rm_config = config.reward_model.copy_and_resolve_references()
    rm_config.init_workdir = init_workdir
    # A short run would spend most of its steps warming up.
    rm_config.train.update(steps=steps,
                           warmup_steps=min(rm_config.train.warmup_steps, max(1, steps // 5)))
    ppo_config = config.ppo.copy_and_resolve_references()
    ppo_config.update(init_workdir=init_workdir,
                      reward_workdir=os.path.join(workdir, f'rm_{steps}'))
    for stage, binary, stage_config in (('reward_model', reward_model, rm_config),
                                        ('ppo', rl_binary, ppo_config)):
      try:
        binary.validate(stage_config.copy_and_resolve_references())
      except UserError as e:
        raise UserError(f'config.{stage}: {e}') from e
    runs[steps] = rm_config, ppo_config
  return runs


def train_once(binary, config, run_workdir: str) -> float:
  """Trains (or resumes) a run unless an earlier launch finished it; returns its wall seconds,
  as of the launch that finished it."""
  timing_path = os.path.join(run_workdir, 'wall_seconds.json')
  if os.path.exists(timing_path):
    metrics.log(f'{run_workdir}: finished earlier, reusing it.')
    with open(timing_path, encoding='utf-8') as f:
      return json.load(f)
  start = time.time()
  with locking.hold(run_workdir):
    binary.train_and_evaluate(config, run_workdir)  # SIGTERM ends the program here
  seconds = time.time() - start
  with open(timing_path, 'w', encoding='utf-8') as f:
    json.dump(seconds, f)
  return seconds


def curve(ppo_workdir: str) -> list[dict]:
  """Every evaluation of a PPO run, in step order: its step and the `CURVE` columns it logged."""
  points = [{'step': r['step'], **{name: r[key] for name, key in CURVE.items() if key in r}}
            for r in metrics.read(ppo_workdir) if 'eval/gold_reward' in r]
  if not points:
    raise UserError(f'{ppo_workdir} logged no eval/gold_reward: the PPO evaluation prompts need '
                    'reference answers (config.ppo.data)')
  return points


def gold_peak(points: list[dict]) -> dict:
  """Where gold peaks (the first evaluation at its maximum), and how proxy and gold moved from
  there to the end: over-optimisation is the proxy rising while gold falls."""
  peak = max(points, key=lambda p: p['gold'])
  end = points[-1]
  return dict(step=peak['step'], kl=peak['kl'], gold=peak['gold'], proxy=peak['proxy'],
              gold_start=points[0]['gold'], gold_end=end['gold'], kl_end=end['kl'],
              proxy_change_after_peak=end['proxy'] - peak['proxy'],
              gold_change_after_peak=end['gold'] - peak['gold'])


def reward_model_accuracy(rm_workdir: str) -> float:
  """The reward model's final held-out pairwise accuracy."""
  return [r for r in metrics.read(rm_workdir) if 'eval/pairwise_accuracy' in r][-1][
      'eval/pairwise_accuracy']


def format_tables(variants: list[dict]) -> str:
  """Markdown: each variant's gold peak and divergence, then every evaluation."""
  lines = ['| reward model | RM accuracy | gold at start | gold peak | at step | KL at peak | '
           'gold at end | KL at end | proxy peak->end | gold peak->end | RM s | PPO s |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for v in variants:
    p = v['peak']
    lines.append(
        f'| {v["reward_model_steps"]} steps | {v["reward_model_accuracy"]:.3f} | '
        f'{p["gold_start"]:.3f} | {p["gold"]:.3f} | {p["step"]} | {p["kl"]:.3f} | '
        f'{p["gold_end"]:.3f} | {p["kl_end"]:.3f} | {p["proxy_change_after_peak"]:+.3f} | '
        f'{p["gold_change_after_peak"]:+.3f} | {v["wall_seconds"]["reward_model"]:.0f} | '
        f'{v["wall_seconds"]["ppo"]:.0f} |')
  lines += ['', '| reward model | step | ' + ' | '.join(CURVE) + ' |',
            '|---|---|' + '---|' * len(CURVE)]
  for v in variants:
    for point in v['curve']:
      cells = [f'{point[name]:.3f}' if name in point else '' for name in CURVE]
      lines.append(f'| {v["reward_model_steps"]} steps | {point["step"]} | '
                   + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot(variants: list[dict], path: str) -> None:
  """Writes a PNG of proxy (left) and gold (right) against KL to the SFT model, one colour per
  reward model, a star at each gold peak."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')  # files only: no display on a server
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  figure, (proxy_axes, gold_axes) = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
  colors = plt.cm.viridis([0.9 * i / max(len(variants) - 1, 1) for i in range(len(variants))])
  for v, color in zip(variants, colors):
    kl = [p['kl'] for p in v['curve']]
    label = f'RM {v["reward_model_steps"]} steps (acc {v["reward_model_accuracy"]:.2f})'
    for axes, name in ((proxy_axes, 'proxy'), (gold_axes, 'gold')):
      axes.plot(kl, [p[name] for p in v['curve']], 'o-', color=color, label=label)
      axes.plot(v['peak']['kl'], v['peak'][name], '*', color=color, markersize=15,
                markeredgecolor='black')
  proxy_axes.set(xlabel='KL to SFT (nats per reply)',
                 ylabel='proxy: reward model score (normalised)')
  gold_axes.set(xlabel='KL to SFT (nats per reply)', ylabel='gold: share of replies right')
  proxy_axes.set_title('proxy reward', fontsize='medium')
  gold_axes.set_title('gold reward (stars: its peak)', fontsize='medium')
  gold_axes.legend(fontsize='small')
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)


def main(config, workdir: str) -> dict:
  start = time.time()
  init_workdir, stage_config = sft_stage(config, workdir)
  runs = run_configs(config, init_workdir, workdir)
  sft_seconds = 0.0
  if stage_config is not None:
    metrics.log(f'== SFT of {config.base_workdir} ==')
    sft_seconds = train_once(sft, stage_config, init_workdir)
  variants = []
  for index, (steps, (rm_config, ppo_config)) in enumerate(runs.items()):
    metrics.log(f'== reward model of {steps} steps, then PPO against it ({index + 1} of '
                f'{len(runs)}) ==')
    rm_workdir, ppo_workdir = (os.path.join(workdir, f'{kind}_{steps}') for kind in ('rm', 'ppo'))
    wall_seconds = {'reward_model': train_once(reward_model, rm_config, rm_workdir),
                    'ppo': train_once(rl_binary, ppo_config, ppo_workdir)}
    points = curve(ppo_workdir)
    variants.append(dict(reward_model_steps=steps,
                         reward_model_accuracy=reward_model_accuracy(rm_workdir),
                         curve=points, peak=gold_peak(points), wall_seconds=wall_seconds))
  report = dict(variants=variants, kl_coef=config.ppo.kl.coef, init_workdir=init_workdir,
                sft_wall_seconds=sft_seconds,
                wall_seconds=sft_seconds + sum(sum(v['wall_seconds'].values()) for v in variants))
  tables = format_tables(variants)
  with open(os.path.join(workdir, 'overoptimization.json'), 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=2)
  with open(os.path.join(workdir, 'overoptimization.md'), 'w', encoding='utf-8') as f:
    f.write(tables + '\n')
  plot(variants, os.path.join(workdir, 'overoptimization.png'))
  print(tables)
  for v in variants:
    p = v['peak']
    print(f'reward model of {v["reward_model_steps"]} steps: gold peaks at step {p["step"]} '
          f'(KL {p["kl"]:.3f}) at {p["gold"]:.3f}; from there to the end proxy '
          f'{p["proxy_change_after_peak"]:+.3f}, gold {p["gold_change_after_peak"]:+.3f}')
  print(f'wall time: {report["wall_seconds"]:.0f} s training and evaluating the runs (as of the '
        f'launches that finished them); this launch {time.time() - start:.0f} s. Wrote '
        f'overoptimization.json, .md and .png to {workdir}')
  return report


if __name__ == '__main__':
  cli.run(main, 'experiments/configs/overoptimization.py')
