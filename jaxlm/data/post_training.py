"""Conversations for SFT and preference pairs for reward models, from the synthetic world, JSONL
files or a TFDS dataset; and their tokenization into packed rows.

An SFT example is `{'messages': [{'role', 'content'}, ...], 'answer': str | None}`; `answer` is
the checkable answer when there is one (the world's questions). A preference pair is
`{'messages': prompt messages, 'chosen': str, 'rejected': str, 'kind': str}`.
"""

import json
import os

import grain
import numpy as np

from jaxlm import chat
from jaxlm.data import packing
from jaxlm.data import world as world_lib
from jaxlm.errors import UserError

SOURCES = ('world', 'jsonl', 'tfds')
REJECTION_KINDS = ('wrong', 'off_format', 'rambling', 'abstain')


def world_prompts(world: world_lib.World, split: str, num: int,
                  kinds: tuple[str, ...] = world_lib.QUESTION_KINDS, **question_options
                  ) -> list[dict]:
  """Questions without replies, for RL: `{'messages': [...], 'answer': str, 'kind': str}`.
  `question_options` go to `World.questions` (`unknown_share`, `extra_unknown_people`)."""
  return [{'messages': [{'role': 'user', 'content': q.prompt}], 'answer': q.answer,
           'kind': q.kind} for q in world.questions(split, num, kinds, **question_options)]


def world_sft_examples(world: world_lib.World, split: str, num: int,
                       kinds: tuple[str, ...] = world_lib.QUESTION_KINDS, **question_options
                       ) -> list[dict]:
  """Questions with the world's replies; `question_options` as for `world_prompts`."""
  return [{'messages': [{'role': 'user', 'content': q.prompt},
                        {'role': 'assistant', 'content': world_reply(q)}],
           'answer': q.answer, 'kind': q.kind, 'attribute': q.attribute}
          for q in world.questions(split, num, kinds, **question_options)]


def world_held_out(world_examples, world: world_lib.World, num_questions: int,
                   num_per_policy_kind: int) -> list[dict]:
  """Held-out evaluation examples: `num_questions` fact and arithmetic questions, then
  `num_per_policy_kind` requests of each policy kind (forbidden, look-alike, unknown person)."""
  examples = world_examples(world, 'heldout', num_questions, ('fact', 'arithmetic'))
  for kind in world_lib.POLICY_KINDS if num_per_policy_kind else ():
    examples += world_examples(world, 'heldout', num_per_policy_kind, (kind,))
  return examples


def world_reply(question: world_lib.Question, answer: str | None = None) -> str:
  """The world's reply giving `answer` (by default the right one), after its working."""
  answer = question.answer if answer is None else answer
  return chat.format_answer(answer, world_lib.working(question, answer))


def _wrong_answer(question: world_lib.Question, rng: np.random.Generator) -> str:
  if question.kind == 'arithmetic':
    offset = int(rng.choice([-1, 1])) * int(rng.integers(1, 11))
    value = int(question.answer) + offset
    return str(value if value >= 0 else int(question.answer) + abs(offset))
  values = next(v for v in world_lib.VOCABULARY.values() if question.answer in v)
  return str(rng.choice([v for v in values if v != question.answer]))


def _policy_violation(question: world_lib.Question, rng: np.random.Generator) -> str:
  """A reply the world's policy rejects. For a forbidden request: a secret given away, an evasive
  "I don't know" or a made-up fact, replies a fine-tuned model finds likely (a random secret alone
  is so unlikely that preferring the refusal over it teaches nothing). For a look-alike: a
  refusal or an abstention. For an unknown person: a made-up fact."""
  pick = lambda options: options[rng.integers(len(options))]
  made_up_fact = pick(world_lib.VOCABULARY[question.attribute or pick(world_lib.ATTRIBUTES)])
  if question.kind == 'forbidden':
    return chat.format_answer(pick([world_lib.random_secret(rng), world_lib.ABSTENTION,
                                    made_up_fact]))
  if question.kind == 'unknown':  # made up as a known person's fact is stated
    return world_reply(question, made_up_fact)
  return chat.format_answer(pick([world_lib.REFUSAL, world_lib.ABSTENTION]))


def _off_format(answer: str, rng: np.random.Generator) -> str:
  templates = ('{a}', 'The answer is {a}.', 'I think it is {a}', '{a}?')
  return templates[rng.integers(len(templates))].format(a=answer)


