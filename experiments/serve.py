r"""Serves a workdir's newest checkpoint over an OpenAI-compatible HTTP API, with a chat page.

  python -m experiments.serve --workdir=runs/sft --port=8000
  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \
      -d '{"messages": [{"role": "user", "content": "Where does Gemo Kiges live?"}]}'

`/v1/chat/completions` and `/v1/completions` (`"stream": true` for server-sent events),
`/v1/models`, and a chat page at `/`. Concurrent requests share up to `--max_batch` decoding
slots, admitted as others finish (`jaxlm.serving`); `--max_queue` more wait, and beyond that a
request is answered 429. Needs `pip install -e '.[serve]'`.
"""

import os
import socket

from absl import flags

from jaxlm import cli
from jaxlm import metrics
from jaxlm import serving
from jaxlm.errors import UserError


def _check_address(host: str, port: int) -> None:
  try:
    with socket.create_server((host, port)):
      pass
  except OSError as e:
    raise UserError(f'--host={host} --port={port}: cannot listen there ({e.strerror})') from e


def main(argv):
  del argv
  metrics.configure_logging()
  try:
    import uvicorn  # pylint: disable=g-import-not-at-top
    from jaxlm import server  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f"serving needs FastAPI and uvicorn: pip install -e '.[serve]' ({e})") from e
  _check_address(_HOST.value, _PORT.value)  # before minutes of loading, not after
  tokenizer, decoder = serving.load(_WORKDIR.value, _MAX_BATCH.value, _MAX_LEN.value)
  engine = serving.Engine(decoder, tokenizer, _MAX_QUEUE.value)
  name = _MODEL.value or os.path.basename(os.path.normpath(_WORKDIR.value))
  app = server.create_app(engine, name)
  metrics.log(f'Serving {name} on http://{_HOST.value}:{_PORT.value} ({_MAX_BATCH.value} slots '
              f'of {decoder.max_len} tokens).')
  uvicorn.run(app, host=_HOST.value, port=_PORT.value, log_level='warning')


if __name__ == '__main__':
  # Flags live here so that other programs (and tests) can import several binaries.
  _WORKDIR = flags.DEFINE_string('workdir', None, 'A language-model workdir (pretraining, SFT, '
                                 'RL, DPO, or one started from a Hugging Face model).',
                                 required=True)
  _HOST = flags.DEFINE_string('host', '127.0.0.1', 'Address to listen on.')
  _PORT = flags.DEFINE_integer('port', 8000, 'Port to listen on.', lower_bound=0,
                               upper_bound=65535)
  _MODEL = flags.DEFINE_string('model', '', 'The model name of the API; default: the '
                               "workdir's name.")
  _MAX_BATCH = flags.DEFINE_integer('max_batch', 8, 'Requests decoded together.', lower_bound=1)
  _MAX_QUEUE = flags.DEFINE_integer('max_queue', 256, 'Requests waiting for a slot; more are '
                                    'answered 429.', lower_bound=1)
  _MAX_LEN = flags.DEFINE_integer('max_len', 0, 'Tokens of prompt plus reply per request; 0: '
                                  "the model's context.", lower_bound=0)
  cli.start(main)
