"""The OpenAI-compatible server, really served (uvicorn on a free local port), against
`lm.replies` and `lm.sample` on the same checkpoint: greedy replies equal theirs, streamed or
not, through plain HTTP and the official `openai` client; concurrent requests share one compiled
step; bad requests are answered 400 and a full queue 429."""

import concurrent.futures
import json
import re
import shutil
import threading
import time

import flax.linen as nn
import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest

from jaxlm import chat
from jaxlm import lm
from jaxlm import model as model_lib
from jaxlm import sampling
from jaxlm import server
from jaxlm import serving
from jaxlm import sharding
from tests import saved_models

BUCKET = 32  # prompt padding: the tiny model's 128-token context has 4 buckets
MAX_TOKENS = 12
QUESTION = 'Where does Gemo Kiges live?'


def _conversation(i: int) -> list[dict]:
  """Conversations whose prompts run from ~10 to ~100 tokens, over every bucket."""
  turns = [{'role': 'user', 'content': f'{i} {"and why " * (i % 11)}'}]
  if i % 3 == 1:
    turns = [{'role': 'system', 'content': 'Answer briefly.'}] + turns
  return turns


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, tokenizer):
  return saved_models.random_workdir(str(tmp_path_factory.mktemp('serve')), tokenizer)


class Served:
  """A server on a fresh engine, and the same checkpoint's references."""

  def __init__(self, workdir, num_slots=8, max_queue=256):
    self.tokenizer, self.decoder = serving.load(workdir, num_slots, bucket=BUCKET)
    self.engine = serving.Engine(self.decoder, self.tokenizer, max_queue)
    self.url, self.server = server.start_in_thread(server.create_app(self.engine, 'tiny'))
    self.model = lm.load_workdir(workdir)[2]

  def replies(self, conversations, max_tokens=MAX_TOKENS):
    with jax.set_mesh(self.decoder.mesh), nn.logical_axis_rules(sharding.RULES):
      return lm.replies(self.model, self.decoder.params, self.tokenizer, conversations,
                        jax.random.PRNGKey(0), max_new_tokens=max_tokens, temperature=0.0,
                        top_k=0, top_p=1.0, batch_size=len(conversations))

  def samples(self, prompts, max_tokens=MAX_TOKENS):
    with jax.set_mesh(self.decoder.mesh), nn.logical_axis_rules(sharding.RULES):
      return lm.sample(self.model, self.decoder.params, self.tokenizer, prompts,
                       jax.random.PRNGKey(0), max_new_tokens=max_tokens, temperature=0.0,
                       top_k=0, top_p=1.0, batch_size=len(prompts))

  def post(self, path, body, **kwargs):
    content = body if isinstance(body, bytes) else json.dumps(body)
    return httpx.post(self.url + path, content=content, timeout=60, **kwargs)

  def close(self):
    self.server.should_exit = True


@pytest.fixture(scope='module')
def served(workdir):
  s = Served(workdir)
  yield s
  s.close()


def _chat_body(messages, **settings):
  return {'model': 'tiny', 'messages': messages, 'max_tokens': MAX_TOKENS, 'temperature': 0,
          **settings}


def _events(response) -> list:
  """The JSON objects of a server-sent event stream, checking its framing and [DONE]."""
  frames = response.text.split('\n\n')
  assert frames[-2:] == ['data: [DONE]', ''], frames[-3:]
  assert all(f.startswith('data: ') for f in frames[:-1])
  return [json.loads(f[len('data: '):]) for f in frames[:-2]]


def test_greedy_chat_replies_equal_lm_replies_streamed_or_not(served):
  conversations = [_conversation(i) for i in (0, 1, 5, 11)]
  expected = served.replies(conversations)
  for messages, reply in zip(conversations, expected):
    whole = served.post('/v1/chat/completions', _chat_body(messages)).json()
    assert whole['choices'][0]['message'] == {'role': 'assistant', 'content': reply}
    prompt_tokens = len(chat.encode(served.tokenizer, messages, add_generation_prompt=True)[0])
    assert whole['usage']['prompt_tokens'] == prompt_tokens
    events = _events(served.post('/v1/chat/completions', _chat_body(messages, stream=True)))
    assert events[0]['choices'][0]['delta'] == {'role': 'assistant', 'content': ''}
    assert all(e['object'] == 'chat.completion.chunk' and e['id'] == events[0]['id']
               for e in events)
    assert ''.join(e['choices'][0]['delta']['content'] for e in events) == reply
    assert events[-1]['choices'][0]['finish_reason'] == whole['choices'][0]['finish_reason']
    assert len(events) > 3  # streamed in pieces, not all at once


