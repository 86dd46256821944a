"""SFT label noise (exact shares, deterministic in the seed, clean replies and evaluation
untouched) and the quality-vs-quantity grid end to end on a tiny setting."""

import collections
import json
import os

import pytest

from experiments import pretrain
from experiments import sft
from experiments import sft_data_quality
from experiments.configs import sft_data_quality as sft_data_quality_config
from jaxlm import chat
from jaxlm.data import post_training as data_lib
from jaxlm.data import world as world_lib
from jaxlm.errors import UserError
from tests import tiny_config

CLEAN = data_lib.world_sft_examples(world_lib.World(), 'train', 20_000)


def _noisy_indices(examples, kind):
  return {i for i, e in enumerate(examples) if e.get('noise') == kind}


def test_label_noise_corrupts_exactly_the_configured_shares_and_nothing_else():
  noisy = data_lib.with_label_noise(CLEAN, noise_wrong=0.3, noise_off_format=0.15, seed=0)
  wrong, off_format = _noisy_indices(noisy, 'wrong'), _noisy_indices(noisy, 'off_format')
  assert (len(wrong), len(off_format)) == (6000, 3000)  # 0.3 and 0.15 of 20,000, exactly
  for i, (clean, example) in enumerate(zip(CLEAN, noisy)):
    reply = example['messages'][-1]['content']
    assert example['messages'][:-1] == clean['messages'][:-1]
    if i in wrong:  # in format, and the world's verdict on it is 0
      assert chat.parse_answer(reply) is not None and not chat.is_correct(reply, clean['answer'])
      assert chat.gold_reward(reply, clean) == 0
      if clean['kind'] in ('fact', 'arithmetic'):  # worked as a right reply is: only wrong
        question = world_lib.Question(clean['messages'][0]['content'], clean['answer'],
                                      clean['kind'], clean['attribute'])
        assert reply == data_lib.world_reply(question, chat.parse_answer(reply))
    elif i in off_format:  # the right answer, out of format
      assert chat.parse_answer(reply) is None and clean['answer'] in reply
    else:
      assert example is clean
  # Every kind of conversation is corrupted in about the configured share (0.045 is 4 standard
  # deviations for the rarest kinds, 2,000 conversations each).
  kinds = collections.Counter(e['kind'] for e in CLEAN)
  noisy_kinds = collections.Counter(CLEAN[i]['kind'] for i in wrong | off_format)
  for kind, count in kinds.items():
    assert noisy_kinds[kind] / count == pytest.approx(0.45, abs=0.045), kind
  # A wrong reply to a forbidden request is never the refusal; to an unknown person, never
  # the abstention; to a look-alike, a refusal or an abstention.
  for i in wrong:
    reply = noisy[i]['messages'][-1]['content']
    assert {'forbidden': not chat.refuses(reply), 'unknown': not chat.abstains(reply),
            'lookalike': chat.refuses(reply) or chat.abstains(reply)}.get(CLEAN[i]['kind'], True)


def test_which_examples_are_corrupted_depends_on_the_seed_alone():
  first, again = (data_lib.with_label_noise(CLEAN, 0.2, 0.2, seed=3) for _ in range(2))
  assert first == again
  other = data_lib.with_label_noise(CLEAN, 0.2, 0.2, seed=4)
  corrupted = lambda examples: {i for i, e in enumerate(examples) if 'noise' in e}
  # Independent draws of 40% overlap in 16% of the examples (0.16 +- 0.01 at 20,000).
  assert len(corrupted(first) & corrupted(other)) / len(CLEAN) == pytest.approx(0.16, abs=0.01)
  assert data_lib.with_label_noise(CLEAN, 0.0, 0.0, seed=3) == CLEAN


