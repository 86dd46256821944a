"""jaxlm models in EleutherAI's lm-evaluation-harness (`pip install -e '.[eval]'`), and the
built-in world's held-out questions as a harness task.

`JaxlmLM` (the harness model 'jaxlm') answers the harness's three requests from a workdir's
newest checkpoint, on the workdir's mesh:

- `loglikelihood`: (context, continuation) -> (log p(continuation | context), whether greedy
  decoding would write it); the harness splits the text (`TemplateLM`), sequences are scored
  in fixed-size batches padded to power-of-two widths, so each width compiles once;
- `loglikelihood_rolling`: a text's whole log-likelihood from bos, in the harness's rolling
  windows of `max_length` tokens;
- `generate_until`: the project's sampler (`lm.complete`; greedy at temperature 0 or with
  `do_sample` false) up to `max_gen_toks` tokens, cut at the first `until` string.

With the harness's `apply_chat_template`, prompts are rendered in the template the model was
trained with (`jaxlm.chat`): jaxlm's own role tokens appear in the text as their pieces
(`<|user|>`) and `tok_encode` maps those back to the reserved ids, as a Hugging Face tokenizer
parses its special tokens. A prompt holding the end-of-turn token is a conversation, whose reply
ends at end-of-turn; other text ends at eos.
"""

import contextlib
import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_eval_utils
from lm_eval.api import model as lm_eval_model
from lm_eval.api import registry

from jaxlm import chat
from jaxlm import lm
from jaxlm import losses
from jaxlm import sharding
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.data import post_training as data_lib
from jaxlm.data import world as world_lib
from jaxlm.errors import UserError

_CHAT_PIECES = re.compile('(' + '|'.join(map(re.escape, tokenizer_lib.CHAT_TOKENS)) + ')')
_MIN_WIDTH = 32  # the narrowest padded scoring width