def test_greedy_completions_equal_lm_sample_streamed_or_not(served):
  prompts = ['Gemo Kiges lives in', '12 + 30 =']
  expected = served.samples(prompts)
  whole = served.post('/v1/completions', {'prompt': prompts, 'max_tokens': MAX_TOKENS,
                                          'temperature': 0}).json()
  assert [c['text'] for c in whole['choices']] == expected
  streamed = {0: '', 1: ''}
  for e in _events(served.post('/v1/completions', {'prompt': prompts, 'max_tokens': MAX_TOKENS,
                                                   'temperature': 0, 'stream': True})):
    streamed[e['choices'][0]['index']] += e['choices'][0]['text']
  assert list(streamed.values()) == expected


def test_the_openai_client_talks_to_it(served):
  client = openai.OpenAI(base_url=served.url + '/v1', api_key='x')
  assert [m.id for m in client.models.list().data] == ['tiny']
  messages = _conversation(2)
  [reply] = served.replies([messages])
  settings = dict(model='tiny', max_tokens=MAX_TOKENS, temperature=0)
  whole = client.chat.completions.create(messages=messages, **settings)
  assert whole.choices[0].message.content == reply
  assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
  chunks = client.chat.completions.create(messages=messages, stream=True,
                                          stream_options={'include_usage': True}, **settings)
  chunks = list(chunks)
  assert ''.join(c.choices[0].delta.content or '' for c in chunks if c.choices) == reply
  assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
  [sample] = served.samples(['Gemo Kiges lives in'])
  completion = client.completions.create(prompt='Gemo Kiges lives in', **settings)
  assert completion.choices[0].text == sample
  chunks = client.completions.create(prompt='Gemo Kiges lives in', stream=True, **settings)
  assert ''.join(c.choices[0].text for c in chunks) == sample
  with pytest.raises(openai.BadRequestError, match='context'):
    client.chat.completions.create(messages=messages, **{**settings, 'max_tokens': 1000})


def test_32_concurrent_requests_are_all_answered_with_one_compile_per_bucket(workdir):
  fresh = Served(workdir, num_slots=8)
  try:
    conversations = [_conversation(i) for i in range(32)]
    expected = fresh.replies(conversations)
    # Sampled requests (each its own settings) ride along: settings are traced, not compiled.
    sampled = [dict(temperature=0.5 + i / 10, top_k=i, top_p=0.5 + i / 20, seed=i)
               for i in range(8)]

    def ask(i):
      settings = {} if i < 32 else sampled[i - 32]
      return fresh.post('/v1/chat/completions',
                        _chat_body(conversations[i % 32], **settings)).json()

    with concurrent.futures.ThreadPoolExecutor(40) as pool:
      answers = list(pool.map(ask, range(40)))
    assert [a['choices'][0]['message']['content'] for a in answers[:32]] == expected
    assert all(a['choices'][0]['finish_reason'] in ('stop', 'length') for a in answers[32:])
    buckets = {fresh.decoder.padded_length(len(chat.encode(
        fresh.tokenizer, c, add_generation_prompt=True)[0])) for c in conversations}
    assert len(buckets) >= 3
    assert fresh.decoder.compilations() == 1 + len(buckets)
  finally:
    fresh.close()


def test_a_seeded_sample_does_not_depend_on_the_requests_beside_it(served):
  body = _chat_body(_conversation(3), temperature=0.9, top_k=40, top_p=0.9, seed=7,
                    max_tokens=24)
  alone = served.post('/v1/chat/completions', body).json()['choices'][0]['message']['content']
  others = [_chat_body(_conversation(i), temperature=1.0, seed=i, max_tokens=24)
            for i in range(6)]
  with concurrent.futures.ThreadPoolExecutor(7) as pool:
    futures = [pool.submit(served.post, '/v1/chat/completions', b) for b in [*others, body]]
    together = [f.result().json()['choices'][0]['message']['content'] for f in futures]
  assert together[-1] == alone
  other_seed = served.post('/v1/chat/completions', {**body, 'seed': 8}).json()
  assert other_seed['choices'][0]['message']['content'] != alone


