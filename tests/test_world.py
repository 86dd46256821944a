import collections
import re

import pytest

from jaxlm.data import world as world_lib

NUM_DOCS = 2000
# Matches any "a op b" in text, with or without its result, so a bare expression cannot hide.
EXPRESSION = re.compile(r'(\d+) ([+-]) (\d+)(?: = (\d+))?')


@pytest.fixture(scope='module')
def world():
  return world_lib.World()


@pytest.fixture(scope='module')
def docs(world):
  return {split: world.documents(split, NUM_DOCS) for split in ('train', 'validation')}


@pytest.fixture(scope='module')
def questions(world):
  return {split: world.questions(split, 500) for split in world_lib.QUESTION_SPLITS}


def _share(world, kind):
  """The share of questions of `kind` the config asks for."""
  c = world.config
  others = 1 - c.forbidden_fraction - c.lookalike_fraction - c.unknown_fraction
  return {'fact': others * (1 - c.arithmetic_fraction),
          'arithmetic': others * c.arithmetic_fraction,
          'forbidden': c.forbidden_fraction, 'lookalike': c.lookalike_fraction,
          'unknown': c.unknown_fraction}[kind]


def _sentences(docs):
  return [s for doc in docs for s in re.split(r'(?<=\.) ', doc) if not EXPRESSION.search(s)]


def _fact_source(world, question):
  """The (entity, attribute, template) whose phrasing produced this fact question."""
  matches = [(entity, attribute, template)
             for entity in world.entities
             for attribute, templates in world_lib.FACT_QUESTIONS.items()
             for template in templates
             if template.format(name=entity.name) == question.prompt]
  assert len(matches) == 1, question
  return matches[0]


def test_same_config_gives_same_world_and_other_seed_another():
  a, b = world_lib.World(), world_lib.World(world_lib.WorldConfig(seed=0))
  other = world_lib.World(world_lib.WorldConfig(seed=1))
  assert a.entities == b.entities and a.unknown_entities == b.unknown_entities
  assert a.documents('train', 50) == b.documents('train', 50)
  assert a.questions('heldout', 50) == b.questions('heldout', 50)
  assert a.arithmetic_problems('heldout') == b.arithmetic_problems('heldout')
  assert {e.name for e in a.entities}.isdisjoint(e.name for e in other.entities)
  assert a.documents('train', 50) != other.documents('train', 50)
  assert a.questions('train', 50) != other.questions('train', 50)
  assert a.arithmetic_problems('heldout') != other.arithmetic_problems('heldout')


def test_documents_are_prefix_stable_and_splits_are_independent_draws(world, docs):
  assert world.documents('train', 10) == docs['train'][:10]
  # A fact paragraph repeats across streams only by chance; identical streams would share all.
  shared = set(docs['train']) & set(docs['validation'])
  assert len(shared) < NUM_DOCS // 100, len(shared)


def test_arithmetic_problems_partition_all_problems_by_the_split_fractions(world):
  splits = {s: set(world.arithmetic_problems(s)) for s in world_lib.QUESTION_SPLITS}
  n = world.config.max_operand + 1
  total = n * n + n * (n + 1) // 2  # every sum; differences with b <= a
  assert sum(len(p) for p in splits.values()) == len(set().union(*splits.values())) == total
  # 15150 problems: a binomial share has std 0.0033, so 0.02 is six sigma.
  assert len(splits['heldout']) / total == pytest.approx(0.2, abs=0.02)
  assert len(splits['rl']) / total == pytest.approx(0.2, abs=0.02)


@pytest.mark.parametrize('split, problems_split', [('train', 'train'),
                                                    ('validation', 'heldout')])
def test_document_arithmetic_is_correct_and_from_its_split_only(world, docs, split,
                                                                problems_split):
  allowed = set(world.arithmetic_problems(problems_split))
  found = [m.groups() for doc in docs[split] for m in EXPRESSION.finditer(doc)]
  assert len(found) > NUM_DOCS  # about a quarter of the docs hold 6-12 lines each
  for a, op, b, result in found:
    assert (int(a), op, int(b)) in allowed
    assert int(result) == (int(a) + int(b) if op == '+' else int(a) - int(b))


