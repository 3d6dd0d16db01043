"""Fused absorbed-MLA decode attention as a Pallas kernel: each cached latent is read once.

The absorbed MLA decode (core/attention.py: mla_absorbed) is MQA with one C + R wide key [c; k_R]
and value c. As two einsums (scores over [c; k_R], then probs @ c) it reads the latent twice; this
kernel streams the cache in blocks of `block_s` slots and, per block, scores the absorbed queries
against [c; k_R], updates a running max and sum (online softmax) and accumulates probs @ c from the
same loaded block, so every latent leaves memory once per head block (once in all when the heads
fit one block, as the defaults arrange for H <= 64).

Grid (batch b, head block, split): split i covers the slots [i * split_len, (i + 1) * split_len)
and writes an unnormalised partial result over the visible ones (flash-decoding):
  m[h] = max_j s[h, j],  l[h] = sum_j exp(s[h, j] - m[h]),  o[h] = sum_j exp(s[h, j] - m[h]) c_j
with s[h, j] = (q~[h] . c_j + q_R[h] . k_R[j]) * scale, over slots j < lengths[b] (per-row fill
levels: ragged batches). Splits let small batches fill the GPU; core/ops.py's `combine_partials`
merges them with a log-sum-exp, the same merge a sequence-sharded cache needs across devices.

Shapes: q_latent [B, H, C] (W_UK already folded in), q_rope [B, H, R], c [B, S, C],
k_rope [B, S, R], lengths [B] int32. Any C, R, H and S >= 1: on GPU (Triton) the loaded tiles
must have power-of-two sides of at least 16, so heads, C and R are padded to such tiles by masked
loads (nothing is copied) and block_s is a power of two <= S; a block that would run past S is
shifted back to end at S, its already-counted slots masked. Scores and softmax are float32
whatever the cache dtype; cache tiles are cast to the query dtype in registers (the cache itself
is never converted).

On CPU (no GPU) the kernel runs in Pallas interpret mode: slow, but the same kernel, with the same
padding and masks, so the tests check what a GPU runs. TPU (Mosaic) is not implemented: its
masked loads and tile rules differ; `supported` says False there and "auto" keeps the einsums.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mla_jax.core import ops

_MIN_TILE = 16  # Triton's tl.dot needs every side >= 16
_TARGET_PROGRAMS = 264  # ~2 programs per SM on H100 / H200 (132 SMs): enough splits to fill them


def _pow2_at_least(x: int, floor: int = _MIN_TILE) -> int:
  return max(floor, pl.next_power_of_2(x))


def _pow2_at_most(x: int) -> int:
  return 1 << (max(x, 1).bit_length() - 1)


def default_interpret() -> bool:
  """Interpret mode unless the default backend is a GPU (the one compiled target)."""
  return jax.default_backend() != "gpu"


def supported(seq_len: int, *, backend: str | None = None) -> bool:
  """Whether the compiled kernel (not interpret mode) runs here: a GPU, and S >= 16 slots."""
  return (backend or jax.default_backend()) == "gpu" and seq_len >= _MIN_TILE


def default_block_h(heads: int) -> int:
  """Heads per program: all of them in one block (a power of two >= 16) up to 64; each head block
  reads the whole cache once, so more heads than 64 read it ceil(H / 64) times."""
  return min(64, _pow2_at_least(heads))


def default_block_s(seq_len: int, latent: int, itemsize: int, interpret: bool) -> int:
  """Slots per block: about 32 KiB of latent per tile (double-buffered by Triton), 16..128,
  a power of two <= S (S < 16 only in interpret mode)."""
  c_pad = _pow2_at_least(latent)
  block = min(128, max(_MIN_TILE, _pow2_at_most(32768 // (c_pad * itemsize))))
  return min(block, _pow2_at_most(seq_len)) if interpret or seq_len >= _MIN_TILE else block


def default_num_splits(batch: int, head_blocks: int, seq_len: int, block_s: int) -> int:
  """Enough splits that batch x head blocks x splits ~ 2 programs per SM, each split keeping at
  least 4 blocks of slots (a split's fixed cost is its q load and its partial write)."""
  want = -(-_TARGET_PROGRAMS // (batch * head_blocks))
  return max(1, min(want, seq_len // (4 * block_s)))


def _kernel(len_ref, q_ref, qr_ref, c_ref, kr_ref, o_ref, m_ref, l_ref, *, heads, latent, rope,
            block_s, split_len, scale):
  """One (batch row, head block, split): online softmax over the split's visible slots."""
  block_h, c_pad = q_ref.shape
  r_pad = qr_ref.shape[-1]
  seq_len = c_ref.shape[0]
  head_ok = pl.program_id(1) * block_h + jnp.arange(block_h) < heads  # [block_h]
  c_ok = jnp.arange(c_pad) < latent
  r_ok = jnp.arange(r_pad) < rope

  def load(ref, rows_ok, cols_ok, pad_rows, pad_cols):
    """ref's tile, zeros where a padded row / column has no data (masked loads read nothing)."""
    if not (pad_rows or pad_cols):
      return ref[...]
    mask = (rows_ok[:, None] if pad_rows else True) & (cols_ok[None, :] if pad_cols else True)
    return plgpu.load(ref, mask=mask, other=0)

  every_slot = jnp.ones((block_s,), bool)
  q = load(q_ref, head_ok, c_ok, heads % block_h, c_pad != latent)  # [block_h, C']
  q_r = load(qr_ref, head_ok, r_ok, heads % block_h, r_pad != rope)  # [block_h, R']
  # float32 inputs: exact float32 dots (Triton would otherwise use TF32).
  precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  dot = functools.partial(plgpu.dot, precision=precision)
  lo = pl.program_id(2) * split_len
  hi = jnp.minimum(jnp.minimum(lo + split_len, len_ref[()]), seq_len)

  def body(i, carry):
    o, m, l = carry
    first = lo + i * block_s  # this block's first new slot
    start = jnp.minimum(first, seq_len - block_s)  # shifted back so the tile ends by S
    rows = pl.ds(start, block_s)
    c_blk = load(c_ref.at[rows, :], every_slot, c_ok, False, c_pad != latent).astype(q.dtype)
    k_blk = load(kr_ref.at[rows, :], every_slot, r_ok, False, r_pad != rope).astype(q_r.dtype)
    s = (dot(q, c_blk, trans_b=True) + dot(q_r, k_blk, trans_b=True)) * scale  # [block_h, block_s]
    slot = start + jnp.arange(block_s)
    s = jnp.where(((slot >= first) & (slot < hi))[None, :], s, ops.NEG)
    m_next = jnp.maximum(m, s.max(axis=-1))
    correction = jnp.exp(m - m_next)
    p = jnp.exp(s - m_next[:, None])
    l = correction * l + p.sum(axis=-1)
    o = correction[:, None] * o + dot(p.astype(c_blk.dtype), c_blk)  # the same c tile: read once
    return o, m_next, l

  carry = (jnp.zeros((block_h, c_pad), jnp.float32), jnp.full((block_h,), ops.NEG, jnp.float32),
           jnp.zeros((block_h,), jnp.float32))
  o, m, l = jax.lax.fori_loop(0, pl.cdiv(jnp.maximum(hi - lo, 0), block_s), body, carry)

  if heads % block_h or c_pad != latent:
    plgpu.store(o_ref, o, mask=(head_ok[:, None] if heads % block_h else True) & c_ok[None, :])
  else:
    o_ref[...] = o
  if heads % block_h:
    plgpu.store(m_ref, m, mask=head_ok)
    plgpu.store(l_ref, l, mask=head_ok)
  else:
    m_ref[...] = m
    l_ref[...] = l


@functools.partial(jax.jit, static_argnames=("scale", "block_h", "block_s", "num_splits",
                                             "interpret", "num_warps", "num_stages"))
def mla_decode_partials(q_latent, q_rope, c, k_rope, lengths, scale: float, *, block_h=None,
                        block_s=None, num_splits=None, interpret=None, num_warps=4, num_stages=2):
  """The kernel: per-split partials (o [B, P, H, C] float32 unnormalised, m [B, P, H], l [B, P, H])
  over slots s < lengths[b] of c [B, S, C], k_rope [B, S, R]; P = num_splits.

  block_h: heads per program (default: default_block_h); block_s: slots per
  loaded tile (default: default_block_s); num_splits: splits of the cache length (default:
  default_num_splits on GPU, 1 in interpret mode); interpret: None -> default_interpret().
  """
  b, h, latent = q_latent.shape
  seq_len, rope = c.shape[1], k_rope.shape[-1]
  if interpret is None:
    interpret = default_interpret()
  if not interpret and jax.default_backend() != "gpu":
    raise NotImplementedError(f"mla_decode: no compiled kernel for {jax.default_backend()!r} "
                              "(GPU only); pass interpret=True or use the einsum path")
  block_h = block_h or default_block_h(h)
  block_s = block_s or default_block_s(seq_len, latent, c.dtype.itemsize, interpret)
  if not interpret and (block_s < _MIN_TILE or block_s & (block_s - 1) or block_s > seq_len
                        or block_h < _MIN_TILE or block_h & (block_h - 1)):
    raise ValueError(f"mla_decode on GPU needs block_s ({block_s}) and block_h ({block_h}) powers "
                     f"of two >= {_MIN_TILE}, block_s <= S ({seq_len})")
  block_s = min(block_s, seq_len)
  head_blocks = pl.cdiv(h, block_h)
  if num_splits is None:
    num_splits = 1 if interpret else default_num_splits(b, head_blocks, seq_len, block_s)
  split_len = pl.cdiv(pl.cdiv(seq_len, block_s), num_splits) * block_s
  c_pad, r_pad = _pow2_at_least(latent), _pow2_at_least(rope)

  kernel = functools.partial(_kernel, heads=h, latent=latent, rope=rope, block_s=block_s,
                             split_len=split_len, scale=scale)
  heads_spec = lambda width: pl.BlockSpec((None, block_h, width), lambda i, j, k: (i, j, 0))
  cache_spec = lambda width: pl.BlockSpec((None, seq_len, width), lambda i, j, k: (i, 0, 0))
  f32 = jnp.float32
  return pl.pallas_call(
      kernel,
      grid=(b, head_blocks, num_splits),
      in_specs=[pl.BlockSpec((None,), lambda i, j, k: (i,)),
                heads_spec(c_pad), heads_spec(r_pad), cache_spec(c_pad), cache_spec(r_pad)],
      out_specs=[pl.BlockSpec((None, None, block_h, c_pad), lambda i, j, k: (i, k, j, 0)),
                 pl.BlockSpec((None, None, block_h), lambda i, j, k: (i, k, j)),
                 pl.BlockSpec((None, None, block_h), lambda i, j, k: (i, k, j))],
      out_shape=[jax.ShapeDtypeStruct((b, num_splits, h, latent), f32),
                 jax.ShapeDtypeStruct((b, num_splits, h), f32),
                 jax.ShapeDtypeStruct((b, num_splits, h), f32)],
      compiler_params=None if interpret else plgpu.CompilerParams(num_warps=num_warps,
                                                                  num_stages=num_stages),
      interpret=interpret,
      name="mla_decode",
  )(lengths.astype(jnp.int32), q_latent, q_rope, c, k_rope)


def mla_decode_partial(q_latent, q_rope, c, k_rope, lengths, scale: float, **kw):
  """The kernel with its splits merged: (o [B, H, C] float32 unnormalised, m [B, H], l [B, H]),
  ready to merge (ops.combine_partials) with other key blocks, e.g. the decode step's own new
  token."""
  return ops.combine_partials(*mla_decode_partials(q_latent, q_rope, c, k_rope, lengths, scale,
                                                   **kw))


def mla_decode_attention(q_latent, q_rope, c, k_rope, lengths, scale: float, **kw):
  """softmax_j((q~ . c_j + q_R . k_R[j]) * scale) @ c over slots j < lengths[b]: o [B, H, C] in
  q_latent's dtype (accumulated in float32); rows with no visible slot give 0.

  Keywords: block_h, block_s, num_splits, interpret, num_warps, num_stages (mla_decode_partials).
  """
  o, _, l = mla_decode_partial(q_latent, q_rope, c, k_rope, lengths, scale, **kw)
  return ops.normalise(o, l).astype(q_latent.dtype)


def reference_partial(q_latent, q_rope, c, k_rope, lengths, scale: float):
  """Plain-JAX (o, m, l) as mla_decode_partial computes them, from core/ops.py's latent scores and
  partial (float32 values at full precision): the tests' reference."""
  f32 = jnp.float32
  s = ops.latent_scores(q_latent[:, None], q_rope[:, None], c.astype(q_latent.dtype),
                        k_rope.astype(q_rope.dtype), scale)[:, :, 0]  # [B, H, S]
  visible = (jnp.arange(c.shape[1]) < lengths[:, None])[:, None, :]  # [B, 1, S]
  return ops.partial(s, visible, lambda p: jnp.einsum("BSC,BHS->BHC", c.astype(f32), p,
                                                      precision=jax.lax.Precision.HIGHEST))
