"""Documents from Parquet and JSONL files, as random-access Grain sources.

`ParquetDocuments` indexes row groups from the files' footers and reads one row group's text
column when asked for a row in it; `JsonlDocuments` scans each file once for where its lines
start and reads one line per document. Neither holds a shard in memory. Compressed JSONL
(`.gz`, `.zst`) cannot seek, so it is decompressed once into a plain cache under `data_dir`.

Rows without a document (a null value; in JSONL also a line that is not UTF-8, not JSON, lacks the
field or holds a non-string) are left out when indexing, so indices stay dense; how many were
left out is logged. Paths may be local or any fsspec URL (`gs://...`).
"""

import bisect
import glob as globlib
import gzip
import hashlib
import json
import os
import threading
import zlib

import fsspec
import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from jaxlm import distributed
from jaxlm import metrics
from jaxlm.errors import UserError

SOURCES = ('parquet', 'jsonl')
JSONL_SUFFIXES = ('.jsonl', '.jsonl.gz', '.jsonl.zst')
_TEXT_TYPES = (pa.string(), pa.large_string())


def glob_files(globs: str, field: str) -> list[str]:
  """The sorted files matching comma-separated `globs`; a glob matching nothing is an error."""
  paths = set()
  for pattern in (g.strip() for g in globs.split(',') if g.strip()):
    if '://' in pattern:
      fs, _ = fsspec.core.url_to_fs(pattern)
      matched = [fs.unstrip_protocol(p) for p in fs.glob(pattern)]
    else:
      matched = [os.path.abspath(p) for p in globlib.glob(pattern, recursive=True)
                 if os.path.isfile(p)]
    if not matched:
      raise UserError(f'config.{field} matches no files: {pattern!r}')
    paths.update(matched)
  return sorted(paths)


def _open(path: str):
  return fsspec.open(path, 'rb').open() if '://' in path else open(path, 'rb')


class _PerThread:
  """Grain reads with threads: each keeps its own open files (and caches) in `self._local`."""

  def _handle(self, i: int, open_file):
    handles = self._local.__dict__.setdefault('handles', {})
    if i not in handles:
      handles[i] = open_file(self._paths[i])
    return handles[i]

  def __getstate__(self):  # for Grain's worker processes: open files stay behind
    return {k: v for k, v in self.__dict__.items() if k != '_local'}

  def __setstate__(self, state):
    self.__dict__.update(state, _local=threading.local())


class ParquetDocuments(_PerThread):
  """The strings of column `text_field` of Parquet files, row by row."""

  def __init__(self, paths: list[str], text_field: str):
    self._paths, self._text_field = paths, text_field
    self._groups = []  # (file index, row group, kept row positions or None for all)
    ends, self.files, skipped = [], [], 0
    for i, path in enumerate(paths):
      parquet = self._file(path)
      column = self._column_index(parquet, path)
      kept_in_file = 0
      for g in range(parquet.metadata.num_row_groups):
        group = parquet.metadata.row_group(g)
        stats = group.column(column).statistics
        rows = None  # every row; a group that may hold nulls is read once for its valid rows
        if stats is None or not stats.has_null_count or stats.null_count:
          rows = np.flatnonzero(
              self._read_group(parquet, path, g).is_valid().to_numpy(zero_copy_only=False))
          skipped += group.num_rows - len(rows)
        kept = group.num_rows if rows is None else len(rows)
        if kept:
          self._groups.append((i, g, rows))
          ends.append((ends[-1] if ends else 0) + kept)
          kept_in_file += kept
      self.files.append((os.path.basename(path), kept_in_file))
    self._ends = ends
    self._local = threading.local()
    if skipped:
      metrics.log(f'Parquet: left out {skipped:,} null {text_field!r} values of {len(paths)} '
                  'files.')

  def _file(self, path: str) -> pq.ParquetFile:
    try:
      return pq.ParquetFile(_open(path))
    except (OSError, pa.ArrowException) as e:
      raise UserError(f'{path}: not a readable Parquet file ({e})') from e

  def _column_index(self, parquet, path: str) -> int:
    schema = parquet.schema_arrow
    if self._text_field not in schema.names:
      raise UserError(f'{path} has no column {self._text_field!r} (config.data.text_field); '
                      f'its columns: {schema.names}')
    if schema.field(self._text_field).type not in _TEXT_TYPES:
      raise UserError(f'{path}: column {self._text_field!r} is '
                      f'{schema.field(self._text_field).type}, not a string column')
    return schema.get_field_index(self._text_field)

  def _read_group(self, parquet, path: str, group: int):
    try:
      return parquet.read_row_group(group, columns=[self._text_field]).column(0).combine_chunks()
    except (OSError, pa.ArrowException) as e:
      raise UserError(f'{path}: row group {group} is unreadable ({e})') from e

  def __len__(self):
    return self._ends[-1] if self._ends else 0

  def __getitem__(self, index: int) -> str:
    k = bisect.bisect_right(self._ends, index)
    i, g, rows = self._groups[k]
    row = index - (self._ends[k - 1] if k else 0)
    # A thread reads mostly within one row group at a time: keep its last one.
    local = self._local
    if getattr(local, 'key', None) != (i, g):
      parquet = self._handle(i, self._file)
      local.column, local.key = self._read_group(parquet, self._paths[i], g), (i, g)
    return local.column[int(row if rows is None else rows[row])].as_py()


