"""Defaults every pretraining config starts from; each field is overridable on the command line
(`--config.train.steps=100`). `jaxlm.configs.validate` checks them before anything runs."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Continued pretraining of a Hugging Face checkpoint (a local directory, or a hub name, then
  # downloaded): its architecture and tokenizer replace the model and tokenizer sections.
  c.init_hf = ''
  c.log_every = 10
  c.eval_every = 200  # 0: only at the end

  c.model = ml_collections.ConfigDict(dict(
      d_model=256, num_layers=4, num_heads=8, num_kv_heads=8, head_dim=32, mlp_dim=1024,
      max_seq_len=256, rope_theta=10_000.0, norm_eps=1e-6, tie_embeddings=False,
      scan_layers=True, remat='none', dtype='float32', param_dtype='float32',
      attention_impl='xla',
      causal_query_blocks=4,  # of the cache-free 'xla' attention; 1: all queries at once
      vocab_multiple=128,  # the embedding is padded to a multiple of this for even sharding
  ))

  c.tokenizer = ml_collections.ConfigDict(dict(
      path='',  # an existing SentencePiece .model; empty: train one into the workdir
      type='bpe', vocab_size=512,
      train_docs=20_000,  # documents read to train it
  ))

  c.data = ml_collections.ConfigDict(dict(
      source='world',  # world | text | tfds | parquet | jsonl
      seq_len=256,
      # Disjoint parts of the training data, split between the processes; 0: one per process.
      # Fix it to resume on another number of hosts with the same batches.
      num_shards=0,
      data_dir='',  # where TFDS builders write; empty: <workdir>/tfds
      # The built-in synthetic world.
      world_seed=0, num_train_docs=50_000, num_validation_docs=1_000,
      # Local text files.
      text_glob='', split_by='file', validation_fraction=0.05,
      # Parquet or JSONL files (.jsonl, .jsonl.gz, .jsonl.zst): comma-separated globs, local or
      # gs://, and the column or field holding each document.
      files='', text_field='text',
      # Comma-separated globs of the validation split, for text, parquet and jsonl (left out of
      # training); empty: validation_fraction of the documents, by a hash of file and row.
      validation_files='',
      # Several sources drawn from by weight, each a dict of the fields above it sets and its
      # 'weight' (and 'name'): see jaxlm/data/mixture.py. Empty: the one source above.
      mixture=(),
      # A TFDS catalog dataset prepared as ArrayRecord (never downloaded by jaxlm).
      tfds_name='', tfds_data_dir='', tfds_train_split='train', tfds_validation_split='validation',
      # A directory experiments.tokenize_data wrote (source 'tokens'); its tokenizer is used.
      token_dir='',
  ))

  c.train = ml_collections.ConfigDict(dict(
      steps=1000, batch_size=32, grad_accum_steps=1,
      learning_rate=3e-3, warmup_steps=100, min_lr_ratio=0.1,
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, decay_embeddings=False, grad_clip=1.0,
      z_loss=1e-4,
      # Updates skipped in a row (non-finite loss or gradient) before the run stops.
      max_nonfinite_steps=10,
  ))

  c.eval = ml_collections.ConfigDict(dict(
      batches=8, batch_size=32,
      num_samples=4, prompt_tokens=16, sample_tokens=64, temperature=0.7, top_k=0, top_p=0.95,
  ))

  c.checkpoint = ml_collections.ConfigDict(dict(
      every=500, keep=3, async_save=True,
      # Set unusable checkpoints aside and start from step 0 instead of stopping with an error.
      start_over=False,
  ))
  c.mesh = mesh_config()
  c.lora = lora_config()
  return c


def mesh_config() -> ml_collections.ConfigDict:
  """The device mesh of every stage.

  Sizes within a slice (or host); -1: all remaining devices. dcn_*: how many slices (or hosts)
  each axis spans over the data-centre network, for multi-slice runs. num_devices 0 uses every
  device; N uses the first N (one process).
  """
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1,
                                        dcn_data=1, dcn_fsdp=1, dcn_tensor=1, num_devices=0))


def lora_config() -> ml_collections.ConfigDict:
  """Low-rank adapters (`jaxlm.lora`); rank 0 trains every parameter.

  With rank > 0 only the adapters (and a reward model's or critic's head) train, checkpoints hold
  only them, and the reference of RL and DPO is the starting model: the base without adapters.
  """
  return ml_collections.ConfigDict(dict(
      rank=0, alpha=16.0,
      dropout=0.0,  # on the adapters' inputs, in training only (not in RL's loss)
      frozen_dtype='',  # 'bfloat16' stores the frozen base in half the memory; empty: as is
      # Module paths (re.fullmatch) that get adapters: every attention and MLP projection.
      targets=r'(.*/)?(attention/(query|key|value|out)|mlp/(gate|up|down))',
      # Parameter paths (re.fullmatch) that train in full beside the adapters, such as
      # 'embed/embedding|unembed/kernel' where the data brings tokens the base never learned.
      train_fully='',
  ))
