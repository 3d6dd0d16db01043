"""Corpora as 1-D token arrays (+ byte counts for bits-per-byte).

Sources (`load_corpus`):
  'stdlib'  the running Python's standard-library .py files: no download.
  'text'    a file, a glob of text files or a directory (its text files,
            recursively, in sorted order); the last `val_fraction` of the
            characters is validation (as nanoGPT).
  'tokens'  a directory written by scripts/prepare_data.py (train.bin,
            val.bin or .npy, meta.json, tokenizer/).

Batches over a corpus's splits come from data.pipeline.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import pathlib
import sysconfig

import numpy as np

from mla_jax.data import tokenizer as tok_lib

SOURCES = ('stdlib', 'text', 'tokens')
SEPARATOR = '\n\n'  # Between files when several are joined into one split.
STDLIB_VAL_EVERY = 20  # stdlib: sorted file i is validation iff i % 20 == 19.
TOKEN_DTYPES = ('uint16', 'uint32')


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: arrays have no ==.
class Corpus:
  """Token ids of both splits, their tokenizer and their UTF-8 byte counts.

  train, val: 1-D int32, or uint16/uint32 as stored in a token file (cast to
    int32 per batch by the pipelines).
  tokenizer: a `tokenizer.Tokenizer`, or None for a token file without one.
  vocab_size: number of ids the model must embed (all ids are below it).
  train_bytes, val_bytes: UTF-8 bytes of the text each split came from.
  """
  train: np.ndarray
  val: np.ndarray
  tokenizer: tok_lib.Tokenizer | None
  vocab_size: int
  train_bytes: int
  val_bytes: int

  @property
  def val_bytes_per_token(self) -> float:
    """For bits/byte: loss_nats_per_token / ln(2) / val_bytes_per_token."""
    return self.val_bytes / len(self.val)


# ----------------------------------------------------------------------------
# Reading text.


def _decode(raw: bytes, name: str, kind: str) -> str:
  """Bytes -> str. 'bytes' keeps invalid UTF-8 (surrogateescape round-trips
  it to the same bytes); other tokenizers need real text, so fail clearly."""
  if kind == 'bytes':
    return raw.decode('utf-8', errors='surrogateescape')
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise ValueError(
        f"data.path: {name!r} is not valid UTF-8 at byte {e.start}; tokenizer "
        f"{kind!r} needs text (tokenizer 'bytes' takes raw bytes)") from None


def stdlib_files() -> tuple[pathlib.Path, list[str]]:
  """(root, relative paths) of the stdlib .py files, sorted, no site-packages."""
  root = pathlib.Path(sysconfig.get_paths()['stdlib'])
  rels = []
  for f in root.rglob('*.py'):
    rel = f.relative_to(root)
    if not {'site-packages', 'dist-packages'} & set(rel.parts) and f.is_file():
      rels.append(rel.as_posix())
  return root, sorted(rels)


def _read_stdlib(max_bytes: int) -> tuple[str, str]:
  """(train, val) text of the stdlib corpus.

  Split by file, never inside one: the file with sorted index i goes to
  validation iff i % STDLIB_VAL_EVERY == STDLIB_VAL_EVERY - 1 (5%). Files are
  read as UTF-8 with errors='replace' (a few test files are Latin-1). With
  max_bytes > 0, files are taken in order until max_bytes bytes were read,
  the last one cut short; the split rule stays the same.
  """
  root, rels = stdlib_files()
  if not rels:
    raise FileNotFoundError(f"data.source: no .py files under stdlib {str(root)!r}")
  train, val, total = [], [], 0
  for i, rel in enumerate(rels):
    raw = (root / rel).read_bytes()
    if max_bytes > 0:
      raw = raw[:max_bytes - total]
    total += len(raw)
    is_val = i % STDLIB_VAL_EVERY == STDLIB_VAL_EVERY - 1
    (val if is_val else train).append(raw.decode('utf-8', errors='replace'))
    if max_bytes > 0 and total >= max_bytes:
      break
  if not val:
    raise ValueError(f'data.max_bytes: {max_bytes} bytes cover {len(train)} stdlib '
                     f'files, fewer than the {STDLIB_VAL_EVERY} needed for one validation file')
  return SEPARATOR.join(train), SEPARATOR.join(val)


def text_files(path: str) -> list[str]:
  """Files named by `path`: itself, the sorted matches of a glob, or a directory's text files
  (every file below it, recursively, sorted by path; hidden names and binary files skipped)."""
  if not path:
    raise ValueError("data.path: required for source 'text' (a file, directory or glob)")
  if any(c in path for c in '*?['):
    files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    if not files:
      raise FileNotFoundError(f'data.path: no file matches {path!r}')
    return files
  if os.path.isdir(path):
    files = directory_text_files(path)
    if not files:
      raise FileNotFoundError(f'data.path: directory {path!r} holds no text file')
    return files
  if not os.path.isfile(path):
    raise FileNotFoundError(f'data.path: no file {path!r}')
  return [path]


BINARY_PROBE = 8192  # a file with a NUL byte in its first this many bytes is not text


def directory_text_files(root: str) -> list[str]:
  """Every regular file under root, recursively, in sorted order of its path relative to root
  (stable across machines and runs), leaving out hidden files and directories ('.git', ...)
  and binary files (a NUL byte in the first BINARY_PROBE bytes)."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if not d.startswith('.')]
    for name in filenames:
      full = os.path.join(dirpath, name)
      if not name.startswith('.') and os.path.isfile(full):
        found.append((pathlib.Path(os.path.relpath(full, root)).as_posix(), full))
  files = []
  for _, full in sorted(found):
    with open(full, 'rb') as f:
      if b'\0' not in f.read(BINARY_PROBE):
        files.append(full)
  return files