class JsonlDocuments(_PerThread):
  """The string field `text_field` of each JSON line of JSONL files (`.gz`, `.zst` too)."""

  def __init__(self, paths: list[str], text_field: str, cache_dir: str):
    self._text_field = text_field
    self._paths = [_plain(p, cache_dir) for p in paths]
    self._starts, self.files, skipped, first = [], [], 0, None
    for path, plain in zip(paths, self._paths):
      starts, file_skipped, file_first = self._scan(path, plain)
      self._starts.append(starts)
      self.files.append((os.path.basename(path), len(starts)))
      skipped, first = skipped + file_skipped, first or file_first
    self._ends = np.cumsum([len(s) for s in self._starts]).tolist()
    self._local = threading.local()
    if skipped:
      metrics.log(f'JSONL: left out {skipped:,} lines that are not UTF-8 JSON objects with a '
                  f'string {text_field!r}, the first at {first}.')

  def _scan(self, path: str, plain: str) -> tuple[np.ndarray, int, str | None]:
    """Where each document's line starts, how many lines were left out and the first one."""
    starts, skipped, first, offset, fields = [], 0, None, 0, None
    with _open(plain) as f:
      for number, line in enumerate(f, 1):
        record = _parse(line)
        if isinstance(record, dict) and isinstance(record.get(self._text_field), str):
          starts.append(offset)
        elif line.strip():
          skipped, first = skipped + 1, first or f'{path}:{number}'
          if isinstance(record, dict) and self._text_field not in record and fields is None:
            fields = list(record)
        offset += len(line)
    if not starts and fields is not None:
      raise UserError(f'{path} has no field {self._text_field!r} (config.data.text_field); '
                      f'its records have: {fields}')
    return np.asarray(starts, np.uint64), skipped, first

  def __len__(self):
    return self._ends[-1] if self._ends else 0

  def __getitem__(self, index: int) -> str:
    k = bisect.bisect_right(self._ends, index)
    f = self._handle(k, _open)
    f.seek(int(self._starts[k][index - (self._ends[k - 1] if k else 0)]))
    return json.loads(f.readline())[self._text_field]


def _parse(line: bytes):
  try:
    return json.loads(line.decode('utf-8'))
  except ValueError:  # UnicodeDecodeError and JSONDecodeError alike
    return None


