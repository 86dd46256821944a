r"""Multi-step arithmetic on a scratchpad: pretraining on single-step facts and worked 2-digit
sums and chains -> SFT on a few worked examples (3-digit sums among them) -> GRPO on problems of
the RL split, ending with a table of held-out accuracy (greedy) before and after RL, a few
replies to the same problems after each stage, and each stage's wall time summed over the
launches that resumed it (also in `summary.json`).

  python -m experiments.reasoning --workdir=runs/reasoning

The data (`jaxlm.data.reasoning`) is written as JSONL under `<workdir>/data` and read by the
ordinary binaries; stages live in `<workdir>/<stage>`, and rerunning resumes.
"""

import json
import os

import flax.linen as nn
import jax
from absl import flags

from experiments import pretrain
from experiments import rl as rl_binary
from experiments import sft
from jaxlm import cli
from jaxlm import lm
from jaxlm import locking
from jaxlm import metrics
from jaxlm import perf
from jaxlm import sharding
from jaxlm.data import reasoning
from jaxlm.errors import UserError

EVALUATED_STAGES = ('sft', 'grpo')


def write_data(data_config, data_dir: str) -> dict[str, str]:
  """Every stage's data as JSONL files; returns {name: path}."""
  world = world_config(data_config)
  records = {
      'pretrain_train': [{'text': d} for d in reasoning.documents(
          world, 'train', data_config.num_pretrain_docs)],
      'pretrain_validation': [{'text': d} for d in reasoning.documents(
          world, 'validation', data_config.num_validation_docs)],
      'sft_train': [reasoning.conversation(p) for p in reasoning.problems(
          world, 'train', data_config.num_sft)],
      'rl_train': [reasoning.prompt(p) for p in reasoning.problems(
          world, 'rl', data_config.num_rl)],
  }
  heldout = held_out_problems(data_config)
  records['sft_eval'] = [reasoning.conversation(p) for p in heldout]
  records['heldout'] = [reasoning.prompt(p) for p in heldout]
  os.makedirs(data_dir, exist_ok=True)
  paths = {}
  for name, rows in records.items():
    paths[name] = os.path.join(data_dir, f'{name}.jsonl')
    with open(paths[name], 'w', encoding='utf-8') as f:
      f.writelines(json.dumps(row) + '\n' for row in rows)
  return paths


def world_config(data_config) -> reasoning.ReasoningConfig:
  return reasoning.ReasoningConfig(seed=data_config.seed,
                                   worked_fraction=data_config.worked_fraction,
                                   worked_kinds=tuple(data_config.worked_kinds))


def held_out_problems(data_config) -> list[reasoning.Problem]:
  """The same `num_eval_per_kind` held-out problems of each kind, distinct, for every stage."""
  world = world_config(data_config)
  problems = []
  for kind in reasoning.KINDS:
    unique = list(dict.fromkeys(reasoning.problems(world, 'heldout',
                                                   4 * data_config.num_eval_per_kind, (kind,))))
    problems += unique[:data_config.num_eval_per_kind]
  return problems


def stage_configs(config, workdir: str, paths: dict[str, str]) -> dict:
  """{stage: its binary's config} with the data files and starting workdirs filled in."""
  dirs = {stage: os.path.join(workdir, stage) for stage in ('base', 'sft', 'grpo')}
  c = config.copy_and_resolve_references()
  c.pretrain.data.update(files=paths['pretrain_train'],
                         validation_files=paths['pretrain_validation'])
  c.sft.update(init_workdir=dirs['base'])
  c.sft.data.update(jsonl_train=paths['sft_train'], jsonl_eval=paths['sft_eval'])
  c.grpo.update(init_workdir=dirs['sft'])
  c.grpo.data.update(jsonl_train=paths['rl_train'], jsonl_eval='')
  return {'pretrain': (c.pretrain, dirs['base'], pretrain),
          'sft': (c.sft, dirs['sft'], sft), 'grpo': (c.grpo, dirs['grpo'], rl_binary)}


