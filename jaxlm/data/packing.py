"""Packing: tokenized documents, concatenated in order and cut into fixed-length rows.

A batch is `batch_size` rows of `seq_len` tokens, each row made whole with numpy: segment ids
count the (pieces of) documents in a row from 1, positions restart at 0 at each piece, 0 pads
the end of the last row of a finite source. The iterator's position is two integers (the first
document not yet emitted whole, and how many of its tokens were), so saving and resuming it is
exact and cheap.
"""

import grain
import numpy as np

from jaxlm.errors import UserError

# Tokenized documents kept in memory per iterator: a small corpus is tokenized once, not once per
# epoch; a large one is read afresh beyond this.
CACHE_BYTES = 256 << 20


class Memoized(grain.MapDataset):
  """A MapDataset that keeps the elements (dicts of arrays) it has read, up to `max_bytes`."""

  def __init__(self, parent: grain.MapDataset, max_bytes: int = CACHE_BYTES):
    super().__init__(parent)
    self._max_bytes = max_bytes
    self._bytes = 0
    self._cache = {}

  def __len__(self) -> int:
    return len(self._parent)

  def __str__(self) -> str:
    return 'Memoized'

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    index %= len(self)  # as Grain's sources do: an epoch's indices continue past the length
    element = self._cache.get(index)
    if element is None:
      element = self._parent[index]
      size = sum(array.nbytes for array in element.values())
      if self._bytes + size <= self._max_bytes:
        self._cache[index] = element
        self._bytes += size
    return element


class PackedBatches:
  """Batches of packed rows from a random-access sequence of documents, each a dict of equal-
  length int arrays (`inputs`, `targets`, and for a mixture `sources`). A finite sequence ends
  with a short batch whose last row is padded."""

  def __init__(self, documents: grain.MapDataset, seq_len: int, batch_size: int):
    self.documents = documents
    self.seq_len = seq_len
    self.batch_size = batch_size

  def __iter__(self) -> 'PackedIterator':
    return PackedIterator(self)


class PackedIterator:

  def __init__(self, packed: PackedBatches):
    self._documents = packed.documents
    self._seq_len = packed.seq_len
    self._batch_size = packed.batch_size
    self._num_documents = len(packed.documents)
    self._next_document = 0  # the first document not yet emitted whole
    self._offset = 0  # how many of its tokens were
    self._read = []  # documents from `_next_document` on, already read

  def __iter__(self):
    return self

  def get_state(self) -> dict:
    return {'next_document': self._next_document, 'offset': self._offset}

  def set_state(self, state: dict) -> None:
    _check_state(state, {'next_document', 'offset'})
    self._next_document, self._offset = int(state['next_document']), int(state['offset'])
    self._read = []

  def __next__(self) -> dict[str, np.ndarray]:
    wanted = self._batch_size * self._seq_len
    available = -self._offset
    for document in self._read:
      available += len(document['inputs'])
    while available < wanted and self._next_document + len(self._read) < self._num_documents:
      self._read.append(self._documents[self._next_document + len(self._read)])
      available += len(self._read[-1]['inputs'])
    if available <= 0:
      raise StopIteration
    pieces, used, start = [], 0, self._offset
    for document in self._read:
      take = min(len(document['inputs']) - start, wanted - used)
      pieces.append({k: v[start:start + take] for k, v in document.items()})
      used, end = used + take, start + take
      if used == wanted:
        break
      start = 0
    unfinished = end < len(self._read[len(pieces) - 1]['inputs'])
    self._next_document += len(pieces) - unfinished
    self._read = self._read[len(pieces) - unfinished:]
    self._offset = end if unfinished else 0
    return pack(pieces, self._seq_len)


def _check_state(state: dict, keys: set[str]) -> None:
  if set(state) != keys:
    raise UserError('the checkpoint\'s data position was saved by an older jaxlm data pipeline '
                    'and cannot be resumed; to train from scratch, use a new workdir or move '
                    'this workdir\'s checkpoints directory aside')


