"""The lm-evaluation-harness adapter against the model computed directly, and the world task
through the harness against jaxlm's own evaluation of the same checkpoint."""

import functools
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

os.environ.update(HF_DATASETS_OFFLINE='1', HF_HUB_OFFLINE='1')
import datasets  # pylint: disable=g-import-not-at-top,wrong-import-position
import lm_eval  # pylint: disable=g-import-not-at-top,wrong-import-position
from lm_eval import tasks as lm_eval_tasks  # pylint: disable=wrong-import-position
from lm_eval import utils as lm_eval_utils  # pylint: disable=wrong-import-position
from lm_eval.api.instance import Instance  # pylint: disable=wrong-import-position

from experiments import pretrain  # pylint: disable=wrong-import-position
from experiments import sft  # pylint: disable=wrong-import-position
from jaxlm import chat  # pylint: disable=wrong-import-position
from jaxlm import configs  # pylint: disable=wrong-import-position
from jaxlm import evaluation  # pylint: disable=wrong-import-position
from jaxlm import lm  # pylint: disable=wrong-import-position
from jaxlm import post_training  # pylint: disable=wrong-import-position
from jaxlm import sharding  # pylint: disable=wrong-import-position
from jaxlm.data import post_training as data_lib  # pylint: disable=wrong-import-position
from jaxlm.data import world as world_lib  # pylint: disable=wrong-import-position
from tests import tiny_config  # pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_QUESTIONS = 32
NUM_TRAINED = 24  # of them SFT is trained on, so that exact match is neither 0 nor 1
MAX_TOKENS = world_lib.REPLY_TOKENS  # as SFT's evaluation
# Log-probs computed in other shapes (padding, batch) differ by ~1e-6 a token, and the adapter
# sums them in float32.
TOLERANCE = dict(rtol=1e-6, atol=1e-4)


@pytest.fixture(scope='module')
def sft_workdir(tmp_path_factory):
  """A tiny SFT model that has memorised the first held-out questions."""
  tmp = tmp_path_factory.mktemp('evaluation')
  base, tuned = str(tmp / 'base'), str(tmp / 'sft')
  pretrain.train_and_evaluate(tiny_config.config(steps=8), base)
  questions = data_lib.world_prompts(world_lib.World(), 'heldout', NUM_TRAINED,
                                     ('fact', 'arithmetic'))
  train = tmp / 'train.jsonl'
  train.write_text(''.join(
      json.dumps({'prompt': q['messages'][0]['content'],
                  'response': chat.format_answer(q['answer'])}) + '\n' for q in questions))
  sft.train_and_evaluate(tiny_config.sft_config(
      base, steps=60, **{'data.source': 'jsonl', 'data.jsonl_train': str(train),
                          'train.learning_rate': 3e-3}), tuned)
  return tuned


@pytest.fixture(scope='module')
def harness_lm(sft_workdir):
  return evaluation.JaxlmLM(sft_workdir, batch_size=8)


def _requests(kind, arguments):
  return [Instance(kind, {}, args, i) for i, args in enumerate(arguments)]


def _log_probs_BxTxV(harness_lm, ids):
  """log p of every next token after each prefix of `ids`, from one unpadded forward pass."""
  with jax.set_mesh(harness_lm.mesh), nn.logical_axis_rules(sharding.RULES):
    logits, _ = _forward(harness_lm.model, harness_lm.params, jnp.asarray([ids]))
  return np.asarray(jax.nn.log_softmax(logits))[0].astype(np.float64)


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, tokens_BxT):
  return model.apply({'params': params}, tokens_BxT)


def test_the_chat_template_text_encodes_as_jaxlm_encodes_the_conversation(harness_lm):
  messages = [{'role': 'system', 'content': 'Be brief.'},
              {'role': 'user', 'content': 'Where does Gemo Kiges live?'},
              {'role': 'assistant', 'content': 'Answer: Carrow'},
              {'role': 'user', 'content': 'What is 2 + 3?'}]
  text = harness_lm.apply_chat_template(messages)
  expected = chat.encode(harness_lm.jaxlm_tokenizer, messages, add_generation_prompt=True)[0]
  assert harness_lm.tok_encode(text) == expected.tolist()
  # A prefilled reply (the harness's gen_prefix) stays open for the model to continue.
  prefilled = messages[:2] + [{'role': 'assistant', 'content': 'Answer:'}]
  whole = chat.encode(harness_lm.jaxlm_tokenizer, prefilled)[0].tolist()
  assert harness_lm.tok_encode(harness_lm.apply_chat_template(
      prefilled, add_generation_prompt=False)) == whole[:-1]


