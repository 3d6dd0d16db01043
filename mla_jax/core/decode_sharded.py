"""Decode over a cache sharded along its length (the mesh's `sequence` axis), flash-decoding style.

    plan = DecodePlan.make(mesh)                   # mesh from sharding.make_mesh({...})
    out = generate(model, prompts, 64, mesh=mesh)  # generate builds the plan and uses it

A decode cache on a mesh is split by sharding.cache_shardings: batch over data / fsdp, kv heads
over tensor where they divide, the cache length S over `sequence`. Batch and head splits need no
communication in attention (each device owns whole rows / heads), so plain einsums partitioned by
GSPMD handle them. A split cache length does: the softmax runs over every slot. Here each sequence
shard scores its own S / N_seq slots, keeps the unnormalised partial (o = sum_j exp(s_j - m) v_j,
its max m and sum l), and the shards merge the partials with a log-sum-exp (pmax of m, psum of the
rescaled o and l over `sequence`): each device sends O(B x H x T x width) numbers, never a cache
slot. The new tokens' own causal block is computed on every shard (it is replicated there) and
merged the same way; each new token is then written only by the shard that owns its slot.

MLA's latent has no head axis: its cache splits over batch and sequence only; with a tensor axis
its query heads split over tensor while every tensor device keeps the whole latent of its
(batch, sequence) shard. A per-head K/V cache also splits its kv heads over tensor.

`DecodePlan.impl`: 'shard_map' (this module) or 'gspmd' (the plain attention code with the cache
sharded, leaving XLA's partitioner to place the softmax's reductions and the cache write);
scripts/bench_decode.py --devices times both.

The plan reaches attention through `use(plan)`, a context read while tracing: generate and
generate.decode_step take the plan as a static jit argument and enter it inside the traced
function, so a jitted function's cache of traces never mixes sharded and unsharded versions.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mla_jax.core import cache as cache_lib
from mla_jax.core import sharding as shd
from mla_jax.core.layers import rope_scores

SEQ = "sequence"
_NEG = -1e30  # as attention._NEG: a finite "minus infinity"
DECODE_IMPLS = ("shard_map", "gspmd")


@dataclasses.dataclass(frozen=True)
class DecodePlan:
  """How a decode step runs on a mesh: hashable, so it can be a static jit argument."""
  mesh: Mesh
  rules: tuple = ()  # sorted (logical name, mesh axes) items of the sharding rules
  impl: str = "shard_map"

  @classmethod
  def make(cls, mesh: Mesh, rules: Mapping[str, Any] | None = None,
           impl: str = "shard_map") -> "DecodePlan":
    if impl not in DECODE_IMPLS:
      raise ValueError(f"sharded_impl: {impl!r} is not one of {DECODE_IMPLS}")
    return cls(mesh, tuple(sorted((rules or shd.DEFAULT_RULES).items())), impl)

  @property
  def rules_dict(self) -> dict[str, Any]:
    return dict(self.rules)

  @property
  def seq_shards(self) -> int:
    return self.mesh.shape.get(SEQ, 1)

  @property
  def shards_sequence(self) -> bool:
    """True when attention must merge partials across the `sequence` axis itself."""
    return self.impl == "shard_map" and self.seq_shards > 1

  def cache_shardings(self, cache: cache_lib.Cache):
    return shd.cache_shardings(cache, self.mesh, self.rules_dict)

  def check_cache_length(self, slots: int, flag: str = "mesh.sequence") -> None:
    """A cache of `slots` slots must split into whole, non-empty shards: one line naming the flag
    otherwise (a non-dividing axis would silently leave the cache whole on every device)."""
    n = self.seq_shards
    if n > slots:
      raise ValueError(f"{flag}: {n} sequence shards exceed the cache of {slots} slots")
    if slots % n:
      raise ValueError(f"{flag}: {n} sequence shards do not divide the cache of {slots} slots")


_STACK: list[DecodePlan | None] = []


@contextlib.contextmanager
def use(plan: DecodePlan | None):
  """Attention traced inside sees `plan` (current()); None switches the sharded path off."""
  _STACK.append(plan)
  try:
    yield plan
  finally:
    _STACK.pop()


def current() -> DecodePlan | None:
  return _STACK[-1] if _STACK else None


def round_up_slots(slots: int, plan: DecodePlan | None) -> int:
  """A cache length the sequence axis divides (extra slots stay unfilled and masked)."""
  n = 1 if plan is None else plan.seq_shards
  return -(-slots // n) * n


def init_cache(cfg, batch: int, max_len: int, plan: DecodePlan) -> cache_lib.Cache:
  """cache.init_cache born sharded: each device makes only its own shard of the zeros."""
  abstract = jax.eval_shape(lambda: cache_lib.init_cache(cfg, batch, max_len))
  return jax.jit(lambda: cache_lib.init_cache(cfg, batch, max_len),
                 out_shardings=plan.cache_shardings(abstract))()


def batch_spec(plan: DecodePlan, batch: int):
  """The mesh axes the batch splits over (as the cache's batch axis), for prompts and lengths."""
  return shd.logical_to_spec(("cache_batch",), (batch,), plan.mesh, plan.rules_dict)[0]


def per_device_bytes(tree) -> dict[str, int]:
  """{device: bytes of its shards} over every array of a (cache) pytree, from addressable_shards."""
  out: dict[str, int] = {}
  for x in jax.tree.leaves(tree):
    for s in x.addressable_shards:
      out[str(s.device)] = out.get(str(s.device), 0) + s.data.nbytes
  return out


# The per-shard attention -------------------------------------------------------------------------


def _partial(scores, visible, values_fn):
  """Masked scores [..., T, S] float32 -> (o unnormalised via values_fn(p), m [..., T], l [..., T]).
  A row with no visible key gives m = _NEG, l = 0, o = 0: it adds nothing when merged."""
  scores = jnp.where(visible, scores, _NEG)
  m = scores.max(axis=-1)
  p = jnp.where(visible, jnp.exp(scores - m[..., None]), 0.0)
  return values_fn(p), m, p.sum(axis=-1)


def _merge(parts):
  """Log-sum-exp merge of [(o [..., T, X], m [..., T], l [..., T]), ...] -> o / l."""
  m_all = parts[0][1]
  for _, m, _ in parts[1:]:
    m_all = jnp.maximum(m_all, m)
  o = sum(o * jnp.exp(m - m_all)[..., None] for o, m, _ in parts)
  l = sum(l * jnp.exp(m - m_all) for _, m, l in parts)
  return o / jnp.where(l > 0, l, 1.0)[..., None]


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
  new = cache_lib.schedule_after(new.astype(buffer.dtype), out)
  return buffer.at[rows, local].set(new, mode="drop")


def _causal(t: int):
  return jnp.tril(jnp.ones((t, t), bool))


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
    def scores(keys):
      return jnp.einsum("BTGMK,BSGK->BGMTS", q, keys, preferred_element_type=jnp.float32) * scale
    # XLA:CPU relayouts the cache to [B, G, S, K] for these dots (full copies): tie each copy to
    # what it waits for, as GQAttention does (cache.schedule_after), or all layers' copies start
    # at once.
    attend = lambda values: lambda p: jnp.einsum(
        "BSGK,BGMTS->BGMTK", cache_lib.schedule_after(values, p), p.astype(dt)).astype(jnp.float32)
    filled = jnp.arange(k_old.shape[1]) < _local_lengths(lengths, k_old.shape[1])[:, None]
    old = _merge_over_sequence(*_partial(scores(cache_lib.schedule_after(k_old.astype(dt), k)),
                                         filled[:, None, None, None], attend(v_old.astype(dt))))
    new = _partial(scores(k), _causal(q.shape[1]), attend(v))
    o = jnp.moveaxis(_merge([old, new]), 3, 1).astype(dt)  # [B, G, M, T, K] -> [B, T, G, M, K]
    return o, _write_local(k_old, k, lengths, o), _write_local(v_old, v, lengths, o)

  cache_spec = P(*spec)
  f = jax.shard_map(shard, mesh=plan.mesh, in_specs=(q_spec, new_spec, new_spec, cache_spec,
                                                     cache_spec, P(bs)),
                    out_specs=(q_spec, cache_spec, cache_spec), check_vma=False)
  o, k_cache, v_cache = f(q, k, v, cache.k, cache.v, lengths)
  return o, cache_lib.KVCache(k=k_cache, v=v_cache)


def mla_attend(plan: DecodePlan, q_c, q_rope, c, k_rope, cache: cache_lib.LatentCache, lengths,
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

    def scores(c_, kr):
      nope = jnp.einsum("BTHC,BSC->BHTS", q_c, c_, preferred_element_type=jnp.float32)
      return (nope + rope_scores(q_rope, kr)) * scale
    attend = lambda c_: lambda p: jnp.einsum("BSC,BHTS->BHTC", c_, p.astype(dt)
                                             ).astype(jnp.float32)
    c_old_dt = c_old.astype(dt)
    filled = jnp.arange(c_old.shape[1]) < _local_lengths(lengths, c_old.shape[1])[:, None]
    old = _merge_over_sequence(*_partial(scores(c_old_dt, kr_old.astype(dt)),
                                         filled[:, None, None], attend(c_old_dt)))
    new = _partial(scores(c, k_rope), _causal(q_c.shape[1]), attend(c))
    o = jnp.moveaxis(_merge([old, new]), 1, 2).astype(dt)  # [B, H, T, C] -> [B, T, H, C]
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