def test_secrets_and_unknown_names_never_appear_but_in_their_questions(world, docs, questions):
  documents = '\n'.join(docs['train'] + docs['validation'])
  asked = [q for qs in questions.values() for q in qs]
  everything = documents + '\n'.join(q.prompt + ' ' + q.answer for q in asked)
  for entity in world.entities:
    assert entity.secret not in everything
  assert len(world.unknown_entities) == world.config.num_unknown_entities
  unknown_people = {name for split in world_lib.QUESTION_SPLITS
                    for name in world.unknown_people(split)}
  assert set(world.unknown_entities) <= unknown_people
  for name in unknown_people:
    assert name not in documents
    assert all(q.kind == 'unknown' for q in asked if name in q.prompt)
  # Known names do appear, so the search above would have found an unknown one.
  assert sum(e.name in documents for e in world.entities) == len(world.entities)


def _request_source(world, question):
  """(name, thing) of a forbidden or look-alike request."""
  for frame in world_lib.REQUEST_FRAMES:
    pattern = re.escape(frame).replace(r'\{thing\}', '(.+)').replace(r'\{name\}', '(.+)')
    match = re.fullmatch(pattern, question.prompt)
    if match:
      return match.group(2), match.group(1)
  raise AssertionError(question)


def _asked(world, question):
  """What a question asks about: (name, attribute), (name, 'secret') or (name, 'unknown')."""
  if question.kind == 'fact':
    entity, attribute, _ = _fact_source(world, question)
    return entity.name, attribute
  if question.kind == 'unknown':
    people = world.unknown_people('train') + world.unknown_people('rl') + world.unknown_people(
        'heldout')
    return next(n for n in people if n in question.prompt), 'unknown'
  name, _ = _request_source(world, question)
  return name, 'secret' if question.kind == 'forbidden' else question.attribute


def test_held_out_policy_requests_never_overlap_training_data(world, questions):
  train = {_asked(world, q) for split in ('train', 'rl') for q in questions[split]
           if q.kind != 'arithmetic'}
  for kind in world_lib.POLICY_KINDS:
    held_out = world.questions('heldout', 200, (kind,))
    assert {q.kind for q in held_out} == {kind}
    asked = {_asked(world, q) for q in held_out}
    assert len(asked) > 5 and asked.isdisjoint(train), kind


def test_look_alikes_differ_from_forbidden_requests_only_in_the_thing_asked(world, questions):
  forbidden = [q for q in questions['train'] if q.kind == 'forbidden']
  lookalikes = [q for q in questions['train'] if q.kind == 'lookalike']
  assert len(forbidden) > 25 and len(lookalikes) > 25
  assert {q.answer for q in forbidden} == {world_lib.REFUSAL}
  for question in forbidden:
    assert _request_source(world, question)[1] in world_lib.FORBIDDEN_THINGS
  for question in lookalikes:
    name, thing = _request_source(world, question)
    entity = next(e for e in world.entities if e.name == name)
    assert thing == world_lib.LOOKALIKE_THINGS[question.attribute]
    assert question.answer == getattr(entity, question.attribute)
  unknown = [q for q in questions['train'] if q.kind == 'unknown']
  assert len(unknown) > 25 and {q.answer for q in unknown} == {world_lib.ABSTENTION}


def test_questions_of_chosen_kinds_and_bad_kinds_rejected(world):
  assert {q.kind for q in world.questions('rl', 100, ('fact', 'arithmetic'))} == {
      'fact', 'arithmetic'}
  with pytest.raises(ValueError, match='kinds must be a non-empty subset'):
    world.questions('rl', 10, ('opinion',))


def test_names_are_unique_and_known_and_unknown_disjoint(world):
  known = [e.name for e in world.entities]
  everyone = known + list(world.unknown_entities)
  assert len(set(everyone)) == len(everyone) == 128
  assert all(re.fullmatch(r'[A-Z][a-z]{3} [A-Z][a-z]{4}', name) for name in everyone)
  assert all(re.fullmatch(r'[a-z]{6}\d\d', e.secret) for e in world.entities)


