"""TFDS builders that write ArrayRecord, readable with `tfds.data_source` (no TensorFlow).

`LocalText` turns local text files (a glob) into documents; `SyntheticWorld` writes the built-in
world's documents. Each builder config is named by a hash of what defines its content, so a
changed glob or world seed never reuses stale prepared data.
"""

import dataclasses
import glob as globlib
import hashlib
import json
import os

import numpy as np
import tensorflow_datasets as tfds

from jaxlm import distributed

from jaxlm.data import files as files_lib
from jaxlm.data import world as world_lib
from jaxlm.errors import UserError

VERSION = tfds.core.Version('1.0.0')
SPLIT_BY = ('file', 'line')


def _content_hash(fields) -> str:
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def _text_info(builder, description):
  return tfds.core.DatasetInfo(builder=builder, description=description,
                               features=tfds.features.FeaturesDict({'text': tfds.features.Text()}))


@dataclasses.dataclass
class LocalTextConfig(tfds.core.BuilderConfig):
  pattern: str = ''
  split_by: str = 'file'
  validation_fraction: float = 0.05
  validation_files: tuple[str, ...] = ()  # when set, the validation split, left out of training
  files_fingerprint: str = ''  # paths, sizes and times: edited files are prepared anew


class LocalText(tfds.core.GeneratorBasedBuilder):
  """Documents from local text files: one per file, or one per non-empty line.

  With `validation_files` those are the validation split; otherwise a document goes to
  `validation` when a hash of its file path (and line number) falls below `validation_fraction`,
  so the split is stable when files are added.
  """
  VERSION = VERSION

  def _info(self):
    return _text_info(self, 'Documents from local text files.')

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in ('train', 'validation')}

  def _generate_examples(self, split):
    c = self.builder_config
    held_out = list(c.validation_files)
    paths = sorted(set(os.path.abspath(p) for p in globlib.glob(c.pattern, recursive=True))
                   - set(held_out))
    if held_out and split == 'validation':
      paths = held_out
    for path in paths:
      with open(path, encoding='utf-8', errors='replace') as f:
        text = f.read()
      docs = [text] if self.builder_config.split_by == 'file' else text.splitlines()
      for i, doc in enumerate(docs):
        if not doc.strip():
          continue
        key = f'{path}:{i}'
        fraction = int(hashlib.md5(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        if held_out or (fraction < c.validation_fraction) == (split == 'validation'):
          yield key, {'text': doc}


@dataclasses.dataclass
class SyntheticWorldConfig(tfds.core.BuilderConfig):
  world_seed: int = 0
  num_train_docs: int = 20_000
  num_validation_docs: int = 1_000


class SyntheticWorld(tfds.core.GeneratorBasedBuilder):
  """The built-in synthetic world (`jaxlm.data.world`) as a text dataset."""
  VERSION = VERSION

  def _info(self):
    return _text_info(self, 'Documents of the built-in synthetic world.')

  def _split_generators(self, dl_manager):
    del dl_manager
    world = world_lib.World(world_lib.WorldConfig(seed=self.builder_config.world_seed))
    c = self.builder_config
    return {
        'train': self._generate_examples(world.documents('train', c.num_train_docs)),
        'validation': self._generate_examples(
            world.documents('validation', c.num_validation_docs)),
    }

  def _generate_examples(self, docs):
    for i, doc in enumerate(docs):
      yield i, {'text': doc}


def local_text_builder(pattern: str, split_by: str, validation_fraction: float,
                       data_dir: str, validation_globs: str = '') -> LocalText:
  """`validation_globs`: comma-separated globs of the validation files (config.data
  .validation_files); empty: a `validation_fraction` of the documents."""
  if split_by not in SPLIT_BY:
    raise UserError(f'config.data.split_by must be one of {SPLIT_BY}, got {split_by!r}')
  paths = sorted(globlib.glob(pattern, recursive=True))
  if not paths:
    raise UserError(f'config.data.text_glob matches no files: {pattern!r}')
  validation = (files_lib.glob_files(validation_globs, 'data.validation_files')
                if validation_globs else [])
  files = [(os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns)
           for p in sorted(set(map(os.path.abspath, paths)) | set(validation))]
  fields = dict(pattern=os.path.abspath(pattern), split_by=split_by,
                validation_fraction=validation_fraction, validation_files=tuple(validation),
                files_fingerprint=_content_hash(files))
  config = LocalTextConfig(name=_content_hash(fields), version=VERSION, **fields)
  return LocalText(config=config, data_dir=data_dir, file_format='array_record')


def synthetic_world_builder(world_seed: int, num_train_docs: int, num_validation_docs: int,
                            data_dir: str) -> SyntheticWorld:
  fields = dict(world_seed=world_seed, num_train_docs=num_train_docs,
                num_validation_docs=num_validation_docs)
  config = SyntheticWorldConfig(name=_content_hash(fields), version=VERSION, **fields)
  return SyntheticWorld(config=config, data_dir=data_dir, file_format='array_record')


def prepared(make_builder):
  """A builder whose dataset is on disk, ready for `as_data_source(split)`.

  Process 0 makes and prepares it first (a no-op when already prepared); the other processes
  then open what it wrote, or prepare their own copy when `data_dir` is not shared.
  """
  def prepare():
    builder = make_builder()
    try:
      builder.download_and_prepare()
    except AssertionError as e:  # tfds asserts that every split has examples
      raise UserError(f'{builder.name}: a split came out empty; with few documents raise or '
                       f'lower config.data.validation_fraction ({e})') from e
    return builder
  return distributed.main_process_first(prepare, 'tfds_prepare')


def decode_text(record) -> str:
  text = record['text']
  return text.decode('utf-8') if isinstance(text, (bytes, np.bytes_)) else str(text)