def test_a_stop_string_ends_the_reply_before_it(served):
  messages = _conversation(4)
  [reply] = served.replies([messages], max_tokens=24)
  stop = next(reply[i:i + 2] for i in range(3, len(reply) - 2) if reply[i:i + 2].strip())
  expected = reply[:reply.find(stop)]
  body = _chat_body(messages, max_tokens=24, stop=[stop, 'never in it'])
  whole = served.post('/v1/chat/completions', body).json()['choices'][0]
  assert (whole['message']['content'], whole['finish_reason']) == (expected, 'stop')
  events = _events(served.post('/v1/chat/completions', {**body, 'stream': True}))
  assert ''.join(e['choices'][0]['delta']['content'] for e in events) == expected


@pytest.mark.parametrize('scan_layers', [True, False])
def test_slots_prefilled_one_at_a_time_decode_as_the_cache_free_forward(scan_layers):
  """Prompts of three lengths prefilled into their slots one by one, then decoded side by side:
  greedy tokens equal `sampling.generate`'s, and each slot's next logits the forward without a
  cache; for scanned layers' one stacked cache and unrolled layers' one cache per layer."""
  config = model_lib.ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4,
                                 num_kv_heads=2, head_dim=8, mlp_dim=64, max_seq_len=32,
                                 scan_layers=scan_layers)
  model = model_lib.Transformer(config)
  mesh = saved_models.one_device_mesh()
  prompts = [[5, 9, 3], [7, 1, 2, 8, 4, 6, 30, 12, 40], [11]]
  steps = 6
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32)))
    params = jax.tree.map(lambda x: 3 * x, params['params'])  # replies that vary by prompt
    decoder = serving.Decoder(model, params, mesh, num_slots=len(prompts), max_len=32, bucket=8)
    for slot, prompt in enumerate(prompts):
      decoder.prefill(slot, prompt, temperature=0.0, top_k=0, top_p=1.0, seed=slot)
    decoded = np.stack([decoder.step() for _ in range(steps)], axis=1)
    padded = np.zeros((len(prompts), max(map(len, prompts))), np.int32)
    for row, prompt in enumerate(prompts):
      padded[row, :len(prompt)] = prompt
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    tokens, _ = sampling.generate(model, params, jnp.asarray(padded), jnp.asarray(lengths),
                                  jax.random.PRNGKey(0), max_new_tokens=steps, temperature=0.0)
    for row, prompt in enumerate(prompts):
      np.testing.assert_array_equal(decoded[row], tokens[row, len(prompt):len(prompt) + steps])
      sequence = jnp.asarray([prompt + decoded[row].tolist()], jnp.int32)
      logits = model.apply({'params': params}, sequence)[0][0, -1]
      np.testing.assert_allclose(decoder.logits_BxV[row], logits, rtol=0, atol=1e-4)
  assert len(set(map(tuple, decoded))) == len(prompts)  # the rows' replies differ


def test_per_row_filter_settings_equal_the_same_settings_one_row_at_a_time():
  logits = (2 * np.random.default_rng(0).standard_normal((5, 40))).astype(np.float32)
  rows = [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.6), (0.5, 12, 0.8), (2.0, 40, 0.3)]
  temperature, top_k, top_p = (np.asarray(column) for column in zip(*rows))
  batched = sampling.filter_logits(jnp.asarray(logits), jnp.asarray(temperature, jnp.float32),
                                   jnp.asarray(top_k), jnp.asarray(top_p, jnp.float32))
  for row, (t, k, p) in enumerate(rows):
    np.testing.assert_array_equal(batched[row], sampling.filter_logits(logits[row:row + 1], t,
                                                                       k, p)[0])


BAD_REQUESTS = [
    ('malformed JSON', b'{"messages": [', 'not valid JSON'),
    ('not an object', b'[1, 2]', 'JSON object'),
    ('unknown model', {'model': 'gpt-4'}, "model 'gpt-4' is not served here"),
    ('no messages', {'messages': []}, 'messages must be a non-empty list'),
    ('unknown role', {'messages': [{'role': 'tool', 'content': 'x'}]}, r'messages\[0\]\.role'),
    ('prompt over the context', {'messages': [{'role': 'user', 'content': 'and why ' * 40}]},
     'over the model.s context of 128 tokens'),
    ('max_tokens over the context', {'max_tokens': 125}, 'max_tokens=125: over the model'),
    ('temperature out of range', {'temperature': 2.5}, r'temperature must be in \[0, 2\]'),
    ('top_p zero', {'top_p': 0}, r'top_p must be in \(0, 1\]'),
    ('top_k not an integer', {'top_k': 1.5}, 'top_k must be an integer'),
    ('max_tokens zero', {'max_tokens': 0}, 'max_tokens must be in'),
    ('temperature a string', {'temperature': 'hot'}, 'temperature must be a number'),
    ('too many stop strings', {'stop': list('abcde')}, 'stop must be'),
    ('several choices', {'n': 2}, 'n must be 1'),
]