def evaluate(config, workdir: str, prompts: list[dict]) -> dict:
  """Greedy replies of each evaluated stage to the held-out prompts: accuracy per kind and over
  all, the share of replies that end with an answer, and a few replies of each kind, to the same
  problems at every stage (first those whose verdict RL changed)."""
  r = config.report
  _, tokenizer, model = lm.load_workdir(os.path.join(workdir, 'sft'))
  mesh = sharding.make_mesh(config.sft.mesh)
  replies, correct = {}, {}
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    for stage in EVALUATED_STAGES:
      params = lm.load_params(os.path.join(workdir, stage), model, mesh)
      replies[stage] = lm.replies(model, params, tokenizer, [p['messages'] for p in prompts],
                                  jax.random.PRNGKey(0), max_new_tokens=r.max_new_tokens,
                                  temperature=0.0, top_k=0, top_p=1.0, batch_size=r.batch_size)
      correct[stage] = [reasoning.final_answer(reply) == p['answer']
                        for reply, p in zip(replies[stage], prompts)]
  first, last = EVALUATED_STAGES[0], EVALUATED_STAGES[-1]
  shown = {}
  for kind in reasoning.KINDS:
    rows = [i for i, p in enumerate(prompts) if p['kind'] == kind]
    changed = [i for i in rows if correct[first][i] != correct[last][i]]
    shown[kind] = (changed + [i for i in rows if i not in changed])[:r.num_replies]
  results = {}
  for stage in EVALUATED_STAGES:
    results[stage] = {
        'format_rate': sum(reasoning.final_answer(reply) is not None
                           for reply in replies[stage]) / len(prompts),
        'accuracy': sum(correct[stage]) / len(prompts), 'replies': {}}
    for kind in reasoning.KINDS:
      rows = [i for i, p in enumerate(prompts) if p['kind'] == kind]
      results[stage][f'accuracy/{kind}'] = sum(correct[stage][i] for i in rows) / len(rows)
      results[stage]['replies'][kind] = [
          (prompts[i]['messages'][0]['content'], replies[stage][i], correct[stage][i])
          for i in shown[kind]]
  return results


def format_report(results: dict, seconds: dict[str, float], num_per_kind: int) -> str:
  columns = [f'accuracy/{k}' for k in reasoning.KINDS] + ['accuracy', 'format_rate']
  header = '| stage | ' + ' | '.join(columns) + ' |'
  lines = [f'Held-out problems ({num_per_kind} of each kind, in no training data), greedy:', '',
           header, '|' + '|'.join('-' * len(c) for c in header.split('|')[1:-1]) + '|']
  for stage, r in results.items():
    lines.append(f'| {stage} | ' + ' | '.join(f'{r[c]:{len(c)}.3f}' for c in columns) + ' |')
  for stage, r in results.items():
    lines.append(f'\nReplies after {stage}:')
    for kind in reasoning.KINDS:
      for question, reply, correct in r['replies'][kind]:
        lines.append(f'  {"right" if correct else "wrong"}  {question} -> {reply}')
  lines.append('\nWall time: ' + ', '.join(f'{s} {t / 60:.1f} min' for s, t in seconds.items()))
  return '\n'.join(lines)


def run(config, workdir: str) -> tuple[dict, dict[str, float]]:
  """Writes the data, trains every stage in order and evaluates them: (results, seconds), each
  stage's seconds summed over the launches that resumed it."""
  paths = write_data(config.data, os.path.join(workdir, 'data'))
  stages = stage_configs(config, workdir, paths)
  for stage, (stage_config, _, binary) in stages.items():  # a bad value fails in seconds
    try:
      binary.validate(stage_config.copy_and_resolve_references())
    except UserError as e:
      raise UserError(f'config.{stage}: {e}') from e
  times = metrics.StageTimes(workdir)
  for stage, (stage_config, stage_dir, binary) in stages.items():
    metrics.log(f'== {stage} ==')
    with times.timing(stage), locking.hold(stage_dir):
      binary.train_and_evaluate(stage_config, stage_dir)
  with times.timing('evaluation'):
    with open(paths['heldout'], encoding='utf-8') as f:
      prompts = [json.loads(line) for line in f]
    results = evaluate(config, workdir, prompts)
  seconds = {**times.seconds, 'total': sum(times.seconds.values())}
  with open(os.path.join(workdir, 'summary.json'), 'w', encoding='utf-8') as f:
    json.dump({'results': results, 'seconds': seconds}, f, indent=2)
  return results, seconds


def main(argv):
  del argv
  metrics.configure_logging()
  workdir, config = _WORKDIR.value, cli.config_value(_CONFIG)
  perf.cache_compilations(workdir)
  with locking.hold(workdir):
    results, seconds = run(config, workdir)
  print(format_report(results, seconds, config.data.num_eval_per_kind))
  print(f'(also in {os.path.join(workdir, "summary.json")})')


if __name__ == '__main__':
  _CONFIG = cli.define_config('experiments/configs/reasoning.py')
  _WORKDIR = flags.DEFINE_string('workdir', 'runs/reasoning', 'Every stage writes below here.')
  cli.start(main)
