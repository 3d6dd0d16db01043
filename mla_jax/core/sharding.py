"""The one place that maps logical axis names to mesh axes.

Modules name the axes of their parameters (`axes=(...)` metadata) and caches (`cache.py`); this
table decides which mesh axes shard them. The mesh has four named axes:
  data      pure data parallelism (batch split, parameters replicated)
  fsdp      batch split AND parameters sharded along 'embed' (ZeRO-3 style)
  tensor    Megatron-style: heads, kv heads, MLP hidden and vocab split
  sequence  the cache length axis during decode (long-context inference)
A dimension that a mesh axis does not divide stays replicated over it (e.g. MQA's single kv head).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# logical name -> mesh axis, tuple of mesh axes, or None (replicated).
DEFAULT_RULES: dict[str, Any] = {
    # activations / batches
    "batch": ("data", "fsdp"),
    # parameters
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "q_latent": None,
    "kv_latent": None,
    "norm": None,
    # caches
    "cache_batch": ("data", "fsdp"),
    "cache_length": "sequence",
    "cache_kv_heads": "tensor",
    "cache_head_dim": None,
    "cache_latent": None,
    "cache_rope": None,
}


def make_rules(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """DEFAULT_RULES with overrides applied; unknown names or mesh axes are refused."""
  rules = dict(DEFAULT_RULES)
  for name, target in (overrides or {}).items():
    if name not in rules:
      raise ValueError(f"mesh.rules.{name}: unknown logical axis (known: {', '.join(rules)})")
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    bad = [t for t in targets if t not in MESH_AXES]
    if bad:
      raise ValueError(f"mesh.rules.{name}: {bad[0]!r} is not a mesh axis {MESH_AXES}")
    rules[name] = target if isinstance(target, str) or target is None else tuple(target)
  return rules


def resolve_mesh_shape(shape: Mapping[str, int], n_devices: int) -> dict[str, int]:
  """Fills the single -1 entry so the product equals n_devices; errors name the field."""
  sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
  unknown = sorted(set(shape) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"mesh.{unknown[0]}: unknown mesh axis (known: {', '.join(MESH_AXES)})")
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ValueError(f"mesh.{fill[1]}: only one mesh axis may be -1 (also {fill[0]})")
  for a, s in sizes.items():
    if s == 0 or s < -1:
      raise ValueError(f"mesh.{a}: must be a positive size or -1, got {s}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if n_devices % fixed:
      raise ValueError(f"mesh.{fill[0]}: the other axes ({fixed} devices) do not divide the "
                       f"{n_devices} devices")
    sizes[fill[0]] = n_devices // fixed
  elif fixed != n_devices:
    raise ValueError(f"mesh: {dict(sizes)} uses {fixed} devices but {n_devices} are present")
  return sizes


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
  """A mesh over all (or the given) devices with axes MESH_AXES; default: all devices on 'data'.

  Auto axis types: XLA's sharding propagation (GSPMD) places the intermediates, so modules need no
  out_sharding annotations.
  """
  devices = list(devices if devices is not None else jax.devices())
  sizes = resolve_mesh_shape(shape or {"data": -1}, len(devices))
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(axes: Sequence[str], shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, Any] = DEFAULT_RULES) -> PartitionSpec:
  """PartitionSpec for an array with these logical axes, dropping mesh axes that do not divide
  its dimension or that an earlier dimension already uses."""
  used, spec = set(), []
  for name, dim in zip(axes, shape):
    target = rules.get(name)
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    kept = []
    for t in targets:
      size = mesh.shape[t] * math.prod(mesh.shape[k] for k in kept)
      if t not in used and mesh.shape[t] > 1 and dim % size == 0:
        kept.append(t)
    used.update(kept)
    spec.append(kept[0] if len(kept) == 1 else tuple(kept) if kept else None)
  return PartitionSpec(*spec)


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def param_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, Any] = DEFAULT_RULES):
  """NamedSharding for every parameter of an nnx.State (arrays or ShapeDtypeStructs)."""
  def one(v):
    return v.replace(NamedSharding(mesh, logical_to_spec(v.get_metadata()["axes"],
                                                         v.get_value().shape, mesh, rules)))
  return jax.tree.map(one, state, is_leaf=_is_var)


def tree_shardings(tree, axes_tree, mesh: Mesh, rules: Mapping[str, Any] = DEFAULT_RULES):
  """NamedSharding per array of a plain pytree, given a matching tree of logical-axis tuples."""
  axes_leaves = jax.tree.leaves(axes_tree, is_leaf=lambda x: isinstance(x, tuple) and
                                all(isinstance(a, str) for a in x))
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, [NamedSharding(mesh, logical_to_spec(a, np.shape(x), mesh,
                                                                          rules))
                                      for x, a in zip(leaves, axes_leaves)])


def cache_shardings(cache, mesh: Mesh, rules: Mapping[str, Any] = DEFAULT_RULES):
  """NamedSharding for every array of a decode cache (see cache.Cache.axes)."""
  return tree_shardings(cache, cache.axes(), mesh, rules)


def batch_sharding(mesh: Mesh, rules: Mapping[str, Any] = DEFAULT_RULES,
                   ndim: int = 2) -> NamedSharding:
  """Batches [B, ...]: B split over the data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(rules["batch"], *([None] * (ndim - 1))))


def data_parallel_size(mesh_sizes: Mapping[str, int],
                       rules: Mapping[str, Any] = DEFAULT_RULES) -> int:
  """How many ways the batch axis is split, from the mesh's axis sizes."""
  target = rules["batch"]
  targets = (target,) if isinstance(target, str) else tuple(target or ())
  return math.prod(mesh_sizes[t] for t in targets)


def per_device_bytes(tree) -> dict[str, int]:
  """{device: bytes of its shards} over every array of a (cache) pytree, from addressable_shards."""
  out: dict[str, int] = {}
  for x in jax.tree.leaves(tree):
    for s in x.addressable_shards:
      out[str(s.device)] = out.get(str(s.device), 0) + s.data.nbytes
  return out
