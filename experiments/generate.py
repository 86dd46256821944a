r"""Samples from the latest checkpoint of a workdir.

  python -m experiments.generate --workdir=/tmp/tiny --prompt="Gemo Kiges lives in" \
      --prompt="12 + 30 =" --temperature=0
"""

import os

import flax.linen as nn
import jax
import ml_collections
from absl import app
from absl import flags

from jaxlm import checkpoint
from jaxlm import configs
from jaxlm import lm
from jaxlm import metrics
from jaxlm import model as model_lib
from jaxlm import sharding
from jaxlm import tokenizer as tokenizer_lib
from jaxlm import trainer

_WORKDIR = flags.DEFINE_string('workdir', None, 'A pretraining workdir.', required=True)
_PROMPTS = flags.DEFINE_multi_string('prompt', ['The pet of'], 'Prompts (repeat the flag).')
_MAX_TOKENS = flags.DEFINE_integer('max_tokens', 64, 'Tokens to generate per prompt.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.7, '0 is greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, '0 keeps every token.')
_TOP_P = flags.DEFINE_float('top_p', 0.95, '1 keeps every token.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')


def main(argv):
  del argv
  metrics.configure_logging()
  config = configs.load(_WORKDIR.value)
  tokenizer = tokenizer_lib.Tokenizer.load(
      config.tokenizer.path or os.path.join(_WORKDIR.value, 'tokenizer.model'))
  model = model_lib.Transformer(lm.model_config(config, tokenizer))
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    boxed = jax.eval_shape(lm.init_params_fn(model, 1), jax.random.PRNGKey(0))
    abstract, _ = trainer.abstract_params(boxed, mesh)
    checkpointer = checkpoint.Checkpointer(os.path.join(_WORKDIR.value, 'checkpoints'), keep=1)
    restored = checkpointer.restore_params(abstract)
    if restored is None:
      raise FileNotFoundError(f'no usable checkpoint in {_WORKDIR.value}/checkpoints')
    params, step = restored
    sample_config = ml_collections.ConfigDict(dict(
        sample_tokens=_MAX_TOKENS.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
        top_p=_TOP_P.value))
    texts = lm.sample(model, params, tokenizer, _PROMPTS.value, sample_config,
                      jax.random.PRNGKey(_SEED.value))
  print(f'Checkpoint at step {step}:')
  for prompt, text in zip(_PROMPTS.value, texts):
    print(f'{prompt!r} -> {text!r}')


if __name__ == '__main__':
  app.run(main)
