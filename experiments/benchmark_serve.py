r"""Throughput of `experiments.serve` on a workdir: requests/s and generated tokens/s at several
numbers of concurrent clients, over real HTTP to a server in this process.

  python -m experiments.benchmark_serve --workdir=runs/sft --clients=1,8,32 --max_batch=8

Each client sends `--requests_per_client` chat completions one after another (sampled at
temperature 1, so replies run to `--max_tokens` unless the model ends its turn). The prompt
buckets are compiled before the clock starts.
"""

import concurrent.futures
import time

import httpx
from absl import flags

from jaxlm import cli
from jaxlm import metrics
from jaxlm import serving
from jaxlm.errors import UserError


def _ask(url: str, i: int, max_tokens: int) -> tuple[int, float]:
  """(generated tokens, seconds) of one request."""
  body = {'messages': [{'role': 'user', 'content': f'Where does person {i} live?'}],
          'max_tokens': max_tokens, 'temperature': 1.0, 'seed': i}
  start = time.perf_counter()
  response = httpx.post(f'{url}/v1/chat/completions', json=body, timeout=600)
  response.raise_for_status()
  return response.json()['usage']['completion_tokens'], time.perf_counter() - start


def benchmark(url: str, clients: int, requests_per_client: int, max_tokens: int) -> dict:
  def client(c):
    return [_ask(url, c * requests_per_client + i, max_tokens) for i in range(requests_per_client)]

  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    results = [r for rs in pool.map(client, range(clients)) for r in rs]
  seconds = time.perf_counter() - start
  tokens = sum(t for t, _ in results)
  return {'clients': clients, 'requests': len(results), 'seconds': seconds,
          'requests_per_s': len(results) / seconds, 'tokens_per_s': tokens / seconds,
          'mean_latency_s': sum(s for _, s in results) / len(results)}


def main(argv):
  del argv
  metrics.configure_logging()
  from jaxlm import server  # pylint: disable=g-import-not-at-top
  try:
    clients = [int(c) for c in _CLIENTS.value]
  except ValueError:
    raise UserError(f'--clients must be integers, got {",".join(_CLIENTS.value)}') from None
  if any(c < 1 for c in clients):
    raise UserError(f'--clients must be positive, got {",".join(_CLIENTS.value)}')
  tokenizer, decoder = serving.load(_WORKDIR.value, _MAX_BATCH.value)
  if _MAX_TOKENS.value >= decoder.max_len - 32:
    raise UserError(f'--max_tokens={_MAX_TOKENS.value} leaves too little of the context '
                    f'({decoder.max_len} tokens) for the prompt')
  engine = serving.Engine(decoder, tokenizer, max_queue=max(clients))
  url, uvicorn_server = server.start_in_thread(server.create_app(engine, 'benchmark'))
  _ask(url, -1, _MAX_TOKENS.value)  # compiles the step and the prompts' bucket
  metrics.log(f'{decoder.num_slots} slots of {decoder.max_len} tokens; {decoder.compilations()} '
              'programs compiled before timing.')
  print('| clients | requests | seconds | requests/s | tokens/s | mean latency (s) |')
  print('|---|---|---|---|---|---|')
  for c in clients:
    r = benchmark(url, c, _REQUESTS_PER_CLIENT.value, _MAX_TOKENS.value)
    print(f'| {r["clients"]} | {r["requests"]} | {r["seconds"]:.2f} | {r["requests_per_s"]:.2f} '
          f'| {r["tokens_per_s"]:.0f} | {r["mean_latency_s"]:.2f} |', flush=True)
  uvicorn_server.should_exit = True


if __name__ == '__main__':
  _WORKDIR = flags.DEFINE_string('workdir', None, 'A language-model workdir.', required=True)
  _CLIENTS = flags.DEFINE_list('clients', ['1', '8', '32'], 'Concurrent clients, one run each.')
  _REQUESTS_PER_CLIENT = flags.DEFINE_integer('requests_per_client', 4,
                                              'Requests each client sends in turn.',
                                              lower_bound=1)
  _MAX_TOKENS = flags.DEFINE_integer('max_tokens', 32, 'Most tokens of a reply.', lower_bound=1)
  _MAX_BATCH = flags.DEFINE_integer('max_batch', 8, 'Slots of the server.', lower_bound=1)
  cli.start(main)
