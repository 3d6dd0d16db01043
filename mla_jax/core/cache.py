"""Decode caches as explicit pytrees: passed into the model and returned updated, not hidden state.

The types only (a leaf of core/: it imports nothing of the package); each attention class makes
its own layer cache (`init_cache`), model.init_cache the whole Cache of a config.

Slot s of a cache holds the token at position s of its sequence; `lengths[b]` counts the tokens of
sequence b written so far, so the next tokens go to slots lengths[b], lengths[b] + 1, ... Slots past
a sequence's length may hold stale values (right-padded prompts); attention masks them out.

MLA's cache holds only the normalised latent c and the rotated shared rope key: no per-head tensor.
"""

from __future__ import annotations

import flax.struct
import jax

# Logical axis names of each cache array, mapped to mesh axes by sharding.py.
KV_AXES = ("cache_batch", "cache_length", "cache_kv_heads", "cache_head_dim")
LATENT_AXES = ("cache_batch", "cache_length", "cache_latent")
ROPE_AXES = ("cache_batch", "cache_length", "cache_rope")
COUNT_AXES = ("cache_batch", "cache_kv_heads")  # DMC's per-head counters


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
class RingCache:
  """One YOCO self-decoder layer (core/yoco.py): k, v [B, W', G, K] (keys rotated), W' = min(W, S)
  slots; slot j holds the newest position p < lengths[b] with p = j mod W'."""
  k: jax.Array
  v: jax.Array

  @property
  def axes(self):
    return RingCache(k=KV_AXES, v=KV_AXES)


@flax.struct.dataclass
class DMCCache:
  """One DMC layer (core/dmc.py): k, v [B, S, G, K] (keys rotated, slot s of head g live iff
  s < n[b, g]), n [B, G] int32 slots used, z [B, G] float32 importance sum of each head's last
  slot."""
  k: jax.Array
  v: jax.Array
  n: jax.Array
  z: jax.Array

  @property
  def axes(self):
    return DMCCache(k=KV_AXES, v=KV_AXES, n=COUNT_AXES, z=COUNT_AXES)


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


def write(buffer: jax.Array, new: jax.Array, lengths: jax.Array) -> jax.Array:
  """Writes new [B, T, ...] into buffer [B, S, ...] at slots lengths[b] .. lengths[b] + T - 1."""
  update = lambda buf, x, start: jax.lax.dynamic_update_slice_in_dim(buf, x, start, axis=0)
  return jax.vmap(update)(buffer, new.astype(buffer.dtype), lengths)


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
