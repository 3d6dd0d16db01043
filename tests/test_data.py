"""Tests for mla_jax.tokenizer, mla_jax.data and scripts/prepare_data.py."""

import importlib.util
import json
import os
import pathlib

import grain
import numpy as np
import pytest

from mla_jax.data import corpus as data
from mla_jax.data import pipeline
from mla_jax.data import tokenizer as tok_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
WORDS = ('the', 'king', 'queen', 'of', 'and', 'to', 'café', 'naïve', '日本', 'lord',
         'what', 'shall', 'we', 'do', '?', '!', 'thou', 'art')


def make_text(n_words: int, seed: int = 0) -> str:
  """Deterministic text with repeats (for BPE), punctuation and non-ASCII."""
  rng = np.random.default_rng(seed)
  words = rng.choice(WORDS, size=n_words)
  breaks = rng.random(n_words) < 0.1
  return ''.join(w + ('\n' if b else ' ') for w, b in zip(words, breaks))


@pytest.fixture(scope='module')
def text_file(tmp_path_factory):
  path = tmp_path_factory.mktemp('text') / 'input.txt'
  path.write_text(make_text(20_000), encoding='utf-8')
  return str(path)


@pytest.fixture(scope='module')
def tokens():
  """A corpus whose token i is i % 65536: windows are easy to recognise."""
  return (np.arange(10_000) % 65536).astype(np.int32)


