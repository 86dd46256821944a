"""What the post-training stages (SFT, reward model, RL, DPO) share: starting from an earlier
workdir, reading their data source, and evaluating answers on held-out prompts."""

import os
import shutil

import jax

from jaxlm import chat
from jaxlm import lm
from jaxlm import metrics
from jaxlm import model as model_lib
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.data import post_training as data_lib
from jaxlm.data import world as world_lib
from jaxlm.errors import UserError


def start_from(config, workdir: str):
  """(tokenizer, model, world) of the starting point: the Hugging Face checkpoint
  `config.init_hf`, or the workdir `config.init_workdir`. Its tokenizer (and an imported
  checkpoint's config.json) are copied into `workdir` so the new run stands on its own."""
  runtime = {k: v for k, v in config.get('model', {}).items() if v is not None}
  if config.get('init_hf'):
    tokenizer = lm.start_from_hf(config, workdir)
    with config.unlocked():
      config.model.update(runtime)
    world = world_lib.World(world_lib.WorldConfig(seed=config.data.get('world_seed', 0)))
    return tokenizer, model_lib.Transformer(lm.model_config(config, tokenizer)), world
  if not config.init_workdir:
    raise UserError('config.init_workdir (or config.init_hf) must name what to start from '
                     '(e.g. --config.init_workdir=runs/tiny)')
  base_config, tokenizer, _ = lm.load_workdir(config.init_workdir)
  if not lm.has_checkpoint(config.init_workdir):
    raise UserError(f'config.init_workdir={config.init_workdir} has no checkpoint to start from: '
                    'did its training save one?')
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    if not os.path.exists(tokenizer_lib.workdir_path(workdir)):
      tokenizer.save(workdir)
    hf_config = os.path.join(config.init_workdir, lm.HF_CONFIG)
    if os.path.exists(hf_config):
      shutil.copy(hf_config, os.path.join(workdir, lm.HF_CONFIG))
  with config.unlocked():
    config.model = base_config.model
    config.model.update(runtime)
    config.tokenizer = base_config.tokenizer
    config.tokenizer.path = ''
    # Carried from stage to stage, so every stage asks about the world pretraining read.
    config.data.world_seed = base_config.data.get('world_seed', 0)
  world = world_lib.World(world_lib.WorldConfig(seed=config.data.world_seed))
  return tokenizer, model_lib.Transformer(lm.model_config(config, tokenizer)), world


def load_initial_params(config, model, mesh):
  """The starting parameters (`lm.initial_params_loader`) for `model`, sharded over `mesh`."""
  return lm.initial_params_loader(config)(lm.abstract_params(model, mesh))


def world_question_options(data_config) -> dict:
  """The `World.questions` options of a stage's training questions, checked: how often they ask
  about people no document mentions (`data.unknown_share`; unset: the world's own mix) and about
  how many people beyond the split's own (`data.extra_unknown_people`, fresh names of the split)."""
  unknown_share = data_config.get('unknown_share')
  extra_unknown_people = data_config.get('extra_unknown_people', 0)
  if unknown_share is not None and not 0 <= unknown_share < 1:
    raise UserError("config.data.unknown_share must be in [0, 1) (unset: the world's own mix), "
                     f'got {unknown_share}')
  if extra_unknown_people < 0:
    raise UserError(f'config.data.extra_unknown_people must be >= 0, got {extra_unknown_people}')
  if (unknown_share is not None or extra_unknown_people) and data_config.source != 'world':
    raise UserError("config.data.unknown_share and extra_unknown_people shape the built-in "
                     f"world's questions; config.data.source is {data_config.source!r}")
  return dict(unknown_share=unknown_share, extra_unknown_people=extra_unknown_people)


def examples(data_config, split: str, world, parse, world_examples) -> list[dict]:
  """Records of `split` ('train' or 'eval') from the configured source. Training questions
  from the world follow `world_question_options`; held-out ones keep the world's own mix."""
  if data_config.source == 'world':
    train_split = data_config.get('world_train_split', 'train')
    if split == 'train':
      return world_examples(world, train_split, data_config.num_train,
                            **world_question_options(data_config))
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
