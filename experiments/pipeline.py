r"""The whole pipeline on the built-in world: pretraining -> SFT -> reward model -> GRPO, PPO
and DPO, each stage starting from the previous one's checkpoint, and the chained assistant
(SFT -> reward model -> PPO -> GRPO on a reward that also scores the policy). Ends with one
table of what each stage achieved (also in `summary.json`) and a report card, `report.md`, with
the table, learning curves (`curves.png`) and each stage's wall time.

  python -m experiments.pipeline --workdir=runs/pipeline

Stages live in `<workdir>/<stage>`; rerunning resumes (finished stages are not retrained).
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import flags

from experiments import dpo
from experiments import pretrain
from experiments import reward_model
from experiments import rl as rl_binary
from experiments import sft
from jaxlm import dpo as dpo_lib
from jaxlm import cli
from jaxlm import lm
from jaxlm import locking
from jaxlm import metrics
from jaxlm import perf
from jaxlm import reward
from jaxlm import rl
from jaxlm import sharding
from jaxlm.data import post_training as data_lib
from jaxlm.data import world as world_lib
from jaxlm.errors import UserError

POLICY_STAGES = ('base', 'sft', 'ppo', 'grpo', 'dpo', 'assistant')
TABLE_ROWS = ('base', 'sft', 'reward_model', 'ppo', 'grpo', 'dpo', 'assistant')
METRICS = ('eval/loss', 'eval/format_rate', 'eval/exact_match', 'eval/pairwise_accuracy',
           'eval/mean_reward', 'eval/kl', 'eval/refusal_rate', 'eval/over_refusal_rate',
           'eval/hallucination_rate', 'eval/gold_reward')


# (stage, its binary, the stage it starts from), in training order.
STAGES = (('sft', sft, 'base'), ('reward_model', reward_model, 'sft'), ('grpo', rl_binary, 'sft'),
          ('ppo', rl_binary, 'sft'), ('assistant', rl_binary, 'ppo'), ('dpo', dpo, 'sft'))


def run_stages(config, workdir: str) -> dict[str, str]:
  """Trains every stage in order; returns {stage: workdir}. Each stage's wall time (summed over
  the runs that resumed it) goes to `<workdir>/timings.json`."""
  dirs = {'base': os.path.join(workdir, 'base'),
          **{stage: os.path.join(workdir, stage) for stage, _, _ in STAGES}}
  times = metrics.StageTimes(workdir)

  def timed(stage, train):
    with times.timing(stage), locking.hold(dirs[stage]):
      train()

  metrics.log('== pretraining ==')
  timed('base', lambda: pretrain.train_and_evaluate(config.pretrain, dirs['base']))
  for stage, binary, init in STAGES:
    metrics.log(f'== {stage} ==')
    stage_config = config[stage]
    with stage_config.unlocked():
      stage_config.init_workdir = dirs[init]
      if 'reward_workdir' in stage_config:
        stage_config.reward_workdir = dirs['reward_model']
    timed(stage, lambda: binary.train_and_evaluate(stage_config, dirs[stage]))
  return dirs


def validate(config, workdir: str) -> None:
  """Every stage's config, checked before pretraining starts, so that a bad value in a later
  stage fails in seconds, not after the stages before it have trained."""
  for stage, binary, _ in (('pretrain', pretrain, None), *STAGES):
    stage_config = config[stage].copy_and_resolve_references()
    if 'reward_workdir' in stage_config:  # as `run_stages` will set it
      stage_config.reward_workdir = os.path.join(workdir, 'reward_model')
    try:
      binary.validate(stage_config)
    except UserError as e:
      raise UserError(f'config.{stage}: {e}') from e


def report(config, dirs: dict[str, str]) -> dict[str, dict[str, float]]:
  """Every policy on the same held-out prompts and pairs: held-out SFT loss, format rate, exact
  match, how often it gives the chosen reply a higher likelihood than the rejected one, the
  normalised reward-model score of its greedy replies and their KL to the SFT model, and the
  refusal, over-refusal and hallucination rates on held-out policy requests."""
  r = config.report
  _, tokenizer, policy = lm.load_workdir(dirs['sft'])
  world_config = lm.load_workdir(dirs['base'])[0].data
  world = world_lib.World(world_lib.WorldConfig(seed=world_config.world_seed))
  conversations = data_lib.world_held_out(data_lib.world_sft_examples, world, r.num_prompts,
                                          r.num_policy_prompts)
  pairs = reward.world_pairs(config.reward_model.data, config.reward_model.seed)(
      world, 'heldout', r.num_pairs)
  critic = reward.reward_model(dirs['reward_model'], policy.config)
  rl_config = ml_collections.ConfigDict(dict(
      algorithm='grpo', reward='model', rollout=dict(prompt_len=r.prompt_len,
                                                     max_new_tokens=r.max_new_tokens),
      eval=dict(num_prompts=r.num_prompts, batch_size=r.batch_size, num_samples=0)))
  mesh = sharding.make_mesh(config.sft.mesh)
  summary = {}
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    reference = lm.load_params(dirs['sft'], policy, mesh)
    scorer = rl.Scorer(rl_config, policy, critic, critic, reference,
                       lm.load_params(dirs['reward_model'], critic, mesh),
                       reward.load_stats(dirs['reward_model']), mesh)
    prompts = [{'messages': c['messages'][:-1], 'answer': c['answer'], 'kind': c['kind']}
               for c in conversations]
    evaluate_replies = rl.make_evaluator(rl_config, tokenizer, policy, scorer, prompts, mesh,
                                         metrics.log)
    loss_batches = lm.fixed_batches(data_lib.packed_conversation_batches(
        data_lib.tokenize_conversations(tokenizer, conversations, r.seq_len)[0], r.seq_len,
        r.batch_size, seed=0, shuffle=False, repeat=False), r.batch_size, r.num_prompts)
    evaluate_loss = lm.make_loss_evaluator(policy, mesh, loss_batches)
    pair_batches = [sharding.put_batch(b, mesh) for b in reward.padded_pair_batches(
        reward.pair_rows(tokenizer, pairs, r.seq_len, 'report'), r.batch_size)]

    @jax.jit
    def prefers_chosen(params, batch):
      chosen, rejected = dpo_lib.pair_log_probs(policy, params, batch)
      return jnp.sum((chosen > rejected) * batch['valid']), jnp.sum(batch['valid'])

    for stage in POLICY_STAGES:
      params = lm.load_params(dirs[stage], policy, mesh)
      results = {**evaluate_loss(params), **evaluate_replies({'policy': params}, 0)}
      counts = jax.device_get([prefers_chosen(params, b) for b in pair_batches])
      results['eval/pairwise_accuracy'] = sum(c for c, _ in counts) / sum(n for _, n in counts)
      summary[stage] = {k: float(results[k]) for k in METRICS}
    rm_final = metrics.read(dirs['reward_model'])[-1]
    summary['reward_model'] = {'eval/pairwise_accuracy': rm_final['eval/pairwise_accuracy']}
  return summary


def format_table(summary) -> str:
  stages = [s for s in TABLE_ROWS if s in summary]
  names = [m.split('/')[1] for m in METRICS]
  widths = [max(len(n), 6) for n in names]
  header = f'| {"stage":<12} | ' + ' | '.join(f'{n:>{w}}' for n, w in zip(names, widths)) + ' |'
  lines = [header, '|' + '|'.join('-' * len(c) for c in header.split('|')[1:-1]) + '|']
  for stage in stages:
    cells = [f'{summary[stage][m]:{w}.3f}' if m in summary[stage] else ' ' * w
             for m, w in zip(METRICS, widths)]
    lines.append(f'| {stage:<12} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


# The report card's learning curves: (panel title, metric, stages drawn).
CURVES = (
    ('training loss', 'train/loss', ('base', 'sft', 'reward_model', 'dpo')),
    ('rollout reward (each stage its own reward)', 'rollout/mean_reward',
     ('grpo', 'ppo', 'assistant')),
    ('rollout KL to the stage\'s reference (nats a reply)', 'rollout/kl',
     ('grpo', 'ppo', 'assistant')),
    ('held-out exact match', 'eval/exact_match', ('sft', 'grpo', 'ppo', 'assistant', 'dpo')),
)
STARTS_FROM = {'base': None, **{stage: init for stage, _, init in STAGES}}  # in training order


def plot_curves(dirs: dict[str, str], path: str) -> None:
  """Each stage's learning curves, read from its metrics.jsonl, as one PNG of four panels."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')  # files only: no display on a server
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  figure, axes = plt.subplots(2, 2, figsize=(11, 8))
  colours = dict(zip(STARTS_FROM, plt.cm.tab10.colors))
  for ax, (title, metric, stages) in zip(axes.flat, CURVES):
    for stage in stages:
      points = [(r['step'], r[metric]) for r in metrics.read(dirs[stage]) if metric in r]
      if points:
        ax.plot(*zip(*points), marker='.' if len(points) < 10 else None, label=stage,
                color=colours[stage])
    ax.set(title=title, xlabel='step of the stage')
    if metric == 'train/loss':
      ax.set_yscale('log')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def report_card(summary, dirs: dict[str, str], workdir: str) -> str:
  """`report.md`: the table, what each stage changed against the stage it started from, the
  learning curves (`curves.png`) and each stage's wall time."""
  plot_curves(dirs, os.path.join(workdir, 'curves.png'))
  timings = metrics.StageTimes(workdir).seconds
  lines = ['# Pipeline report', '',
           'Every policy on the same held-out questions, policy requests and preference pairs.',
           '', format_table(summary), '',
           '## What each stage changed', '',
           '| stage | started from | exact match | refusal | over-refusal | hallucination |'
           ' gold reward |', '|---|---|---|---|---|---|---|']
  changes = ('eval/exact_match', 'eval/refusal_rate', 'eval/over_refusal_rate',
             'eval/hallucination_rate', 'eval/gold_reward')
  for stage in POLICY_STAGES[1:]:
    init = STARTS_FROM[stage]
    cells = [f'{summary[stage][m] - summary[init][m]:+.3f}' for m in changes]
    lines.append(f'| {stage} | {init} | ' + ' | '.join(cells) + ' |')
  lines += ['', '## Learning curves', '', '![learning curves](curves.png)', '',
            '## Wall time', '', '| stage | steps | minutes |', '|---|---|---|']
  for stage in STARTS_FROM:
    records = metrics.read(dirs[stage])
    steps = records[-1]['step'] if records else 0
    lines.append(f'| {stage} | {steps} | {timings.get(stage, 0.0) / 60:.1f} |')
  lines.append(f'| all stages | | {sum(timings.values()) / 60:.1f} |')
  text = '\n'.join(lines) + '\n'
  with open(os.path.join(workdir, 'report.md'), 'w', encoding='utf-8') as f:
    f.write(text)
  return text


def main(argv):
  del argv
  metrics.configure_logging()
  workdir, config = _WORKDIR.value, cli.config_value(_CONFIG)
  validate(config, workdir)
  perf.cache_compilations(workdir)
  with locking.hold(workdir):
    dirs = run_stages(config, workdir)
    summary = report(config, dirs)
    with open(os.path.join(workdir, 'summary.json'), 'w', encoding='utf-8') as f:
      json.dump(summary, f, indent=2)
    report_card(summary, dirs, workdir)
  print(format_table(summary))
  print(f'(also in {os.path.join(workdir, "summary.json")}; the report card: '
        f'{os.path.join(workdir, "report.md")})')


if __name__ == '__main__':
  # Flags live here so that other programs (and tests) can import several binaries.
  _CONFIG = cli.define_config('experiments/configs/pipeline.py')
  _WORKDIR = flags.DEFINE_string('workdir', 'runs/pipeline', 'Every stage writes below here.')
  cli.start(main)