@pytest.mark.parametrize('body, message', [pytest.param(b, m, id=name)
                                           for name, b, m in BAD_REQUESTS])
def test_a_bad_request_is_answered_400_in_openais_format(served, body, message):
  if isinstance(body, dict):
    body = {**_chat_body(_conversation(0)), **body}
  response = served.post('/v1/chat/completions', body)
  assert response.status_code == 400, response.text
  error = response.json()['error']
  assert error['type'] == 'invalid_request_error'
  assert re.search(message, error['message']), error


def test_bad_completions_and_a_server_that_goes_on(served):
  for body in ({'prompt': 3}, {'prompt': 'x', 'seed': 'one'}, {'prompt': 'x', 'model': 'y'}):
    response = served.post('/v1/completions', body)
    assert response.status_code == 400 and 'error' in response.json(), response.text
  [reply] = served.replies([_conversation(0)])
  answer = served.post('/v1/chat/completions', _chat_body(_conversation(0))).json()
  assert answer['choices'][0]['message']['content'] == reply


def test_a_full_queue_is_answered_429_and_the_queued_requests_finish(workdir):
  fresh = Served(workdir, num_slots=1, max_queue=1)
  gate = threading.Event()
  step = fresh.decoder.step
  fresh.decoder.step = lambda: gate.wait(30) and step()  # hold the engine mid-reply
  try:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      first = pool.submit(fresh.post, '/v1/chat/completions', _chat_body(_conversation(0)))
      while fresh.engine.slots[0] is None:
        time.sleep(0.01)
      second = pool.submit(fresh.post, '/v1/chat/completions', _chat_body(_conversation(1)))
      while fresh.engine.waiting.qsize() < 1:
        time.sleep(0.01)
      full = fresh.post('/v1/chat/completions', _chat_body(_conversation(2)))
      assert full.status_code == 429, full.text
      assert full.json()['error']['code'] == 'queue_full'
      gate.set()
      replies = [f.result().json()['choices'][0]['message']['content'] for f in (first, second)]
    assert replies == fresh.replies([_conversation(0), _conversation(1)])
  finally:
    gate.set()
    fresh.close()


def test_the_chat_page(served):
  page = httpx.get(served.url + '/')
  assert page.status_code == 200 and page.headers['content-type'].startswith('text/html')
  assert "fetch('/v1/chat/completions'" in page.text and 'stream: true' in page.text


SYSTEM_CHROMIUMS = ('chromium-headless-shell', 'chromium', 'chromium-browser', 'google-chrome')


def _launch_chromium(playwright):
  """Playwright's own Chromium (`playwright install chromium`, a download), else one of the
  system's; None if neither starts."""
  system = [shutil.which(name) for name in SYSTEM_CHROMIUMS]
  for executable in [None, *filter(None, system)]:
    try:
      return playwright.chromium.launch(executable_path=executable)
    except Exception:  # pylint: disable=broad-except
      continue
  return None


def test_the_chat_page_streams_a_reply_in_a_browser(served):
  """Skipped where no headless browser can start (pip's playwright has none: it downloads
  its browsers)."""
  sync_api = pytest.importorskip('playwright.sync_api')
  [reply] = served.replies([[{'role': 'user', 'content': QUESTION}]])
  with sync_api.sync_playwright() as playwright:
    browser = _launch_chromium(playwright)
    if browser is None:
      pytest.skip('no headless browser starts: neither playwright\'s Chromium nor one of '
                  f'{SYSTEM_CHROMIUMS} on PATH')
    page = browser.new_page()
    page.goto(served.url + '/')
    page.fill('#temperature', '0')
    page.fill('#max_tokens', str(MAX_TOKENS))
    page.fill('#input', QUESTION)
    page.press('#input', 'Enter')
    page.wait_for_selector('.assistant.done', timeout=30_000)
    assert page.text_content('.assistant') == reply
    browser.close()
