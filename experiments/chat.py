r"""Chats with a workdir's newest checkpoint in the terminal, streaming each reply.

  python -m experiments.chat --workdir=runs/sft --temperature=0

Each line read is a user message, answered through the model's chat template; the conversation
is kept, its oldest turns dropped (with a notice) when it outgrows the model's context. Commands:
`/reset` starts over, `/system <text>` sets the system prompt (`/system` alone clears it),
`/quit` ends. Lines come from stdin, so a pipe drives it too.
"""

import contextlib
import sys

from absl import flags

from jaxlm import chat
from jaxlm import cli
from jaxlm import metrics
from jaxlm import serving
from jaxlm.errors import UserError

COMMANDS = '/reset, /system <text>, /quit'


def _say(text: str) -> None:
  print(f'[{text}]', flush=True)


class Conversation:
  """The system prompt and the turns so far, cut to fit the context."""

  def __init__(self, tokenizer, max_len: int, max_tokens: int):
    self.tokenizer, self.max_len, self.max_tokens = tokenizer, max_len, max_tokens
    self.system, self.turns = '', []

  def messages(self) -> list[dict]:
    system = [{'role': 'system', 'content': self.system}] if self.system else []
    return system + self.turns

  def prompt(self) -> list[int] | None:
    """The prompt for the next reply, leaving room for `max_tokens`; None if even the last
    message alone does not fit (it is then left out)."""
    while True:
      prompt = chat.encode(self.tokenizer, self.messages(), add_generation_prompt=True)[0]
      if len(prompt) + self.max_tokens <= self.max_len:
        return prompt.tolist()
      if len(self.turns) == 1:
        self.turns.pop()
        _say(f'the message is too long for the model\'s context of {self.max_len} tokens with '
             f'{self.max_tokens} for the reply; not sent')
        return None
      del self.turns[:2]  # the oldest user message and its reply
      _say(f'dropped the oldest turn to fit the model\'s context of {self.max_len} tokens')


def main(argv):
  del argv
  metrics.configure_logging()
  with contextlib.redirect_stdout(sys.stderr):  # stdout is the conversation alone
    tokenizer, decoder = serving.load(_WORKDIR.value, num_slots=1)
  if _MAX_TOKENS.value >= decoder.max_len:
    raise UserError(f'--max_tokens={_MAX_TOKENS.value} leaves no room for a prompt in the '
                    f'model\'s context of {decoder.max_len} tokens')
  engine = serving.Engine(decoder, tokenizer)
  conversation = Conversation(tokenizer, decoder.max_len, _MAX_TOKENS.value)
  interactive = sys.stdin.isatty()
  replies = 0
  while True:
    if interactive:
      print('> ', end='', flush=True)
    line = sys.stdin.readline()
    if not line:  # end of input
      break
    line = line.strip()
    if not line:
      continue
    if line == '/quit':
      break
    if line == '/reset':
      conversation.turns = []
      _say('new conversation')
      continue
    if line == '/system' or line.startswith('/system '):
      conversation.system = line[len('/system'):].strip()
      _say('system prompt set' if conversation.system else 'system prompt cleared')
      continue
    if line.startswith('/'):
      _say(f'unknown command {line.split()[0]}; the commands are {COMMANDS}')
      continue
    conversation.turns.append({'role': 'user', 'content': line})
    prompt = conversation.prompt()
    if prompt is None:
      continue
    request = serving.Request(prompt, _MAX_TOKENS.value, (chat.end_of_turn_id(tokenizer),),
                              temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                              top_p=_TOP_P.value, seed=_SEED.value + replies)
    try:
      for piece in engine.stream(request):
        print(piece, end='', flush=True)
    except KeyboardInterrupt:
      request.cancelled = True
      print()
      _say('interrupted')
    print(flush=True)
    conversation.turns.append({'role': 'assistant', 'content': request.text})
    replies += 1


if __name__ == '__main__':
  # Flags live here so that other programs (and tests) can import several binaries.
  _WORKDIR = flags.DEFINE_string('workdir', None, 'A language-model workdir (SFT, RL, DPO, or '
                                 'one started from a Hugging Face model).', required=True)
  _MAX_TOKENS = flags.DEFINE_integer('max_tokens', 64, 'Most tokens of a reply.', lower_bound=1)
  _TEMPERATURE = flags.DEFINE_float('temperature', 0.7, '0 is greedy.', lower_bound=0)
  _TOP_K = flags.DEFINE_integer('top_k', 0, '0 keeps every token.', lower_bound=0)
  _TOP_P = flags.DEFINE_float('top_p', 0.95, '1 keeps every token.', lower_bound=0,
                              upper_bound=1)
  _SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed (the n-th reply uses seed + n).')
  cli.start(main)