def _read_text(path: str, kind: str, val_fraction: float, max_bytes: int) -> tuple[str, str]:
  """(train, val) text: the last val_fraction of the characters is val.

  Several files are joined with SEPARATOR in sorted order. max_bytes > 0
  keeps only the first max_bytes bytes (whole characters) before splitting.
  """
  files = text_files(path)
  texts, total = [], 0
  for name in files:
    raw = pathlib.Path(name).read_bytes()
    if max_bytes > 0 and total + len(raw) > max_bytes:
      raw = raw[:max_bytes - total]
      if kind != 'bytes':  # Do not let the cut split a multi-byte character.
        try:
          raw.decode('utf-8')
        except UnicodeDecodeError as e:
          if e.reason == 'unexpected end of data':
            raw = raw[:e.start]
    total += len(raw)
    texts.append(_decode(raw, name, kind))
    if max_bytes > 0 and total >= max_bytes:
      break
  text = SEPARATOR.join(texts)
  if not text:
    raise ValueError(f'data.path: {path!r} is empty')
  n_train = int(len(text) * (1.0 - val_fraction))
  if n_train == len(text) or n_train == 0:
    raise ValueError(f'data.val_fraction: {val_fraction} of {len(text)} characters '
                     'leaves an empty train or validation split')
  return text[:n_train], text[n_train:]


# ----------------------------------------------------------------------------
# Token files (see scripts/prepare_data.py).


def _token_path(path: str, name: str) -> str:
  """`path` is a directory or a file-name prefix ('out/shakespeare_')."""
  return os.path.join(path, name) if os.path.isdir(path) else path + name


def read_meta(path: str) -> dict:
  """meta.json of a token directory, with the required keys checked."""
  meta_path = _token_path(path, 'meta.json')
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(f'data.path: no file {meta_path!r}')
  with open(meta_path, encoding='utf-8') as f:
    meta = json.load(f)
  for key in ('vocab_size', 'dtype', 'train_bytes', 'val_bytes'):
    if key not in meta:
      raise ValueError(f'data.path: {meta_path!r} has no {key!r}')
  if meta['dtype'] not in TOKEN_DTYPES:
    raise ValueError(f"data.path: {meta_path!r} has dtype {meta['dtype']!r}; expected one of "
                     f"{TOKEN_DTYPES}")
  return meta


def _read_token_split(path: str, split: str, meta: dict) -> np.ndarray:
  """Memory-maps split.bin (dtype from meta) or split.npy; checks the ids."""
  npy, bin_ = _token_path(path, split + '.npy'), _token_path(path, split + '.bin')
  if os.path.isfile(npy):
    name, tokens = npy, np.load(npy, mmap_mode='r')
  elif os.path.isfile(bin_):
    name, dtype = bin_, np.dtype(meta['dtype'])
    size = os.path.getsize(bin_)
    if size == 0 or size % dtype.itemsize:
      raise ValueError(f'data.path: {bin_!r} has {size} bytes, not a positive '
                       f'multiple of {dtype.itemsize} ({dtype})')
    tokens = np.memmap(bin_, dtype=dtype, mode='r')  # No copy of big files.
  else:
    raise FileNotFoundError(f'data.path: no file {bin_!r} or {npy!r}')
  if tokens.ndim != 1 or tokens.dtype.kind not in 'iu' or len(tokens) == 0:
    raise ValueError(f'data.path: {name!r} must hold a non-empty 1-D integer array')
  lo, hi = int(tokens.min()), int(tokens.max())
  if hi >= meta['vocab_size'] or lo < 0:
    bad = hi if hi >= meta['vocab_size'] else lo
    raise ValueError(f"data.path: {name!r} has id {bad} outside vocab_size={meta['vocab_size']}")
  return tokens