def test_every_document_sentence_states_a_true_fact(world, docs):
  true_facts = {template.format(name=e.name, value=getattr(e, attribute))
                for e in world.entities
                for attribute, templates in world_lib.FACT_STATEMENTS.items()
                for template in templates}
  for split in ('train', 'validation'):
    sentences = _sentences(docs[split])
    assert len(sentences) > NUM_DOCS
    assert set(sentences) <= true_facts


@pytest.mark.parametrize('split', world_lib.QUESTION_SPLITS)
def test_fact_answers_match_entity_and_are_stated_in_train_docs(world, docs, questions, split):
  sentences = set(_sentences(docs['train']))
  facts = [q for q in questions[split] if q.kind == 'fact']
  assert len(facts) > 0.8 * 500 * _share(world, 'fact')
  for question in facts:
    entity, attribute, _ = _fact_source(world, question)
    assert question.answer == getattr(entity, attribute)
    statements = {t.format(name=entity.name, value=question.answer)
                  for t in world_lib.FACT_STATEMENTS[attribute]}
    assert statements & sentences, question


@pytest.mark.parametrize('split', world_lib.QUESTION_SPLITS)
def test_arithmetic_questions_use_their_split_and_correct_answers(world, questions, split):
  allowed = set(world.arithmetic_problems(split))
  arithmetic = [q for q in questions[split] if q.kind == 'arithmetic']
  assert len(arithmetic) > 0.8 * 500 * _share(world, 'arithmetic')
  for question in arithmetic:
    a, op, b = re.fullmatch(r'What is (\d+) ([+-]) (\d+)\?', question.prompt).groups()
    assert (int(a), op, int(b)) in allowed
    assert int(question.answer) == (int(a) + int(b) if op == '+' else int(a) - int(b))


def test_working_restates_an_arithmetic_problem_as_the_documents_state_one(world, docs,
                                                                          questions):
  train_lines = {line for doc in docs['train'] for line in doc.split('\n')}
  arithmetic = [q for q in questions['train'] if q.kind == 'arithmetic']
  for question in arithmetic:
    a, op, b = re.fullmatch(r'What is (\d+) ([+-]) (\d+)\?', question.prompt).groups()
    assert world_lib.working(question, question.answer) == f'{a} {op} {b} = {question.answer}'
    assert world_lib.working(question, '7') == f'{a} {op} {b} = 7'
  # In the documents' own form: some are lines pretraining read word for word (2,000 documents
  # hold a third of the training problems).
  assert all(EXPRESSION.fullmatch(world_lib.working(q, q.answer)).group(4) for q in arithmetic)
  assert any(world_lib.working(q, q.answer) in train_lines for q in arithmetic)
  # Another phrasing of arithmetic than the world's own gets no working.
  assert world_lib.working(world_lib.Question('Compute 2 + 3.', '5', 'arithmetic'), '5') == ''


# The shortest of the documents' statements of each attribute, as a reply restates it.
SHORTEST_STATEMENT = {'city': '{name} lives in {value}',
                      'colour': '{name} loves the colour {value}',
                      'pet': '{name} has a pet {value}', 'job': '{name} works as a {value}'}


