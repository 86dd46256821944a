"""SentencePiece tokenizer: trained from the training text into the workdir, or loaded.

Ids 0-2 are pad, bos and eos. Ids 3.. are reserved control tokens for chat roles, so the chat
template (SFT, reward model, RL) can use them without retraining the tokenizer.
"""

import io
import os

import numpy as np
import sentencepiece as spm

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
CHAT_TOKENS = ('<|system|>', '<|user|>', '<|assistant|>', '<|end_of_turn|>')
MODEL_TYPES = ('bpe', 'unigram', 'char')


class Tokenizer:

  def __init__(self, model_proto: bytes, path: str | None = None):
    self.path = path
    self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.model_proto = model_proto
    self.chat_ids = {piece: self.sp.piece_to_id(piece) for piece in CHAT_TOKENS}

  @classmethod
  def load(cls, path: str) -> 'Tokenizer':
    if not os.path.exists(path):
      raise FileNotFoundError(f'tokenizer model not found: {path}')
    with open(path, 'rb') as f:
      proto = f.read()
    try:
      if not proto:
        raise RuntimeError('the file is empty')
      return cls(proto, path)
    except RuntimeError as e:
      raise ValueError(f'not a SentencePiece model: {path} ({e})') from e

  @classmethod
  def train(cls, texts, path: str, vocab_size: int, model_type: str = 'bpe') -> 'Tokenizer':
    """Trains on an iterable of strings and writes the model to `path`."""
    if model_type not in MODEL_TYPES:
      raise ValueError(f'config.tokenizer.type must be one of {MODEL_TYPES}, got {model_type!r}')
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=proto, vocab_size=vocab_size,
        model_type=model_type, pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=len(
            CHAT_TOKENS) + 3, control_symbols=list(CHAT_TOKENS), byte_fallback=True,
        character_coverage=1.0, normalization_rule_name='identity',
        remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True, max_sentence_length=1 << 16,
        hard_vocab_limit=False, minloglevel=2, num_threads=1)
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
      f.write(proto.getvalue())
    os.replace(tmp, path)
    return cls(proto.getvalue(), path)

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

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
