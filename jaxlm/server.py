"""An OpenAI-compatible HTTP server over `jaxlm.serving.Engine`: `/v1/chat/completions` and
`/v1/completions` (streamed as server-sent events, or not), `/v1/models`, and a chat page at `/`.

A request the server cannot take is answered at once, before the engine sees it: 400 with
OpenAI's error body for bad JSON, an unknown model, a prompt over the context or a setting out of
range; 429 when the engine's queue is full.
"""

import asyncio
import json
import secrets
import threading
import time
import uuid

import fastapi
import uvicorn
from fastapi import responses

from jaxlm import chat
from jaxlm import lm
from jaxlm import serving
from jaxlm import web_chat
from jaxlm.errors import UserError

MAX_STOP_STRINGS = 4  # as OpenAI's API


class ApiError(Exception):

  def __init__(self, message: str, param: str | None = None, status: int = 400,
               kind: str = 'invalid_request_error', code: str | None = None):
    super().__init__(message)
    self.message, self.param, self.status, self.kind, self.code = (message, param, status,
                                                                    kind, code)

  def response(self) -> responses.JSONResponse:
    return responses.JSONResponse({'error': {'message': self.message, 'type': self.kind,
                                             'param': self.param, 'code': self.code}},
                                  status_code=self.status)


def _number(body: dict, name: str, default, low, high, integer: bool = False,
            low_open: bool = False):
  value = body.get(name)
  if value is None:
    return default
  kinds = (int,) if integer else (int, float)
  if isinstance(value, bool) or not isinstance(value, kinds):
    raise ApiError(f'{name} must be {"an integer" if integer else "a number"}, got {value!r}',
                   name)
  if value < low or (low_open and value == low) or (high is not None and value > high):
    interval = f'{"(" if low_open else "["}{low}, {high if high is not None else "inf"}]'
    raise ApiError(f'{name} must be in {interval}, got {value!r}', name)
  return value


def _stop_strings(body: dict) -> tuple[str, ...]:
  stop = body.get('stop')
  stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
  if (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS
      or not all(isinstance(s, str) and s for s in stop)):
    raise ApiError(f'stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS}',
                   'stop')
  return tuple(stop)


def _content(message, i: int) -> str:
  content = message.get('content')
  if content is None:
    return ''
  if isinstance(content, str):
    return content
  if isinstance(content, list) and all(isinstance(p, dict) and p.get('type') == 'text'
                                       and isinstance(p.get('text'), str) for p in content):
    return ''.join(p['text'] for p in content)
  raise ApiError(f'messages[{i}].content must be a string or a list of text parts',
                 f'messages[{i}].content')


def _messages(body: dict) -> list[dict]:
  messages = body.get('messages')
  if not isinstance(messages, list) or not messages:
    raise ApiError('messages must be a non-empty list', 'messages')
  out = []
  for i, message in enumerate(messages):
    if not isinstance(message, dict):
      raise ApiError(f'messages[{i}] must be an object', f'messages[{i}]')
    role = {'developer': 'system'}.get(message.get('role'), message.get('role'))
    if role not in chat.ROLES:
      raise ApiError(f'messages[{i}].role must be one of {chat.ROLES}, got '
                     f'{message.get("role")!r}', f'messages[{i}].role')
    out.append({'role': role, 'content': _content(message, i)})
  return out


def _prompts(body: dict) -> list[str]:
  prompt = body.get('prompt')
  prompts = [prompt] if isinstance(prompt, str) else prompt
  if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
    raise ApiError('prompt must be a string or a non-empty list of strings', 'prompt')
  return prompts


