"""Workdirs for generation tests, written in a second or two without training: a jaxlm model
with random parameters, and one imported from the Hugging Face fixture checkpoint. Their replies
are noise, but real checkpoints that every binary loads as it loads a trained one."""

import os
import shutil

import flax.linen as nn
import jax
import ml_collections

from jaxlm import checkpoint
from jaxlm import configs
from jaxlm import lm
from jaxlm import sharding
from tests import tiny_config

QWEN2 = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'hf', 'qwen2')


def _save(workdir: str, params) -> None:
  checkpointer = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=1)
  checkpointer.save(1, {'params': params}, {})
  checkpointer.wait()
  checkpointer.close()


def one_device_mesh():
  return sharding.make_mesh(ml_collections.ConfigDict(
      {'data': 1, 'fsdp': 1, 'tensor': 1, 'num_devices': 1}))


def random_workdir(workdir: str, tokenizer) -> str:
  """The tiny config's model (context 128) with random parameters and `tokenizer`. Weights are
  twice init's, so that greedy replies differ from prompt to prompt (at init's scale most settle
  into repeating one token)."""
  config = tiny_config.config()
  configs.save(config, workdir)
  shutil.copy(tokenizer.path, os.path.join(workdir, 'tokenizer.model'))
  model = lm.load_workdir(workdir)[2]
  with jax.set_mesh(one_device_mesh()), nn.logical_axis_rules(sharding.RULES):
    params = nn.meta.unbox(jax.jit(lm.init_params_fn(model, 8))(jax.random.PRNGKey(0)))
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x if path[-1].key == 'scale' else 2 * x, params)
  _save(workdir, params)
  return workdir


def hf_workdir(workdir: str) -> str:
  """The Qwen2 fixture imported as it is (its tokenizer and Jinja chat template)."""
  config = tiny_config.config(init_hf=QWEN2)
  lm.start_from_hf(config, workdir)
  configs.save(config, workdir)
  model = lm.load_workdir(workdir)[2]
  mesh = one_device_mesh()
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    _save(workdir, lm.initial_params_loader(config)(lm.abstract_params(model, mesh)))
  return workdir