def _plain(path: str, cache_dir: str) -> str:
  """`path`, or for a compressed file its decompressed copy under `cache_dir`, made once."""
  if not path.endswith(('.gz', '.zst')):
    return path
  fs, _ = fsspec.core.url_to_fs(path)
  info = fs.info(path)
  key = hashlib.sha256(json.dumps(
      [path, info.get('size'), str(info.get('mtime', info.get('updated')))]).encode())
  cache = os.path.join(cache_dir, f'{key.hexdigest()[:16]}.jsonl')
  if not os.path.exists(cache):
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f'{cache}.tmp{os.getpid()}'
    try:
      with _open(path) as raw, open(tmp, 'wb') as out:
        for chunk in _decompressed(raw, path):
          out.write(chunk)
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
      os.remove(tmp)
      raise UserError(f'{path}: corrupt or truncated ({e})') from e
    os.replace(tmp, cache)  # never a half-written cache, however the run ends
  return cache


def _decompressed(raw, path: str, chunk_size: int = 1 << 20):
  """The decompressed bytes of `raw` in chunks; EOFError where it ends mid-frame."""
  if path.endswith('.gz'):
    with gzip.GzipFile(fileobj=raw) as f:  # raises EOFError itself
      while chunk := f.read(chunk_size):
        yield chunk
    return
  decompressor = zstandard.ZstdDecompressor()
  frame, fed = decompressor.decompressobj(), False
  while data := raw.read(chunk_size):
    while data:  # a file may hold several frames, one after another
      yield frame.decompress(data)
      fed, data = True, b''
      if frame.eof:
        frame, fed, data = decompressor.decompressobj(), False, frame.unused_data
  if fed and not frame.eof:
    raise EOFError('the last zstd frame ends early')


def _validation_share(files: list[tuple[str, int]], fraction: float) -> np.ndarray:
  """Whether each document goes to validation, by a hash of its file's name and row."""
  if not files:
    return np.zeros(0, bool)
  masks = []
  for name, count in files:
    seed = np.uint64(int(hashlib.md5(name.encode()).hexdigest()[:16], 16))
    with np.errstate(over='ignore'):  # splitmix64 wraps by design
      z = np.arange(count, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + seed
      z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
      z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
      z ^= z >> np.uint64(31)
    masks.append((z >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction)
  return np.concatenate(masks)


class _Rows:
  """`source` restricted to the documents at `indices`."""

  def __init__(self, source, indices: np.ndarray):
    self._source, self._indices = source, indices

  def __len__(self):
    return len(self._indices)

  def __getitem__(self, index: int) -> str:
    return self._source[int(self._indices[index])]


def sources(data_config, data_dir: str) -> tuple[grain.MapDataset, grain.MapDataset]:
  """(train, validation) documents of `data.files`: `data.validation_files` when set, else a
  `data.validation_fraction` of the documents."""
  def documents(paths):
    if data_config.source == 'parquet':
      return ParquetDocuments(paths, data_config.text_field)
    for path in paths:
      if not path.endswith(JSONL_SUFFIXES):
        raise UserError(f'{path}: a JSONL file must end in one of {JSONL_SUFFIXES}')
    return JsonlDocuments(paths, data_config.text_field, os.path.join(data_dir, 'jsonl'))

  def make():
    paths = glob_files(data_config.files, 'data.files')
    if data_config.validation_files:
      held_out = glob_files(data_config.validation_files, 'data.validation_files')
      paths = sorted(set(paths) - set(held_out))
      if not paths:
        raise UserError('config.data.files holds no files besides config.data.validation_files')
      return documents(paths), documents(held_out)
    everything = documents(paths)
    validation = _validation_share(everything.files, data_config.validation_fraction)
    return (_Rows(everything, np.flatnonzero(~validation)),
            _Rows(everything, np.flatnonzero(validation)))

  train, validation = distributed.main_process_first(make, 'file_sources')
  for name, split in (('training', train), ('validation', validation)):
    if not len(split):
      raise UserError(f'config.data.files gave no {name} documents; with few documents raise '
                      'or lower config.data.validation_fraction, or set '
                      'config.data.validation_files')
  metrics.log(f'{data_config.source}: {len(train):,} training and {len(validation):,} '
              'validation documents.')
  return grain.MapDataset.source(train), grain.MapDataset.source(validation)
