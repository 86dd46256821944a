r"""Instruction data, quality vs quantity: does a small clean SFT set beat a large noisy one?

  python -m experiments.sft_data_quality --workdir=runs/sft_quality \
      --config.init_workdir=runs/pipeline/base

SFTs the pretrained `init_workdir` once per (training conversations, label-noise rate) of the
grid, each in `<workdir>/runs/n<size>_noise<rate>` for the same number of steps and evaluated
once, at the end, on the same held-out questions and policy requests. Rerunning reuses finished
runs and resumes the others. Writes `sft_data_quality.json`, `sft_data_quality.md` (the table it
prints) and `sft_data_quality.png` (each metric against the size, a line per noise rate).
"""

import json
import os
import time

import ml_collections

from experiments import sft
from jaxlm import cli
from jaxlm import distributed
from jaxlm import metrics
from jaxlm.errors import UserError

METRICS = ('eval/format_rate', 'eval/exact_match', 'eval/gold_reward', 'eval/refusal_rate',
           'eval/over_refusal_rate', 'eval/hallucination_rate', 'eval/loss')
PLOTTED = ('eval/format_rate', 'eval/exact_match', 'eval/gold_reward')


def run_configs(config) -> dict[str, tuple[int, float, ml_collections.ConfigDict]]:
  """{run name: (conversations, noise rate, SFT config)} over the grid; raises a UserError before
  anything trains if a grid value or a run's config is invalid."""
  grid = config.grid
  if not grid.num_train or not grid.noise:
    raise UserError('config.grid.num_train and config.grid.noise must each list at least one '
                    f'value, got {grid.num_train!r} and {grid.noise!r}')
  for size in grid.num_train:
    if not isinstance(size, int) or size < 1:
      raise UserError(f'config.grid.num_train: {size!r} is not a positive whole number')
  for field, shares in (('noise', grid.noise), ('wrong_share', (grid.wrong_share,))):
    for share in shares:
      if not 0 <= share <= 1:
        raise UserError(f'config.grid.{field}: {share!r} is not in [0, 1]')
  runs = {}
  for size in grid.num_train:
    for rate in grid.noise:
      c = config.copy_and_resolve_references()
      with c.unlocked():
        del c.grid  # a plain SFT config, which later stages can load
        c.data.update(num_train=size, noise_wrong=rate * grid.wrong_share,
                      noise_off_format=rate * (1 - grid.wrong_share))
      sft.validate(c)
      runs[f'n{size}_noise{rate:g}'] = (size, rate, c)
  return runs


def final_record(run_workdir: str, steps: int) -> dict | None:
  """The run's metrics.jsonl record of its final evaluation; None until it has one."""
  final = [r for r in metrics.read(run_workdir) if r['step'] == steps and 'eval/exact_match' in r]
  return final[-1] if final else None


def train_grid(config, workdir: str) -> list[dict]:
  """Trains (or reuses) every run; returns each one's final metrics and wall seconds."""
  runs = run_configs(config)
  cells = []
  for index, (name, (size, rate, run_config)) in enumerate(runs.items()):
    run_workdir = os.path.join(workdir, 'runs', name)
    timing_path = os.path.join(run_workdir, 'wall_seconds.json')
    if final_record(run_workdir, config.train.steps) is None:
      metrics.log(f'== {name}: run {index + 1} of {len(runs)} ==')
      start = time.time()
      sft.train_and_evaluate(run_config, run_workdir)
      metrics.log(f'{name}: {time.time() - start:.0f} s')
      if distributed.is_main():
        with open(timing_path, 'w', encoding='utf-8') as f:
          json.dump(time.time() - start, f)  # of the launch that finished it
    else:
      metrics.log(f'{name}: finished earlier, reusing it.')
    wall_seconds = None
    if os.path.exists(timing_path):
      with open(timing_path, encoding='utf-8') as f:
        wall_seconds = json.load(f)
    record = final_record(run_workdir, config.train.steps)
    cells.append(dict(name=name, num_train=size, noise=rate,
                      noise_wrong=run_config.data.noise_wrong,
                      noise_off_format=run_config.data.noise_off_format,
                      **{m.split('/')[1]: record.get(m) for m in METRICS},
                      wall_seconds=wall_seconds))
  return cells


def format_table(cells: list[dict]) -> str:
  """A markdown table, one row per run; a metric the run did not log is left blank."""
  names = ['conversations', 'noise', *(m.split('/')[1] for m in METRICS), 'seconds']
  widths = [max(len(name), 6) for name in names]
  header = '| ' + ' | '.join(f'{n:>{w}}' for n, w in zip(names, widths)) + ' |'
  lines = [header, '|' + '|'.join('-' * len(c) for c in header.split('|')[1:-1]) + '|']
  for cell in cells:
    values = [f'{cell["num_train"]:>{widths[0]}}', f'{cell["noise"]:{widths[1]}.2f}']
    for name, width in zip(names[2:-1], widths[2:-1]):
      values.append(' ' * width if cell[name] is None else f'{cell[name]:{width}.3f}')
    seconds = '?' if cell['wall_seconds'] is None else f'{cell["wall_seconds"]:.0f}'
    values.append(f'{seconds:>{widths[-1]}}')
    lines.append('| ' + ' | '.join(values) + ' |')
  return '\n'.join(lines)


def plot(cells: list[dict], steps: int, path: str) -> None:
  """Writes a PNG with a panel per plotted metric: the metric against the number of training
  conversations (log scale), a line per noise rate."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')  # files only: no display on a server
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  figure, axes = plt.subplots(1, len(PLOTTED), figsize=(5 * len(PLOTTED), 4))
  for axis, metric in zip(axes, PLOTTED):
    name = metric.split('/')[1]
    for rate in sorted({c['noise'] for c in cells}):
      line = sorted((c['num_train'], c[name]) for c in cells if c['noise'] == rate)
      axis.plot(*zip(*line), marker='o', label=f'noise {rate:g}')
    sizes = sorted({c['num_train'] for c in cells})
    axis.set(xscale='log', xlabel='training conversations', ylabel=name, ylim=(-0.02, 1.02),
             title=f'held-out {name} after {steps} SFT steps')
    axis.set_xticks(sizes, [f'{s:,}' for s in sizes])
    axis.minorticks_off()
    axis.grid(alpha=0.3)
  axes[0].legend()
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)


def main(config, workdir: str) -> dict:
  start = time.time()
  cells = train_grid(config, workdir)
  table = format_table(cells)
  report = dict(cells=cells, steps=config.train.steps, batch_size=config.train.batch_size,
                wall_seconds=time.time() - start)
  if distributed.is_main():
    paths = {ext: os.path.join(workdir, f'sft_data_quality.{ext}') for ext in ('json', 'md', 'png')}
    with open(paths['json'], 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=2)
    with open(paths['md'], 'w', encoding='utf-8') as f:
      f.write(table + '\n')
    plot(cells, config.train.steps, paths['png'])
    print(table)
    print(f'{len(cells)} runs; this launch took {report["wall_seconds"]:.0f} s (`seconds`: each '
          f'run in the launch that finished it). Also in {paths["json"]}, .md and .png')
  return report


if __name__ == '__main__':
  cli.run(main, 'experiments/configs/sft_data_quality.py')