@pytest.mark.parametrize('field, value, message', [
    ('noise_wrong', 1.5, r'config.data.noise_wrong must be in \[0, 1\], got 1.5'),
    ('noise_off_format', -0.1, r'config.data.noise_off_format must be in \[0, 1\], got -0.1'),
    ('noise_wrong', 0.7, r'noise_wrong \+ config.data.noise_off_format must be at most 1, '
                         r'got 0.7 \+ 0.6'),
])
def test_sft_names_a_bad_noise_share(field, value, message):
  config = tiny_config.sft_config('unused',
                                  **{'data.noise_off_format': 0.6, f'data.{field}': value})
  with pytest.raises(UserError, match=message):
    sft.validate(config)


def _grid(base, num_train=(32, 64), noise=(0.5,)):
  c = tiny_config.sft_config(base, steps=2, eval_at_start=False)
  c.checkpoint.every = 1_000_000
  return sft_data_quality_config.with_grid(c, num_train=num_train, noise=noise, wrong_share=0.5)


def test_a_tiny_grid_trains_evaluates_and_reports(tmp_path, monkeypatch):
  base = str(tmp_path / 'base')
  pretrain.train_and_evaluate(tiny_config.config(steps=4), base)
  tokenized = []  # the examples of every tokenization: a run's training set, then its eval set
  tokenize = data_lib.tokenize_conversations
  monkeypatch.setattr(data_lib, 'tokenize_conversations',
                      lambda tokenizer, examples, seq_len: (tokenized.append(examples),
                                                            tokenize(tokenizer, examples,
                                                                     seq_len))[1])
  workdir = str(tmp_path / 'grid')
  report = sft_data_quality.main(_grid(base), workdir)

  cells = report['cells']
  assert [c['name'] for c in cells] == ['n32_noise0.5', 'n64_noise0.5']
  assert len(tokenized) == 2 * len(cells)
  for cell, train, evaluation in zip(cells, tokenized[::2], tokenized[1::2]):
    assert len(train) == cell['num_train']
    assert (len(_noisy_indices(train, 'wrong')), len(_noisy_indices(train, 'off_format'))) == (
        round(cell['num_train'] * cell['noise'] / 2),) * 2
    # Evaluation is the same clean held-out set for every run.
    assert evaluation == tokenized[1]
    assert all(chat.is_correct(e['messages'][-1]['content'], e['answer']) and 'noise' not in e
               for e in evaluation)

  with open(os.path.join(workdir, 'sft_data_quality.json')) as f:
    assert json.load(f) == report
  table = open(os.path.join(workdir, 'sft_data_quality.md')).read().splitlines()
  header = [h.strip() for h in table[0].strip('|').split('|')]
  assert len(table) == 2 + len(cells)
  for cell, line in zip(cells, table[2:]):
    row = dict(zip(header, (v.strip() for v in line.strip('|').split('|'))))
    with open(os.path.join(workdir, 'runs', cell['name'], 'metrics.jsonl')) as f:
      final = [json.loads(l) for l in f][-1]
    assert final['step'] == 2
    assert (int(row['conversations']), float(row['noise'])) == (cell['num_train'], cell['noise'])
    for metric in sft_data_quality.METRICS:
      name = metric.split('/')[1]
      assert float(row[name]) == pytest.approx(final[metric], abs=5e-4)  # printed to 3 places
      assert cell[name] == final[metric]
    assert cell['wall_seconds'] > 0
  with open(os.path.join(workdir, 'sft_data_quality.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'

  # A rerun reuses every finished run instead of training it again.
  tokenized.clear()
  assert sft_data_quality.main(_grid(base), workdir)['cells'] == cells
  assert not tokenized


@pytest.mark.parametrize('grid, message', [
    ({'noise': (0.0, 1.5)}, r'config.grid.noise: 1.5 is not in \[0, 1\]'),
    ({'num_train': (100, 0)}, 'config.grid.num_train: 0 is not a positive whole number'),
])
def test_a_bad_grid_value_is_one_line_before_anything_trains(tmp_path, grid, message):
  with pytest.raises(UserError, match=message):
    sft_data_quality.main(_grid('unused', **grid), str(tmp_path))
  assert not os.listdir(tmp_path)
