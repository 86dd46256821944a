"""The chat template, in one place: SFT, the reward model, RL and generation all use it.

  [bos] <|system|> ... <|end_of_turn|> <|user|> ... <|end_of_turn|> <|assistant|> ... <|end_of_turn|>

Role tokens are ids the tokenizer reserved (`jaxlm.tokenizer.CHAT_TOKENS`), so no text can fake
them. The loss mask is 1 exactly on assistant content tokens and their end-of-turn token.
Answers to the synthetic world's questions are expected in the form `Answer: <answer>`.
"""

import re

import numpy as np

from jaxlm import tokenizer as tokenizer_lib

ROLES = ('system', 'user', 'assistant')
ANSWER_PREFIX = 'Answer: '
_ANSWER = re.compile(r'Answer: (\S(?:.*\S)?)')


def role_id(tokenizer, role: str) -> int:
  if role not in ROLES:
    raise ValueError(f'message role must be one of {ROLES}, got {role!r}')
  return tokenizer.chat_ids[f'<|{role}|>']


def end_of_turn_id(tokenizer) -> int:
  return tokenizer.chat_ids['<|end_of_turn|>']


def encode(tokenizer, messages: list[dict], add_generation_prompt: bool = False):
  """(tokens, loss_mask) as int32 arrays of equal length.

  With `add_generation_prompt` the sequence ends with the assistant role token, ready for the
  model to write the reply.
  """
  tokens, mask = [tokenizer_lib.BOS_ID], [0]
  for message in messages:
    content = tokenizer.encode(message['content'])
    trained = int(message['role'] == 'assistant')
    tokens += [role_id(tokenizer, message['role'])] + content + [end_of_turn_id(tokenizer)]
    mask += [0] + [trained] * (len(content) + 1)
  if add_generation_prompt:
    tokens.append(role_id(tokenizer, 'assistant'))
    mask.append(0)
  return np.asarray(tokens, np.int32), np.asarray(mask, np.int32)


def format_answer(answer: str) -> str:
  return ANSWER_PREFIX + answer


def parse_answer(response: str) -> str | None:
  """The answer of a well-formed response, or None when it is off format."""
  match = _ANSWER.fullmatch(response)
  return match.group(1) if match else None


def is_correct(reply: str, answer: str) -> bool:
  """Well formed, with the right answer (ignoring case and surrounding space)."""
  parsed = parse_answer(reply)
  return parsed is not None and parsed.strip().lower() == answer.strip().lower()


def answer_metrics(replies: list[str], answers: list[str]) -> dict[str, float]:
  """Format-following rate and exact-match accuracy of replies against reference answers."""
  if len(replies) != len(answers):
    raise ValueError(f'{len(replies)} replies for {len(answers)} answers')
  n = max(len(replies), 1)
  return {'eval/format_rate': sum(parse_answer(r) is not None for r in replies) / n,
          'eval/exact_match': sum(is_correct(r, a) for r, a in zip(replies, answers)) / n}
