"""Streaming generation for chat and serving: a decoder of fixed shapes, and an engine that
batches requests into it continuously.

`Decoder` holds `num_slots` rows over one KV cache of `max_len` positions. A request's prompt,
right-padded to a multiple of `bucket` tokens, is prefilled into a free slot while the other
slots keep their place; each step then advances every slot by one token (an empty slot decodes
padding nobody reads). So one compiled step and one compiled prefill per prompt bucket serve
every request, whatever comes and goes. The math is `jaxlm.sampling`'s: its `prefill`, `choose`
(with per-row settings, traced) and `decode_step`.

`Engine` owns a decoder in a thread of its own: it fills free slots from a bounded queue,
steps, and hands each request its text as it is generated, until the request's stop token, a
stop string or its token budget.
"""

import dataclasses
import functools
import os
import queue
import threading
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from jaxlm import lm
from jaxlm import model as model_lib
from jaxlm import reward
from jaxlm import sampling
from jaxlm import sharding
from jaxlm.errors import UserError


def _prefill(model, params, cache, logits_BxV, keys_B, slot, prompt_1xP, length, seed):
  """Fills row `slot` of the cache from one prompt; sets that row's logits and key."""
  axis = lambda a: a.ndim + model_lib.CACHE_BATCH_AXIS
  row_cache = jax.tree.map(
      lambda a: jax.lax.dynamic_slice_in_dim(a, slot, 1, axis=axis(a)), cache)
  logits_1xV, row_cache = sampling.prefill(model, params, prompt_1xP, length[None], row_cache)
  cache = jax.tree.map(
      lambda a, r: jax.lax.dynamic_update_slice_in_dim(a, r, slot, axis=axis(a)), cache, row_cache)
  return (cache, logits_BxV.at[slot].set(logits_1xV[0]),
          keys_B.at[slot].set(jax.random.key(seed)))


def _step(model, params, cache, logits_BxV, keys_B, positions_B, temperature_B, top_k_B,
          top_p_B):
  """Chooses every row's next token and feeds it at the row's position."""
  split_Bx2 = jax.vmap(jax.random.split)(keys_B)
  tokens_B = sampling.choose(logits_BxV, split_Bx2[:, 1], temperature_B, top_k_B,
                             top_p_B).astype(jnp.int32)
  logits_BxV, cache = sampling.decode_step(model, params, tokens_B, positions_B, cache)
  return tokens_B, cache, logits_BxV, split_Bx2[:, 0]