def load_prepare_data():
  spec = importlib.util.spec_from_file_location('prepare_data',
                                                REPO / 'scripts' / 'prepare_data.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# ---------------------------------------------------------------- tokenizers


@pytest.mark.parametrize('kind,vocab', [('bytes', 0), ('char', 0), ('bpe', 300)])
def test_round_trip_and_save_load(kind, vocab, tmp_path):
  text = make_text(3000)
  tok = tok_lib.build_tokenizer(kind, text, vocab)
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.ndim == 1
  assert 0 <= ids.min() and ids.max() < tok.vocab_size
  assert tok.decode(ids) == text
  tok.save(str(tmp_path))
  again = tok_lib.load_tokenizer(str(tmp_path))
  assert (again.name, again.vocab_size) == (kind, tok.vocab_size)
  np.testing.assert_array_equal(again.encode(text), ids)


def test_bytes_and_char_vocab():
  assert tok_lib.build_tokenizer('bytes', 'ignored').vocab_size == 256
  np.testing.assert_array_equal(tok_lib.build_tokenizer('bytes', '').encode('é'), [0xC3, 0xA9])
  tok = tok_lib.build_tokenizer('char', 'hello world')
  assert tok.chars == [' ', 'd', 'e', 'h', 'l', 'o', 'r', 'w']
  np.testing.assert_array_equal(tok.encode('lower'), [4, 5, 7, 2, 6])


def test_bpe_vocab_size_and_any_text():
  tok = tok_lib.build_tokenizer('bpe', make_text(5000), 320)
  assert tok.vocab_size == 320
  assert len(tok.encode('the king')) < len('the king')  # Merges were learnt.
  unseen = 'Ωμέγα ✓ \x00\t'  # Never in training: still encodes via bytes.
  assert tok.decode(tok.encode(unseen)) == unseen
  with pytest.raises(ValueError, match='vocab_size >= 257'):
    tok_lib.build_tokenizer('bpe', 'text', 256)


def test_bpe_chunked_encode_is_exact(monkeypatch):
  text = make_text(4000).replace('\n', '  \n\n', 50)  # Multi-space runs too.
  tok = tok_lib.build_tokenizer('bpe', text, 300)
  whole = np.asarray(tok.hf.encode(text).ids)
  monkeypatch.setattr(tok_lib.BpeTokenizer, 'chunk_chars', 500)
  assert len(tok._chunks(text)) > 10
  np.testing.assert_array_equal(tok.encode(text), whole)


def test_tokenizer_errors(tmp_path):
  tok = tok_lib.build_tokenizer('char', 'abc')
  with pytest.raises(ValueError, match=r"'z' is not in the vocabulary.*training split"):
    tok.encode('abz')
  with pytest.raises(FileNotFoundError, match='tokenizer.json'):
    tok_lib.load_tokenizer(str(tmp_path))
  with pytest.raises(ValueError, match='data.tokenizer'):
    tok_lib.build_tokenizer('words', 'abc')


# ------------------------------------------------------------------- sources


def test_stdlib_deterministic_and_split_by_file():
  a = data.load_corpus('stdlib', max_bytes=2_000_000)
  b = data.load_corpus('stdlib', max_bytes=2_000_000)
  np.testing.assert_array_equal(a.train, b.train)
  np.testing.assert_array_equal(a.val, b.val)
  # bytes tokenizer: one token per byte.
  assert a.train_bytes == len(a.train) and a.val_bytes == len(a.val)
  assert 1_900_000 < a.train_bytes + a.val_bytes <= 2_000_000 + 4 * 200
  assert 0.02 < len(a.val) / (len(a.train) + len(a.val)) < 0.10
  # Val files are whole in val and absent from train (by file, not offset).
  train_text, val_text = a.tokenizer.decode(a.train), a.tokenizer.decode(a.val)
  root, rels = data.stdlib_files()
  val_rels = rels[data.STDLIB_VAL_EVERY - 1::data.STDLIB_VAL_EVERY]
  contents = [(root / r).read_text(encoding='utf-8', errors='replace') for r in val_rels[:4]]
  contents = [c for c in contents if len(c) > 500]
  assert len(contents) >= 2
  for content in contents:
    assert content in val_text and content not in train_text
  train_rel = rels[0 if len((root / rels[0]).read_bytes()) > 500 else 1]
  assert (root / train_rel).read_text(encoding='utf-8', errors='replace') in train_text


def test_text_split_last_tenth(text_file):
  text = pathlib.Path(text_file).read_text(encoding='utf-8')
  corpus = data.load_corpus('text', text_file, tokenizer='char')
  n = int(len(text) * 0.9)
  assert corpus.tokenizer.decode(corpus.train) == text[:n]
  assert corpus.tokenizer.decode(corpus.val) == text[n:]
  assert len(corpus.val) == len(text) - n
  assert corpus.val_bytes == len(text[n:].encode('utf-8'))
  assert corpus.val_bytes_per_token > 1.0  # Non-ASCII chars are 2-3 bytes.


def test_saved_tokenizer_is_reused(text_file, tmp_path):
  tok_dir = tmp_path / 'tokenizer'
  first = data.load_corpus('text', text_file, 'bpe', 300, tokenizer_dir=str(tok_dir))
  assert not tok_dir.exists()  # loading writes nothing
  first.tokenizer.save(str(tok_dir))
  # A different vocab_size is ignored: the saved tokenizer wins.
  second = data.load_corpus('text', text_file, 'bpe', 400, tokenizer_dir=str(tok_dir))
  assert second.vocab_size == first.vocab_size == 300
  np.testing.assert_array_equal(first.val, second.val)
  with pytest.raises(ValueError, match="holds a 'bpe' tokenizer"):
    data.load_corpus('text', text_file, 'char', tokenizer_dir=str(tok_dir))


def test_tokens_source_round_trip(text_file, tmp_path, capsys):
  out = tmp_path / 'tok'
  meta = load_prepare_data().main(['--source=text', f'--path={text_file}', '--tokenizer=bpe',
                                   '--vocab_size=300', f'--out={out}'])
  assert 'bytes/token' in capsys.readouterr().out
  assert meta['dtype'] == 'uint16' and os.path.getsize(out / 'val.bin') == 2 * meta['val_tokens']
  direct = data.load_corpus('text', text_file, 'bpe', 300)
  loaded = data.load_corpus('tokens', str(out))
  assert loaded.train.dtype == np.uint16
  np.testing.assert_array_equal(loaded.train, direct.train)
  np.testing.assert_array_equal(loaded.val, direct.val)
  assert (loaded.train_bytes, loaded.val_bytes) == (direct.train_bytes, direct.val_bytes)
  assert loaded.vocab_size == 300 and loaded.tokenizer.name == 'bpe'
  assert loaded.tokenizer.decode(loaded.val) == direct.tokenizer.decode(direct.val)


def test_tokens_source_rejects_big_ids(tmp_path):
  np.array([1, 2, 3], np.uint16).tofile(tmp_path / 'train.bin')
  np.array([1, 70, 3], np.uint16).tofile(tmp_path / 'val.bin')
  (tmp_path / 'meta.json').write_text(json.dumps(
      {'vocab_size': 50, 'dtype': 'uint16', 'train_bytes': 3, 'val_bytes': 3}))
  with pytest.raises(ValueError, match=r"val\.bin' has id 70 outside vocab_size=50"):
    data.load_corpus('tokens', str(tmp_path))
  np.save(tmp_path / 'val.npy', np.array([1, 2, 3], np.uint32))  # .npy wins.
  corpus = data.load_corpus('tokens', str(tmp_path))
  assert corpus.tokenizer is None and corpus.val.dtype == np.uint32


# ------------------------------------------------------------------ pipelines


def test_train_batches_are_shifted_windows(tokens):
  it = pipeline.make_train_iterator(tokens, seq_len=16, batch_size=8, seed=0)
  seen = set()
  for _ in range(5):
    batch = next(it)
    assert batch.shape == (8, 17) and batch.dtype == np.int32
    starts = batch[:, 0]
    assert np.all(starts % 16 == 0)  # Stride seq_len.
    np.testing.assert_array_equal(batch, tokens[starts[:, None] + np.arange(17)])
    seen.update(starts.tolist())
  assert len(seen) == 40  # No repeats within an epoch (624 windows).


def test_epochs_are_reshuffled():
  tokens = np.arange(8 * 4 + 1, dtype=np.int32)  # 8 windows of seq_len 4.
  it = pipeline.make_train_iterator(tokens, seq_len=4, batch_size=8, seed=1)
  epoch1, epoch2 = next(it)[:, 0], next(it)[:, 0]
  assert sorted(epoch1) == sorted(epoch2) == list(range(0, 32, 4))
  assert not np.array_equal(epoch1, epoch2)


def test_resume_with_get_set_state(tokens):
  it = pipeline.make_train_iterator(tokens, 16, 4, seed=3)
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  it2 = pipeline.make_train_iterator(tokens, 16, 4, seed=3)
  it2.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(it2), want)