def create_app(engine: serving.Engine, model_name: str) -> fastapi.FastAPI:
  """The FastAPI app serving `engine`'s model as `model_name`."""
  app = fastapi.FastAPI(title='jaxlm')
  tokenizer, max_len = engine.tokenizer, engine.decoder.max_len
  created = int(time.time())

  @app.exception_handler(ApiError)
  async def api_error(request, error: ApiError):
    del request
    return error.response()

  async def read_body(request: fastapi.Request) -> dict:
    try:
      body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ApiError(f'the body is not valid JSON: {e}') from None
    if not isinstance(body, dict):
      raise ApiError('the body must be a JSON object')
    if body.get('model', model_name) != model_name:
      raise ApiError(f'model {body["model"]!r} is not served here; it serves {model_name!r}',
                     'model', code='model_not_found')
    if body.get('n', 1) != 1:
      raise ApiError('n must be 1', 'n')
    return body

  def requests_for(body: dict, prompts: list[list[int]], stop_ids) -> list[serving.Request]:
    settings = dict(temperature=_number(body, 'temperature', 1.0, 0, 2),
                    top_p=_number(body, 'top_p', 1.0, 0, 1, low_open=True),
                    top_k=max(_number(body, 'top_k', 0, -1, None, integer=True), 0),
                    seed=_number(body, 'seed', None, -2**63, 2**64, integer=True),
                    stop=_stop_strings(body), stop_ids=stop_ids)
    if settings['seed'] is None:
      settings['seed'] = secrets.randbits(32)
    name = 'max_completion_tokens' if 'max_completion_tokens' in body else 'max_tokens'
    asked = _number(body, name, None, 1, None, integer=True)
    out = []
    for prompt in prompts:
      if len(prompt) >= max_len or (asked and len(prompt) + asked > max_len):
        asking = f' plus {name}={asked}' if asked else ''
        raise ApiError(f'the prompt is {len(prompt)} tokens{asking}: over the model\'s context '
                       f'of {max_len} tokens', name if asked else None,
                       code='context_length_exceeded')
      out.append(serving.Request(list(prompt), asked or max_len - len(prompt), **settings))
    return out

  def submit(requests: list[serving.Request]) -> asyncio.Queue:
    """Queues the requests; their pieces arrive on the returned queue as (index, piece)."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def notify_for(index):
      def notify(piece):
        try:
          loop.call_soon_threadsafe(events.put_nowait, (index, piece))
        except RuntimeError:  # the event loop is gone: nobody listens any more
          requests[index].cancelled = True
      return notify

    for i, request in enumerate(requests):
      try:
        engine.submit(request, notify_for(i))
      except serving.QueueFull as e:
        for submitted in requests[:i]:
          submitted.cancelled = True
        raise ApiError(f'the server is busy ({e}); retry later', status=429,
                       kind='rate_limit_error', code='queue_full') from None
    return events

  def usage(requests):
    prompt = sum(len(r.prompt) for r in requests)
    completion = sum(len(r.tokens) for r in requests)
    return {'prompt_tokens': prompt, 'completion_tokens': completion,
            'total_tokens': prompt + completion}

  async def respond(body: dict, requests: list[serving.Request], kind: str):
    """The whole reply, or (stream=true) server-sent events of its pieces."""
    events = submit(requests)
    reply_id = f'{"chatcmpl" if kind == "chat" else "cmpl"}-{uuid.uuid4().hex}'
    head = {'id': reply_id, 'object': 'chat.completion' if kind == 'chat' else 'text_completion',
            'created': int(time.time()), 'model': model_name}

    def choice(index, text, finish_reason, delta: bool):
      if kind != 'chat':
        return {'index': index, 'text': text, 'logprobs': None, 'finish_reason': finish_reason}
      message = {'content': text} if delta else {'role': 'assistant', 'content': text}
      return {'index': index, 'delta' if delta else 'message': message,
              'finish_reason': finish_reason}

    if not body.get('stream'):
      try:
        for _ in requests:
          while (await events.get())[1] is not None:
            pass
      finally:  # a client that went away frees its slots
        for request in requests:
          request.cancelled = True
      if any(r.finish_reason == 'error' for r in requests):
        raise ApiError('the engine failed on this request; see the server log', status=500,
                       kind='server_error')
      return {**head, 'choices': [choice(i, r.text, r.finish_reason, False)
                                  for i, r in enumerate(requests)], 'usage': usage(requests)}

    chunk_head = {**head, 'object': 'chat.completion.chunk' if kind == 'chat' else head['object']}
    include_usage = bool((body.get('stream_options') or {}).get('include_usage'))

    def event(data) -> str:
      return f'data: {json.dumps(data)}\n\n'

    async def stream():
      try:
        if kind == 'chat':
          for i in range(len(requests)):
            yield event({**chunk_head, 'choices': [
                {'index': i, 'delta': {'role': 'assistant', 'content': ''},
                 'finish_reason': None}]})
        unfinished = len(requests)
        while unfinished:
          index, piece = await events.get()
          if piece is not None:
            yield event({**chunk_head, 'choices': [choice(index, piece, None, True)]})
            continue
          unfinished -= 1
          if requests[index].finish_reason == 'error':
            yield event({'error': {'message': 'the engine failed on this request',
                                   'type': 'server_error', 'param': None, 'code': None}})
            return
          yield event({**chunk_head, 'choices': [
              choice(index, '', requests[index].finish_reason, True)]})
        if include_usage:
          yield event({**chunk_head, 'choices': [], 'usage': usage(requests)})
        yield 'data: [DONE]\n\n'
      finally:  # also when the client goes away: free its slots
        for request in requests:
          request.cancelled = True

    return responses.StreamingResponse(stream(), media_type='text/event-stream')

  @app.get('/', response_class=responses.HTMLResponse)
  async def page():
    return web_chat.PAGE

  @app.get('/v1/models')
  async def models():
    return {'object': 'list', 'data': [{'id': model_name, 'object': 'model', 'created': created,
                                        'owned_by': 'jaxlm', 'max_model_len': max_len}]}

  @app.post('/v1/chat/completions')
  async def chat_completions(request: fastapi.Request):
    body = await read_body(request)
    try:
      prompt = chat.encode(tokenizer, _messages(body), add_generation_prompt=True)[0]
    except UserError as e:
      raise ApiError(str(e), 'messages') from None
    requests = requests_for(body, [prompt.tolist()], (chat.end_of_turn_id(tokenizer),))
    return await respond(body, requests, 'chat')

  @app.post('/v1/completions')
  async def completions(request: fastapi.Request):
    body = await read_body(request)
    prompts = [lm.with_bos(tokenizer, tokenizer.encode(p)) for p in _prompts(body)]
    requests = requests_for(body, prompts, (tokenizer.eos_id,))
    return await respond(body, requests, 'completion')

  return app


def start_in_thread(app, host: str = '127.0.0.1', port: int = 0):
  """Runs `app` under uvicorn in a daemon thread (port 0: a free one); returns (base URL,
  server): `server.should_exit = True` stops it."""
  server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level='warning'))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  while not server.started:
    if not thread.is_alive():
      raise UserError(f'the server could not start on {host}:{port}')
    time.sleep(0.01)
  bound_port = server.servers[0].sockets[0].getsockname()[1]
  return f'http://{host}:{bound_port}', server