class Decoder:
  """`num_slots` rows decoding side by side, each with its own sampling settings and key."""

  def __init__(self, model, params, mesh, num_slots: int, max_len: int, bucket: int = 64):
    self.mesh, self.params = mesh, params
    self.num_slots, self.max_len, self.bucket = num_slots, max_len, bucket
    # The state is replicated in and out, so that the first call and later ones (fed the
    # outputs) hit the same compiled program.
    replicated = sharding.replicated(mesh)
    self.cache, self.logits_BxV, self.keys_B = jax.device_put(
        (model_lib.init_cache(model.config, num_slots, max_len),
         jnp.zeros((num_slots, model.config.vocab_size), jnp.float32),
         jax.random.split(jax.random.key(0), num_slots)), replicated)
    # Host-side, small: sent with each step, so changing them never recompiles.
    self.positions_B = np.zeros(num_slots, np.int32)
    self.temperature_B = np.zeros(num_slots, np.float32)
    self.top_k_B = np.zeros(num_slots, np.int32)
    self.top_p_B = np.ones(num_slots, np.float32)
    self._prefill = jax.jit(functools.partial(_prefill, model), donate_argnums=(1, 2, 3),
                            out_shardings=replicated)
    self._step = jax.jit(functools.partial(_step, model), donate_argnums=(1, 2, 3),
                         out_shardings=replicated)

  def padded_length(self, prompt_length: int) -> int:
    return min(-(-prompt_length // self.bucket) * self.bucket, self.max_len)

  def prefill(self, slot: int, prompt: list[int], *, temperature: float, top_k: int,
              top_p: float, seed: int) -> None:
    assert 0 < len(prompt) < self.max_len, (len(prompt), self.max_len)
    prompt_1xP = np.zeros((1, self.padded_length(len(prompt))), np.int32)
    prompt_1xP[0, :len(prompt)] = prompt
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.RULES):
      self.cache, self.logits_BxV, self.keys_B = self._prefill(
          self.params, self.cache, self.logits_BxV, self.keys_B, np.int32(slot), prompt_1xP,
          np.int32(len(prompt)), np.uint32(seed % 2**32))
    self.positions_B[slot] = len(prompt)
    self.temperature_B[slot], self.top_k_B[slot], self.top_p_B[slot] = temperature, top_k, top_p

  def step(self) -> np.ndarray:
    """Every slot's next token [num_slots] (a host sync: the caller streams them)."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.RULES):
      tokens_B, self.cache, self.logits_BxV, self.keys_B = self._step(
          self.params, self.cache, self.logits_BxV, self.keys_B, self.positions_B,
          self.temperature_B, self.top_k_B, self.top_p_B)
    # A slot at the end of the cache is finished by its budget; the clip only keeps empty
    # slots' writes in range.
    self.positions_B = np.minimum(self.positions_B + 1, self.max_len - 1)
    return np.asarray(tokens_B)

  def compilations(self) -> int:
    """Programs compiled so far: 1 step plus 1 prefill per prompt bucket seen."""
    return self._prefill._cache_size() + self._step._cache_size()


def load(workdir: str, num_slots: int, max_len: int = 0, bucket: int = 64):
  """(tokenizer, decoder) of the newest checkpoint of `workdir`, on one device. `max_len` (the
  cache, so prompt plus reply) defaults to the model's context."""
  _, tokenizer, model = lm.load_workdir(workdir)
  if os.path.exists(os.path.join(workdir, reward.STATS_FILE)):
    raise UserError(f'{workdir} is a reward model: it scores replies but does not write them')
  context = model.config.max_seq_len
  if not 0 <= max_len <= context:
    raise UserError(f'--max_len={max_len}: the model\'s context is {context} tokens')
  # One device: slots are few and a step is one token each, too little to split.
  mesh = sharding.make_mesh(ml_collections.ConfigDict(
      {'data': 1, 'fsdp': 1, 'tensor': 1, 'num_devices': 1}))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    params = lm.load_params(workdir, model, mesh)
  return tokenizer, Decoder(model, params, mesh, num_slots, max_len or context, bucket)


@dataclasses.dataclass(eq=False)
class Request:
  """A prompt (token ids) and how to sample and stop; the engine fills in the rest."""
  prompt: list[int]
  max_tokens: int
  stop_ids: tuple[int, ...] = ()  # tokens that end the reply (not part of it)
  stop: tuple[str, ...] = ()  # strings that end it (not part of it)
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  tokens: list[int] = dataclasses.field(default_factory=list)  # generated, without stop ids
  text: str = ''  # decoded so far; the reply once finished
  finish_reason: str | None = None  # 'stop', 'length', 'cancelled' or 'error'
  cancelled: bool = False  # set by a caller who no longer listens
  notify: Callable[[str | None], None] | None = None  # set by `Engine.submit`
  streamed: str = ''  # the text handed to `notify` so far


class QueueFull(Exception):
  """The engine's queue of waiting requests is full: the caller should come back later."""


class Engine:
  """Continuous batching over a `Decoder`: a thread owns it, admits waiting requests into free
  slots as rows finish, and calls each request's `notify` with every new piece of its text, then
  with None when it is finished."""

  def __init__(self, decoder: Decoder, tokenizer, max_queue: int = 256):
    self.decoder, self.tokenizer = decoder, tokenizer
    self.waiting = queue.Queue(max_queue)
    self.slots: list[Request | None] = [None] * decoder.num_slots
    threading.Thread(target=self._loop, name='jaxlm-engine', daemon=True).start()

  def submit(self, request: Request, notify) -> None:
    """Queues `request` (a prompt and budget that fit the cache); raises `QueueFull`."""
    assert request.prompt and len(request.prompt) + request.max_tokens <= self.decoder.max_len
    request.notify = notify
    try:
      self.waiting.put_nowait(request)
    except queue.Full:
      raise QueueFull(f'{self.waiting.maxsize} requests are already waiting') from None

  def stream(self, request: Request):
    """Yields the pieces of `request`'s text as they are generated (blocking)."""
    pieces = queue.Queue()
    self.submit(request, pieces.put)
    while (piece := pieces.get()) is not None:
      yield piece

  def _loop(self):
    while True:
      try:
        self._admit()
        tokens_B = self.decoder.step()
        for slot, request in enumerate(self.slots):
          if request is not None and self._advance(request, int(tokens_B[slot])):
            self.slots[slot] = None
      except Exception:  # pylint: disable=broad-except
        # A bug in jaxlm: fail the requests in flight rather than leave them waiting forever.
        logging.exception('The engine failed; its requests in flight end with an error.')
        for slot, request in enumerate(self.slots):
          if request is not None:
            self._finish(request, 'error')
            self.slots[slot] = None

  def _admit(self):
    """Prefills waiting requests into free slots; waits for one while every slot is free."""
    while None in self.slots:
      try:
        request = self.waiting.get(block=all(r is None for r in self.slots))
      except queue.Empty:
        return
      if request.cancelled:
        self._finish(request, 'cancelled')
        continue
      slot = self.slots.index(None)
      self.slots[slot] = request
      self.decoder.prefill(slot, request.prompt, temperature=request.temperature,
                           top_k=request.top_k, top_p=request.top_p, seed=request.seed)

  def _advance(self, request: Request, token: int) -> bool:
    """Adds a generated token and hands out the new text; returns whether `request` is done."""
    if request.cancelled:
      return self._finish(request, 'cancelled')
    if token in request.stop_ids:
      return self._finish(request, 'stop')
    request.tokens.append(token)
    request.text = self.tokenizer.decode(request.tokens)
    found = [at for at in (request.text.find(s) for s in request.stop) if at >= 0]
    if found:
      request.text = request.text[:min(found)]
      return self._finish(request, 'stop')
    if len(request.tokens) == request.max_tokens:
      return self._finish(request, 'length')
    # Hold back what the next tokens may still change: the start of a stop string, or bytes of
    # a character not yet complete (decoded as U+FFFD).
    ready = len(request.text.rstrip('\ufffd')) - max((len(s) - 1 for s in request.stop),
                                                     default=0)
    self._hand_out(request, request.text[:max(ready, 0)])
    return False

  def _hand_out(self, request: Request, text: str) -> None:
    # A tokenizer may decode a prefix of ids to text that is not a prefix of the whole (none of
    # jaxlm's do): then the stream waits, and its pieces may fall short of the reply.
    if len(text) > len(request.streamed) and text.startswith(request.streamed):
      request.notify(text[len(request.streamed):])
      request.streamed = text

  def _finish(self, request: Request, reason: str) -> bool:
    request.finish_reason = reason
    self._hand_out(request, request.text)
    request.notify(None)
    return True
