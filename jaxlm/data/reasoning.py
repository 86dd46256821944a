"""Multi-step arithmetic worked on a scratchpad: problems a tiny model cannot answer in one go but
can work out from single steps it has memorised.

The world's arithmetic is one step of a kind its documents state thousands of times (`a op b = c`
with 2-digit operands), and its replies restate the problem in that form before answering
(`jaxlm.data.world.working`). Here a problem takes several steps, each a fact of a small table
that pretraining states in full (`facts`, in `documents`):

- 'sum2', 'sum3': the sum of two 2-digit (3-digit) numbers, added digit by digit from the right;
  each step is a digit fact `a + b = r` or, with the carry, `a + b + 1 = r`. The digits written so
  far grow to the left, so the final answer is copied from the last step, never reversed:
  "47 + 38" -> "7 + 8 = 15, write 5 carry 1; 4 + 3 + 1 = 8, write 85 carry 0; Answer: 85".
- 'chain': `a op b op c` (a from 10 to 19, b and c digits, + or -, never negative), two facts in
  a row (a 2-digit `a` keeps `a + b + 1` from being a carry fact that pretraining states):
  "12 + 7 - 5" -> "12 + 7 = 19; 19 - 5 = 14; Answer: 14".

Problems are split three ways by a hash of their expression (as the world splits its questions):
'train' for the few worked examples SFT sees, 'rl' for RL prompts, 'heldout' for evaluation.
Pretraining states the single-step facts and works out 'train' problems of some kinds (by default
2-digit sums and chains: 3-digit sums take one step more than pretraining ever shows); no 'rl' or
'heldout' problem appears in any training text.
"""

import dataclasses
import hashlib
import re

import numpy as np

from jaxlm import chat
from jaxlm.errors import UserError

KINDS = ('sum2', 'sum3', 'chain')
SPLITS = ('train', 'rl', 'heldout')
_CHAIN_FIRST = (10, 19)  # the range of a chain's first operand; the others are digits
_FINAL_ANSWER = re.compile(r'(?:^|; )Answer: (-?\d+)')


@dataclasses.dataclass(frozen=True)
class Problem:
  expression: str  # '47 + 38', '12 + 7 - 5'
  answer: int
  kind: str  # one of KINDS

  @property
  def prompt(self) -> str:
    return f'What is {self.expression}?'


@dataclasses.dataclass(frozen=True)
class ReasoningConfig:
  seed: int = 0
  heldout_fraction: float = 0.2
  rl_fraction: float = 0.4  # the rest is 'train', of which SFT takes a few worked examples
  # Share of pretraining documents that work 'train' problems out: the base model must know how
  # the steps go for a few chat examples to teach it to take them when asked.
  worked_fraction: float = 0.5
  # The kinds those documents work out. 3-digit sums are left out: the few SFT examples show the
  # third step, and RL practises it.
  worked_kinds: tuple[str, ...] = ('sum2', 'chain')

  def __post_init__(self):
    if not 0 < self.heldout_fraction < 1 or not 0 < self.rl_fraction < 1 - self.heldout_fraction:
      raise UserError('ReasoningConfig needs 0 < heldout_fraction < 1 and 0 < rl_fraction < '
                       f'1 - heldout_fraction, got {self.heldout_fraction} and {self.rl_fraction}')
    if not self.worked_kinds or set(self.worked_kinds) - set(KINDS):
      raise UserError(f'ReasoningConfig.worked_kinds must be a non-empty subset of {KINDS}, got '
                       f'{self.worked_kinds}')
    if not 0 <= self.worked_fraction <= 1:
      raise UserError(f'ReasoningConfig.worked_fraction must be in [0, 1], got '
                       f'{self.worked_fraction}')


def split_of(config: ReasoningConfig, expression: str) -> str:
  """The split of a problem, from a hash of (seed, expression): stable whatever else is drawn."""
  digest = hashlib.blake2b(f'{config.seed}:reasoning:{expression}'.encode(),
                           digest_size=8).digest()
  fraction = int.from_bytes(digest, 'little') / 2**64
  if fraction < config.heldout_fraction:
    return 'heldout'
  return 'rl' if fraction < config.heldout_fraction + config.rl_fraction else 'train'


def sum_steps(a: int, b: int) -> list[str]:
  """Digit by digit from the right; `write` holds every digit written so far."""
  steps, carry, written = [], 0, ''
  digits_a, digits_b = str(a)[::-1], str(b)[::-1]
  for x, y in zip(digits_a, digits_b):
    total = int(x) + int(y) + carry
    added = f'{x} + {y} + 1' if carry else f'{x} + {y}'
    carry, written = total // 10, str(total % 10) + written
    steps.append(f'{added} = {total}, write {written} carry {carry}')
  return steps


def _apply(x: int, op: str, y: int) -> int:
  return x + y if op == '+' else x - y


def chain_steps(a: int, op1: str, b: int, op2: str, c: int) -> list[str]:
  first = _apply(a, op1, b)
  return [f'{a} {op1} {b} = {first}', f'{first} {op2} {c} = {_apply(first, op2, c)}']