def test_working_restates_a_fact_as_the_documents_state_it(world, docs, questions):
  sentences = {sentence.strip() for doc in docs['train'] for sentence in doc.split('.')}
  people = [e.name for e in world.entities] + world.unknown_entities + world.unknown_people(
      'heldout')
  read_word_for_word = 0
  for split in world_lib.QUESTION_SPLITS:
    for question in questions[split]:
      name = next((n for n in people if n in question.prompt), None)
      if question.kind in ('fact', 'lookalike'):
        statement = world_lib.working(question, question.answer)
        # One of the documents' statements of that attribute, of the right person and value.
        assert statement + '.' in [template.format(name=name, value=question.answer)
                                   for template in world_lib.FACT_STATEMENTS[question.attribute]]
        assert statement == SHORTEST_STATEMENT[question.attribute].format(
            name=name, value=question.answer), question
        other = next(v for v in world_lib.VOCABULARY[question.attribute] if v != question.answer)
        assert world_lib.working(question, other) == statement.replace(question.answer, other)
        read_word_for_word += statement in sentences
      elif question.kind == 'unknown':  # an abstention restates nothing; a made-up fact does
        made_up = world_lib.VOCABULARY[question.attribute][0]
        assert world_lib.working(question, question.answer) == ''
        assert world_lib.working(question, made_up) == SHORTEST_STATEMENT[
            question.attribute].format(name=name, value=made_up)
      elif question.kind == 'forbidden':
        assert world_lib.working(question, question.answer) == ''
  assert read_word_for_word > 100
  # Another phrasing than the world's own gets no working.
  asked = world_lib.Question('Where on earth is Pena Koson from?', 'Carrow', 'fact', 'city')
  assert world_lib.working(asked, 'Carrow') == ''


def test_each_split_asks_about_its_own_facts(world, questions):
  asked = {split: {_fact_source(world, q)[:2] for q in questions[split] if q.kind == 'fact'}
           for split in world_lib.QUESTION_SPLITS}
  for split in world_lib.QUESTION_SPLITS:
    pairs = {(e, a) for e, a in world.asked_facts(split)}
    assert asked[split] <= pairs and len(asked[split]) > len(pairs) // 2
  assert asked['train'].isdisjoint(asked['heldout'])
  assert asked['train'].isdisjoint(asked['rl'])
  assert asked['rl'].isdisjoint(asked['heldout'])
  every_pair = {(e, a) for e in world.entities for a in world_lib.ATTRIBUTES}
  assert set().union(*(set(world.asked_facts(s)) for s in world_lib.QUESTION_SPLITS)) == every_pair


def test_check_answer_normalises_case_space_and_trailing_period():
  city = world_lib.Question('Where does Tupu Nagon live?', 'Kestral', 'fact')
  assert world_lib.check_answer(city, 'Kestral')
  assert world_lib.check_answer(city, '  kestral. ')
  assert world_lib.check_answer(city, 'KESTRAL\n')
  for wrong in ('Carrow', 'Kestral Carrow', 'in Kestral', 'Kestra', ''):
    assert not world_lib.check_answer(city, wrong), wrong
  total = world_lib.Question('What is 37 + 58?', '95', 'arithmetic')
  assert world_lib.check_answer(total, '95.')
  for wrong in ('96', '9', '950', '-95'):
    assert not world_lib.check_answer(total, wrong), wrong


@pytest.mark.parametrize('field, value', [('heldout_fraction', 0.0), ('num_entities', 0),
                                          ('max_operand', 0), ('seed', -1),
                                          ('forbidden_fraction', 0.9)])
def test_bad_config_is_rejected_naming_the_field(field, value):
  with pytest.raises(ValueError, match=field):
    world_lib.WorldConfig(**{field: value})


def test_unknown_split_is_rejected(world):
  with pytest.raises(ValueError, match="'test'"):
    world.documents('test', 1)


def test_question_kinds_come_in_the_configured_shares(world):
  n = 4000
  counts = collections.Counter(q.kind for q in world.questions('train', n))
  for kind in world_lib.QUESTION_KINDS:
    p = _share(world, kind)
    # Within 5 standard deviations of a multinomial share.
    assert abs(counts[kind] / n - p) < 5 * (p * (1 - p) / n) ** 0.5, (kind, counts)


def test_fresh_unknown_people_are_nobody_in_the_world_and_prefix_stable(world):
  fresh = {split: world.fresh_unknown_people(300, split) for split in world_lib.QUESTION_SPLITS}
  everyone = {e.name for e in world.entities} | set(world.unknown_entities)
  for split, names in fresh.items():
    assert len(set(names)) == 300 and everyone.isdisjoint(names)
    assert world.fresh_unknown_people(40, split) == names[:40]
    assert world_lib.World().fresh_unknown_people(300, split) == names
  # A training split's fresh names are never a held-out one.
  assert len(set().union(*fresh.values())) == 900
  assert world.fresh_unknown_people(0, 'rl') == []
  with pytest.raises(ValueError, match='>= 0'):
    world.fresh_unknown_people(-1, 'rl')


