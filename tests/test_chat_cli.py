"""`experiments.chat` driven through a pipe, on a jaxlm workdir and on one imported from Hugging
Face: its transcript is, byte for byte, the greedy `lm.replies` of each state of the
conversation, with the notices of /system, /reset and a conversation outgrowing the context."""

import concurrent.futures
import os
import subprocess
import sys

import flax.linen as nn
import jax
import pytest

from jaxlm import chat
from jaxlm import lm
from jaxlm import serving
from jaxlm import sharding
from tests import saved_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_TOKENS = 16
SYSTEM = 'Answer briefly.'
LONG = 'and why ' * 6  # ~50 tokens: two of them and a reply outgrow the 112 left for a prompt


def _chat(workdir, lines, *flags):
  """(exit status, stdout, stderr) of the chat binary fed `lines`; bytes decoded as they are
  (a random model's replies hold carriage returns that text mode would translate)."""
  done = subprocess.run(
      [sys.executable, '-m', 'experiments.chat', f'--workdir={workdir}', '--temperature=0',
       f'--max_tokens={MAX_TOKENS}', *flags], input=''.join(f'{l}\n' for l in lines).encode(),
      cwd=ROOT, capture_output=True, timeout=120, env={**os.environ, 'PYTHONIOENCODING': 'utf-8'})
  return done.returncode, done.stdout.decode(), done.stderr.decode()


class Reference:
  """Greedy replies of the workdir's checkpoint, as `lm.replies` writes them."""

  def __init__(self, workdir):
    self.tokenizer, decoder = serving.load(workdir, 1)
    self.model, self.params, self.mesh = lm.load_workdir(workdir)[2], decoder.params, decoder.mesh

  def reply(self, messages) -> str:
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.RULES):
      return lm.replies(self.model, self.params, self.tokenizer, [messages],
                        jax.random.PRNGKey(0), max_new_tokens=MAX_TOKENS, temperature=0.0,
                        top_k=0, top_p=1.0, batch_size=1)[0]

  def prompt_length(self, messages) -> int:
    return len(chat.encode(self.tokenizer, messages, add_generation_prompt=True)[0])


def _turns(*pairs):
  return [{'role': role, 'content': content} for role, content in pairs]


@pytest.fixture(scope='module')
def runs(tmp_path_factory, tokenizer):
  """The binary's runs, two at a time, with the workdirs they ran on."""
  tmp = tmp_path_factory.mktemp('chat')
  workdirs = {'jaxlm': saved_models.random_workdir(str(tmp / 'jaxlm'), tokenizer),
              'hf': saved_models.hf_workdir(str(tmp / 'hf'))}
  scripts = {
      'jaxlm': (workdirs['jaxlm'], ['Where does Gemo Kiges live?', '', f'/system {SYSTEM}',
                                    'And his pet?', '/reset', 'and why ' * 20, LONG, '/nope',
                                    LONG + 'again', '/quit', 'never read']),
      'hf': (workdirs['hf'], ['Hello there', f'/system {SYSTEM}', 'Who are you?']),
      'max_tokens_over_context': (workdirs['jaxlm'], ['hi'], '--max_tokens=128'),
      'reward_model': (str(tmp / 'rm'), ['hi']),
  }
  os.makedirs(tmp / 'rm')
  for name in os.listdir(workdirs['jaxlm']):  # a reward model: the same files and its stats
    if name != 'checkpoints':
      os.symlink(os.path.join(workdirs['jaxlm'], name), tmp / 'rm' / name)
  (tmp / 'rm' / 'reward_stats.json').write_text('{}')
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    futures = {name: pool.submit(_chat, workdir, lines, *flags)
               for name, (workdir, lines, *flags) in scripts.items()}
    return workdirs, {name: future.result() for name, future in futures.items()}


def test_a_jaxlm_model_chats_resets_and_drops_its_oldest_turns(runs):
  workdirs, results = runs
  status, stdout, stderr = results['jaxlm']
  assert status == 0, stderr
  ref = Reference(workdirs['jaxlm'])
  first = _turns(('user', 'Where does Gemo Kiges live?'))
  a1 = ref.reply(first)
  second = _turns(('system', SYSTEM), *[(m['role'], m['content']) for m in first],
                  ('assistant', a1), ('user', 'And his pet?'))
  a2 = ref.reply(second)
  long1 = _turns(('system', SYSTEM), ('user', LONG.strip()))
  a3 = ref.reply(long1)
  long2 = _turns(('system', SYSTEM), ('user', (LONG + 'again').strip()))
  # The second long message does not fit beside the first and its reply; alone it does.
  overflowing = long1 + _turns(('assistant', a3), ('user', (LONG + 'again').strip()))
  assert ref.prompt_length(overflowing) + MAX_TOKENS > 128
  assert ref.prompt_length(long2) + MAX_TOKENS <= 128
  expected = (f'{a1}\n[system prompt set]\n{a2}\n[new conversation]\n'
              "[the message is too long for the model's context of 128 tokens with 16 for the "
              f'reply; not sent]\n{a3}\n'
              '[unknown command /nope; the commands are /reset, /system <text>, /quit]\n'
              "[dropped the oldest turn to fit the model's context of 128 tokens]\n"
              f'{ref.reply(long2)}\n')
  assert stdout == expected
  assert len({a1, a2, a3}) == 3  # the replies tell the states apart


def test_a_hugging_face_model_chats_through_its_template(runs):
  workdirs, results = runs
  status, stdout, stderr = results['hf']
  assert status == 0, stderr
  ref = Reference(workdirs['hf'])
  assert ref.tokenizer.chat_template is not None  # the checkpoint's Jinja template
  a1 = ref.reply(_turns(('user', 'Hello there')))
  a2 = ref.reply(_turns(('system', SYSTEM), ('user', 'Hello there'), ('assistant', a1),
                        ('user', 'Who are you?')))
  assert stdout == f'{a1}\n[system prompt set]\n{a2}\n'


@pytest.mark.parametrize('name, message', [
    ('max_tokens_over_context', r"--max_tokens=128 leaves no room for a prompt in the model's "
                                'context of 128 tokens'),
    ('reward_model', 'is a reward model'),
])
def test_a_mistake_is_one_line(runs, name, message):
  status, stdout, stderr = runs[1][name]
  lines = stderr.strip().splitlines()
  assert status == 2 and 'Traceback' not in stderr, stderr
  assert lines[-1].startswith('error: ') and message in lines[-1], stderr
  assert stdout == ''