def test_loglikelihood_is_the_sum_of_the_model_token_log_probs(harness_lm):
  tokenizer = harness_lm.jaxlm_tokenizer
  question = data_lib.world_prompts(world_lib.World(), 'heldout', 1, ('fact', 'arithmetic'))[0]
  prompt = harness_lm.apply_chat_template(question['messages'])
  pairs = [('Gemo Kiges lives in', ' Carrow.'), ('', 'The pet of Gemo Kiges is a cat.'),
           (prompt, chat.format_answer(question['answer'])),  # memorised: greedy
           (prompt, 'Answer: nobody knows'), ('12 + 30 =', ' 42')]
  got = harness_lm.loglikelihood(_requests('loglikelihood', pairs))
  for (context, continuation), (log_prob, is_greedy) in zip(pairs, got):
    context_ids = harness_lm.tok_encode(context) if context else [tokenizer.bos_id]
    ids = harness_lm.tok_encode(context + continuation)
    assert ids[:len(context_ids)] == context_ids
    log_probs = _log_probs_BxTxV(harness_lm, ids[:-1])
    positions = np.arange(len(context_ids) - 1, len(ids) - 1)
    targets = np.asarray(ids)[positions + 1]
    np.testing.assert_allclose(log_prob, log_probs[positions, targets].sum(), **TOLERANCE)
    assert is_greedy == bool(np.all(log_probs[positions].argmax(-1) == targets))
  assert got[2][1] and not all(g for _, g in got)


def test_loglikelihood_rolling_is_the_text_log_prob_in_windows_of_max_length(harness_lm):
  world = world_lib.World()
  short, long = world.documents('validation', 1)[0], ' '.join(world.documents('validation', 6))
  tokenizer = harness_lm.jaxlm_tokenizer
  assert len(tokenizer.encode(short)) < harness_lm.max_length < len(tokenizer.encode(long))
  got = harness_lm.loglikelihood_rolling(_requests('loglikelihood_rolling', [(short,), (long,)]))
  ids = [tokenizer.bos_id] + tokenizer.encode(short)
  log_probs = _log_probs_BxTxV(harness_lm, ids[:-1])
  np.testing.assert_allclose(got[0], log_probs[np.arange(len(ids) - 1), ids[1:]].sum(), **TOLERANCE)
  # The long text: each token predicted once, from at most max_length tokens before it (the
  # harness's windows), each window's forward pass run alone.
  windows = map(lm_eval_utils.make_disjoint_window, lm_eval_utils.get_rolling_token_windows(
      tokenizer.encode(long), tokenizer.bos_id, harness_lm.max_length, 1))
  expected, scored = 0.0, 0
  for context, continuation in windows:
    window = context + continuation
    log_probs = _log_probs_BxTxV(harness_lm, window[:-1])
    positions = np.arange(len(context) - 1, len(window) - 1)
    expected += log_probs[positions, np.asarray(window)[positions + 1]].sum()
    scored += len(continuation)
  assert scored == len(tokenizer.encode(long))
  np.testing.assert_allclose(got[1], expected, **TOLERANCE)


def _greedy_without_cache(harness_lm, ids, max_new_tokens, stop_id):
  """Greedy decoding that reruns the whole sequence (padded to one width) for every token."""
  new = []
  while len(new) < max_new_tokens:
    sequence = ids + new
    padded = sequence + [0] * (harness_lm.max_length - len(sequence))
    token = int(_log_probs_BxTxV(harness_lm, padded)[len(sequence) - 1].argmax())
    if token == stop_id:
      break
    new.append(token)
  return harness_lm.jaxlm_tokenizer.decode(new)


def test_generate_until_is_greedy_decoding_cut_at_the_stop_strings(harness_lm):
  tokenizer = harness_lm.jaxlm_tokenizer
  questions = data_lib.world_prompts(world_lib.World(), 'heldout', 3, ('fact', 'arithmetic'))
  chats = [harness_lm.apply_chat_template(q['messages']) for q in questions]
  arguments = ([(c, {'until': [], 'max_gen_toks': MAX_TOKENS}) for c in chats]
               + [('Gemo Kiges lives in', {'until': ['.'], 'max_gen_toks': 12}),
                  ('12 + 30 =', {'until': ['\n', '='], 'max_gen_toks': 8, 'temperature': 0.0}),
                  (chats[0], {'until': ': ', 'max_gen_toks': 8})])
  got = harness_lm.generate_until(_requests('generate_until', arguments))
  for (context, options), reply in zip(arguments, got):
    ids = harness_lm.tok_encode(context)
    stop = (chat.end_of_turn_id(tokenizer) if context.startswith('<|user|>')
            else tokenizer.eos_id)
    expected = _greedy_without_cache(harness_lm, ids, options['max_gen_toks'], stop)
    until = options['until']
    assert reply == evaluation.cut_at(expected, [until] if isinstance(until, str) else until)
  assert got[-1] == 'Answer' and got[0].startswith('Answer: ')