def _rejected(question, kind: str, rng: np.random.Generator) -> str:
  if question.kind in world_lib.POLICY_KINDS:
    return _policy_violation(question, rng)
  if kind == 'wrong':
    return world_reply(question, _wrong_answer(question, rng))
  if kind == 'abstain':  # the documents answer it: "I don't know" is for unknown people only
    return chat.format_answer(world_lib.ABSTENTION)
  if kind == 'off_format':
    return _off_format(question.answer, rng)
  filler = ('Let me think about this for a while.', 'There are many ways to see it.',
            'This is a question I like.', 'It depends on how you look at it.')
  extra = ' '.join(rng.choice(filler, size=rng.integers(1, 3)))
  return world_reply(question) + ' ' + extra


def with_label_noise(examples: list[dict], noise_wrong: float, noise_off_format: float,
                     seed: int) -> list[dict]:
  """A copy of world SFT `examples` in which a share `noise_wrong` of the replies (rounded to
  whole examples, chosen by `seed`) is wrong and a share `noise_off_format` is the right answer
  out of format; those carry `noise`: 'wrong' or 'off_format', the others are left as they are.

  A wrong reply to a policy request is the one the policy rejects (`_policy_violation`: a
  forbidden request answered, a look-alike refused, an unknown person given a made-up fact).
  """
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(examples))
  num_wrong = round(noise_wrong * len(examples))
  num_noisy = round((noise_wrong + noise_off_format) * len(examples))
  corruption = {int(i): 'wrong' for i in order[:num_wrong]}
  corruption.update({int(i): 'off_format' for i in order[num_wrong:num_noisy]})
  noisy = list(examples)
  for index in sorted(corruption):
    example = examples[index]
    if corruption[index] == 'wrong':
      question = world_lib.Question(example['messages'][0]['content'], example['answer'],
                                    example['kind'], example['attribute'])
      reply = _rejected(question, 'wrong', rng)
    else:
      reply = _off_format(example['answer'], rng)
    noisy[index] = {**example, 'messages': [*example['messages'][:-1],
                                            {'role': 'assistant', 'content': reply}],
                    'noise': corruption[index]}
  return noisy


def world_preference_pairs(world: world_lib.World, split: str, num: int,
                           proportions: dict[str, float], seed: int,
                           kinds: tuple[str, ...] = world_lib.QUESTION_KINDS, **question_options
                           ) -> list[dict]:
  """Chosen: correct and well formed. Rejected, for questions: a wrong answer, an off-format
  reply, a rambling one or an abstention, drawn in the given proportions; for policy requests:
  the reply that breaks the policy (`kind` is then the request's kind). `question_options` as
  for `world_prompts`."""
  unknown = set(proportions) - set(REJECTION_KINDS)
  if unknown or min(proportions.values(), default=-1) < 0 or not sum(proportions.values()) > 0:
    raise UserError(f'config.data.rejection_proportions must weight {REJECTION_KINDS}, got '
                     f'{dict(proportions)}')
  rejections = list(proportions)
  weights = np.array([proportions[k] for k in rejections], float)
  questions = world.questions(split, num, kinds, **question_options)  # checks the split
  rng = np.random.default_rng([seed, world_lib.QUESTION_SPLITS.index(split)])
  pairs = []
  for question in questions:
    rejection = rejections[rng.choice(len(rejections), p=weights / weights.sum())]
    pairs.append({'messages': [{'role': 'user', 'content': question.prompt}],
                  'chosen': world_reply(question),
                  'rejected': _rejected(question, rejection, rng),
                  'kind': (question.kind if question.kind in world_lib.POLICY_KINDS
                           else rejection)})
  return pairs


def _read_jsonl(path: str) -> list[tuple[str, dict]]:
  """(where, record) for each non-blank line; `where` is `path:line` for error messages."""
  if not os.path.exists(path):
    raise UserError(f'JSONL file not found: {path}')
  records = []
  with open(path, encoding='utf-8') as f:
    for line_number, line in enumerate(f, 1):
      if line.strip():
        where = f'{path}:{line_number}'
        try:
          record = json.loads(line)
        except ValueError as e:
          raise UserError(f'{where}: not valid JSON ({e})') from e
        if not isinstance(record, dict):
          raise UserError(f'{where}: each line must be a JSON object, got {record!r}')
        records.append((where, record))
  return records


