r"""Compute-optimal scaling: trains a ladder of model widths x token budgets, fits
L(N, D) = E + A / N^alpha + B / D^beta to their final eval losses and splits
`config.budget_flops` between parameters and tokens where the fit is lowest.

  python -m experiments.scaling --workdir=/tmp/scaling

Each run is an ordinary pretraining run in `<workdir>/runs/<width>_<steps>`; rerunning reuses
finished runs and resumes the others. All runs share one TFDS data dir and one tokenizer. Writes
`scaling.json` (every run and the fit) and `iso_flops.png` to the workdir.
"""

import json
import os
import time

import ml_collections

from experiments import pretrain
from jaxlm import cli
from jaxlm import configs
from jaxlm import distributed
from jaxlm import lm
from jaxlm import metrics
from jaxlm import scaling
from jaxlm.data import pipeline
from jaxlm.errors import UserError


def run_configs(config, workdir: str,
                tokenizer_path: str) -> dict[str, ml_collections.ConfigDict]:
  """{run name: pretraining config} for every width x length of the ladder; raises ValueError
  before anything trains if one of them is invalid."""
  ladder, head_dim = config.ladder, config.model.head_dim
  runs = {}
  for d_model in ladder.d_models:
    if d_model % head_dim:
      raise UserError(f'config.ladder.d_models: {d_model} is not a multiple of '
                       f'config.model.head_dim ({head_dim})')
    for steps in ladder.steps:
      c = config.copy_and_resolve_references()
      with c.unlocked():
        del c.ladder, c.budget_flops  # a plain pretraining config, which later stages can load
      c.model.update(d_model=d_model, num_heads=d_model // head_dim,
                     num_kv_heads=d_model // head_dim, mlp_dim=ladder.mlp_ratio * d_model)
      c.train.update(steps=steps, warmup_steps=max(1, round(ladder.warmup_fraction * steps)))
      c.data.data_dir = config.data.data_dir or os.path.join(workdir, 'tfds')
      c.tokenizer.path = tokenizer_path
      configs.validate(c, {'data.source': pipeline.SOURCES})
      runs[f'd{d_model}_{steps}'] = c
  return runs


def final_eval_loss(run_workdir: str, steps: int) -> float | None:
  """The eval loss logged at `steps` in the run's metrics.jsonl; None until it gets there."""
  path = os.path.join(run_workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    records = [json.loads(line) for line in f]
  final = [r['eval/loss'] for r in records if r['step'] == steps and 'eval/loss' in r]
  return final[-1] if final else None


def train_ladder(config, workdir: str) -> list[dict] | None:
  """Trains (or reuses) every run; returns their N, D, L, FLOPs and wall seconds, or None when a
  run stopped early (SIGTERM), so that the ladder resumes on the next launch."""
  # One tokenizer for every run, so that their losses (nats per token) are comparable.
  tokenizer_path = config.tokenizer.path or os.path.join(workdir, 'tokenizer.model')
  ladder = run_configs(config, workdir, tokenizer_path)
  train_docs, _ = pipeline.text_sources(
      config.data, config.data.data_dir or os.path.join(workdir, 'tfds'))
  tokenizer = lm.tokenizer_for(config, workdir, train_docs)
  results = []
  for index, (name, run_config) in enumerate(ladder.items()):
    run_workdir = os.path.join(workdir, 'runs', name)
    steps = run_config.train.steps
    timing_path = os.path.join(run_workdir, 'wall_seconds.json')
    if final_eval_loss(run_workdir, steps) is None:
      metrics.log(f'== {name}: run {index + 1} of {len(ladder)} ==')
      start = time.time()
      state = pretrain.train_and_evaluate(run_config, run_workdir)
      if int(state.step) < steps:
        metrics.log(f'{name} stopped at step {int(state.step)} of {steps}; rerun to resume.')
        return None
      if distributed.is_main():
        with open(timing_path, 'w', encoding='utf-8') as f:
          json.dump(time.time() - start, f)  # of the launch that finished it
    else:
      metrics.log(f'{name}: finished earlier, reusing it.')
    model_config = lm.model_config(run_config, tokenizer)
    # N counts non-embedding parameters (Kaplan et al.): the layers and final norm, from the
    # ModelConfig fields; D is every token trained on.
    N = model_config.num_params(include_embeddings=False)
    D = steps * run_config.train.batch_size * run_config.data.seq_len
    wall_seconds = None
    if os.path.exists(timing_path):
      with open(timing_path, encoding='utf-8') as f:
        wall_seconds = json.load(f)
    results.append(dict(name=name, d_model=run_config.model.d_model, steps=steps, N=N, D=D,
                        L=final_eval_loss(run_workdir, steps), flops=6 * N * D,
                        wall_seconds=wall_seconds))
  return results


def fit_and_report(config, workdir: str, runs: list[dict]) -> dict:
  """Fits the law, logs it with the compute-optimal split of `config.budget_flops`, and writes
  `scaling.json` and `iso_flops.png`; returns what scaling.json holds."""
  law = scaling.fit_loss_law([r['N'] for r in runs], [r['D'] for r in runs],
                             [r['L'] for r in runs])
  N_opt, D_opt = (float(x) for x in scaling.compute_optimal(law, config.budget_flops))
  optimum = dict(N=N_opt, D=D_opt, tokens_per_parameter=D_opt / N_opt,
                 L=float(law.predict(N_opt, D_opt)))
  metrics.log(f'{"run":>10} {"N":>9} {"D":>9} {"6ND":>9} {"eval loss":>9} {"fit":>7} '
              f'{"seconds":>7}')
  for r in runs:
    seconds = '?' if r['wall_seconds'] is None else f'{r["wall_seconds"]:.0f}'
    metrics.log(f'{r["name"]:>10} {r["N"]:9.3g} {r["D"]:9.3g} {r["flops"]:9.3g} {r["L"]:9.4f} '
                f'{law.predict(r["N"], r["D"]):7.4f} {seconds:>7}')
  metrics.log(f'fit: L = {law.E:.4g} + {law.A:.4g} / N^{law.alpha:.3f} + '
              f'{law.B:.4g} / D^{law.beta:.3f}')
  metrics.log(f'compute-optimal at C = {config.budget_flops:.3g} FLOPs: N = {N_opt:.3g}, '
              f'D = {D_opt:.3g} tokens, N:D = 1:{D_opt / N_opt:.3g}, predicted loss '
              f'{optimum["L"]:.4f}')
  report = dict(runs=runs, fit=dict(E=law.E, A=law.A, B=law.B, alpha=law.alpha, beta=law.beta),
                budget_flops=config.budget_flops, compute_optimal=optimum)
  if distributed.is_main():
    with open(os.path.join(workdir, 'scaling.json'), 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=2)
    scaling.plot_iso_flops(law, runs, os.path.join(workdir, 'iso_flops.png'))
    metrics.log(f'wrote {os.path.join(workdir, "scaling.json")} and iso_flops.png')
  return report


def main(config, workdir: str) -> dict | None:
  if not config.budget_flops > 0:
    raise UserError(f'config.budget_flops must be positive, got {config.budget_flops!r}')
  runs = train_ladder(config, workdir)
  return None if runs is None else fit_and_report(config, workdir, runs)


if __name__ == '__main__':
  cli.run(main, 'experiments/configs/scaling.py')
