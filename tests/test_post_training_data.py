"""Post-training data: conversations tokenized into shifted rows, truncation and drops counted by
hand, packing that keeps each conversation whole, JSONL records, and preference pairs."""

import collections
import itertools
import json
import re

import grain
import grain.experimental

import numpy as np
import pytest

from jaxlm import chat
from jaxlm.data import post_training as data_lib
from jaxlm.data import world as world_lib
from jaxlm.errors import UserError

# Documented ids: bos 1, then the chat markers in CHAT_TOKENS order.
BOS, SYSTEM, USER, ASSISTANT, END_OF_TURN = 1, 3, 4, 5, 6
ROLE_TOKENS = (SYSTEM, USER, ASSISTANT)


@pytest.fixture(scope='module')
def world():
  return world_lib.World()


def _digits(n):
  """Text of exactly n tokens: the tokenizer splits digits, one token each."""
  return ''.join(str(i % 10) for i in range(1, n + 1))


def _conversation(user_tokens, reply_tokens=None):
  messages = [{'role': 'user', 'content': _digits(user_tokens)}]
  if reply_tokens is not None:
    messages.append({'role': 'assistant', 'content': _digits(reply_tokens)})
  return {'messages': messages, 'answer': None}


def _assistant_targets(tokens):
  """1 where tokens[i + 1] is an assistant content token or its end_of_turn, from the ids alone."""
  role, counted = None, []
  for token in tokens[1:]:
    if token in ROLE_TOKENS:
      role = token
      counted.append(0)
    else:
      counted.append(int(role == ASSISTANT))
      if token == END_OF_TURN:
        role = None
  return np.asarray(counted, np.float32)


def test_digit_text_has_one_token_per_digit(tokenizer):
  for n in (1, 5, 13):
    assert len(tokenizer.encode(_digits(n))) == n


# With seq_len 16, a conversation of u user and a reply tokens is u + a + 5 tokens long
# (bos, two role markers, two end_of_turns) and its reply starts at index u + 4.
SEQ_LEN = 16
CASES = [  # (user tokens, reply tokens or None, truncated, dropped)
    (3, 2, False, False),  # 10 tokens: fits
    (3, 9, False, False),  # 17 = seq_len + 1 tokens: exactly one full row, not cut
    (3, 10, True, False),  # 18 tokens: cut inside the reply
    (12, 5, True, False),  # reply starts at index 16: the cut keeps one reply token
    (13, 5, True, True),  # reply starts at index 17: the cut leaves no reply token
    (3, None, False, True),  # no reply at all
]


def test_rows_are_the_conversation_shifted_by_one_and_cuts_are_counted(tokenizer):
  examples = [_conversation(u, a) for u, a, _, _ in CASES]
  rows, stats = data_lib.tokenize_conversations(tokenizer, examples, SEQ_LEN)
  assert stats == {'conversations': len(CASES),
                   'truncated': sum(c[2] for c in CASES), 'dropped': sum(c[3] for c in CASES)}
  assert stats['truncated'] == 3 and stats['dropped'] == 2  # the hand count
  kept = [e for e, case in zip(examples, CASES) if not case[3]]
  assert len(rows) == len(kept)
  for row, example, case in zip(rows, kept, [c for c in CASES if not c[3]]):
    tokens, mask = chat.encode(tokenizer, example['messages'])
    n = min(len(tokens), SEQ_LEN + 1)
    assert len(tokens) == case[0] + case[1] + 5 and (len(tokens) > n) == case[2]
    np.testing.assert_array_equal(row['inputs'], tokens[:n - 1])
    np.testing.assert_array_equal(row['targets'], tokens[1:n])
    np.testing.assert_array_equal(row['weights'], mask[1:n])
    np.testing.assert_array_equal(row['weights'], _assistant_targets(tokens[:n]))
    assert row['weights'].dtype == np.float32 and len(row['inputs']) <= SEQ_LEN
  # The conversation cut right after its reply's first token counts that one target only.
  np.testing.assert_array_equal(rows[3]['weights'], [0] * (SEQ_LEN - 1) + [1])