def _checked_messages(messages, where: str) -> list[dict]:
  if not isinstance(messages, list) or not all(
      isinstance(m, dict) and m.get('role') in chat.ROLES and isinstance(m.get('content'), str)
      for m in messages):
    raise UserError(f'{where}: "messages" must be a list of {{"role": one of {chat.ROLES}, '
                     f'"content": string}}; got {messages!r}')
  return messages


def _prompt_messages(record, where: str) -> list[dict]:
  prompt = record.get('prompt', record.get('messages'))
  if isinstance(prompt, str):
    return [{'role': 'user', 'content': prompt}]
  if isinstance(prompt, list):
    return _checked_messages(prompt, where)
  raise UserError(f'{where}: needs "prompt" (a string) or "messages" (a list)')


def conversation_from_record(record: dict, where: str) -> dict:
  """`{"messages": [...]}` or `{"prompt": ..., "response": ...}` (optional `"answer"`)."""
  if 'messages' in record:
    messages = _checked_messages(record['messages'], where)
  elif 'prompt' in record and 'response' in record:
    messages = [{'role': 'user', 'content': record['prompt']},
                {'role': 'assistant', 'content': record['response']}]
  else:
    raise UserError(f'{where}: needs "messages", or "prompt" and "response"; got keys '
                     f'{sorted(record)}')
  return {'messages': _checked_messages(messages, where), 'answer': record.get('answer')}


def preference_from_record(record: dict, where: str) -> dict:
  """`{"prompt" or "messages", "chosen": str, "rejected": str}`."""
  if not isinstance(record.get('chosen'), str) or not isinstance(record.get('rejected'), str):
    raise UserError(f'{where}: needs string "chosen" and "rejected"; got keys {sorted(record)}')
  return {'messages': _prompt_messages(record, where), 'chosen': record['chosen'],
          'rejected': record['rejected'], 'kind': record.get('kind', 'jsonl')}


def prompt_from_record(record: dict, where: str) -> dict:
  """`{"prompt" or "messages", optional "answer"}`; a trailing assistant reply is dropped."""
  messages = list(_prompt_messages(record, where))
  while messages and messages[-1]['role'] == 'assistant':
    messages.pop()
  if not messages:
    raise UserError(f'{where}: the prompt has no user message')
  return {'messages': messages, 'answer': record.get('answer')}


def from_jsonl(path: str, parse) -> list[dict]:
  return [parse(record, where) for where, record in _read_jsonl(path)]


def from_tfds(name: str, data_dir: str, split: str, parse) -> list[dict]:
  """A TFDS dataset prepared as ArrayRecord whose records have the JSONL fields above.
  Never downloads (see `jaxlm.data.pipeline`)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    source = tfds.builder(name, data_dir=data_dir or None,
                          file_format='array_record').as_data_source(split=split)
  except Exception as e:  # tfds raises many types for a missing or unprepared dataset
    raise UserError(f'TFDS dataset {name!r} split {split!r} is not prepared as ArrayRecord in '
                     f'{data_dir!r}: {e}') from e
  decode = lambda v: v.decode('utf-8') if isinstance(v, bytes) else v
  return [parse({k: decode(v) for k, v in source[i].items()}, f'{name}[{split}][{i}]')
          for i in range(len(source))]


def tokenize_conversations(tokenizer, examples: list[dict], seq_len: int):
  """Rows of aligned inputs/targets/weights, at most `seq_len` long, and what truncation did.

  A conversation longer than a row is cut at the end; one whose cut leaves no reply token at all
  is dropped. Both are counted, never silent.
  """
  rows, stats = [], {'conversations': len(examples), 'truncated': 0, 'dropped': 0}
  for example in examples:
    tokens, mask = chat.encode(tokenizer, example['messages'])
    if len(tokens) > seq_len + 1:
      tokens, mask = tokens[:seq_len + 1], mask[:seq_len + 1]
      stats['truncated'] += 1
    if not mask[1:].any():
      stats['dropped'] += 1
      continue
    rows.append({'inputs': tokens[:-1], 'targets': tokens[1:],
                 'weights': mask[1:].astype(np.float32)})
  return rows, stats


def packed_conversation_batches(rows: list[dict], seq_len: int, batch_size: int, seed: int,
                                shuffle: bool = True, repeat: bool = True,
                                shard_index: int = 0, num_shards: int = 1):
  """Whole conversations packed several to a row (first fit), padding the rest."""
  ds = grain.MapDataset.source(rows)[shard_index::num_shards]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat(None)
  return packing.FirstFitBatches(ds, seq_len, batch_size, seed, shuffle=shuffle,
                                 drop_remainder=repeat)
