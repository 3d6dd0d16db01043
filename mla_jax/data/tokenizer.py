"""Tokenizers: raw UTF-8 bytes, characters, and byte-level BPE.

All three share one small interface (`Tokenizer`): `name`, `vocab_size`,
`encode(text) -> int32[n]`, `decode(ids) -> str` and `save(directory)`.
`build_tokenizer` makes one (training it on the train split where it has
something to learn) and `load_tokenizer` rebuilds it from what `save` wrote:

  directory/tokenizer.json   {"kind": ..., plus what that kind needs}
  directory/bpe.json         the HF `tokenizers` file (bpe only)
"""

from __future__ import annotations

import json
import os
import re
from typing import Sequence

import numpy as np

KINDS = ('bytes', 'char', 'bpe')
META_FILE = 'tokenizer.json'
BPE_FILE = 'bpe.json'
MIN_BPE_VOCAB = 257  # 256 byte symbols + at least one merge.


class Tokenizer:
  """Base class: text <-> 1-D int32 token ids in [0, vocab_size)."""

  name: str = ''
  vocab_size: int = 0

  def encode(self, text: str) -> np.ndarray:
    """Returns int32[n] ids for `text`."""
    raise NotImplementedError

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Returns the text for 1-D ids (any int dtype)."""
    raise NotImplementedError

  def _meta(self) -> dict:
    """What goes in tokenizer.json besides the kind."""
    return {}

  def save(self, directory: str) -> None:
    """Writes directory/tokenizer.json (and any extra files) to rebuild this."""
    os.makedirs(directory, exist_ok=True)
    meta = {'kind': self.name, 'vocab_size': self.vocab_size, **self._meta()}
    with open(os.path.join(directory, META_FILE), 'w', encoding='utf-8') as f:
      json.dump(meta, f, ensure_ascii=False, indent=1)

  def __repr__(self) -> str:
    return f'{type(self).__name__}(vocab_size={self.vocab_size})'


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes as ids: vocab 256, nothing to train, any text encodes."""

  name = 'bytes'
  vocab_size = 256

  def encode(self, text: str) -> np.ndarray:
    # surrogateescape: text decoded from invalid UTF-8 with surrogateescape
    # (see data.py) encodes back to exactly the original raw bytes.
    raw = text.encode('utf-8', errors='surrogateescape')
    return np.frombuffer(raw, dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    raw = np.asarray(ids).astype(np.uint8).tobytes()
    return raw.decode('utf-8', errors='replace')


class CharTokenizer(Tokenizer):
  """One id per character; vocab = sorted characters of the training text.

  As nanoGPT's shakespeare_char: a character the training split never had
  cannot be encoded, and says so.
  """

  name = 'char'

  def __init__(self, chars: Sequence[str]):
    chars = sorted(set(chars))
    if not chars:
      raise ValueError('char tokenizer: training text is empty, no vocabulary')
    self.chars = chars
    self.vocab_size = len(chars)
    # Sorted code points let encode look ids up with one vectorised
    # searchsorted instead of a Python loop over every character.
    self._codes = np.array([ord(c) for c in chars], dtype=np.uint32)

  def encode(self, text: str) -> np.ndarray:
    codes = np.frombuffer(text.encode('utf-32-le', errors='surrogatepass'),
                          dtype=np.uint32)
    ids = np.searchsorted(self._codes, codes)
    ok = ids < self.vocab_size
    ok[ok] = self._codes[ids[ok]] == codes[ok]
    if not ok.all():
      bad = chr(int(codes[np.argmin(ok)]))
      raise ValueError(
          f'char tokenizer: character {bad!r} is not in the vocabulary '
          f'({self.vocab_size} chars, built from the training split only)')
    return ids.astype(np.int32)

  def decode(self, ids) -> str:
    return ''.join(self.chars[i] for i in np.asarray(ids).tolist())

  def _meta(self) -> dict:
    return {'chars': self.chars}


# Splitting after a newline with non-space characters on both sides is exact
# for the GPT-2 pre-tokenizer regex: that '\n' is always its own pre-token
# (a longer whitespace run would be split differently at a string end), so
# chunked encoding equals whole-text encoding while bounding memory and
# letting HF encode the chunks in parallel.
_CHUNK_BOUNDARY = re.compile(r'(?<=\S)\n(?=\S)')


class BpeTokenizer(Tokenizer):
  """Byte-level BPE (HF `tokenizers`), GPT-2 style pre-tokenization."""

  name = 'bpe'
  chunk_chars = 1 << 20  # Target chunk size for encode / train (characters).

  def __init__(self, hf_tokenizer):
    self.hf = hf_tokenizer
    self.vocab_size = hf_tokenizer.get_vocab_size()

  @classmethod
  def train(cls, text: str, vocab_size: int) -> 'BpeTokenizer':
    """Trains a byte-level BPE with `vocab_size` symbols on `text`."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    hf = HFTokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(text)) == text exactly.
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        # All 256 byte symbols up front: any text encodes, even unseen bytes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False)
    hf.train_from_iterator(cls._chunks(text), trainer=trainer)
    return cls(hf)

  @classmethod
  def _chunks(cls, text: str) -> list[str]:
    """Splits text at exact pre-token boundaries into ~chunk_chars pieces."""
    chunks, start = [], 0
    while len(text) - start > cls.chunk_chars:
      m = _CHUNK_BOUNDARY.search(text, start + cls.chunk_chars)
      if m is None:
        break
      chunks.append(text[start:m.end()])
      start = m.end()
    chunks.append(text[start:])
    return chunks

  def encode(self, text: str) -> np.ndarray:
    parts = [np.asarray(e.ids, dtype=np.int32)
             for e in self.hf.encode_batch(self._chunks(text))]
    return np.concatenate(parts) if parts else np.zeros([0], np.int32)

  def decode(self, ids) -> str:
    return self.hf.decode(np.asarray(ids).tolist(), skip_special_tokens=False)

  def save(self, directory: str) -> None:
    super().save(directory)
    self.hf.save(os.path.join(directory, BPE_FILE))

  def _meta(self) -> dict:
    return {'file': BPE_FILE}


def check_tokenizer_args(kind: str, vocab_size: int = 0) -> None:
  """Validates (kind, vocab_size) cheaply, before any text is read."""
  if kind not in KINDS:
    raise ValueError(f'data.tokenizer: unknown kind {kind!r}; expected one of {KINDS}')
  if kind == 'bpe' and vocab_size < MIN_BPE_VOCAB:
    raise ValueError(f"data.vocab_size: tokenizer 'bpe' needs vocab_size >= "
                     f'{MIN_BPE_VOCAB} (256 bytes + merges), got {vocab_size}')


def build_tokenizer(kind: str, train_text: str, vocab_size: int = 0) -> Tokenizer:
  """Builds a tokenizer of `kind` ('bytes'|'char'|'bpe') from training text.

  'bytes' ignores train_text and vocab_size; 'char' ignores vocab_size;
  'bpe' needs vocab_size >= 257 (the result may be smaller if the text has
  too few distinct pairs to merge).
  """
  check_tokenizer_args(kind, vocab_size)
  if kind == 'bytes':
    return ByteTokenizer()
  if kind == 'char':
    return CharTokenizer(train_text)
  return BpeTokenizer.train(train_text, vocab_size)


def load_tokenizer(directory: str) -> Tokenizer:
  """Rebuilds the tokenizer that `Tokenizer.save(directory)` wrote."""
  path = os.path.join(directory, META_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'tokenizer: no file {path!r}')
  with open(path, encoding='utf-8') as f:
    meta = json.load(f)
  kind = meta.get('kind')
  if kind == 'bytes':
    return ByteTokenizer()
  if kind == 'char':
    return CharTokenizer(meta['chars'])
  if kind == 'bpe':
    from tokenizers import Tokenizer as HFTokenizer
    bpe_path = os.path.join(directory, meta.get('file', BPE_FILE))
    if not os.path.isfile(bpe_path):
      raise FileNotFoundError(f'tokenizer: no file {bpe_path!r}')
    return BpeTokenizer(HFTokenizer.from_file(bpe_path))
  raise ValueError(f'tokenizer: {path!r} has unknown kind {kind!r}; expected one of {KINDS}')