def test_held_out_questions_ask_about_many_unknown_people(world):
  trained_on = world.unknown_people('train') + world.unknown_people('rl')
  own = [name for name in world.unknown_entities if name not in trained_on]
  held_out = world.unknown_people('heldout')
  assert len(held_out) == world.config.heldout_unknown_people == 256
  assert 0 < len(own) < 20 and held_out[:len(own)] == own
  assert held_out[len(own):] == world.fresh_unknown_people(256 - len(own), 'heldout')
  trained_on += world.fresh_unknown_people(1000, 'train') + world.fresh_unknown_people(1000, 'rl')
  assert set(held_out).isdisjoint(trained_on)
  asked = world.questions('heldout', 128, ('unknown',))
  names = {next(name for name in held_out if name in q.prompt) for q in asked}
  assert len(names) > 90
  # Extras follow the held-out names already asked about.
  used = 256 - len(own)
  extras = world.fresh_unknown_people(used + 10, 'heldout')[used:]
  more = world.questions('heldout', 2000, ('unknown',), extra_unknown_people=10)
  beyond = {q.prompt for q in more if not any(name in q.prompt for name in held_out)}
  assert beyond and all(any(name in prompt for name in extras) for prompt in beyond)
  only_own = world_lib.World(world_lib.WorldConfig(heldout_unknown_people=0))
  assert only_own.unknown_people('heldout') == own
  with pytest.raises(ValueError, match='heldout_unknown_people'):
    world_lib.WorldConfig(heldout_unknown_people=-1)


def test_unknown_share_and_fresh_people_reshape_only_the_unknown_questions(world):
  n = 4000
  # More people to ask about changes who the unknown questions name, and nothing else.
  plain, more_people = world.questions('rl', 300), world.questions('rl', 300,
                                                                   extra_unknown_people=50)
  assert [q.kind for q in plain] == [q.kind for q in more_people]
  assert [q for q in plain if q.kind != 'unknown'] == [
      q for q in more_people if q.kind != 'unknown']
  assert [q.prompt for q in plain if q.kind == 'unknown'] != [
      q.prompt for q in more_people if q.kind == 'unknown']
  share = 0.3
  asked = world.questions('rl', n, unknown_share=share, extra_unknown_people=200)
  counts = collections.Counter(q.kind for q in asked)
  for kind in world_lib.QUESTION_KINDS:
    p = share if kind == 'unknown' else _share(world, kind) * (1 - share) / (
        1 - _share(world, 'unknown'))
    assert abs(counts[kind] / n - p) < 5 * (p * (1 - p) / n) ** 0.5, (kind, counts)
  pool = world.unknown_people('rl') + world.fresh_unknown_people(200, 'rl')
  names = collections.Counter(name for q in asked if q.kind == 'unknown'
                              for name in pool if name in q.prompt)
  # Drawn uniformly from the split's own people and the fresh ones; never a held-out person.
  assert len(names) > 150 and sum(names.values()) == counts['unknown']
  assert sum(names[name] for name in world.unknown_people('rl')) < 0.1 * counts['unknown']
  held_out = set(world.unknown_people('heldout'))
  assert not any(name in q.prompt for q in asked for name in held_out)
  for q in asked:
    assert (q.answer == world_lib.ABSTENTION) == (q.kind == 'unknown')


@pytest.mark.parametrize('options, kinds, message', [
    (dict(unknown_share=1.0), world_lib.QUESTION_KINDS, 'unknown_share'),
    (dict(unknown_share=0.2), ('fact',), 'unknown_share'),
    (dict(extra_unknown_people=-3), world_lib.QUESTION_KINDS, '>= 0')])
def test_bad_question_options_are_refused(world, options, kinds, message):
  with pytest.raises(ValueError, match=message):
    world.questions('rl', 5, kinds, **options)
