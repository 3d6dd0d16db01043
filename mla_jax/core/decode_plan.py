"""How a decode step runs on a mesh: the `DecodePlan`, passed explicitly down to attention.

    plan = DecodePlan.make(mesh)                    # mesh from sharding.make_mesh({...})
    logits, cache = model.extend(tokens, cache, plan=plan)
    out = generate(model, prompts, 64, mesh=mesh)   # generate builds the plan and passes it

A decode cache on a mesh is split by sharding.cache_shardings: batch over data / fsdp, kv heads
over tensor where they divide, the cache length S over `sequence`. `impl` says how attention runs
over a split cache length: 'shard_map' (core/decode_sharded.py: per-shard partials merged by
log-sum-exp) or 'gspmd' (the plain attention code on the sharded cache, leaving XLA's partitioner
to place the softmax's reductions and the cache write); scripts/bench_decode.py --devices times
both. The plan is hashable, so jitted functions take it as a static argument and a trace never
mixes sharded and unsharded versions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jax.sharding import Mesh

from mla_jax.core import sharding as shd

SEQ = "sequence"
DECODE_IMPLS = ("shard_map", "gspmd")


@dataclasses.dataclass(frozen=True)
class DecodePlan:
  """The mesh, its sharding rules and the sequence-split attention: hashable (a static jit
  argument)."""
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

  def cache_shardings(self, cache):
    """NamedSharding per array of a core.cache.Cache on this plan's mesh."""
    return shd.cache_shardings(cache, self.mesh, self.rules_dict)

  def check_cache_length(self, slots: int, flag: str = "mesh.sequence") -> None:
    """A cache of `slots` slots must split into whole, non-empty shards: one line naming the flag
    otherwise (a non-dividing axis would silently leave the cache whole on every device)."""
    n = self.seq_shards
    if n > slots:
      raise ValueError(f"{flag}: {n} sequence shards exceed the cache of {slots} slots")
    if slots % n:
      raise ValueError(f"{flag}: {n} sequence shards do not divide the cache of {slots} slots")

  def batch_spec(self, batch: int):
    """The mesh axes the batch splits over (as the cache's batch axis), for prompts and lengths."""
    return shd.logical_to_spec(("cache_batch",), (batch,), self.mesh, self.rules_dict)[0]


def round_up_slots(slots: int, plan: DecodePlan | None) -> int:
  """A cache length the sequence axis divides (extra slots stay unfilled and masked)."""
  n = 1 if plan is None else plan.seq_shards
  return -(-slots // n) * n
