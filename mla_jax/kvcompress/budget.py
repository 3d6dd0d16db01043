"""The fixed-budget cache every policy shares: S slots per layer and KV group, fixed shapes.

Layout: every cached array is [B, G, S, W] (G kv groups, S = budget slots, W width): GQA/MQA/MHA
cache k and v (W = K, G kv heads); MLA caches its latent c (W = C) and rope key kr (W = R) with
G = 1, one kept set per layer. Per slot and group, bookkeeping [B, G, S]:
  pos    the token's position: its true position ('original') or its rank among the kept slots
         ('cache', StreamingLLM's re-assignment)
  rot    the position its stored key was rotated at (keys are cached after RoPE; 'cache' mode
         re-rotates them by pos - rot when read, so only a rotation, never a re-projection)
  score  the policy's running score (accumulated attention, the last query's attention, votes)
  aux    a per-token figure fixed at insertion (VATP: the value's L1 norm; L2-norm: the key norm)
Slots fill in order and are then only overwritten, so the slots in use are always [0, n_valid):
attention masks exactly as the contiguous cache does (attention.causal_probs with lengths).

Quantised caches ('int8' / 'int4', quant.py) store codes, scales and zero points in place of an
array, and a full-precision ring of the last `fp_recent` tokens (`<name>_r`, [B, G, Wr, W]) that
reads of recent slots take instead of the codes (KIVI's full-precision residual).
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from mla_jax.core.config import ModelConfig
from mla_jax.kvcompress import quant
from mla_jax.kvcompress.policy import Policy, PolicyError

BOOKKEEPING = (("pos", jnp.int32), ("rot", jnp.int32), ("score", jnp.float32),
               ("aux", jnp.float32))


@dataclasses.dataclass(frozen=True)
class ArraySpec:
  """One cached array: name, width W, storage mode (plain | bf16 | token | channel)."""
  name: str
  width: int
  mode: str


@flax.struct.dataclass
class BudgetCache:
  """layers: tuple of L dicts of arrays (ArraySpec storage + BOOKKEEPING); n_seen [B] int32 tokens
  consumed (the true position of the next one); n_valid [B] int32 slots in use."""
  layers: tuple
  n_seen: jax.Array
  n_valid: jax.Array

  @property
  def budget(self) -> int:
    return self.layers[0]["pos"].shape[-1]


def kv_groups(cfg: ModelConfig) -> int:
  return 1 if cfg.attention == "mla" else cfg.kv_heads


def array_specs(cfg: ModelConfig, policy: Policy) -> tuple[ArraySpec, ...]:
  """GQA: keys per channel, values per token (KIVI); MLA: the latent per token (DeepSeek's FP8
  cache scales each group of latent values), the rope key kept in bfloat16."""
  q = policy.quant != "none"
  if cfg.attention == "mla":
    return (ArraySpec("c", cfg.kv_lora_rank, "token" if q else "plain"),
            ArraySpec("kr", cfg.qk_rope_head_dim, "bf16" if q else "plain"))
  k = cfg.qk_head_dim
  return (ArraySpec("k", k, "channel" if q else "plain"),
          ArraySpec("v", k, "token" if q else "plain"))


def _array_init(spec: ArraySpec, lead: tuple, s: int, policy: Policy, dtype) -> dict:
  w, g = spec.width, policy.group
  if spec.mode == "plain":
    return {spec.name: jnp.zeros(lead + (s, w), dtype)}
  if spec.mode == "bf16":
    return {spec.name: jnp.zeros(lead + (s, w), jnp.bfloat16)}
  packed = w if policy.bits == 8 else -(-w // 2)
  scales = lead + ((s, -(-w // g)) if spec.mode == "token" else (-(-s // g), w))
  return {f"{spec.name}_q": jnp.zeros(lead + (s, packed), jnp.uint8),
          f"{spec.name}_s": jnp.ones(scales, quant.SCALE_DTYPE),
          f"{spec.name}_z": jnp.zeros(scales, quant.SCALE_DTYPE)}


def check_model(cfg: ModelConfig) -> None:
  """MHA2MLA conversions with one rope key per KV group or per-layer frequencies are not covered
  (the budget cache holds one rope key per slot, rotated with the standard frequencies); nor are
  YOCO's or DMC's caches, which compress by design (core/yoco.py, core/dmc.py)."""
  if cfg.attention == "yoco" or getattr(cfg, "dmc", False):
    raise PolicyError("--cache_policy: YOCO and DMC models keep their own compressed caches; "
                      "the budget cache covers MHA/GQA/MQA and MLA")
  if cfg.attention == "mla" and (getattr(cfg, "mla_rope_kv_heads", 1) != 1
                                 or getattr(cfg, "mla_rope_pairs", ())):
    raise PolicyError("--cache_policy: MLA models with mla_rope_kv_heads > 1 or mla_rope_pairs "
                      "(MHA2MLA conversions) are not supported by the budget cache")


def init_cache(cfg: ModelConfig, policy: Policy, batch: int, context: int) -> BudgetCache:
  """An empty cache of min(budget, context) slots (budget 0: context slots, nothing evicted)."""
  check_model(cfg)
  s = min(policy.budget or context, context)
  lead = (batch, kv_groups(cfg))
  dtype = cfg.kv_cache_dtype

  def layer():
    out = {}
    for spec in array_specs(cfg, policy):
      out.update(_array_init(spec, lead, s, policy, dtype))
      if policy.fp_recent:
        out[f"{spec.name}_r"] = jnp.zeros(lead + (policy.fp_recent, spec.width), jnp.float32)
    for name, dt in BOOKKEEPING:
      out[name] = jnp.full(lead + (s,), -1 if name == "pos" else 0, dt)
    if policy.name == "fastgen":  # each group's profiled policy (fastgen.MODES), 'full' until then
      out["mode"] = jnp.full(lead, 4, jnp.int32)
    return out

  return BudgetCache(layers=tuple(layer() for _ in range(cfg.n_layers)),
                     n_seen=jnp.zeros((batch,), jnp.int32), n_valid=jnp.zeros((batch,), jnp.int32))


# Reading and writing the stored arrays ----------------------------------------------------------


def _true_pos(layer, policy: Policy, n_seen, n_valid):
  """[B, G, S] true positions of the slots; in 'cache' mode only right for the recent slots (the
  last `window` tokens are always kept, so their ranks are the last ones)."""
  if policy.positions == "original":
    return layer["pos"]
  return (n_seen - n_valid)[:, None, None] + layer["pos"]


def read(layer: dict, spec: ArraySpec, policy: Policy, n_seen, n_valid, dtype) -> jax.Array:
  """The stored array as [B, G, S, W] in `dtype`: dequantised, recent slots from the ring."""
  n, g = spec.name, policy.group
  if spec.mode in ("plain", "bf16"):
    x = layer[n].astype(dtype)
  else:
    codes = quant.unpack(layer[f"{n}_q"], policy.bits, spec.width)
    deq = quant.dequantize_tokens if spec.mode == "token" else quant.dequantize_channels
    x = deq(codes, layer[f"{n}_s"], layer[f"{n}_z"], g, dtype)
  if policy.fp_recent:
    wr = policy.fp_recent
    tp = _true_pos(layer, policy, n_seen, n_valid)
    recent = (tp >= (n_seen[:, None, None] - wr)) & (layer["pos"] >= 0)
    ring = jnp.take_along_axis(layer[f"{n}_r"], (tp % wr)[..., None], axis=2)
    x = jnp.where(recent[..., None], ring.astype(dtype), x)
  return x


def store(spec: ArraySpec, policy: Policy, full: jax.Array, dtype) -> dict:
  """full [B, G, S, W] -> the stored form of the whole array (every block quantised afresh)."""
  n = spec.name
  if spec.mode == "plain":
    return {n: full.astype(dtype)}
  if spec.mode == "bf16":
    return {n: full.astype(jnp.bfloat16)}
  fn = quant.quantize_tokens if spec.mode == "token" else quant.quantize_channels
  codes, scale, zero = fn(full, policy.bits, policy.group)
  return {f"{n}_q": quant.pack(codes, policy.bits), f"{n}_s": scale, f"{n}_z": zero}


def write_slot(layer: dict, spec: ArraySpec, policy: Policy, slot, new, dtype) -> dict:
  """Writes new [B, G, W] at slot [B, G] -> the updated stored arrays. A per-channel array
  re-quantises the block of `group` slots holding `slot` (new min / max per channel)."""
  n = spec.name
  b, g = jnp.arange(slot.shape[0])[:, None], jnp.arange(slot.shape[1])[None, :]
  if spec.mode in ("plain", "bf16"):
    return {n: layer[n].at[b, g, slot].set(new.astype(layer[n].dtype))}
  if spec.mode == "token":
    codes, scale, zero = quant.quantize_tokens(new, policy.bits, policy.group)
    return {f"{n}_q": layer[f"{n}_q"].at[b, g, slot].set(quant.pack(codes, policy.bits)),
            f"{n}_s": layer[f"{n}_s"].at[b, g, slot].set(scale),
            f"{n}_z": layer[f"{n}_z"].at[b, g, slot].set(zero)}
  size, s = policy.group, layer[f"{n}_q"].shape[2]
  blk = slot // size  # [B, G]
  rows = blk[..., None] * size + jnp.arange(size)  # [B, G, group]
  inside = rows < s
  b3, g3 = b[..., None], g[..., None]
  codes = quant.unpack(layer[f"{n}_q"][b3, g3, jnp.minimum(rows, s - 1)], policy.bits, spec.width)
  scale, zero = layer[f"{n}_s"][b, g, blk], layer[f"{n}_z"][b, g, blk]  # [B, G, W]
  x = codes.astype(jnp.float32) * scale[:, :, None] + zero[:, :, None]  # [B, G, group, W]
  x = jnp.where((rows == slot[..., None])[..., None], new[:, :, None].astype(jnp.float32), x)
  lo = jnp.where(inside[..., None], x, jnp.inf).min(2)
  hi = jnp.where(inside[..., None], x, -jnp.inf).max(2)
  codes, scale, zero = quant._quant(x, lo[:, :, None], hi[:, :, None], policy.bits)
  drop = jnp.where(inside, rows, s)  # rows past the last slot are not written
  return {f"{n}_q": layer[f"{n}_q"].at[b3, g3, drop].set(quant.pack(codes, policy.bits),
                                                          mode="drop"),
          f"{n}_s": layer[f"{n}_s"].at[b, g, blk].set(scale[:, :, 0]),
          f"{n}_z": layer[f"{n}_z"].at[b, g, blk].set(zero[:, :, 0])}


def write_ring(layer: dict, spec: ArraySpec, policy: Policy, new, n_seen) -> dict:
  """new [B, G, T, W] (true positions n_seen + t) -> the ring with its last Wr tokens written."""
  wr = policy.fp_recent
  t = new.shape[2]
  keep = min(t, wr)
  idx = (n_seen[:, None] + jnp.arange(t - keep, t)) % wr  # [B, keep]
  b = jnp.arange(new.shape[0])[:, None]
  ring = layer[f"{spec.name}_r"]
  # [B, keep, G, W] values scattered at [b, :, idx]: move the slot axis next to batch.
  upd = jnp.moveaxis(new[:, :, t - keep:].astype(ring.dtype), 2, 1)
  return {f"{spec.name}_r": jnp.moveaxis(jnp.moveaxis(ring, 2, 1).at[b, idx].set(upd), 1, 2)}


def stored_bytes_per_slot(cfg: ModelConfig, policy: Policy) -> dict:
  """Bytes one slot costs per layer and group, split into the cached values (codes, scales and
  zero points included) and the policy's bookkeeping (pos, rot, score, aux)."""
  dt = jnp.dtype(cfg.kv_cache_dtype).itemsize
  values = 0.0
  for spec in array_specs(cfg, policy):
    mode = "plain" if spec.mode == "bf16" else spec.mode
    values += quant.bytes_per_slot(spec.width, mode, policy.bits, policy.group,
                                   2 if spec.mode == "bf16" else dt)
  return {"values": values, "bookkeeping": float(sum(jnp.dtype(d).itemsize
                                                     for _, d in BOOKKEEPING))}


def cache_bytes(cache: BudgetCache) -> int:
  """Bytes of every array the cache holds (codes, scales, rings, bookkeeping; lengths excluded)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache.layers))
