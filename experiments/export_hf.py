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

A LoRA run exports with its adapters merged into the weights. With `--peft` it exports the
adapters alone in the PEFT layout (`adapter_config.json`, `adapter_model.safetensors`), to load
with `peft.PeftModel.from_pretrained` onto its base: the Hugging Face model it started from, or
the export of the workdir it started from.

  python -m experiments.export_hf --workdir=runs/sft_lora --out=exported/sft_lora --peft
"""

import json
import os

import flax.linen as nn
import jax
from absl import flags

from jaxlm import checkpoint
from jaxlm import cli
from jaxlm import hf
from jaxlm import lm
from jaxlm import lora
from jaxlm import metrics
from jaxlm import reward
from jaxlm import sharding
from jaxlm.errors import UserError


def _hf_config(workdir: str, model, tokenizer) -> dict:
  hf_config_path = os.path.join(workdir, lm.HF_CONFIG)
  if os.path.exists(hf_config_path):
    with open(hf_config_path, encoding='utf-8') as f:
      return json.load(f)
  return hf.llama_config(model.config, tokenizer)


def export_adapters(workdir: str, out: str) -> None:
  config, tokenizer, model = lm.load_workdir(workdir)
  if not lora.enabled(config):
    raise UserError(f'{workdir} trained every parameter (config.lora.rank is 0): it has no '
                    'adapters to export; export it without --peft')
  if os.path.exists(os.path.join(workdir, reward.STATS_FILE)):
    raise UserError(f'{workdir} is a reward model: --peft exports a language model\'s adapters')
  hf_config = _hf_config(workdir, model, tokenizer)
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    checkpointer = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=1)
    restored = checkpointer.restore_params(sharding=sharding.replicated(mesh))
    checkpointer.close()
    if restored is None:
      raise UserError(f'no usable checkpoint in {workdir}/checkpoints')
    base = config.get('init_hf') or config.init_workdir
    hf.export_peft(out, lora.adapter_pairs(restored[0]), hf_config['model_type'], model.config,
                   config.lora, base_model=config.get('init_hf', ''))
  if jax.process_index() == 0:
    tokenizer.save_hf(out)
  metrics.log(f'Wrote the LoRA adapters of {workdir} (step {restored[1]}) to {out}; their base '
              f'is {base}' + ('' if config.get('init_hf') else ' exported with export_hf') + '.')


def export(workdir: str, out: str, max_shard_bytes: int) -> None:
  config, tokenizer, model = lm.load_workdir(workdir)
  is_reward_model = os.path.exists(os.path.join(workdir, reward.STATS_FILE))
  if is_reward_model and config.get('reply_likelihood'):
    raise UserError(f'{workdir}: this reward model adds the reply\'s log-likelihood to its head '
                    '(config.reply_likelihood), which a Hugging Face sequence-classification '
                    'model cannot compute; train it with --config.reply_likelihood=false to '
                    'export it')
  hf_config = _hf_config(workdir, model, tokenizer)
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
  if _PEFT.value:
    export_adapters(_WORKDIR.value, _OUT.value)
  else:
    export(_WORKDIR.value, _OUT.value, int(_MAX_SHARD_GB.value * (1 << 30)))


if __name__ == '__main__':
  _WORKDIR = flags.DEFINE_string('workdir', None, 'A jaxlm workdir (any language-model stage).',
                                 required=True)
  _OUT = flags.DEFINE_string('out', None, 'Directory to write the Hugging Face checkpoint to.',
                             required=True)
  _MAX_SHARD_GB = flags.DEFINE_float('max_shard_gb', 2.0, 'Largest safetensors file, in GiB.')
  _PEFT = flags.DEFINE_bool('peft', False, 'A LoRA run: write its adapters alone, in the PEFT '
                            'layout (otherwise they are merged into the exported weights).')
  cli.start(main)
