"""XLA:CPU scheduling ties: orderings XLA cannot see from the data, made visible as dependencies.

XLA schedules by data dependencies only (optimization_barrier does not survive on XLA:CPU). The
attention code ties only where scripts/bench_decode.py measured it to help:
(1) the cache write after attention's reads of the old cache (`write_after`): otherwise XLA
    cannot prove the reads come first and copies the donated buffer (twice, on XLA:CPU) instead
    of updating it in place (MQA batch 1 at 16k ~7 -> 3.5 ms/step, batch 8 2-5x faster);
(2) the full copies made from the cache, GQA's [B, G, S, K] relayout and naive MLA's
    decompression, each to what it waits for (`schedule_after`): otherwise XLA:CPU runs every
    layer's copies at the start of the step, all live at once (GQA batch 1 2.5x slower).
Only on CPU (jax.default_backend()): elsewhere x is returned as is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mla_jax.core import cache as cache_lib


def schedule_after(x: jax.Array, dep: jax.Array) -> jax.Array:
  """x unchanged, but computed from dep [B, ...] too, so XLA cannot run x's users before dep.
  Exact: selects x whatever dep holds (NaN included)."""
  if jax.default_backend() != "cpu":  # GPU/TPU schedulers order these themselves; a tie would
    return x  # only add a select per element (not yet measured on a GPU)
  ready = ~(dep.reshape(dep.shape[0], -1)[:, 0] > jnp.inf)  # always True (NaN too); XLA can't tell
  return jnp.where(ready.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))


def write_after(buffer: jax.Array, new: jax.Array, lengths: jax.Array, out: jax.Array):
  """buffer [B, S, ...] with new [B, T, ...] written at slots lengths[b] + t, once the layer's
  output out [B, T, D] exists. out needs every read of the old buffer, so the write comes after
  them and XLA updates a donated buffer in place instead of copying it."""
  return cache_lib.write(buffer, schedule_after(new, out), lengths)