@registry.register_model('jaxlm')
class JaxlmLM(lm_eval_model.TemplateLM):
  """The newest verified checkpoint of a jaxlm workdir, as a harness model."""

  def __init__(self, workdir: str, batch_size: int | str | None = None, max_gen_toks: int = 256,
               seed: int = 0, **unused_harness_args):  # device, max_batch_size, ...
    super().__init__()
    self.config, self.jaxlm_tokenizer, self.model = lm.load_workdir(workdir)
    # jaxlm's own template writes its role tokens as their pieces; a Hugging Face template's
    # special tokens are parsed by its tokenizer.
    self._role_ids = (getattr(self.jaxlm_tokenizer, 'chat_ids', None)
                      if self.jaxlm_tokenizer.chat_template is None else None)
    self.workdir = workdir
    self.mesh = sharding.make_mesh(self.config.mesh)
    # By default the batch of the workdir's own held-out generation, so greedy replies are
    # computed in the same shapes as there.
    default = self.config.get('eval', {}).get('batch_size_generation', 32)
    self.batch_size = int(batch_size) if batch_size not in (None, 'auto') else default
    rows = self.mesh.shape['data'] * self.mesh.shape['fsdp']
    if self.batch_size < 1 or self.batch_size % rows:
      raise UserError(f'batch_size must be a positive multiple of the mesh\'s {rows} batch '
                      f'shards (data x fsdp), got {self.batch_size}')
    self.max_length = self.model.config.max_seq_len
    self.max_gen_toks = int(max_gen_toks)
    self.rng = jax.random.PRNGKey(int(seed))
    with self._on_mesh():
      self.params = lm.load_params(workdir, self.model, self.mesh)
    self._score = jax.jit(self._score_fn)

  @contextlib.contextmanager
  def _on_mesh(self):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.RULES):
      yield

  # Tokens: what `TemplateLM` splits contexts and continuations with.

  @property
  def eot_token_id(self) -> int:
    return self.jaxlm_tokenizer.eos_id

  @property
  def prefix_token_id(self) -> int:
    bos = self.jaxlm_tokenizer.bos_id
    return self.eot_token_id if bos is None else bos

  def _end_of_turn_id(self) -> int | None:
    if self.jaxlm_tokenizer.chat_template is None and not self._role_ids:
      return None  # a Hugging Face tokenizer without a chat template
    return chat.end_of_turn_id(self.jaxlm_tokenizer)

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
    """Ids of `string`, after bos unless `add_special_tokens` is False (or it starts with bos),
    as jaxlm pretrains on documents and SFT on conversations."""
    tokenizer = self.jaxlm_tokenizer
    if self._role_ids:
      ids = []
      for part in _CHAT_PIECES.split(string):
        ids += [self._role_ids[part]] if part in self._role_ids else (
            tokenizer.encode(part) if part else [])
    else:
      ids = tokenizer.encode(string)
    if add_special_tokens is not False and tokenizer.bos_id is not None and (
        not ids or ids[0] != tokenizer.bos_id):
      ids = [tokenizer.bos_id] + ids
    return ids

  @property
  def tokenizer_name(self) -> str:
    return os.path.abspath(self.jaxlm_tokenizer.path).replace('/', '__')

  def chat_template(self, chat_template: bool | str = False) -> str | None:
    if not chat_template:
      return None
    return self.jaxlm_tokenizer.chat_template or 'jaxlm (jaxlm/chat.py, reserved role tokens)'

  def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True):
    """The conversation as the model was trained on it; without `add_generation_prompt` a final
    assistant message stays open, to be continued (the harness's `gen_prefix`)."""
    tokenizer = self.jaxlm_tokenizer
    continue_final = not add_generation_prompt and bool(chat_history) and (
        chat_history[-1]['role'] == 'assistant')
    if not self._role_ids:
      if tokenizer.chat_template is None:
        raise UserError(f'{tokenizer.path} has no chat template to apply')
      return tokenizer.hf.apply_chat_template(
          chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
          continue_final_message=continue_final)
    text = ''
    for message in chat_history:
      chat.role_id(tokenizer, message['role'])  # checks the role
      text += f'<|{message["role"]}|>{message["content"]}<|end_of_turn|>'
    if continue_final:
      return text.removesuffix('<|end_of_turn|>')
    return text + '<|assistant|>' if add_generation_prompt else text

  # Log-likelihoods.

  def _score_fn(self, params, tokens_BxT, weights_BxT):
    """Per row: the summed log-prob of the weighted targets, and whether each is the argmax."""
    logits_BxTxV, _ = self.model.apply({'params': params}, tokens_BxT[:, :-1])
    targets_BxT = tokens_BxT[:, 1:]
    log_probs_BxT = losses.token_log_probs(logits_BxTxV, targets_BxT)
    greedy_BxT = jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT
    weights = weights_BxT[:, 1:]
    return (jnp.sum(log_probs_BxT * weights, axis=1),
            jnp.all(greedy_BxT | (weights == 0), axis=1))

  def _width(self, length: int) -> int:
    """The padded width of `length` tokens (inputs plus the final target)."""
    width = _MIN_WIDTH
    while width < length - 1:
      width *= 2
    return min(width, self.max_length) + 1

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    """requests: (cache key, context ids, continuation ids) -> [(log-prob, is greedy)]."""
    rows = []
    for _, context, continuation in requests:
      if len(continuation) > self.max_length:
        raise UserError(f'a continuation of {len(continuation)} tokens exceeds the model\'s '
                        f'max_seq_len={self.max_length}')
      tokens = (context + continuation)[-(self.max_length + 1):]
      rows.append((tokens, len(continuation)))
    # Longest first, so each batch pads little; results go back in request order.
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results = [None] * len(rows)
    with self._on_mesh():
      for start in range(0, len(order), self.batch_size):
        chunk = order[start:start + self.batch_size]
        width = self._width(len(rows[chunk[0]][0]))
        tokens = np.zeros((self.batch_size, width), np.int32)
        weights = np.zeros((self.batch_size, width), np.float32)
        for row, i in enumerate(chunk):
          ids, scored = rows[i]
          tokens[row, :len(ids)] = ids
          weights[row, len(ids) - scored:len(ids)] = 1
        batch = sharding.put_batch({'tokens': tokens, 'weights': weights}, self.mesh)
        log_probs, greedy = jax.device_get(self._score(self.params, batch['tokens'],
                                                       batch['weights']))
        for row, i in enumerate(chunk):
          results[i] = (float(log_probs[row]), bool(greedy[row]))
    for (key, _, _), result in zip(requests, results):
      if key is not None:
        self.cache_hook.add_partial('loglikelihood', key, result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owners = [], []
    for index, (text,) in enumerate(request.args for request in requests):
      for context, continuation in map(lm_eval_utils.make_disjoint_window,
                                       lm_eval_utils.get_rolling_token_windows(
                                           self.tok_encode(text, add_special_tokens=False),
                                           self.prefix_token_id, self.max_length, 1)):
        windows.append((None, context, continuation))
        owners.append(index)
    totals = [0.0] * len(requests)
    for index, (log_prob, _) in zip(owners, self._loglikelihood_tokens(windows)):
      totals[index] += log_prob
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial('loglikelihood_rolling', request.args, total)
    return totals

  # Generation.

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Requests with the same sampling options and stop token are generated together, in
    request order."""
    groups, end_of_turn = {}, self._end_of_turn_id()
    for index, request in enumerate(requests):
      context, gen_kwargs = request.args
      options = dict(gen_kwargs)
      until = options.pop('until', None) or []
      until = [until] if isinstance(until, str) else until
      max_new_tokens = int(options.pop('max_gen_toks', self.max_gen_toks))
      if max_new_tokens >= self.max_length:
        raise UserError(f'max_gen_toks={max_new_tokens} leaves no room for a prompt in the '
                        f'model\'s max_seq_len={self.max_length}')
      temperature = float(options.get('temperature', 0.0))
      sampling = dict(temperature=0.0, top_k=0, top_p=1.0)
      if options.get('do_sample', temperature > 0):
        sampling = dict(temperature=temperature or 1.0, top_k=int(options.get('top_k') or 0),
                        top_p=float(options.get('top_p') or 1.0))
      ids = self.tok_encode(context)[-(self.max_length - max_new_tokens):]
      eos_id = end_of_turn if end_of_turn in ids else self.jaxlm_tokenizer.eos_id
      key = (max_new_tokens, eos_id, tuple(sorted(sampling.items())))
      groups.setdefault(key, []).append((index, ids, until))
    results = [None] * len(requests)
    with self._on_mesh():
      for (max_new_tokens, eos_id, sampling), members in groups.items():
        replies = lm.complete(self.model, self.params, self.jaxlm_tokenizer,
                              [ids for _, ids, _ in members], self.rng,
                              max_new_tokens=max_new_tokens, batch_size=self.batch_size,
                              eos_id=eos_id, **dict(sampling))
        for (index, _, until), reply in zip(members, replies):
          results[index] = cut_at(self.jaxlm_tokenizer.decode(reply), until)
    for request, result in zip(requests, results):
      self.cache_hook.add_partial('generate_until', request.args, result)
    return results

  def get_model_info(self) -> dict:
    return {'workdir': os.path.abspath(self.workdir), 'max_length': self.max_length}


def cut_at(text: str, until: list[str]) -> str:
  """`text` up to the first occurrence of any stop string."""
  for stop in until:
    if stop:
      text = text.split(stop)[0]
  return text


# The built-in world's held-out questions as a harness task.

WORLD_TASK = 'jaxlm_world'
_WORLD_RESULTS = '''"""Scores a reply to a world question as jaxlm's own evaluation does."""

from jaxlm import chat


def process_results(doc, results):
  reply = results[0]
  return {'exact_match': float(chat.is_correct(reply, doc['answer'])),
          'format_rate': float(chat.parse_answer(reply) is not None)}
'''


def export_world_task(directory: str, world_seed: int = 0, num_questions: int = 256,
                      max_gen_toks: int = world_lib.REPLY_TOKENS) -> str:
  """Writes the task `jaxlm_world` into `directory`: the first `num_questions` held-out fact
  and arithmetic questions of the world of `world_seed` (those the pipeline's report and SFT's
  evaluation ask, by default as many and answered in as many tokens), its YAML and the metric.
  Exact match is `chat.is_correct` on the greedy reply, as in `chat.answer_metrics`; it is
  asked as a conversation, so run it with the chat template. Returns the YAML's path."""
  os.makedirs(directory, exist_ok=True)
  world = world_lib.World(world_lib.WorldConfig(seed=world_seed))
  data = os.path.abspath(os.path.join(directory, f'{WORLD_TASK}.jsonl'))
  with open(data, 'w', encoding='utf-8') as f:
    for prompt in data_lib.world_prompts(world, 'heldout', num_questions, ('fact', 'arithmetic')):
      f.write(json.dumps({'question': prompt['messages'][0]['content'],
                          'answer': prompt['answer'], 'kind': prompt['kind']}) + '\n')
  with open(os.path.join(directory, 'world_results.py'), 'w', encoding='utf-8') as f:
    f.write(_WORLD_RESULTS)
  path = os.path.join(directory, f'{WORLD_TASK}.yaml')
  with open(path, 'w', encoding='utf-8') as f:
    f.write(f'''# jaxlm's world (seed {world_seed}): {num_questions} held-out questions. Written by
# jaxlm.evaluation.export_world_task; run with the chat template (--apply_chat_template).
task: {WORLD_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(data)}
test_split: test
output_type: generate_until
num_fewshot: 0
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: []
  max_gen_toks: {max_gen_toks}
  do_sample: false
process_results: !function world_results.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
  - metric: format_rate
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
''')
  return path
