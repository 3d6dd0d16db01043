"""Batches of windows over a 1-D token array.

Training batches come from a grain pipeline whose iterator state resumes
exactly (`make_train_iterator`); evaluation batches are a plain ordered
generator (`eval_batches`). Both yield int32 [batch, seq_len + 1] windows:
inputs are window[:, :-1], targets window[:, 1:].
"""

from __future__ import annotations

from typing import Iterator

import grain
import numpy as np


def num_windows(n_tokens: int, seq_len: int) -> int:
  """Full windows of seq_len+1 tokens at stride seq_len in n_tokens tokens."""
  return max(0, (n_tokens - 1) // seq_len)


class WindowSource:
  """Random-access windows: item i = int32 tokens[i*T : i*T + T + 1], T=seq_len.

  Module-level and holding only an array and an int, so it pickles into grain
  worker processes.
  """

  def __init__(self, tokens: np.ndarray, seq_len: int):
    self.tokens = tokens
    self.seq_len = seq_len

  def __len__(self) -> int:
    return num_windows(len(self.tokens), self.seq_len)

  def __getitem__(self, index: int) -> np.ndarray:
    start = int(index) * self.seq_len
    return np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int32)


def make_train_iterator(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1,
                        worker_count: int = 0, start_batch: int = 0) -> grain.DatasetIterator:
  """Endless shuffled training batches: int32 [batch_size, seq_len + 1].

  batch_size is per process. Each epoch is a fresh permutation of all windows
  (grain reseeds the shuffle per epoch through repeat); process p takes every
  process_count-th shuffled window from p, so processes never share a window
  within an epoch. Batch k of every process together hold shuffled windows
  k*B .. k*B + B - 1 (B = batch_size * process_count), the global batch k of
  one process, in another row order; exactly so while the window count is a
  multiple of process_count (within the first epoch always), so the loss
  sequence does not depend on how many processes feed the run.
  start_batch skips that many batches (a resume onto another process count,
  whose saved iterator states do not apply: batch k is step k's).
  The iterator's get_state()/set_state() (and grain.checkpoint.CheckpointSave
  / CheckpointRestore in an orbax Composite) resume on exactly the next batch.
  worker_count > 0 reads in spawned processes (needs absl flags parsed).
  """
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f'data: seq_len={seq_len} and batch_size={batch_size} must be >= 1')
  if not 0 <= process_index < process_count:
    raise ValueError(f'data: process_index={process_index} not in [0, {process_count})')
  source = WindowSource(tokens, seq_len)
  per_process = len(range(process_index, len(source), process_count))
  if per_process < batch_size:
    raise ValueError(
        f'data: train split has {len(source)} windows of seq_len+1={seq_len + 1} tokens, '
        f'{per_process} for this process, fewer than batch_size={batch_size}; '
        'lower seq_len or the batch size')
  ds = (grain.MapDataset.source(source)
        .seed(seed)
        .shuffle()
        [process_index::process_count]
        .repeat(None, reseed_each_epoch=True)
        .batch(batch_size, drop_remainder=True))
  if start_batch:
    ds = ds[start_batch:]
  # Windows are cheap slices: a few threads and a short prefetch queue are
  # enough, and keep memory small for large batches (grain's default is 16
  # threads and 500 batches).
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=8))
  if worker_count > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(it_ds)


def num_eval_windows(n_tokens: int, seq_len: int, max_tokens: int = 0) -> int:
  """Windows `eval_batches` yields: all full ones, capped at max_tokens // seq_len
  predicted-token windows when max_tokens > 0."""
  n = num_windows(n_tokens, seq_len)
  if max_tokens > 0:
    if max_tokens < seq_len:
      raise ValueError(f'eval max_tokens={max_tokens} is below seq_len={seq_len}: no window fits')
    n = min(n, max_tokens // seq_len)
  return n


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int,
                 max_tokens: int = 0) -> Iterator[np.ndarray]:
  """Deterministic ordered batches int32 [b, seq_len + 1], b <= batch_size.

  Windows at stride seq_len from the start, so every token but the first is
  predicted exactly once; only the last batch may be smaller; windows are
  always full. Yields num_eval_windows(len(tokens), seq_len, max_tokens) windows.
  """
  n = num_eval_windows(len(tokens), seq_len, max_tokens)
  offsets = np.arange(seq_len + 1)
  for first in range(0, n, batch_size):
    rows = np.arange(first, min(first + batch_size, n)) * seq_len
    yield np.asarray(tokens[rows[:, None] + offsets[None, :]], dtype=np.int32)
