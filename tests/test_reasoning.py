"""Multi-step arithmetic on a scratchpad: disjoint splits, right worked solutions, the reward, and
the config's binary end to end on a tiny setting."""

import re

from experiments import reasoning as reasoning_binary
from experiments.configs import reasoning as reasoning_config
from jaxlm import rl
from jaxlm.data import reasoning
from tests import tiny_config

CONFIG = reasoning.ReasoningConfig()


def _expressions_in(text: str) -> set[str]:
  """Every expression `n op n (op n ...)` written in `text`, and each of its parts."""
  found = set()
  for match in re.findall(r'\d+(?: [+-] \d+)+', text):
    terms = match.split(' ')
    found.update(' '.join(terms[i:j + 1]) for i in range(0, len(terms), 2)
                 for j in range(i + 2, len(terms), 2))
  return found


def test_splits_are_disjoint_and_no_held_out_problem_is_in_training_text():
  drawn = {split: reasoning.problems(CONFIG, split, 600) for split in reasoning.SPLITS}
  expressions = {split: {p.expression for p in problems} for split, problems in drawn.items()}
  assert not expressions['train'] & expressions['rl']
  assert not expressions['heldout'] & (expressions['train'] | expressions['rl'])
  assert all(reasoning.split_of(CONFIG, e) == split
             for split, es in expressions.items() for e in es)
  assert {p.kind for p in drawn['heldout']} == set(reasoning.KINDS)
  training_text = '\n'.join(
      reasoning.documents(CONFIG, 'train', 2000)
      + [m['content'] for p in drawn['train'] for m in reasoning.conversation(p)['messages']]
      + [reasoning.prompt(p)['messages'][0]['content'] for p in drawn['rl']])
  written = _expressions_in(training_text)
  assert not expressions['heldout'] & written
  assert expressions['train'] | expressions['rl'] <= written  # the check finds what is there


def test_worked_solutions_are_right_step_by_step():
  for problem in reasoning.problems(CONFIG, 'train', 300):
    reply = reasoning.solution(problem)
    *steps, answer = reply.split('; ')
    assert answer == f'Answer: {eval(problem.expression)}' and problem.answer == eval(
        problem.expression)
    for step in steps:
      equation, _, written = step.partition(', ')
      left, right = equation.split(' = ')
      assert eval(left) == int(right), step
      if written:  # 'write <the low digits of the sum> carry <its carry out>'
        _, digits, _, carry = written.split()
        assert str(problem.answer).endswith(digits) and int(right) // 10 == int(carry)
    if problem.kind != 'chain':  # one step per digit, and every step a memorised fact
      assert len(steps) == int(problem.kind[-1])
    facts = set(reasoning.facts())
    assert all(step.partition(', ')[0] in facts for step in steps), reply


def test_the_scratchpad_reward_checks_the_final_answer():
  example = {'answer': '85'}
  replies = {
      '7 + 8 = 15, write 5 carry 1; 4 + 3 + 1 = 8, write 85 carry 0; Answer: 85': 1.0,
      'Answer: 85': 1.0,  # no working: the reward checks the answer alone
      ' ... ; Answer: 85 ': 1.0,
      '7 + 8 = 15, write 5 carry 1; 4 + 3 + 1 = 8, write 85 carry 0; Answer: 86': 0.0,
      '7 + 8 = 15, write 5 carry 1; 4 + 3 + 1 = 8, write 85 carry 0': 0.0,  # cut off
      'Answer: 85; 1 + 1 = 2': 0.0,  # the answer must end the reply
      'Answer: 855': 0.0,
      '85': 0.0,
      '': 0.0,
  }
  assert {r: rl.REWARD_FUNCTIONS['scratchpad'](r, example) for r in replies} == replies
  assert reasoning.final_answer('x; Answer: 12') == '12'
  assert reasoning.final_answer('x Answer: 12') is None


def test_the_config_runs_end_to_end(tmp_path):
  config = reasoning_config.get_config()
  config.data.update(num_pretrain_docs=200, num_validation_docs=10, num_sft=16, num_rl=32,
                     num_eval_per_kind=2)
  config.pretrain = tiny_config.config(steps=2, **{'data.source': 'jsonl'})
  config.sft = tiny_config.sft_config('', steps=1, **{'data.source': 'jsonl'})
  config.grpo = tiny_config.rl_config('', steps=1, reward='scratchpad',
                                      **{'data.source': 'jsonl', 'rollout.prompt_len': 32,
                                         'rollout.max_new_tokens': 8})
  config.report.update(batch_size=8, max_new_tokens=8, num_replies=1)
  results, seconds = reasoning_binary.run(config, str(tmp_path))
  assert set(results) == set(reasoning_binary.EVALUATED_STAGES)
  for r in results.values():
    assert all(0.0 <= r[f'accuracy/{k}'] <= 1.0 for k in reasoning.KINDS)
    assert len(r['replies']['sum3']) == 1
  shown = [[question for kind in reasoning.KINDS for question, _, _ in r['replies'][kind]]
           for r in results.values()]
  assert all(questions == shown[0] for questions in shown)
  assert set(seconds) == {'pretrain', 'sft', 'grpo', 'evaluation', 'total'}
  report = reasoning_binary.format_report(results, seconds, 2)
  assert '| sft |' in report and '| grpo |' in report and 'Wall time' in report
