"""Tokenizers behind one interface: jaxlm's SentencePiece model (trained from the training text
into the workdir, or loaded) and a Hugging Face checkpoint's tokenizer with its chat template.

Both have `encode`, `decode`, `vocab_size`, `bos_id` (None where the model has none), `eos_id`,
`pad_id`, `token_bytes` and `save`; `jaxlm.chat` renders conversations with either.

In jaxlm's SentencePiece model ids 0-2 are pad, bos and eos, and ids 3.. are reserved control
tokens for chat roles, so the chat template can use them without retraining the tokenizer.
"""

import io
import json
import os
import shutil

import numpy as np
import sentencepiece as spm

from jaxlm.errors import UserError

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
CHAT_TOKENS = ('<|system|>', '<|user|>', '<|assistant|>', '<|end_of_turn|>')
MODEL_TYPES = ('bpe', 'unigram', 'char')


def check_vocab_size(vocab_size: int) -> None:
  """A vocabulary to train must hold a fallback id for every byte and the special tokens."""
  smallest = 256 + len(CHAT_TOKENS) + 4
  if vocab_size < smallest:
    raise UserError(f'config.tokenizer.vocab_size must be at least {smallest} (256 byte '
                    f'fallback ids and {smallest - 256} special tokens), got {vocab_size}')


class Tokenizer:
  """jaxlm's own SentencePiece tokenizer, with jaxlm's chat template (`chat_template` None)."""
  bos_id, eos_id, pad_id = BOS_ID, EOS_ID, PAD_ID
  chat_template = None

  def __init__(self, model_proto: bytes, path: str | None = None):
    self.path = path
    self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.model_proto = model_proto
    self.chat_ids = {piece: self.sp.piece_to_id(piece) for piece in CHAT_TOKENS}

  @classmethod
  def load(cls, path: str) -> 'Tokenizer':
    if not os.path.exists(path):
      raise UserError(f'tokenizer model not found: {path}')
    with open(path, 'rb') as f:
      proto = f.read()
    try:
      if not proto:
        raise RuntimeError('the file is empty')
      return cls(proto, path)
    except RuntimeError as e:
      raise UserError(f'not a SentencePiece model: {path} ({e})') from e

  @classmethod
  def train(cls, texts, path: str, vocab_size: int, model_type: str = 'bpe') -> 'Tokenizer':
    """Trains on an iterable of strings and writes the model to `path`."""
    if model_type not in MODEL_TYPES:
      raise UserError(f'config.tokenizer.type must be one of {MODEL_TYPES}, got {model_type!r}')
    check_vocab_size(vocab_size)
    proto = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(texts), model_writer=proto, vocab_size=vocab_size,
          model_type=model_type, pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=len(
              CHAT_TOKENS) + 3, control_symbols=list(CHAT_TOKENS), byte_fallback=True,
          character_coverage=1.0, normalization_rule_name='identity',
          remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True, max_sentence_length=1 << 16,
          hard_vocab_limit=False, minloglevel=2, num_threads=1)
    except RuntimeError as e:
      raise UserError(f'the {model_type} tokenizer could not be trained with config.tokenizer.'
                      f'vocab_size={vocab_size}: {str(e).strip()}') from e
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
      f.write(proto.getvalue())
    os.replace(tmp, path)
    return cls(proto.getvalue(), path)

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  def save(self, workdir: str) -> None:
    shutil.copy(self.path, os.path.join(workdir, 'tokenizer.model'))

  def save_hf(self, directory: str) -> None:
    """Beside an exported checkpoint: the SentencePiece model itself (transformers 5 does not
    convert it faithfully: no dummy prefix, identity normalisation, byte fallback)."""
    os.makedirs(directory, exist_ok=True)
    shutil.copy(self.path, os.path.join(directory, 'tokenizer.model'))

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def decode(self, ids) -> str:
    ids = [int(i) for i in ids]
    return self.sp.decode(ids)

  def token_bytes(self) -> np.ndarray:
    """UTF-8 bytes each id stands for: the denominator of bits per byte."""
    sizes = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      if self.sp.is_control(i) or self.sp.is_unknown(i):
        continue
      if self.sp.is_byte(i):
        sizes[i] = 1
      else:
        sizes[i] = len(self.sp.id_to_piece(i).replace('\u2581', ' ').encode('utf-8'))
    return sizes


HF_DIRECTORY = 'tokenizer'  # where a workdir keeps a Hugging Face tokenizer


class HFTokenizer:
  """A Hugging Face tokenizer (`tokenizer.json`, `tokenizer_config.json`) loaded with
  transformers' tokenizer utilities (no torch needed), with the checkpoint's chat template."""

  def __init__(self, directory: str):
    try:
      from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise UserError("Hugging Face tokenizers need transformers: pip install -e '.[hf]'") from e
    try:
      self.hf = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as e:
      raise UserError(f'{directory}: no Hugging Face tokenizer could be loaded ({e})') from e
    self.path = directory
    self.chat_template = self.hf.chat_template
    self.bos_id = self.hf.bos_token_id
    self.eos_id = self.hf.eos_token_id
    self.pad_id = self.hf.pad_token_id if self.hf.pad_token_id is not None else self.eos_id

  @property
  def vocab_size(self) -> int:
    return len(self.hf)

  def encode(self, text: str) -> list[int]:
    return self.hf.encode(text, add_special_tokens=False)

  def decode(self, ids) -> str:
    return self.hf.decode([int(i) for i in ids])

  def save(self, workdir: str) -> None:
    self.hf.save_pretrained(os.path.join(workdir, HF_DIRECTORY))

  def save_hf(self, directory: str) -> None:
    self.hf.save_pretrained(directory)

  def token_bytes(self) -> np.ndarray:
    """UTF-8 bytes each id stands for (0 for special tokens): the denominator of bits per byte.
    Byte-level pieces map back through GPT-2's byte alphabet, SentencePiece-style pieces by
    their text ('\u2581' a space, '<0x..>' one byte)."""
    decoder = json.loads(self.hf.backend_tokenizer.to_str()).get('decoder') or {}
    byte_level = decoder.get('type') == 'ByteLevel'
    special = set(self.hf.all_special_ids)
    sizes = np.zeros(self.vocab_size, np.int32)
    for piece, i in self.hf.get_vocab().items():
      if i in special or i >= self.vocab_size:
        continue
      if byte_level:
        sizes[i] = len(piece)  # one character of the byte alphabet per byte
      elif piece.startswith('<0x') and piece.endswith('>') and len(piece) == 6:
        sizes[i] = 1
      else:
        sizes[i] = len(piece.replace('\u2581', ' ').encode('utf-8'))
    return sizes


def load(path: str):
  """A Hugging Face tokenizer from a directory, jaxlm's SentencePiece model from a file."""
  if os.path.isdir(path):
    return HFTokenizer(path)
  return Tokenizer.load(path)


def workdir_path(workdir: str) -> str:
  """Where a workdir keeps its tokenizer: a Hugging Face directory or a SentencePiece model."""
  hf_path = os.path.join(workdir, HF_DIRECTORY)
  return hf_path if os.path.isdir(hf_path) else os.path.join(workdir, 'tokenizer.model')
