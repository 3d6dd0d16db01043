"""Eviction inside the jitted step: score updates, the one-slot decode insert, the chunk compaction.

Every policy reduces to a keep key per slot and group [B, G, S] (`keep_key`); protected slots
(the first `sinks` tokens, the `recent` newest) get +inf, so the lowest key among the rest goes.
  streaming / none   position (the oldest unprotected token goes: sinks + recent window)
  h2o                attention accumulated over every query so far, averaged over the group's heads
  tova               the current (last) query's attention, averaged over the group's heads
  snapkv             votes: a prefill chunk's last `obs_window` queries' attention summed, then
                     averaged over a `pool`-wide window of neighbouring kept tokens (in position
                     order); decode queries add their attention to the votes
  l2norm             minus the key's L2 norm (low-norm keys draw attention: keep them)
  vatp               accumulated attention times the value's L1 norm (aux)
  fastgen            per group, the policy its prefill profile picked (fastgen.py)
A decode step (T = 1) overwrites the one victim slot in place; a prefill chunk (T > 1) keeps the
S best of the S + T candidates and writes them back in position order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mla_jax.kvcompress import budget as budget_lib
from mla_jax.kvcompress import fastgen
from mla_jax.kvcompress.policy import Policy

_BIG = 2 ** 30  # sorts invalid slots after every real position


def new_scores(policy: Policy, score_old, a_old, a_new):
  """Running scores after T new queries: score_old [B, G, S], a_old [B, G, T, S] and a_new
  [B, G, T, T] (the queries' attention over the old slots and the new tokens, head-averaged)
  -> (old slots' scores [B, G, S], new tokens' scores [B, G, T])."""
  t = a_new.shape[2]
  if policy.name == "tova":  # only the current query counts
    return a_old[:, :, -1], a_new[:, :, -1]
  if policy.name == "snapkv" and t > 1:  # the observation window of the chunk votes afresh
    w = min(policy.obs_window, t)
    return a_old[:, :, -w:].sum(2), a_new[:, :, -w:].sum(2)
  return score_old + a_old.sum(2), a_new.sum(2)


def _pool_in_position_order(key, pos, valid, k: int):
  """Averages key [B, G, N] over k neighbours in position order (SnapKV's 1-D pooling)."""
  order = jnp.argsort(jnp.where(valid, pos, _BIG), axis=-1)
  sorted_key = jnp.take_along_axis(jnp.where(valid, key, 0.0), order, axis=-1)
  pooled = jax.lax.reduce_window(sorted_key, 0.0, jax.lax.add, (1, 1, k), (1, 1, 1),
                                 "SAME") / k
  inverse = jnp.argsort(order, axis=-1)
  return jnp.take_along_axis(pooled, inverse, axis=-1)


def keep_key(policy: Policy, book: dict, valid=None, mode=None, end=None) -> jax.Array:
  """Larger keeps: [B, G, N] from the bookkeeping arrays (pos, score, aux [B, G, N]); FastGen
  also needs the groups' modes [B, G] and end [B] (the newest position + 1)."""
  name = policy.name
  if name == "fastgen":
    return fastgen.keep_key(book, mode, book["pos"] < policy.sinks, end, book["pos"].shape[-1])
  if name in ("streaming", "none"):
    return book["pos"].astype(jnp.float32)
  if name == "l2norm":
    return -book["aux"]
  if name == "vatp":
    return book["score"] * book["aux"]
  if name == "snapkv" and valid is not None and policy.pool > 1:
    return _pool_in_position_order(book["score"], book["pos"], valid, policy.pool)
  return book["score"]


def protected(policy: Policy, pos, end) -> jax.Array:
  """Sinks and the recent window: pos [B, G, N], end [B] = position after the newest token."""
  return (pos < policy.sinks) | (pos >= (end - policy.recent)[:, None, None])


def insert_one(layer, specs, policy: Policy, new, book_new, base, n_seen, n_valid, dtype):
  """Decode: new {name: [B, G, 1, W]}, book_new {pos, rot, score, aux: [B, G, 1]} -> the layer
  with the new token in the first free slot, or in place of the lowest-keyed unprotected slot."""
  s = layer["pos"].shape[-1]
  full = (n_valid >= s)[:, None]  # [B, 1]
  key = keep_key(policy, layer, mode=layer.get("mode"), end=base + 1)
  key = jnp.where(protected(policy, layer["pos"], base + 1), jnp.inf, key)
  victim = jnp.argmin(key, axis=-1)  # [B, G]
  slot = jnp.where(full, victim, n_valid[:, None])
  book_new = dict(book_new)
  out = dict(layer)
  if policy.positions == "cache":  # ranks after the victim move down one; so does the new token
    vpos = jnp.take_along_axis(layer["pos"], victim[..., None], axis=-1)
    shift = full[..., None] & (layer["pos"] > vpos)
    out["pos"] = jnp.where(shift, layer["pos"] - 1, layer["pos"])
    book_new["pos"] = book_new["pos"] - full[..., None]
  b, g = jnp.arange(slot.shape[0])[:, None], jnp.arange(slot.shape[1])[None, :]
  for name in book_new:
    out[name] = out[name].at[b, g, slot].set(book_new[name][..., 0])
  for spec in specs:
    out.update(budget_lib.write_slot(layer, spec, policy, slot, new[spec.name][:, :, 0], dtype))
    if policy.fp_recent:
      out.update(budget_lib.write_ring(layer, spec, policy, new[spec.name], n_seen))
  return out


def compact(layer, specs, policy: Policy, new, book_new, base, n_seen, n_valid, dtype):
  """Prefill chunk: new {name: [B, G, T, W]}, book_new [B, G, T] -> the layer holding the S
  highest-keyed of the S + T candidates (protected ones first), in position order."""
  s = layer["pos"].shape[-1]
  t = book_new["pos"].shape[-1]
  valid = jnp.concatenate([jnp.broadcast_to(jnp.arange(s) < n_valid[:, None, None],
                                            layer["pos"].shape),
                           jnp.ones(book_new["pos"].shape, bool)], axis=-1)
  book = {k: jnp.concatenate([layer[k], book_new[k]], axis=-1) for k in book_new}
  key = keep_key(policy, book, valid, mode=layer.get("mode"), end=base + t)
  key = jnp.where(protected(policy, book["pos"], base + t), jnp.inf, key)
  _, idx = jax.lax.top_k(jnp.where(valid, key, -jnp.inf), s)  # [B, G, S]
  kept = jnp.take_along_axis(valid, idx, axis=-1)
  order = jnp.argsort(jnp.where(kept, jnp.take_along_axis(book["pos"], idx, -1), _BIG), -1)
  idx, kept = jnp.take_along_axis(idx, order, -1), jnp.take_along_axis(kept, order, -1)
  out = dict(layer)
  for k in book:
    out[k] = jnp.where(kept, jnp.take_along_axis(book[k], idx, axis=-1),
                       -1 if k == "pos" else 0).astype(layer[k].dtype)
  if policy.positions == "cache":  # kept slots are in position order: rank = slot index
    out["pos"] = jnp.where(kept, jnp.arange(s), -1)
  for spec in specs:
    old = budget_lib.read(layer, spec, policy, n_seen, n_valid, jnp.float32)
    cand = jnp.concatenate([old, new[spec.name].astype(jnp.float32)], axis=2)
    out.update(budget_lib.store(spec, policy, jnp.take_along_axis(cand, idx[..., None], axis=2),
                                dtype))
    if policy.fp_recent:
      out.update(budget_lib.write_ring(layer, spec, policy, new[spec.name], n_seen))
  return out


def update_layer(layer, specs, policy: Policy, new, a_old, a_new, aux_new, qpos, n_seen, n_valid,
                 dtype):
  """After attention: scores updated with the T new queries' attention (a_old [B, G, T, S],
  a_new [B, G, T, T]), then the new tokens (new {name: [B, G, T, W]}, aux_new [B, G, T], at
  query positions qpos [B, T]) inserted (T = 1) or compacted in (T > 1)."""
  score_old, score_new = new_scores(policy, layer["score"], a_old, a_new)
  layer = {**layer, "score": score_old}
  g = a_old.shape[1]
  qpos = jnp.broadcast_to(qpos[:, None], (qpos.shape[0], g, qpos.shape[1]))
  book_new = {"pos": qpos, "rot": qpos, "score": score_new, "aux": aux_new}
  base = n_seen if policy.positions == "original" else n_valid
  if policy.name == "fastgen" and a_new.shape[-1] > 1:  # the prompt's first chunk is profiled
    picked = fastgen.profile(a_new, book_new["pos"] < policy.sinks, aux_new > 0, policy.recovery)
    layer["mode"] = jnp.where((n_valid == 0)[:, None], picked, layer["mode"])
  step = insert_one if a_new.shape[-1] == 1 else compact
  return step(layer, specs, policy, new, book_new, base, n_seen, n_valid, dtype)