def pack(pieces: list[dict[str, np.ndarray]], seq_len: int) -> dict[str, np.ndarray]:
  """Rows of the pieces concatenated in order and cut every `seq_len` tokens."""
  lengths = [len(piece['inputs']) for piece in pieces]
  rows = -(-sum(lengths) // seq_len)
  padding = rows * seq_len - sum(lengths)
  flat = lambda key: np.pad(np.concatenate([p[key] for p in pieces]), (0, padding)).astype(
      np.int32).reshape(rows, seq_len)
  piece_BxL = np.pad(np.repeat(np.arange(len(pieces)), lengths), (0, padding),
                     constant_values=-1).reshape(rows, seq_len)
  real_BxL = piece_BxL >= 0
  starts_BxL = np.ones_like(real_BxL)
  starts_BxL[:, 1:] = piece_BxL[:, 1:] != piece_BxL[:, :-1]
  index_L = np.arange(seq_len)
  start_index_BxL = np.maximum.accumulate(np.where(starts_BxL, index_L, 0), axis=1)
  batch = {
      'inputs': flat('inputs'),
      'targets': flat('targets'),
      'segment_ids': (np.cumsum(starts_BxL, axis=1) * real_BxL).astype(np.int32),
      'positions': ((index_L - start_index_BxL) * real_BxL).astype(np.int32),
      'weights': real_BxL.astype(np.float32),
  }
  if 'sources' in pieces[0]:
    batch['source_ids'] = flat('sources')
  return batch


class FirstFitBatches:
  """Batches of whole sequences (dicts of equal-length arrays: `inputs`, `targets`, `weights`)
  packed first-fit, `batch_size` rows of `seq_len` at a time: each sequence goes to the first row
  with room for it, and the first that fits none starts the next batch. Rows carry `segment_ids`
  (1, 2, ... per sequence, 0 on padding) and `positions`; `shuffle` shuffles each batch's rows.

  The batches, and the positions a run saves and resumes, are those of Grain's
  `FirstFitPackIterDataset(num_packing_bins=batch_size)` then `.batch(batch_size)`, which packs
  element by element through its generic tree code; this packs with a few numpy operations per
  sequence. `sequences` is random-access (a `grain.MapDataset`, repeated for several epochs).
  """

  def __init__(self, sequences: grain.MapDataset, seq_len: int, batch_size: int, seed: int,
               shuffle: bool = True, drop_remainder: bool = True):
    self.sequences = sequences
    self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
    self.shuffle, self.drop_remainder = shuffle, drop_remainder

  def __iter__(self) -> 'FirstFitIterator':
    return FirstFitIterator(self)


class FirstFitIterator:
  """Packs (Grain's way) at least two rows at a time, even for batches of one row."""

  def __init__(self, packed: FirstFitBatches):
    self._packed = packed
    self._rows_per_pack = max(2, packed.batch_size)
    self._start = 0  # the first sequence of the current pack
    self._emitted = 0  # rows of the current pack already emitted
    self._rows_before = 0  # rows emitted before it (seeds its shuffle, as Grain's counter)
    self._pack = None  # (rows, order, index of the first sequence after the pack)

  def __iter__(self):
    return self

  def get_state(self) -> dict:
    return {'start': self._start, 'emitted': self._emitted, 'rows_before': self._rows_before}

  def set_state(self, state: dict) -> None:
    _check_state(state, {'start', 'emitted', 'rows_before'})
    self._start, self._emitted = int(state['start']), int(state['emitted'])
    self._rows_before, self._pack = int(state['rows_before']), None

  def __next__(self) -> dict[str, np.ndarray]:
    rows = []
    while len(rows) < self._packed.batch_size:
      row = self._next_row()
      if row is None:
        break
      rows.append(row)
    if not rows or (len(rows) < self._packed.batch_size and self._packed.drop_remainder):
      raise StopIteration
    return {k: np.stack([row[k] for row in rows]) for k in rows[0]}

  def _next_row(self) -> dict[str, np.ndarray] | None:
    if self._pack is None:
      self._pack = self._fill(self._start)
      if self._pack is None:
        return None
    rows, order, end = self._pack
    row = {k: v[order[self._emitted]] for k, v in rows.items()}
    self._emitted += 1
    if self._emitted == len(order):
      self._start, self._rows_before = end, self._rows_before + len(order)
      self._emitted, self._pack = 0, None
    return row

  def _fill(self, start: int):
    """The pack beginning at sequence `start`: (rows, their emission order, the next start)."""
    sequences, seq_len = self._packed.sequences, self._packed.seq_len
    rows_per_pack = self._rows_per_pack
    used = np.zeros(rows_per_pack, np.int64)
    counts = np.zeros(rows_per_pack, np.int32)
    rows = None
    index = start
    while index < len(sequences):
      sequence = sequences[index]
      length = len(sequence['inputs'])
      fits = used + length <= seq_len
      if not fits.any():
        if rows is None:
          raise UserError(f'a sequence of {length} tokens does not fit in rows of {seq_len}')
        break
      if rows is None:
        rows = {k: np.zeros((rows_per_pack, seq_len), np.asarray(v).dtype)
                for k, v in sequence.items()}
        rows['segment_ids'] = np.zeros((rows_per_pack, seq_len), np.int32)
        rows['positions'] = np.zeros((rows_per_pack, seq_len), np.int32)
      row = int(np.argmax(fits))
      cells = slice(used[row], used[row] + length)
      for key, values in sequence.items():
        rows[key][row, cells] = values
      counts[row] += 1
      rows['segment_ids'][row, cells] = counts[row]
      rows['positions'][row, cells] = np.arange(length)
      used[row] += length
      index += 1
    if rows is None:
      return None
    filled = int(np.count_nonzero(counts))  # rows fill in order: an empty one fits anything
    rows = {k: v[:filled] for k, v in rows.items()}
    order = (np.random.default_rng(self._packed.seed + self._rows_before).permuted(range(filled))
             if self._packed.shuffle else np.arange(filled))
    return rows, order, index
