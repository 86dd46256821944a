"""Pretokenized data: every document's token ids, made once, in ArrayRecord shards.

`DIR/train/` and `DIR/validation/` hold shards `NNNNN-of-MMMMM.array_record`; shard i holds
documents [i * shard_docs, (i + 1) * shard_docs) in document order, one record per document: its
int32 ids [bos] doc [eos] as little-endian bytes. Beside each shard, `<shard>.json` counts its
documents and tokens. `DIR/tokenized.json`, written once every shard exists, names the
tokenizer that made them and counts documents and tokens per split.
"""

import json
import os

import numpy as np

from jaxlm.errors import UserError

SPLITS = ('train', 'validation')
MANIFEST = 'tokenized.json'
_RECORD_DTYPE = np.dtype('<i4')


def shard_paths(directory: str, split: str, num_documents: int, shard_docs: int) -> list[str]:
  count = -(-num_documents // shard_docs)
  return [os.path.join(directory, split, f'{i:05d}-of-{count:05d}.array_record')
          for i in range(count)]


def write_shard(path: str, documents_ids) -> dict:
  """Writes an iterable of id arrays as a shard (under a tmp name, renamed when complete, so a
  shard that exists is finished); returns its counts."""
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path), exist_ok=True)
  counts = {'documents': 0, 'tokens': 0}
  writer = ArrayRecordWriter(path + '.tmp', 'group_size:1')  # one record per read
  for ids in documents_ids:
    writer.write(np.asarray(ids, _RECORD_DTYPE).tobytes())
    counts['documents'] += 1
    counts['tokens'] += len(ids)
  writer.close()
  write_json(path + '.json', counts)
  os.replace(path + '.tmp', path)
  return counts


def shard_counts(path: str) -> dict:
  with open(path + '.json', encoding='utf-8') as f:
    return json.load(f)


def record_ids(record: bytes) -> np.ndarray:
  return np.frombuffer(record, _RECORD_DTYPE).astype(np.int32)


def write_json(path: str, value) -> None:
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(value, f, indent=2)
  os.replace(path + '.tmp', path)


def read_manifest(directory: str) -> dict:
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    raise UserError(f'config.data.token_dir={directory!r} has no {MANIFEST}: its tokenization is '
                    f'missing or unfinished; rerun python -m experiments.tokenize_data '
                    f'--out={directory} to finish it')
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def split_paths(directory: str, split: str) -> list[str]:
  return [os.path.join(directory, split, name)
          for name in read_manifest(directory)['splits'][split]['shards']]


def tokenizer_path(directory: str) -> str:
  """The tokenizer that made a directory's tokens."""
  return os.path.abspath(os.path.join(directory, read_manifest(directory)['tokenizer']))
