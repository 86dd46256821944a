"""The whole pipeline, tiny: every stage runs from the previous one and the report adds up."""

import json
import os

from experiments import pipeline
from experiments.configs import pipeline as pipeline_config
from tests import tiny_config


def test_the_pipeline_runs_every_stage_and_writes_the_summary(tmp_path):
  config = pipeline_config.get_config()
  config.pretrain = tiny_config.config(steps=4, **{'model.scan_layers': False})  # as tiny.py
  config.sft = tiny_config.sft_config('', steps=2)
  config.reward_model = tiny_config.reward_config('', steps=2)
  config.grpo = tiny_config.rl_config('', steps=2)
  config.ppo = tiny_config.rl_config('', steps=2, algorithm='ppo', reward='model',
                                     **{'rollout.samples_per_prompt': 1})
  config.assistant = tiny_config.rl_config('', steps=2, reward='exact_match_and_policy')
  config.dpo = tiny_config.dpo_config('', steps=2)
  config.report.update(num_prompts=8, num_policy_prompts=4, num_pairs=8, batch_size=8,
                       seq_len=128, prompt_len=64, max_new_tokens=8)
  dirs = pipeline.run_stages(config, str(tmp_path))
  summary = pipeline.report(config, dirs)
  assert set(summary) == {'base', 'sft', 'reward_model', 'ppo', 'grpo', 'dpo', 'assistant'}
  for stage in pipeline.POLICY_STAGES:
    assert set(summary[stage]) == set(pipeline.METRICS)
    for name in ('eval/format_rate', 'eval/exact_match', 'eval/pairwise_accuracy',
                 'eval/refusal_rate', 'eval/over_refusal_rate', 'eval/hallucination_rate'):
      assert 0.0 <= summary[stage][name] <= 1.0
  # The KL is measured to the SFT model, so the SFT model's own is exactly zero.
  assert summary['sft']['eval/kl'] == 0.0
  with open(os.path.join(dirs['reward_model'], 'metrics.jsonl')) as f:
    final = [json.loads(line) for line in f][-1]
  assert summary['reward_model'] == {'eval/pairwise_accuracy': final['eval/pairwise_accuracy']}
  table = pipeline.format_table(summary)
  assert table.count('\n') == 8 and '| grpo' in table and '| assistant' in table
  # The assistant is GRPO on the PPO model: it starts from PPO's checkpoint.
  assert json.load(open(os.path.join(dirs['assistant'], 'config.json')))['init_workdir'] == (
      dirs['ppo'])

  card = pipeline.report_card(summary, dirs, str(tmp_path))
  assert card == (tmp_path / 'report.md').read_text()
  assert table in card
  assert (tmp_path / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  timings = json.loads((tmp_path / 'timings.json').read_text())
  assert set(timings) == set(dirs) and all(t > 0 for t in timings.values())
  # Each change is the stage's value minus its starting stage's, as the summary has them.
  change = summary['assistant']['eval/gold_reward'] - summary['ppo']['eval/gold_reward']
  assert '| assistant | ppo | ' in card and f'{change:+.3f} |\n' in card

  # A rerun retrains nothing and adds what it spent to each stage's time.
  steps = {stage: pipeline.metrics.read(d)[-1]['step'] for stage, d in dirs.items()}
  pipeline.run_stages(config, str(tmp_path))
  assert {stage: pipeline.metrics.read(d)[-1]['step'] for stage, d in dirs.items()} == steps
  rerun = pipeline.metrics.StageTimes(str(tmp_path)).seconds
  assert all(rerun[stage] > timings[stage] for stage in dirs)

