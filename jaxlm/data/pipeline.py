"""The pretraining data pipeline: Grain sources of documents -> tokens -> packed fixed-length
rows (`jaxlm.data.packing`).

A row is a dict of int32 [batch, seq_len] arrays: `inputs`, `targets`, `segment_ids` (1, 2, ...
per document; 0 is padding), `positions` (restarting at 0 per document) and float32 `weights`
(1 where the target counts). A data shard (`jaxlm.data.shards`) reads every `num_shards`-th
document; the iterator's position is a small JSON-able dict that checkpoints store and restore
exactly.
"""

import os

import grain
import numpy as np

from jaxlm.data import files
from jaxlm.data import mixture
from jaxlm.data import packing
from jaxlm.data import tfds_builders
from jaxlm.data import tokenized
from jaxlm.errors import UserError

SOURCES = ('world', 'text', 'tfds', 'tokens', *files.SOURCES)


def text_sources(data_config, data_dir: str):
  """(train, validation) random-access sources of document strings; for a mixture of sources
  the training documents are a `mixture.Mixture`."""
  if data_config.get('mixture'):
    return mixture.sources(data_config, data_dir, text_sources)
  if data_config.source == 'world':
    builder = tfds_builders.prepared(lambda: tfds_builders.synthetic_world_builder(
        data_config.world_seed, data_config.num_train_docs, data_config.num_validation_docs,
        data_dir))
    train, validation = (builder.as_data_source(split=s) for s in ('train', 'validation'))
  elif data_config.source == 'text':
    builder = tfds_builders.prepared(lambda: tfds_builders.local_text_builder(
        data_config.text_glob, data_config.split_by, data_config.validation_fraction, data_dir,
        data_config.validation_files))
    train, validation = (builder.as_data_source(split=s) for s in ('train', 'validation'))
  elif data_config.source == 'tfds':
    train, validation = _catalog_sources(data_config)
  elif data_config.source in files.SOURCES:
    train, validation = files.sources(data_config, data_dir)
  else:
    raise UserError(f'config.data.source must be one of {SOURCES}, got {data_config.source!r}')
  return (grain.MapDataset.source(train).map(_document_text),
          grain.MapDataset.source(validation).map(_document_text))


def pretraining_sources(data_config, workdir: str):
  """(train, validation) documents of a pretraining config: token ids for source 'tokens',
  strings otherwise, prepared under `data_config.data_dir` (by default `<workdir>/tfds`)."""
  if data_config.source == 'tokens':
    return token_sources(data_config)
  return text_sources(data_config, data_config.data_dir or os.path.join(workdir, 'tfds'))


def _catalog_sources(data_config):
  """A TFDS catalog dataset, already prepared as ArrayRecord under `tfds_data_dir`.

  Never downloads: on a machine without network `tfds.load` would retry for minutes. Prepare it
  once where the network is (`tfds build NAME --file_format=array_record --data_dir=...`).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(data_config.tfds_name, data_dir=data_config.tfds_data_dir or None,
                           file_format='array_record')
    return (builder.as_data_source(split=data_config.tfds_train_split),
            builder.as_data_source(split=data_config.tfds_validation_split))
  except Exception as e:  # tfds raises many types for a missing or unprepared dataset
    raise UserError(
        f'config.data.tfds_name={data_config.tfds_name!r} is not prepared as ArrayRecord in '
        f'config.data.tfds_data_dir={data_config.tfds_data_dir!r}: {e}') from e


def _document_text(record) -> str:
  """Record -> document string, whatever the text feature is called."""
  text = record if isinstance(record, (str, bytes)) else record.get(
      'text', next(iter(record.values())))
  return text.decode('utf-8') if isinstance(text, (bytes, np.bytes_)) else str(text)


def token_sources(data_config):
  """(train, validation) random-access sources of the documents `experiments.tokenize_data`
  tokenized into `data_config.token_dir`, as `tokenize_document` makes them."""
  return tuple(
      grain.MapDataset.source(grain.sources.ArrayRecordDataSource(
          tokenized.split_paths(data_config.token_dir, split))).map(
              lambda record: _shifted(tokenized.record_ids(record)))
      for split in tokenized.SPLITS)


def document_ids(tokenizer, text: str) -> np.ndarray:
  """[bos] doc [eos] (no bos for tokenizers without one)."""
  bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  return np.asarray(bos + tokenizer.encode(text) + [tokenizer.eos_id], np.int32)


def _shifted(ids: np.ndarray) -> dict[str, np.ndarray]:
  return {'inputs': ids[:-1], 'targets': ids[1:]}


def tokenize_document(tokenizer, text: str) -> dict[str, np.ndarray]:
  """A document's ids shifted into aligned inputs and targets."""
  return _shifted(document_ids(tokenizer, text))


def _with_source(index: int, document: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {**document, 'sources': np.full_like(document['inputs'], index)}


def packed_batches(documents: grain.MapDataset | mixture.Mixture, tokenizer, seq_len: int,
                   batch_size: int, seed: int, shuffle: bool = True, repeat: bool = True,
                   shard_index: int = 0, num_shards: int = 1) -> packing.PackedBatches:
  """Batches of packed rows from shard `shard_index` of the documents (strings, or already
  tokenized by `token_sources`); a mixture's rows also carry `source_ids`."""
  tokens = lambda doc: doc if isinstance(doc, dict) else tokenize_document(tokenizer, doc)
  # Repeated epochs read each document again: tokenize it once.
  memoized = lambda docs: packing.Memoized(docs.map(tokens)) if repeat else docs.map(tokens)
  order = mixture.document_order(mixture.map_sources(documents, memoized), seed, shuffle, repeat,
                                 shard_index, num_shards)
  if isinstance(documents, mixture.Mixture):  # each token carries the index of its source
    order = order.map(lambda pair: _with_source(*pair))
  return packing.PackedBatches(order, seq_len, batch_size)
