"""Supervised fine-tuning of a pretrained workdir: `--config.init_workdir=runs/tiny`.

The model and tokenizer come from that workdir; the loss counts assistant tokens only.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from experiments.configs import base
from jaxlm.data import world


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init_workdir = ''  # the pretraining (or an earlier SFT) workdir to start from
  # Or a Hugging Face checkpoint: a local directory, or a hub name (downloaded; needs network).
  c.init_hf = ''
  # The starting point fixes the architecture; these choices of how to run it may change
  # (unset: as it was), e.g. --config.model.dtype=bfloat16 --config.model.remat=full.
  c.model = ml_collections.ConfigDict({
      'scan_layers': placeholder(bool), 'remat': placeholder(str), 'dtype': placeholder(str),
      'param_dtype': placeholder(str), 'attention_impl': placeholder(str),
      'causal_query_blocks': placeholder(int)})
  c.log_every = 25
  c.eval_every = 100  # 0: only at the end
  c.eval_at_start = True  # evaluate the starting model first: the "before" numbers

  c.data = ml_collections.ConfigDict(dict(
      source='world',  # world | jsonl | tfds
      seq_len=128,
      # Disjoint parts of the training data, split between the processes; 0: one per process.
      # Fix it to resume on another number of hosts with the same batches.
      num_shards=0,
      # The built-in world (its seed comes from the pretraining config).
      num_train=20_000, num_eval=256,
      num_eval_policy=64,  # held-out requests of each policy kind (forbidden, look-alike, unknown)
      # Training questions about people no document mentions: their share (None: the world's
      # 10%) and how many people beyond the split's own to ask about (fresh names of the same
      # split; the default world's train split has 47, its RL split 5). Held-out questions keep
      # the world's mix and its 256 held-out unknown people.
      unknown_share=placeholder(float), extra_unknown_people=0,
      # Label noise (world only, training split only): shares of training conversations whose
      # reply is replaced by a wrong one / by the right answer out of format, chosen by `seed`.
      noise_wrong=0.0, noise_off_format=0.0,
      # JSONL: {"messages": [...]} or {"prompt": ..., "response": ...} per line.
      jsonl_train='', jsonl_eval='',
      # A TFDS dataset prepared as ArrayRecord with the same fields.
      tfds_name='', tfds_data_dir='', tfds_train_split='train', tfds_eval_split='validation',
  ))

  c.train = ml_collections.ConfigDict(dict(
      steps=300, batch_size=32, grad_accum_steps=1,
      learning_rate=1e-3, warmup_steps=20, min_lr_ratio=0.1,
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, decay_embeddings=False, grad_clip=1.0,
      z_loss=0.0,
      # Updates skipped in a row (non-finite loss or gradient) before the run stops.
      max_nonfinite_steps=10,
  ))

  c.eval = ml_collections.ConfigDict(dict(
      batches=4, batch_size=32,  # held-out loss
      # Generation on held-out prompts: greedy by default; it stops when every reply has ended.
      num_prompts=256, batch_size_generation=128, sample_tokens=world.REPLY_TOKENS,
      temperature=0.0, top_k=0, top_p=1.0, num_samples=4,
  ))

  c.checkpoint = ml_collections.ConfigDict(dict(
      every=100, keep=2, async_save=True,
      # Set unusable checkpoints aside and start from step 0 instead of stopping with an error.
      start_over=False,
  ))
  c.mesh = base.mesh_config()
  c.lora = base.lora_config()
  return c
