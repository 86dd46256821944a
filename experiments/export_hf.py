r"""Exports a workdir's newest verified checkpoint as a Hugging Face checkpoint.

  python -m experiments.export_hf --workdir=runs/sft --out=exported/sft

Writes `config.json`, safetensors (one file, or shards of `--max_shard_gb` with an index) and
the tokenizer files, so that `transformers.AutoModelForCausalLM.from_pretrained(out)` loads it.
A model imported from Hugging Face goes back as its own family, with its tokenizer and chat
template; one jaxlm trained from scratch as Llama, beside its SentencePiece `tokenizer.model`.
An RL workdir exports its policy. A reward model (trained with `--config.reply_likelihood=false`)
exports as a `*ForSequenceClassification` model whose score, at the last token of a conversation
ending in the reply's end-of-turn token, plus `jaxlm_score_bias` from its config.json, is
jaxlm's reward. The vocabulary padding jaxlm adds for sharding is removed; tied embeddings stay
tied.
"""

import json
import os

import flax.linen as nn
import jax
from absl import flags

from jaxlm import cli
from jaxlm import hf
from jaxlm import lm
from jaxlm import metrics
from jaxlm import reward
from jaxlm import sharding
from jaxlm.errors import UserError


def export(workdir: str, out: str, max_shard_bytes: int) -> None:
  config, tokenizer, model = lm.load_workdir(workdir)
  is_reward_model = os.path.exists(os.path.join(workdir, reward.STATS_FILE))
  if is_reward_model and config.get('reply_likelihood'):
    raise UserError(f'{workdir}: this reward model adds the reply\'s log-likelihood to its head '
                    '(config.reply_likelihood), which a Hugging Face sequence-classification '
                    'model cannot compute; train it with --config.reply_likelihood=false to '
                    'export it')
  hf_config_path = os.path.join(workdir, lm.HF_CONFIG)
  if os.path.exists(hf_config_path):
    with open(hf_config_path, encoding='utf-8') as f:
      hf_config = json.load(f)
  else:
    hf_config = hf.llama_config(model.config, tokenizer)
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    if is_reward_model:
      scorer = reward.reward_model(workdir, model.config)
      params = lm.load_params(workdir, scorer, mesh)
      hf.export(out, params['transformer'], hf_config['model_type'], model.config, hf_config,
                max_shard_bytes, score_head=params['head'])
    else:
      hf.export(out, lm.load_params(workdir, model, mesh), hf_config['model_type'],
                model.config, hf_config, max_shard_bytes)
  if jax.process_index() == 0:
    tokenizer.save_hf(out)
  metrics.log(f'Wrote the {hf_config["model_type"]} checkpoint of {workdir} to {out}.')


def main(argv):
  del argv
  metrics.configure_logging()
  export(_WORKDIR.value, _OUT.value, int(_MAX_SHARD_GB.value * (1 << 30)))


if __name__ == '__main__':
  _WORKDIR = flags.DEFINE_string('workdir', None, 'A jaxlm workdir (any language-model stage).',
                                 required=True)
  _OUT = flags.DEFINE_string('out', None, 'Directory to write the Hugging Face checkpoint to.',
                             required=True)
  _MAX_SHARD_GB = flags.DEFINE_float('max_shard_gb', 2.0, 'Largest safetensors file, in GiB.')
  cli.start(main)