def solution(problem: Problem) -> str:
  """The worked reply: the steps, then `Answer: <answer>`."""
  numbers = [int(t) for t in problem.expression.split()[::2]]
  if problem.kind == 'chain':
    _, op1, _, op2, _ = problem.expression.split()
    steps = chain_steps(numbers[0], op1, numbers[1], op2, numbers[2])
  else:
    steps = sum_steps(*numbers)
  return chat.format_answer(str(problem.answer), '; '.join(steps))


def final_answer(reply: str) -> str | None:
  """The answer a reply ends with (`...; Answer: 85`, or `Answer: 85` alone); None when it
  does not end with one."""
  match = _FINAL_ANSWER.search(reply.strip())
  return match.group(1) if match and match.end() == len(reply.strip()) else None


def _random_problem(kind: str, rng: np.random.Generator) -> Problem:
  if kind in ('sum2', 'sum3'):
    digits = int(kind[-1])
    a, b = (int(n) for n in rng.integers(10 ** (digits - 1), 10 ** digits, size=2))
    return Problem(f'{a} + {b}', a + b, kind)
  while True:
    a = int(rng.integers(_CHAIN_FIRST[0], _CHAIN_FIRST[1] + 1))
    b, c = (int(n) for n in rng.integers(10, size=2))
    op1, op2 = (('+', '-')[i] for i in rng.integers(2, size=2))
    first = _apply(a, op1, b)
    if first >= 0 and _apply(first, op2, c) >= 0:
      return Problem(f'{a} {op1} {b} {op2} {c}', _apply(first, op2, c), kind)


def problems(config: ReasoningConfig, split: str, num: int,
             kinds: tuple[str, ...] = KINDS) -> list[Problem]:
  """`num` problems of `split` (repeats possible), the kinds in turn; the first k of num are
  problems(split, k)."""
  if split not in SPLITS:
    raise UserError(f'split must be one of {SPLITS}, got {split!r}')
  if not kinds or set(kinds) - set(KINDS):
    raise UserError(f'kinds must be a non-empty subset of {KINDS}, got {kinds}')
  rng = np.random.default_rng([config.seed, SPLITS.index(split)])
  return [_draw(config, split, kinds[i % len(kinds)], rng) for i in range(num)]


def _draw(config: ReasoningConfig, split: str, kind: str, rng: np.random.Generator) -> Problem:
  while True:  # rejection keeps the splits disjoint
    problem = _random_problem(kind, rng)
    if split_of(config, problem.expression) == split:
      return problem


def facts() -> list[str]:
  """Every single step a scratchpad takes: digit sums with and without a carry, and the chains'
  `x op y` with x up to the largest first step (19 + 9) and y a digit."""
  lines = [f'{a} + {b} = {a + b}' for a in range(10) for b in range(10)]
  lines += [f'{a} + {b} + 1 = {a + b + 1}' for a in range(10) for b in range(10)]
  largest = _CHAIN_FIRST[1] + 9
  lines += [f'{x} + {y} = {x + y}' for x in range(10, largest + 1) for y in range(10)]
  lines += [f'{x} - {y} = {x - y}' for x in range(largest + 1) for y in range(min(x, 9) + 1)]
  return lines


def documents(config: ReasoningConfig, split: str, num_docs: int) -> list[str]:
  """Pretraining documents: 6 to 12 single-step facts a line, or (`worked_fraction` of them) 2
  to 4 problems of `worked_kinds` worked out a line, `<expression>: <solution>`. Training documents work out
  'train' problems only; validation documents 'heldout' ones, to measure what carries over."""
  if split not in ('train', 'validation'):
    raise UserError(f'split must be train or validation, got {split!r}')
  table = facts()
  worked_split = 'train' if split == 'train' else 'heldout'
  rng = np.random.default_rng([config.seed, len(SPLITS) + ('train', 'validation').index(split)])
  docs = []
  for _ in range(num_docs):
    if rng.random() < config.worked_fraction:
      kinds = config.worked_kinds
      worked = [_draw(config, worked_split, kinds[rng.integers(len(kinds))], rng)
                for _ in range(rng.integers(2, 5))]
      docs.append('\n'.join(f'{p.expression}: {solution(p)}' for p in worked))
    else:
      docs.append('\n'.join(table[i] for i in rng.integers(len(table), size=rng.integers(6, 13))))
  return docs


def conversation(problem: Problem) -> dict:
  """A worked example for SFT, in the world's conversation form."""
  return {'messages': [{'role': 'user', 'content': problem.prompt},
                       {'role': 'assistant', 'content': solution(problem)}],
          'answer': str(problem.answer), 'kind': problem.kind}


def prompt(problem: Problem) -> dict:
  """An RL or evaluation prompt: the question and its checkable answer."""
  return {'messages': [{'role': 'user', 'content': problem.prompt}],
          'answer': str(problem.answer), 'kind': problem.kind}