def tokens_tokenizer_dir(path: str, meta: dict | None = None) -> str | None:
  """The tokenizer directory a token directory's meta.json names (relative to it), or None."""
  meta = read_meta(path) if meta is None else meta
  tok_dir = (meta.get('tokenizer') or {}).get('dir')
  return os.path.join(os.path.dirname(_token_path(path, 'meta.json')), tok_dir) if tok_dir else None


def _load_tokens(path: str) -> tuple[Corpus, str | None]:
  """Corpus (tokenizer=None) and the tokenizer directory named in meta.json."""
  if not path:
    raise ValueError("data.path: required for source 'tokens' (a directory)")
  meta = read_meta(path)
  train = _read_token_split(path, 'train', meta)
  val = _read_token_split(path, 'val', meta)
  tok_dir = tokens_tokenizer_dir(path, meta)
  corpus = Corpus(train, val, None, int(meta['vocab_size']),
                  int(meta['train_bytes']), int(meta['val_bytes']))
  return corpus, tok_dir


# ----------------------------------------------------------------------------
# Corpus.


def load_corpus(source: str = 'stdlib', path: str = '', tokenizer: str = 'bytes',
                vocab_size: int = 0, tokenizer_dir: str | None = None,
                val_fraction: float = 0.1, max_bytes: int = 0) -> Corpus:
  """Loads a corpus and tokenizes it (see the module docstring for sources). Writes nothing.

  The tokenizer is built on the train split only. When `tokenizer_dir` holds a
  saved tokenizer (a workdir's, on resume or evaluation), that one is used
  instead of building a new one, so the vocabulary stays the run's.
  For 'tokens', the tokenizer comes from the directory (None if it has none);
  `tokenizer`/`vocab_size` are then ignored.
  """
  if source not in SOURCES:
    raise ValueError(f'data.source: unknown source {source!r}; expected one of {SOURCES}')
  if source == 'tokens':
    corpus, tok_dir = _load_tokens(path)
    tok = None
    if tok_dir and os.path.isfile(os.path.join(tok_dir, tok_lib.META_FILE)):
      tok = tok_lib.load_tokenizer(tok_dir)
    return dataclasses.replace(corpus, tokenizer=tok)

  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f'data.val_fraction: must be in (0, 1), got {val_fraction}')
  tok = None
  tok_dir = tokenizer_dir
  if tok_dir and os.path.isfile(os.path.join(tok_dir, tok_lib.META_FILE)):
    tok = tok_lib.load_tokenizer(tok_dir)  # Before reading: cheap to check.
    if tok.name != tokenizer:
      raise ValueError(f"data.tokenizer: {tokenizer!r} but {tok_dir!r} holds a "
                       f"{tok.name!r} tokenizer; use a new workdir")
  else:
    # Only a tokenizer about to be built needs valid build arguments (a saved BPE, e.g. one
    # imported from Hugging Face, is used whatever data.vocab_size says).
    tok_lib.check_tokenizer_args(tokenizer, vocab_size)

  if source == 'stdlib':
    train_text, val_text = _read_stdlib(max_bytes)
  else:
    train_text, val_text = _read_text(path, tokenizer, val_fraction, max_bytes)

  if tok is None:
    tok = tok_lib.build_tokenizer(tokenizer, train_text, vocab_size)
  return Corpus(
      train=tok.encode(train_text),
      val=tok.encode(val_text),  # May raise for the char tokenizer: see there.
      tokenizer=tok,
      vocab_size=tok.vocab_size,
      # surrogateescape: the exact raw byte count, even for invalid UTF-8.
      train_bytes=len(train_text.encode('utf-8', errors='surrogateescape')),
      val_bytes=len(val_text.encode('utf-8', errors='surrogateescape')))


def check_lengths(corpus: Corpus, seq_len: int) -> None:
  """Raises ValueError unless both splits hold at least one full window."""
  for split, tokens in (('validation', corpus.val), ('train', corpus.train)):
    if len(tokens) < seq_len + 1:
      raise ValueError(f'data: {split} split has {len(tokens)} tokens, fewer than '
                       f'seq_len+1={seq_len + 1}; use a shorter seq_len or more data')
