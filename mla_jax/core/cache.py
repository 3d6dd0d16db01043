"""Decode caches as explicit pytrees: passed into the model and returned updated, not hidden state.

Slot s of a cache holds the token at position s of its sequence; `lengths[b]` counts the tokens of
sequence b written so far, so the next tokens go to slots lengths[b], lengths[b] + 1, ... Slots past
a sequence's length may hold stale values (right-padded prompts); attention masks them out.

MLA's cache holds only the normalised latent c and the rotated shared rope key: no per-head tensor.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from mla_jax.core.config import ModelConfig

# Logical axis names of each cache array, mapped to mesh axes by sharding.py.
KV_AXES = ("cache_batch", "cache_length", "cache_kv_heads", "cache_head_dim")
LATENT_AXES = ("cache_batch", "cache_length", "cache_latent")
ROPE_AXES = ("cache_batch", "cache_length", "cache_rope")


@flax.struct.dataclass
class KVCache:
  """One layer of MHA/GQA/MQA: k, v [B, S, G, K] (keys already rotated)."""
  k: jax.Array
  v: jax.Array

  @property
  def axes(self):
    return KVCache(k=KV_AXES, v=KV_AXES)


@flax.struct.dataclass
class LatentCache:
  """One layer of MLA: c [B, S, C] (after its RMSNorm), k_rope [B, S, R] (after RoPE); with
  mla_rope_kv_heads = G_R > 1, k_rope [B, S, G_R * R], one rotated key per KV group."""
  c: jax.Array
  k_rope: jax.Array

  @property
  def axes(self):
    return LatentCache(c=LATENT_AXES, k_rope=ROPE_AXES)


@flax.struct.dataclass
class Cache:
  """All layers plus the fill level: layers tuple of L layer caches, lengths [B] int32."""
  layers: tuple
  lengths: jax.Array

  @property
  def max_len(self) -> int:
    """S: the longest slot axis (YOCO's window rings may be shorter; DMC's per-head counts
    [B, G] have no slot axis)."""
    return max(x.shape[1] for x in jax.tree.leaves(self.layers) if x.ndim >= 3)

  def axes(self) -> "Cache":
    """The same tree with a tuple of logical axis names in place of each array."""
    return Cache(layers=tuple(layer.axes for layer in self.layers), lengths=("cache_batch",))


def init_cache(cfg: ModelConfig, batch: int, max_len: int | None = None) -> Cache:
  """Zeros for `batch` sequences of up to `max_len` (default cfg.max_seq_len) tokens."""
  s = max_len or cfg.max_seq_len
  dt = cfg.kv_cache_dtype
  if cfg.attention == "yoco":  # window rings + one global cache (core/yoco.py)
    from mla_jax.core import yoco  # yoco imports this module
    return Cache(layers=yoco.init_layers(cfg, batch, s), lengths=jnp.zeros((batch,), jnp.int32))
  if cfg.dmc:  # padded per-head buffers with fill counts (core/dmc.py)
    from mla_jax.core import dmc
    return Cache(layers=dmc.init_layers(cfg, batch, s), lengths=jnp.zeros((batch,), jnp.int32))
  if cfg.attention == "mla":
    layer = lambda: LatentCache(c=jnp.zeros((batch, s, cfg.kv_lora_rank), dt),
                                k_rope=jnp.zeros((batch, s, cfg.mla_rope_kv_heads
                                                  * cfg.qk_rope_head_dim), dt))
  else:
    shape = (batch, s, cfg.kv_heads, cfg.qk_head_dim)
    layer = lambda: KVCache(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt))
  return Cache(layers=tuple(layer() for _ in range(cfg.n_layers)),
               lengths=jnp.zeros((batch,), jnp.int32))


def write(buffer: jax.Array, new: jax.Array, lengths: jax.Array) -> jax.Array:
  """Writes new [B, T, ...] into buffer [B, S, ...] at slots lengths[b] .. lengths[b] + T - 1."""
  update = lambda buf, x, start: jax.lax.dynamic_update_slice_in_dim(buf, x, start, axis=0)
  return jax.vmap(update)(buffer, new.astype(buffer.dtype), lengths)


def schedule_after(x: jax.Array, dep: jax.Array) -> jax.Array:
  """An XLA:CPU scheduling tie: x unchanged, but computed from dep [B, ...] too, so XLA cannot run
  x's users before dep. Exact: selects x whatever dep holds (NaN included).

  XLA schedules by data dependencies only (optimization_barrier does not survive on XLA:CPU).
  attention.py ties only where scripts/bench_decode.py measured it to help:
  (1) the cache write after attention's reads of the old cache (`write_after`): otherwise XLA
      cannot prove the reads come first and copies the donated buffer (twice, on XLA:CPU) instead
      of updating it in place (MQA batch 1 at 16k ~7 -> 3.5 ms/step, batch 8 2-5x faster);
  (2) the full copies made from the cache, GQA's [B, G, S, K] relayout and naive MLA's
      decompression, each to what it waits for: otherwise XLA:CPU runs every layer's copies at
      the start of the step, all live at once (GQA batch 1 2.5x slower).
  Only on CPU (jax.default_backend()): elsewhere x is returned as is.
  """
  if jax.default_backend() != "cpu":  # GPU/TPU schedulers order these themselves; a tie would
    return x  # only add a select per element (not yet measured on a GPU)
  ready = ~(dep.reshape(dep.shape[0], -1)[:, 0] > jnp.inf)  # always True (NaN too); XLA can't tell
  return jnp.where(ready.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))


def as_stored(new: jax.Array, buffer: jax.Array) -> jax.Array:
  """new [B, T, ...] rounded as `write` would store it in buffer (a no-op for the same dtype), so
  the new tokens attend to exactly the values later tokens will read back from the cache."""
  return new.astype(buffer.dtype).astype(new.dtype)


def cache_bytes_per_token(cache: Cache) -> float:
  """Bytes per cached token measured from the arrays themselves (all layers, lengths excluded):
  everything allocated over B * S. YOCO's constant window rings and DMC's per-head counters are
  spread over the S slots (config.kv_cache_bytes gives the same total analytically)."""
  b, s = cache.lengths.shape[0], cache.max_len
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache.layers))
  return total / (b * s)