def test_resume_with_orbax_grain_checkpoint(tokens, tmp_path):
  import orbax.checkpoint as ocp  # Slow import: only here.
  it = pipeline.make_train_iterator(tokens, 16, 4, seed=5)
  for _ in range(3):
    next(it)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = [next(it) for _ in range(2)]
  it2 = pipeline.make_train_iterator(tokens, 16, 4, seed=5)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
    mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
  for want in expected:
    np.testing.assert_array_equal(next(it2), want)


def test_processes_see_disjoint_windows(tokens):
  its = [pipeline.make_train_iterator(tokens, 16, 8, seed=0, process_index=p, process_count=2)
         for p in range(2)]
  starts = [np.concatenate([next(it)[:, 0] for _ in range(30)]) for it in its]
  assert len(set(starts[0])) == len(set(starts[1])) == 240
  assert not set(starts[0]) & set(starts[1])


def test_train_iterator_too_few_windows():
  with pytest.raises(ValueError, match='fewer than batch_size=8'):
    pipeline.make_train_iterator(np.arange(100, dtype=np.int32), 16, 8, seed=0)


def test_eval_batches_cover_split(tokens):
  n = pipeline.num_eval_windows(len(tokens), 64)
  assert n == (10_000 - 1) // 64 == 156
  batches = list(pipeline.eval_batches(tokens, 64, 50))
  assert [len(b) for b in batches] == [50, 50, 50, 6]
  windows = np.concatenate(batches)
  assert windows.dtype == np.int32 and windows.shape == (156, 65)
  np.testing.assert_array_equal(windows[:, 0], np.arange(156) * 64)
  np.testing.assert_array_equal(windows, tokens[windows[:, :1] + np.arange(65)])
  capped = np.concatenate(list(pipeline.eval_batches(tokens, 64, 50, max_tokens=1000)))
  assert capped.shape == (15, 65) and pipeline.num_eval_windows(10_000, 64, 1000) == 15
  np.testing.assert_array_equal(capped, windows[:15])


# -------------------------------------------------------------------- errors


def test_source_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no file matches '.*nothing\*\.txt'"):
    data.load_corpus('text', str(tmp_path / 'nothing*.txt'))
  with pytest.raises(FileNotFoundError, match='data.path: no file'):
    data.load_corpus('text', str(tmp_path / 'missing.txt'))
  (tmp_path / 'empty.txt').write_bytes(b'')
  with pytest.raises(ValueError, match='is empty'):
    data.load_corpus('text', str(tmp_path / 'empty.txt'))
  with pytest.raises(ValueError, match='data.source'):
    data.load_corpus('web', 'x')
  with pytest.raises(FileNotFoundError, match='meta.json'):
    data.load_corpus('tokens', str(tmp_path))


def test_check_lengths(text_file):
  corpus = data.load_corpus('text', text_file, 'bytes')
  data.check_lengths(corpus, 256)
  too_long = len(corpus.val)
  with pytest.raises(ValueError, match=f'validation split has {too_long} tokens, '
                     f'fewer than seq_len\\+1={too_long + 1}'):
    data.check_lengths(corpus, too_long)


def test_char_tokenizer_unseen_val_char(tmp_path):
  path = tmp_path / 'a.txt'
  path.write_text('ab' * 50 + 'Z', encoding='utf-8')  # 'Z' only in val.
  with pytest.raises(ValueError, match="'Z' is not in the vocabulary"):
    data.load_corpus('text', str(path), 'char')


def test_invalid_utf8(tmp_path):
  raw = b'hello world ' * 20 + b'\xff\xfe bad ' + b'tail ' * 10
  path = tmp_path / 'bad.txt'
  path.write_bytes(raw)
  with pytest.raises(ValueError, match=r"bad\.txt' is not valid UTF-8 at byte 240"):
    data.load_corpus('text', str(path), 'char')
  corpus = data.load_corpus('text', str(path), 'bytes')
  joined = np.concatenate([corpus.train, corpus.val]).astype(np.uint8).tobytes()
  assert joined == raw and corpus.train_bytes + corpus.val_bytes == len(raw)