def _unpack(batches):
  """Every (inputs, targets, weights) segment of every packed row, checking each row's layout."""
  segments = []
  for batch in batches:
    for row in range(batch['inputs'].shape[0]):
      seg, pos = batch['segment_ids'][row], batch['positions'][row]
      used = int((seg > 0).sum())
      assert np.all(seg[used:] == 0), 'padding only at the end'
      assert np.all(batch['weights'][row][used:] == 0), 'no weight on padding'
      assert np.all(batch['inputs'][row][used:] == 0) and np.all(batch['targets'][row][used:] == 0)
      ids = seg[:used]
      assert np.all(np.diff(ids) >= 0) and np.all(np.diff(np.unique(ids)) == 1) and ids[0] == 1
      for s in np.unique(ids):
        where = seg == s
        np.testing.assert_array_equal(pos[where], np.arange(where.sum()))
        segments.append(tuple(batch[k][row][where] for k in ('inputs', 'targets', 'weights')))
  return segments


def test_packing_keeps_each_conversation_whole_in_exactly_one_segment(tokenizer, world):
  examples = data_lib.world_sft_examples(world, 'train', 24) + [
      _conversation(3, 2), _conversation(5, 20), _conversation(30, 4),
      {'messages': [{'role': 'system', 'content': 'Be brief.'}] + [
          {'role': r, 'content': c} for r, c in
          [('user', 'What is 1 + 1?'), ('assistant', 'Answer: 2'),
           ('user', 'And 2 + 2?'), ('assistant', 'Answer: 4')]], 'answer': '4'}]
  seq_len, batch_size = 64, 4
  rows, stats = data_lib.tokenize_conversations(tokenizer, examples, seq_len)
  assert stats['dropped'] == 0 and len(rows) == len(examples)
  batches = list(data_lib.packed_conversation_batches(
      rows, seq_len, batch_size, seed=0, shuffle=False, repeat=False))
  for batch in batches:
    assert {k: v.shape[1] for k, v in batch.items()} == dict.fromkeys(batch, seq_len)
  segments = _unpack(batches)
  key = lambda inputs: tuple(int(t) for t in inputs)
  assert collections.Counter(key(s[0]) for s in segments) == collections.Counter(
      key(r['inputs']) for r in rows)
  by_inputs = {key(r['inputs']): r for r in rows}
  for inputs, targets, weights in segments:
    row = by_inputs[key(inputs)]
    np.testing.assert_array_equal(targets, row['targets'])
    np.testing.assert_array_equal(weights, row['weights'])
    np.testing.assert_array_equal(weights, _assistant_targets(np.append(inputs, targets[-1])))
  # Packing did pack: fewer rows than conversations, several to some row.
  assert sum(len(b['inputs']) for b in batches) < len(rows)


def _grain_first_fit(rows, seq_len, batch_size, seed, shuffle, repeat, shard, num_shards):
  """The reference: Grain's own first-fit packing of the same sequence of conversations."""
  ds = grain.MapDataset.source(rows)[shard::num_shards]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat(None)
  ds = grain.experimental.FirstFitPackIterDataset(
      ds.to_iter_dataset(), length_struct={k: seq_len for k in ('inputs', 'targets', 'weights')},
      num_packing_bins=max(2, batch_size), shuffle_bins=shuffle, seed=seed)
  return ds.batch(batch_size, drop_remainder=repeat)


@pytest.mark.parametrize('batch_size, shuffle, repeat, num_shards',
                         [(4, True, True, 1), (1, True, True, 1), (3, False, False, 1),
                          (5, True, True, 2)])
