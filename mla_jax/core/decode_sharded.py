"""Decode over a cache sharded along its length (the mesh's `sequence` axis), flash-decoding style.

The attention backends attention.py uses when a DecodePlan (core/decode_plan.py) shards the
cache length: batch and head splits need no communication in attention (each device owns whole
rows / heads), so plain einsums partitioned by GSPMD handle them. A split cache length does: the
softmax runs over every slot. Here each sequence shard scores its own S / N_seq slots, keeps the
unnormalised partial (ops.partial: o = sum_j exp(s_j - m) v_j, its max m and sum l), and the
shards merge the partials with a log-sum-exp (pmax of m, psum of the rescaled o and l over
`sequence`): each device sends O(B x H x T x width) numbers, never a cache slot. The new tokens'
own causal block is computed on every shard (it is replicated there) and merged the same way
(ops.merge_partials); each new token is then written only by the shard that owns its slot.

MLA's latent has no head axis: its cache splits over batch and sequence only; with a tensor axis
its query heads split over tensor while every tensor device keeps the whole latent of its
(batch, sequence) shard. A per-head K/V cache also splits its kv heads over tensor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mla_jax.core import cache as cache_lib
from mla_jax.core import ops
from mla_jax.core import sharding as shd
from mla_jax.core.decode_plan import SEQ, DecodePlan
from mla_jax.core.ties import schedule_after


def _merge_over_sequence(o, m, l):
  """The partials of every sequence shard merged into one (still unnormalised) partial."""
  m_all = jax.lax.pmax(m, SEQ)
  w = jnp.exp(m - m_all)
  return jax.lax.psum(o * w[..., None], SEQ), m_all, jax.lax.psum(l * w, SEQ)


def _local_lengths(lengths, slots: int):
  """Filled slots of this shard: the fill level is a prefix, so this shard's filled slots are its
  first clip(lengths - offset, 0, slots)."""
  offset = jax.lax.axis_index(SEQ) * slots
  return jnp.clip(lengths - offset, 0, slots)


def _write_local(buffer, new, lengths, out):
  """Writes new [B, T, ...] at global slots lengths[b] + t into this shard's buffer [B, S_loc, ...]
  where it owns them; other slots are dropped (scatter mode='drop'). Tied to out (the attention
  result) so the write follows every read of the old buffer and updates it in place."""
  b, t = new.shape[:2]
  slots = buffer.shape[1]
  local = lengths[:, None] + jnp.arange(t) - jax.lax.axis_index(SEQ) * slots  # [B, T]
  local = jnp.where((local >= 0) & (local < slots), local, slots)  # out of range: dropped
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
  new = schedule_after(new.astype(buffer.dtype), out)
  return buffer.at[rows, local].set(new, mode="drop")


def _specs(plan: DecodePlan, cache_array) -> tuple:
  """The cache array's PartitionSpec entries, one per axis (from sharding.py's table)."""
  spec = shd.logical_to_spec(_axes_of(cache_array), cache_array.shape, plan.mesh, plan.rules_dict)
  spec = tuple(spec) + (None,) * (cache_array.ndim - len(spec))
  return spec


def _axes_of(array) -> tuple[str, ...]:
  return cache_lib.KV_AXES if array.ndim == 4 else cache_lib.LATENT_AXES


def gqa_attend(plan: DecodePlan, q, k, v, cache: cache_lib.KVCache, lengths, scale: float, dt):
  """GQA / MHA / MQA over a sequence-sharded KVCache.

  q [B, T, G, M, K] new queries, k, v [B, T, G, K] new keys / values (as stored), cache.k /
  cache.v [B, S, G, K] sharded over `sequence` on S, lengths [B] filled slots. Returns (o [B, T,
  G, M, K] in dt, the cache's k and v with the new tokens written on their owning shards).
  """
  spec = _specs(plan, cache.k)
  bs, gs = spec[0], spec[2]
  q_spec, new_spec = P(bs, None, gs, None, None), P(bs, None, gs, None)

  def shard(q, k, v, k_old, v_old, lengths):
    # XLA:CPU relayouts the cache to [B, G, S, K] for these dots (full copies): tie each copy to
    # what it waits for, as GQAttention does (ties.schedule_after), or all layers' copies start
    # at once. Partials are [B, G, M, T, K] against m, l [B, G, M, T].
    attend = lambda values: lambda p: jnp.moveaxis(
        ops.gqa_attend(schedule_after(values, p), p, dt), 1, 3).astype(jnp.float32)
    filled = jnp.arange(k_old.shape[1]) < _local_lengths(lengths, k_old.shape[1])[:, None]
    old = _merge_over_sequence(*ops.partial(
        ops.gqa_scores(q, schedule_after(k_old.astype(dt), k), scale),
        filled[:, None, None, None], attend(v_old.astype(dt))))
    new = ops.partial(ops.gqa_scores(q, k, scale), ops.causal_mask(q.shape[1]), attend(v))
    o = jnp.moveaxis(ops.merge_partials([old, new]), 3, 1).astype(dt)  # -> [B, T, G, M, K]
    return o, _write_local(k_old, k, lengths, o), _write_local(v_old, v, lengths, o)

  cache_spec = P(*spec)
  f = jax.shard_map(shard, mesh=plan.mesh, in_specs=(q_spec, new_spec, new_spec, cache_spec,
                                                     cache_spec, P(bs)),
                    out_specs=(q_spec, cache_spec, cache_spec), check_vma=False)
  o, k_cache, v_cache = f(q, k, v, cache.k, cache.v, lengths)
  return o, cache_lib.KVCache(k=k_cache, v=v_cache)


def latent_attend(plan: DecodePlan, q_c, q_rope, c, k_rope, cache: cache_lib.LatentCache, lengths,
               scale: float, dt):
  """Absorbed MLA over a sequence-sharded LatentCache.

  q_c [B, T, H, C] (W_UK folded into the query), q_rope [B, T, H, R], c [B, T, C] and k_rope
  [B, T, R] or [B, T, G_R, R] the new tokens (as stored); cache.c [B, S, C], cache.k_rope
  [B, S, G_R * R], S sharded over `sequence`. Returns (o~ [B, T, H, C] in dt, before W_UV; the
  cache with the new tokens written on their owning shards). Query heads split over tensor when
  it divides H; the latent itself has no head axis to split.
  """
  spec = _specs(plan, cache.c)
  bs = spec[0]
  tensor = plan.mesh.shape.get("tensor", 1)
  hs = "tensor" if tensor > 1 and q_c.shape[2] % tensor == 0 else None
  q_spec = P(bs, None, hs, None)
  new_rope_spec = P(bs, None, None, None) if k_rope.ndim == 4 else P(bs, None, None)
  groups = k_rope.shape[2] if k_rope.ndim == 4 else 0

  def shard(q_c, q_rope, c, k_rope, c_old, kr_old, lengths):
    if groups:  # per-group rope keys are cached flat [B, S, G_R * R]
      kr_old = kr_old.reshape(kr_old.shape[:2] + (groups, -1))
    # Partials are [B, H, T, C] against m, l [B, H, T].
    attend = lambda c_: lambda p: jnp.moveaxis(ops.latent_attend(c_, p, dt), 1, 2
                                               ).astype(jnp.float32)
    c_old_dt = c_old.astype(dt)
    filled = jnp.arange(c_old.shape[1]) < _local_lengths(lengths, c_old.shape[1])[:, None]
    old = _merge_over_sequence(*ops.partial(
        ops.latent_scores(q_c, q_rope, c_old_dt, kr_old.astype(dt), scale), filled[:, None, None],
        attend(c_old_dt)))
    new = ops.partial(ops.latent_scores(q_c, q_rope, c, k_rope, scale),
                      ops.causal_mask(q_c.shape[1]), attend(c))
    o = jnp.moveaxis(ops.merge_partials([old, new]), 1, 2).astype(dt)  # -> [B, T, H, C]
    kr_flat = k_rope.reshape(k_rope.shape[:2] + (-1,))
    return o, _write_local(c_old, c, lengths, o), _write_local(
        kr_old.reshape(kr_old.shape[:2] + (-1,)), kr_flat, lengths, o)

  cache_spec = P(*spec)
  f = jax.shard_map(shard, mesh=plan.mesh,
                    in_specs=(q_spec, q_spec, P(bs, None, None), new_rope_spec, cache_spec,
                              cache_spec, P(bs)),
                    out_specs=(q_spec, cache_spec, cache_spec), check_vma=False)
  o, c_cache, kr_cache = f(q_c, q_rope, c, k_rope, cache.c, cache.k_rope, lengths)
  return o, cache_lib.LatentCache(c=c_cache, k_rope=kr_cache)
