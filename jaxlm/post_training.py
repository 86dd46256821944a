"""What the post-training stages (SFT, reward model, RL, DPO) share: starting from an earlier
workdir, reading their data source, and evaluating answers on held-out prompts."""

import os
import shutil

import jax

from jaxlm import chat
from jaxlm import lm
from jaxlm import metrics
from jaxlm.data import post_training as data_lib
from jaxlm.data import world as world_lib


def start_from(config, workdir: str):
  """(tokenizer, model, world config) of `config.init_workdir`; its tokenizer is copied into
  `workdir` so the new run stands on its own."""
  if not config.init_workdir:
    raise ValueError('config.init_workdir must name the workdir to start from '
                     '(e.g. --config.init_workdir=runs/tiny)')
  base_config, tokenizer, model = lm.load_workdir(config.init_workdir)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0 and not os.path.exists(os.path.join(workdir, 'tokenizer.model')):
    shutil.copy(tokenizer.path, os.path.join(workdir, 'tokenizer.model'))
  with config.unlocked():
    config.model = base_config.model
    config.tokenizer = base_config.tokenizer
    config.tokenizer.path = ''
    # Carried from stage to stage, so every stage asks about the world pretraining read.
    config.data.world_seed = base_config.data.get('world_seed', 0)
  world = world_lib.World(world_lib.WorldConfig(seed=config.data.world_seed))
  return tokenizer, model, world


def examples(data_config, split: str, world, parse, world_examples) -> list[dict]:
  """Records of `split` ('train' or 'eval') from the configured source."""
  if data_config.source == 'world':
    train_split = data_config.get('world_train_split', 'train')
    if split == 'train':
      return world_examples(world, train_split, data_config.num_train)
    return data_lib.world_held_out(world_examples, world, data_config.num_eval,
                                   data_config.get('num_eval_policy', 0))
  if data_config.source == 'jsonl':
    path = data_config.jsonl_train if split == 'train' else data_config.jsonl_eval
    return data_lib.from_jsonl(path, parse) if path else []
  return data_lib.from_tfds(
      data_config.tfds_name, data_config.tfds_data_dir,
      data_config.tfds_train_split if split == 'train' else data_config.tfds_eval_split, parse)


def make_answer_evaluator(model, tokenizer, eval_examples: list[dict], eval_config):
  """params, step -> format-following rate and exact match on held-out questions, and the
  policy rates on held-out policy requests (`chat.evaluation_metrics`); logs a few replies."""
  checkable = chat.evaluation_subset(eval_examples, eval_config.num_prompts)
  # The prompt is the conversation up to its final reply.
  conversations = [e['messages'][:-1] if e['messages'][-1]['role'] == 'assistant'
                   else e['messages'] for e in checkable]

  def evaluate(params, step):
    if not checkable:
      return {}
    replies = lm.replies(model, params, tokenizer, conversations, jax.random.PRNGKey(step),
                         **lm.sampling_options(eval_config))
    for messages, reply in list(zip(conversations, replies))[:eval_config.num_samples]:
      metrics.log(f'reply at step {step}: {messages[-1]["content"]!r} -> {reply!r}')
    return chat.evaluation_metrics(replies, checkable)

  return evaluate