def test_a_sharded_mesh_gives_what_one_device_gives(harness_lm, sft_workdir, tmp_path):
  workdir = str(tmp_path / 'sharded')
  shutil.copytree(sft_workdir, workdir)
  config = configs.load(workdir)
  config.mesh.update(data=2, fsdp=2, tensor=2, num_devices=8)
  configs.save(config, workdir)
  sharded = evaluation.JaxlmLM(workdir, batch_size=8)
  assert sharded.mesh.devices.size == 8
  questions = data_lib.world_prompts(world_lib.World(), 'heldout', 4, ('fact', 'arithmetic'))
  chats = [harness_lm.apply_chat_template(q['messages']) for q in questions]
  pairs = [(c, chat.format_answer(q['answer'])) for c, q in zip(chats, questions)]
  for got, expected in zip(sharded.loglikelihood(_requests('loglikelihood', pairs)),
                           harness_lm.loglikelihood(_requests('loglikelihood', pairs))):
    np.testing.assert_allclose(got[0], expected[0], **TOLERANCE)
    assert got[1] == expected[1]
  generations = _requests('generate_until', [(c, {'until': [], 'max_gen_toks': 8}) for c in chats])
  assert sharded.generate_until(generations) == harness_lm.generate_until(generations)


def test_the_world_task_through_the_harness_scores_as_jaxlm_does(harness_lm, sft_workdir,
                                                                  tmp_path, monkeypatch):
  monkeypatch.setattr(datasets.config, 'HF_DATASETS_CACHE', str(tmp_path / 'hf_cache'))
  task_dir = tmp_path / 'tasks'
  evaluation.export_world_task(str(task_dir), num_questions=NUM_QUESTIONS,
                               max_gen_toks=MAX_TOKENS)
  results = lm_eval.simple_evaluate(
      model=harness_lm, tasks=[evaluation.WORLD_TASK], apply_chat_template=True,
      task_manager=lm_eval_tasks.TaskManager(include_path=str(task_dir), include_defaults=False),
      log_samples=True, bootstrap_iters=0)
  harness_em = results['results'][evaluation.WORLD_TASK]['exact_match,none']
  samples = sorted(results['samples'][evaluation.WORLD_TASK], key=lambda s: s['doc_id'])

  # jaxlm's own evaluation of the same checkpoint, as SFT runs it.
  examples = data_lib.world_held_out(data_lib.world_sft_examples, world_lib.World(),
                                     NUM_QUESTIONS, 0)
  eval_config = ml_collections.ConfigDict(dict(
      num_prompts=NUM_QUESTIONS, sample_tokens=MAX_TOKENS, temperature=0.0, top_k=0, top_p=1.0,
      batch_size_generation=harness_lm.batch_size, num_samples=0))
  evaluate = post_training.make_answer_evaluator(harness_lm.model, harness_lm.jaxlm_tokenizer,
                                                 examples, eval_config)
  with jax.set_mesh(harness_lm.mesh), nn.logical_axis_rules(sharding.RULES):
    jaxlm_metrics = evaluate(harness_lm.params, 0)
    replies = lm.replies(harness_lm.model, harness_lm.params, harness_lm.jaxlm_tokenizer,
                         [e['messages'][:1] for e in examples], jax.random.PRNGKey(0),
                         **lm.sampling_options(eval_config))

  assert [s['doc']['question'] for s in samples] == [e['messages'][0]['content']
                                                      for e in examples]
  assert [s['filtered_resps'][0] for s in samples] == replies
  assert [s['exact_match'] for s in samples] == [
      float(chat.is_correct(r, e['answer'])) for r, e in zip(replies, examples)]
  assert harness_em == pytest.approx(jaxlm_metrics['eval/exact_match'])
  assert 0 < harness_em < 1
  assert results['results'][evaluation.WORLD_TASK]['format_rate,none'] == pytest.approx(
      jaxlm_metrics['eval/format_rate'])


def test_the_binary_writes_the_harness_results(sft_workdir, tmp_path):
  output = tmp_path / 'results.json'
  env = dict(os.environ, HF_DATASETS_CACHE=str(tmp_path / 'hf_cache'))
  done = subprocess.run(
      [sys.executable, '-m', 'experiments.evaluate', f'--workdir={sft_workdir}',
       '--tasks=jaxlm_world', '--apply_chat_template', '--limit=8', '--batch_size=8',
       f'--output={output}'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]
  assert '|jaxlm_world|' in done.stdout and 'exact_match' in done.stdout
  results = json.loads(output.read_text())['results'][evaluation.WORLD_TASK]
  assert 0 <= results['exact_match,none'] <= 1 and results['format_rate,none'] == 1.0