def test_first_fit_packing_gives_grains_batches_and_resumes_them(tokenizer, world, batch_size,
                                                                 shuffle, repeat, num_shards):
  seq_len, seed = 64, 7
  examples = data_lib.world_sft_examples(world, 'train', 48) + [
      _conversation(n, r) for n, r in ((3, 2), (5, 20), (30, 4), (50, 8), (12, 12))]
  rows, _ = data_lib.tokenize_conversations(tokenizer, examples, seq_len)
  names = {'inputs': 'inputs', 'targets': 'targets', 'weights': 'weights',
           'segment_ids': 'inputs_segment_ids', 'positions': 'inputs_positions'}
  for shard in range(num_shards):
    args = (rows, seq_len, batch_size, seed, shuffle, repeat, shard, num_shards)
    ours = iter(data_lib.packed_conversation_batches(*args[:4], shuffle=shuffle, repeat=repeat,
                                                     shard_index=shard, num_shards=num_shards))
    theirs = list(itertools.islice(_grain_first_fit(*args), 60))  # several epochs when repeated
    states = []
    for expected in theirs:
      states.append(ours.get_state())
      batch = next(ours)
      assert set(batch) == set(names)
      for key, name in names.items():
        np.testing.assert_array_equal(batch[key], expected[name], err_msg=key)
    if not repeat:
      assert next(ours, None) is None
    # Resuming from a saved position gives the same batches again.
    for start in (1, len(theirs) // 2, len(theirs) - 1):
      resumed = iter(data_lib.packed_conversation_batches(
          *args[:4], shuffle=shuffle, repeat=repeat, shard_index=shard, num_shards=num_shards))
      resumed.set_state(json.loads(json.dumps(states[start])))
      for expected in theirs[start:start + 3]:
        np.testing.assert_array_equal(next(resumed)['inputs'], expected['inputs'])
  # A position saved by Grain's packing (before this one) is refused, not misread.
  with pytest.raises(UserError, match='older jaxlm data pipeline'):
    ours.set_state({'parent': {}, 'next_row': 0, 'counter': 0})


def _write(path, lines):
  path.write_text('\n'.join(lines) + '\n')
  return str(path)


def test_jsonl_conversations_in_both_shapes(tmp_path):
  messages = [{'role': 'system', 'content': 's'}, {'role': 'user', 'content': 'q'},
              {'role': 'assistant', 'content': 'Answer: a'}]
  path = _write(tmp_path / 'sft.jsonl', [
      json.dumps({'messages': messages, 'answer': 'a'}),
      json.dumps({'prompt': 'What is 2 + 2?', 'response': 'Answer: 4'}),
      '',  # blank lines are skipped
  ])
  assert data_lib.from_jsonl(path, data_lib.conversation_from_record) == [
      {'messages': messages, 'answer': 'a'},
      {'messages': [{'role': 'user', 'content': 'What is 2 + 2?'},
                    {'role': 'assistant', 'content': 'Answer: 4'}], 'answer': None}]


def test_jsonl_preferences_in_both_shapes(tmp_path):
  prompt = [{'role': 'user', 'content': 'q'}]
  path = _write(tmp_path / 'pairs.jsonl', [
      json.dumps({'prompt': 'q', 'chosen': 'Answer: a', 'rejected': 'a'}),
      json.dumps({'messages': prompt, 'chosen': 'Answer: a', 'rejected': 'b', 'kind': 'wrong'}),
  ])
  assert data_lib.from_jsonl(path, data_lib.preference_from_record) == [
      {'messages': prompt, 'chosen': 'Answer: a', 'rejected': 'a', 'kind': 'jsonl'},
      {'messages': prompt, 'chosen': 'Answer: a', 'rejected': 'b', 'kind': 'wrong'}]


GOOD_SFT = json.dumps({'prompt': 'q', 'response': 'r'})
GOOD_PAIR = json.dumps({'prompt': 'q', 'chosen': 'c', 'rejected': 'r'})


SFT, PAIR = data_lib.conversation_from_record, data_lib.preference_from_record


@pytest.mark.parametrize('parse, bad', [
    (SFT, '{"prompt": "q"'),  # not JSON
    (SFT, '{"prompt": "q"}'),  # no response
    (SFT, '{"messages": [{"role": "bot", "content": "x"}]}'),  # unknown role
    (SFT, '{"messages": [{"role": "user", "content": 3}]}'),  # content not a string
    (PAIR, '{"prompt": "q", "chosen": "c"}'),  # no rejected
    (PAIR, '{"prompt": 3, "chosen": "c", "rejected": "r"}'),  # prompt not a string
    (PAIR, '{"chosen": "c", "rejected": "r"}'),  # no prompt
])
def test_a_bad_jsonl_record_is_an_error_naming_path_and_line(tmp_path, parse, bad):
  good = GOOD_SFT if parse is SFT else GOOD_PAIR
  path = _write(tmp_path / 'data.jsonl', [good, good, bad, good])
  with pytest.raises(ValueError, match=f'^{re.escape(path)}:3: '):
    data_lib.from_jsonl(path, parse)


def test_a_bad_record_after_a_blank_line_names_its_own_line(tmp_path):
  path = _write(tmp_path / 'data.jsonl', [GOOD_SFT, '', '{"prompt": "q"}'])
  with pytest.raises(ValueError, match=f'^{re.escape(path)}:3: '):
    data_lib.from_jsonl(path, SFT)


@pytest.mark.parametrize('parse, bad', [
    (SFT, '5'), (SFT, '"messages"'), (SFT, '{"messages": "hi"}'), (SFT, '{"messages": ["hi"]}'),
    (PAIR, '["chosen", "rejected"]'),
])
def test_a_record_of_the_wrong_json_type_is_an_error_naming_path_and_line(tmp_path, parse, bad):
  path = _write(tmp_path / 'data.jsonl', [bad])
  with pytest.raises(ValueError, match=f'^{re.escape(path)}:1: '):
    data_lib.from_jsonl(path, parse)


def test_a_missing_jsonl_file_is_an_error_naming_it(tmp_path):
  path = str(tmp_path / 'no_such_dir' / 'train.jsonl')
  with pytest.raises(UserError, match='no_such_dir/train.jsonl'):
    data_lib.from_jsonl(path, data_lib.conversation_from_record)


QUESTIONS = ('fact', 'arithmetic')


def _correct(world, split, num):
  return [q.answer for q in world.questions(split, num, QUESTIONS)]


def test_chosen_replies_parse_to_the_correct_answer(world):
  pairs = data_lib.world_preference_pairs(world, 'train', 200, {'wrong': 1, 'off_format': 1,
                                                                'rambling': 1}, seed=0)
  questions = world.questions('train', 200)
  assert [p['messages'] for p in pairs] == [[{'role': 'user', 'content': q.prompt}]
                                            for q in questions]
  for pair, question in zip(pairs, questions):
    assert chat.parse_answer(pair['chosen']) == question.answer
    assert pair['chosen'] == data_lib.world_reply(question)
    assert pair['rejected'] != pair['chosen']
  # A fact is restated as the documents state it, then answered.
  fact = next(q for q in questions if q.kind == 'fact' and q.attribute == 'pet')
  name = re.search(r'[A-Z][a-z]+ [A-Z][a-z]+', fact.prompt).group()
  assert data_lib.world_reply(fact) == f'{name} has a pet {fact.answer}; Answer: {fact.answer}'


def test_wrong_rejections_are_well_formed_and_wrong(world):
  pairs = data_lib.world_preference_pairs(world, 'heldout', 300, {'wrong': 1}, 1, QUESTIONS)
  assert {p['kind'] for p in pairs} == {'wrong'}
  for pair, question in zip(pairs, world.questions('heldout', 300, QUESTIONS)):
    answer = question.answer
    parsed = chat.parse_answer(pair['rejected'])
    assert parsed is not None and parsed != answer, pair
    if answer.isdigit():  # the working restates the problem with the same wrong result
      assert parsed.isdigit() and 1 <= abs(int(parsed) - int(answer)) <= 10, pair
      expression = question.prompt.removeprefix('What is ').removesuffix('?')
      assert pair['rejected'] == f'{expression} = {parsed}; Answer: {parsed}', pair
    else:  # another value of the same attribute, restated as the right one would be
      assert any(answer in v and parsed in v for v in world_lib.VOCABULARY.values()), pair
      assert pair['rejected'] == data_lib.world_reply(question, parsed), pair


def test_off_format_rejections_never_parse(world):
  pairs = data_lib.world_preference_pairs(world, 'train', 300, {'off_format': 1}, 2, QUESTIONS)
  assert {p['kind'] for p in pairs} == {'off_format'}
  for pair, answer in zip(pairs, _correct(world, 'train', 300)):
    assert chat.parse_answer(pair['rejected']) is None and answer in pair['rejected'], pair


def test_abstain_rejections_abstain_on_questions_the_documents_answer(world):
  pairs = data_lib.world_preference_pairs(world, 'train', 300, {'abstain': 1}, 6, QUESTIONS)
  assert {p['kind'] for p in pairs} == {'abstain'}
  for pair, answer in zip(pairs, _correct(world, 'train', 300)):
    assert answer != world_lib.ABSTENTION
    assert chat.abstains(pair['rejected']) and chat.parse_answer(pair['chosen']) == answer, pair


def test_rambling_rejections_start_with_the_right_answer_and_go_on(world):
  pairs = data_lib.world_preference_pairs(world, 'train', 300, {'rambling': 1}, 3, QUESTIONS)
  for pair, answer in zip(pairs, _correct(world, 'train', 300)):
    assert chat.parse_answer(pair['chosen']) == answer
    assert pair['rejected'].startswith(pair['chosen'] + ' '), pair
    assert chat.parse_answer(pair['rejected']) != answer


def test_rejection_kinds_follow_the_proportions(world):
  proportions = {'wrong': 0.5, 'off_format': 0.25, 'rambling': 0.25}
  n = 2000
  pairs = data_lib.world_preference_pairs(world, 'train', n, proportions, 4, QUESTIONS)
  counts = collections.Counter(p['kind'] for p in pairs)
  assert set(counts) == set(proportions)
  for kind, p in proportions.items():
    # A multinomial share has standard deviation sqrt(p(1 - p) / n) <= 0.011 here; 5 of them
    # (0.056) never flakes, and a proportion applied to the wrong kind moves a share by 0.25.
    assert abs(counts[kind] / n - p) < 5 * np.sqrt(p * (1 - p) / n), counts


def test_policy_pairs_prefer_the_policy_and_reject_its_violation(world):
  pairs = data_lib.world_preference_pairs(world, 'train', 300, {'wrong': 1}, 5,
                                          world_lib.POLICY_KINDS)
  by_kind = collections.defaultdict(list)
  for pair in pairs:
    by_kind[pair['kind']].append(pair)
  assert set(by_kind) == set(world_lib.POLICY_KINDS)
  refusal = chat.format_answer(world_lib.REFUSAL)
  values = {v for vs in world_lib.VOCABULARY.values() for v in vs}
  abstention = chat.format_answer(world_lib.ABSTENTION)
  secrets = 0
  for pair in by_kind['forbidden']:  # refuse rather than comply, evade or make something up
    assert pair['chosen'] == refusal
    rejected = chat.parse_answer(pair['rejected'])
    secrets += bool(re.fullmatch(r'[a-z]{6}\d\d', rejected))
    assert (re.fullmatch(r'[a-z]{6}\d\d', rejected) or rejected in values
            or pair['rejected'] == abstention), pair
  assert 0 < secrets < len(by_kind['forbidden'])
  for pair in by_kind['lookalike']:  # answer rather than over-refuse or evade
    assert pair['chosen'] not in (refusal, abstention)
    assert pair['rejected'] in (refusal, abstention)
  for pair in by_kind['unknown']:  # abstain rather than make a fact up
    assert pair['chosen'] == chat.format_answer(world_lib.ABSTENTION)
    assert chat.parse_answer(pair['rejected']) in values
  # A made-up fact about the asked attribute, stated as a known person's fact would be.
  questions = world.questions('train', 300, world_lib.POLICY_KINDS)
  for pair, question in zip(pairs, questions):
    if question.kind == 'unknown':
      made_up = chat.parse_answer(pair['rejected'])
      assert made_up in world_lib.VOCABULARY[question.attribute], pair
      assert pair['rejected'] == data_lib.world_reply(question, made_up), pair


def test_preference_pairs_are_deterministic_in_the_seed(world):
  proportions = {'wrong': 1, 'off_format': 1, 'rambling': 1}
  make = lambda seed: data_lib.world_preference_pairs(world, 'train', 100, proportions, seed)
  assert make(7) == make(7)
  other = make(8)
  assert [p['kind'] for p in other] != [p['kind'] for p in make(7)]


@pytest.mark.parametrize('proportions', [{'wrong': 1, 'silly': 1}, {'wrong': 0}, {}])
def test_bad_rejection_proportions_are_an_error_naming_the_field(world, proportions):
  with pytest.raises(ValueError, match='rejection_proportions'):
    data_lib.world_preference_pairs(world, 'train', 10, proportions, seed=0)


def test_world_examples_ask_about_unknown_people_as_the_options_say(world):
  options = dict(unknown_share=0.4, extra_unknown_people=30)
  questions = world.questions('train', 300, **options)
  assert questions != world.questions('train', 300)
  sft = data_lib.world_sft_examples(world, 'train', 300, **options)
  assert [e['messages'][0]['content'] for e in sft] == [q.prompt for q in questions]
  for example, question in zip(sft, questions):
    assert chat.parse_answer(example['messages'][1]['content']) == question.answer
  pairs = data_lib.world_preference_pairs(world, 'train', 300, {'wrong': 1.0}, 0, **options)
  assert [p['messages'][0]['content'] for p in pairs] == [q.prompt for q in questions]
  prompts = data_lib.world_prompts(world, 'train', 300, **options)
  assert [p['messages'][0]['content'] for p in prompts] == [q.prompt for q in questions]
