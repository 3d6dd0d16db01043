"""Group-wise integer quantisation of cache arrays (KIVI-style), and its bytes per token.

Asymmetric min/max quantisation: a group of values x gets zero = min(x), scale = (max - min) /
(2^bits - 1), codes round((x - zero) / scale) in [0, 2^bits - 1]; dequantised values are
zero + code * scale, so every value is off by at most scale / 2 (`error_bound`). Scales and zero
points are float32 (counted in the bytes). int4 codes are packed two per byte.

Two groupings, as KIVI does for keys and values:
  per token    ('token'):   a scale per `group` consecutive channels of one token (values; MLA's
                            latent, as DeepSeek-V3.2's FP8 cache scales each 128 latent values)
  per channel  ('channel'): a scale per channel for each block of `group` consecutive slots
                            (keys: their outlier channels would spoil a per-token scale)
Arrays are [..., S, W] (slots S, width W); a partial last group (or block) is allowed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SCALE_DTYPE = jnp.float32
SCALE_BYTES = 4  # scale + zero point: 2 * SCALE_BYTES per group


def levels(bits: int) -> int:
  return 2 ** bits - 1


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
  """Pads axis up to a multiple with its edge values (min / max stay those of the real ones)."""
  extra = -x.shape[axis] % multiple
  if not extra:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, extra)
  return jnp.pad(x, pad, mode="edge")


def _quant(x, lo, hi, bits):
  """x, lo, hi broadcastable float32 -> (codes uint8, scale, zero)."""
  scale = (hi - lo) / levels(bits)
  scale = jnp.where(scale > 0, scale, 1.0)  # a constant group: codes 0, exact
  codes = jnp.clip(jnp.round((x - lo) / scale), 0, levels(bits)).astype(jnp.uint8)
  return codes, scale.astype(SCALE_DTYPE), lo.astype(SCALE_DTYPE)


def quantize_tokens(x: jax.Array, bits: int, group: int):
  """x [..., W] -> codes uint8 [..., W] (unpacked), scale and zero [..., ceil(W / group)]."""
  w = x.shape[-1]
  g = _pad_to(x.astype(jnp.float32), -1, group).reshape(x.shape[:-1] + (-1, group))
  codes, scale, zero = _quant(g, g.min(-1, keepdims=True), g.max(-1, keepdims=True), bits)
  return codes.reshape(x.shape[:-1] + (-1,))[..., :w], scale[..., 0], zero[..., 0]


def dequantize_tokens(codes, scale, zero, group: int, dtype=jnp.float32) -> jax.Array:
  """Inverse of quantize_tokens: codes [..., W], scale / zero [..., ceil(W / group)] -> [..., W]."""
  w = codes.shape[-1]
  c = _pad_to(codes, -1, group).reshape(codes.shape[:-1] + (-1, group)).astype(jnp.float32)
  x = c * scale[..., None] + zero[..., None]
  return x.reshape(codes.shape[:-1] + (-1,))[..., :w].astype(dtype)


def quantize_channels(x: jax.Array, bits: int, group: int):
  """x [..., S, W] -> codes uint8 [..., S, W], scale and zero [..., ceil(S / group), W]: one
  scale per channel for each block of `group` slots."""
  s = x.shape[-2]
  g = _pad_to(x.astype(jnp.float32), -2, group)
  g = g.reshape(g.shape[:-2] + (-1, group, g.shape[-1]))  # [..., blocks, group, W]
  codes, scale, zero = _quant(g, g.min(-2, keepdims=True), g.max(-2, keepdims=True), bits)
  return codes.reshape(codes.shape[:-3] + (-1, codes.shape[-1]))[..., :s, :], scale[..., 0, :], \
      zero[..., 0, :]


def dequantize_channels(codes, scale, zero, group: int, dtype=jnp.float32) -> jax.Array:
  """Inverse of quantize_channels: codes [..., S, W], scale / zero [..., blocks, W]."""
  block = jnp.arange(codes.shape[-2]) // group  # slot -> its block
  x = codes.astype(jnp.float32) * scale[..., block, :] + zero[..., block, :]
  return x.astype(dtype)


def error_bound(scale: jax.Array) -> jax.Array:
  """Largest |dequantised - original| for values quantised with `scale`: half a step (plus
  float32 rounding)."""
  return scale / 2 * (1 + 1e-5) + 1e-7


def pack(codes: jax.Array, bits: int) -> jax.Array:
  """codes uint8 [..., W] -> stored bytes: int8 as is, int4 two per byte [..., ceil(W / 2)]."""
  if bits == 8:
    return codes
  c = _pad_to(codes, -1, 2) if codes.shape[-1] % 2 else codes
  return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack(stored: jax.Array, bits: int, width: int) -> jax.Array:
  """Inverse of pack: -> codes uint8 [..., width]."""
  if bits == 8:
    return stored
  both = jnp.stack([stored & 0xF, stored >> 4], axis=-1)
  return both.reshape(stored.shape[:-1] + (-1,))[..., :width]


def bytes_per_slot(width: int, mode: str, bits: int, group: int, dtype_bytes: int) -> float:
  """Bytes one slot of a [.., S, width] array costs, scales and zero points included.

  plain: width * dtype_bytes; token: ceil(width * bits / 8) + 2 * SCALE_BYTES * ceil(width /
  group); channel: ceil(width * bits / 8) + 2 * SCALE_BYTES * width / group (a block's scales
  shared by its `group` slots)."""
  if mode == "plain":
    return float(width * dtype_bytes)
  codes = -(-width * bits // 8)
  if mode == "token":
    return float(codes + 2 * SCALE_BYTES * -(-width // group))
  return codes + 2 * SCALE_BYTES * width / group
