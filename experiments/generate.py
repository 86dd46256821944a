r"""Samples from the latest checkpoint of a workdir.

  python -m experiments.generate --workdir=/tmp/tiny --prompt="Gemo Kiges lives in" \
      --prompt="12 + 30 =" --temperature=0
"""

import flax.linen as nn
import jax
from absl import flags

from jaxlm import cli
from jaxlm import lm
from jaxlm import metrics
from jaxlm import sharding


def main(argv):
  del argv
  metrics.configure_logging()
  config, tokenizer, model = lm.load_workdir(_WORKDIR.value)
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    params = lm.load_params(_WORKDIR.value, model, mesh)
    texts = lm.sample(model, params, tokenizer, _PROMPTS.value, jax.random.PRNGKey(_SEED.value),
                      max_new_tokens=_MAX_TOKENS.value, temperature=_TEMPERATURE.value,
                      top_k=_TOP_K.value, top_p=_TOP_P.value, batch_size=len(_PROMPTS.value))
  for prompt, text in zip(_PROMPTS.value, texts):
    print(f'{prompt!r} -> {text!r}')


if __name__ == '__main__':
  # Flags live here so that other programs (and tests) can import several binaries.
  _WORKDIR = flags.DEFINE_string('workdir', None, 'A pretraining workdir.', required=True)
  _PROMPTS = flags.DEFINE_multi_string('prompt', ['The pet of'], 'Prompts (repeat the flag).')
  _MAX_TOKENS = flags.DEFINE_integer('max_tokens', 64, 'Tokens to generate per prompt.',
                                     lower_bound=1)
  _TEMPERATURE = flags.DEFINE_float('temperature', 0.7, '0 is greedy.', lower_bound=0)
  _TOP_K = flags.DEFINE_integer('top_k', 0, '0 keeps every token.', lower_bound=0)
  _TOP_P = flags.DEFINE_float('top_p', 0.95, '1 keeps every token.', lower_bound=0,
                              upper_bound=1)
  _SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  cli.start(main)
