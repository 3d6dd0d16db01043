"""YOCO, You Only Cache Once (arXiv 2405.05254): a decoder-decoder with one global cache.

    layers [0, L/2)   self-decoder: sliding-window self-attention over the last W tokens
                      (WindowAttention); cache: a ring buffer of min(W, S) slots per layer
    global K/V        from the self-decoder's output X, once per token for all later layers:
                      K = RMSNorm(X) W_K, V = RMSNorm(X) W_V (GlobalKV); with cfg.yoco_latent an
                      MLA latent instead, c = RMSNorm(RMSNorm(X) W_DKV), k_R = RoPE(RMSNorm(X) W_KR)
    layers [L/2, L)   cross-decoder: queries from each layer's own input attend causally to the
                      one global cache (CrossAttention); no cache of their own

Cache per sequence: L/2 * min(W, S) * 2 G K window elements (constant) + S * 2 G_x K
(or S * (C + R)) global elements, against S * L * 2 G K for the GQA family. The latent form is an
extra of this project: each cross layer has its own up-projection W_UK, W_UV of the one shared
latent, read with the same MLA paths (attention.MLA_PATHS: naive for prefill, absorbed for decode).

Cache layout (a core.cache.Cache): layers = (RingCache per self-decoder layer) + (the global
KVCache or LatentCache,); the cross-decoder layers have no entry. A ring slot j holds the newest
position p < lengths[b] with p = j mod ring (derived, not stored: the ring must then hold every
position written so far, which is why right-padded prefills pass n_valid, see Transformer.extend).

Axis letters: B batch, T new tokens, S cache slots, W window / ring slots, D width, H heads,
G kv heads, M heads per kv head, K head dim, N nope dim, R rope dim, E value dim, C latent.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax.core import attention as attn
from mla_jax.core import cache as cache_lib
from mla_jax.core import ops
from mla_jax.core.attention import GQAttention
from mla_jax.core.cache import RingCache
from mla_jax.core.config import ModelConfig
from mla_jax.core.layers import RMSNorm, apply_rope, dense, param, rope_angles


def ring_positions(lengths: jax.Array, ring: int) -> jax.Array:
  """lengths [B] -> [B, ring] position held by each slot (the newest p < lengths, p = slot mod
  ring), negative where the slot was never written."""
  last = lengths[:, None] - 1
  return last - jnp.mod(last - jnp.arange(ring), ring)


def ring_write(buf: jax.Array, new: jax.Array, lengths: jax.Array, n: jax.Array) -> jax.Array:
  """buf [B, W', ...] with the first n[b] of new [B, T, ...] written at positions lengths[b] + t,
  slot (position mod W'). A slot several new tokens map to keeps the newest; slots none map to
  keep their value. A whole-ring select, not a scatter: W' is small and T may exceed it."""
  ring = buf.shape[1]
  t_new = n[:, None] - 1 - jnp.mod(lengths[:, None] + n[:, None] - 1 - jnp.arange(ring), ring)
  idx = jnp.clip(t_new, 0).reshape(t_new.shape + (1,) * (new.ndim - 2))  # [B, W', 1..]
  picked = jnp.take_along_axis(new, idx, axis=1).astype(buf.dtype)
  return jnp.where((t_new >= 0).reshape(idx.shape), picked, buf)


class WindowAttention(GQAttention):
  """Sliding-window GQA: query t sees keys t' with t - W < t' <= t. Same parameters as
  GQAttention (wq, wk, wv, wo); only the mask and the cache differ."""

  @staticmethod
  def init_cache(cfg: ModelConfig, batch: int, slots: int) -> RingCache:
    """Zeros: k, v [B, W', G, K], a ring of W' = min(W, slots) slots."""
    ring = (batch, min(cfg.yoco_window, slots), cfg.kv_heads, cfg.qk_head_dim)
    return RingCache(k=jnp.zeros(ring, cfg.kv_cache_dtype), v=jnp.zeros(ring, cfg.kv_cache_dtype))

  def __call__(self, x, positions, cache: RingCache | None = None, lengths=None, *,
               n_valid=None):
    """x [B, T, D], positions [B, T] -> (out [B, T, D], RingCache or None). n_valid [B]: how many
    of the T tokens to write into the ring (the rest are padding; default all)."""
    cfg, dt = self.cfg, self.cfg.compute_dtype
    c = lambda p: p[...].astype(dt)
    q, k, v = dense(x, c(self.wq)), dense(x, c(self.wk)), dense(x, c(self.wv))
    cos, sin = rope_angles(positions, cfg.qk_head_dim, cfg.rope_theta)
    q, k = apply_rope(q, cos, sin, cfg.rope_layout), apply_rope(k, cos, sin, cfg.rope_layout)
    b, t, h, kd = q.shape
    g, w, scale = k.shape[2], cfg.yoco_window, kd ** -0.5
    q = q.reshape(b, t, g, h // g, kd)
    out_proj = lambda o: dense(o.reshape(b, t, h, kd), c(self.wo), n_in=2)
    if cache is None:
      def window_scores(rows, end):  # causal_attention adds the causal mask
        near = jnp.arange(rows.start, rows.stop)[:, None] - jnp.arange(end) < w
        return jnp.where(near, ops.gqa_scores(q[:, rows], k[:, :end], scale), ops.NEG)
      o = ops.causal_attention(t, cfg.attn_block, window_scores,
                               lambda end, probs: ops.gqa_attend(v[:, :end], probs, dt))
      return out_proj(o), None
    k, v = cache_lib.as_stored(k, cache.k), cache_lib.as_stored(v, cache.v)
    held = ring_positions(lengths, cache.k.shape[1])  # [B, W']
    old_ok = (held[:, None] >= 0) & (positions[:, :, None] - held[:, None] < w)  # [B, T, W']
    tt = jnp.arange(t)
    new_ok = (tt[:, None] >= tt) & (tt[:, None] - tt < w)  # [T, T]
    p_old, p_new = ops.two_block_probs(ops.gqa_scores(q, cache.k.astype(dt), scale),
                                       ops.gqa_scores(q, k, scale), old_ok[:, None, None], new_ok)
    out = out_proj(ops.gqa_attend(cache.v.astype(dt), p_old, dt) + ops.gqa_attend(v, p_new, dt))
    n = jnp.full((b,), t, jnp.int32) if n_valid is None else jnp.clip(n_valid, 0, t)
    return out, RingCache(k=ring_write(cache.k, k, lengths, n),
                          v=ring_write(cache.v, v, lengths, n))


class GlobalKV(nnx.Module):
  """The one global cache entry per token, from the self-decoder's output x [B, T, D]:
  k, v [B, T, G_x, K] (k rotated), or with yoco_latent c [B, T, C], k_rope [B, T, R]."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, std, dt = cfg.d_model, cfg.init_std, cfg.params_dtype
    self.cfg = cfg
    self.norm = RMSNorm(d, cfg.norm_eps, dt, rngs)
    if cfg.yoco_latent:
      c, r = cfg.kv_lora_rank, cfg.qk_rope_head_dim
      self.wkv_a = param(rngs, (d, c + r), ("embed", "kv_latent"), std, dt)
      self.kv_norm = RMSNorm(c, cfg.norm_eps, dt, rngs)
    else:
      g, k = cfg.yoco_global_kv_heads, cfg.qk_head_dim
      self.wk = param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), std, dt)
      self.wv = param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), std, dt)

  @staticmethod
  def init_cache(cfg: ModelConfig, batch: int, slots: int):
    """Zeros for the one global cache: KVCache k, v [B, S, G_x, K] or LatentCache c [B, S, C],
    k_rope [B, S, R]."""
    if cfg.yoco_latent:
      return attn.MLAttention.init_cache(cfg, batch, slots)
    shape = (batch, slots, cfg.yoco_global_kv_heads, cfg.qk_head_dim)
    return cache_lib.KVCache(k=jnp.zeros(shape, cfg.kv_cache_dtype),
                             v=jnp.zeros(shape, cfg.kv_cache_dtype))

  def __call__(self, x, positions):
    """-> these T tokens' global entries: (k, v) or (c, k_rope)."""
    cfg, dt = self.cfg, self.cfg.compute_dtype
    x = self.norm(x)
    if cfg.yoco_latent:
      c, r = cfg.kv_lora_rank, cfg.qk_rope_head_dim
      kv = dense(x, self.wkv_a[...].astype(dt))
      cos, sin = rope_angles(positions, r, cfg.rope_theta)
      return self.kv_norm(kv[..., :c]), apply_rope(kv[..., c:], cos, sin, cfg.rope_layout)
    cos, sin = rope_angles(positions, cfg.qk_head_dim, cfg.rope_theta)
    k = apply_rope(dense(x, self.wk[...].astype(dt)), cos, sin, cfg.rope_layout)
    return k, dense(x, self.wv[...].astype(dt))


class CrossAttention(nnx.Module):
  """A cross-decoder layer's attention: its own queries over the global keys / values of every
  position up to its own (causal), or over the global latent with its own W_UK, W_UV."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, h, std, dt = cfg.d_model, cfg.n_heads, cfg.init_std, cfg.params_dtype
    self.cfg = cfg
    out_std = std / (2 * cfg.n_layers) ** .5
    if cfg.yoco_latent:
      n, r, e, c, q = (cfg.nope_dim, cfg.qk_rope_head_dim, cfg.v_dim, cfg.kv_lora_rank,
                       cfg.q_lora_rank)
      up_std = cfg.mla_up_init_std or std
      if q:
        self.wq_a = param(rngs, (d, q), ("embed", "q_latent"), std, dt)
        self.q_norm = RMSNorm(q, cfg.norm_eps, dt, rngs)
        self.wq_b = param(rngs, (q, h, n + r), ("q_latent", "heads", "head_dim"), up_std, dt)
      else:
        self.wq = param(rngs, (d, h, n + r), ("embed", "heads", "head_dim"), std, dt)
      self.wkv_b = param(rngs, (c, h, n + e), ("kv_latent", "heads", "head_dim"), up_std, dt)
      self.wo = param(rngs, (h, e, d), ("heads", "head_dim", "embed"), out_std, dt)
    else:
      k = cfg.qk_head_dim
      self.wq = param(rngs, (d, h, k), ("embed", "heads", "head_dim"), std, dt)
      self.wo = param(rngs, (h, k, d), ("heads", "head_dim", "embed"), out_std, dt)

  def __call__(self, x, positions, cache=None, lengths=None, *, new):
    """x [B, T, D] -> (out [B, T, D], cache unchanged). new: GlobalKV's pair for these T tokens;
    cache: the global cache before this call (lengths [B] slots filled; read only, the model
    writes it once after every cross layer) or None (the T tokens attend causally to
    themselves)."""
    if self.cfg.yoco_latent:
      return self._latent(x, positions, new, cache, lengths), cache
    return self._kv(x, positions, new, cache, lengths), cache

  def _kv(self, x, positions, new, past, lengths):
    cfg, dt = self.cfg, self.cfg.compute_dtype
    w = lambda p: p[...].astype(dt)
    q = apply_rope(dense(x, w(self.wq)), *rope_angles(positions, cfg.qk_head_dim, cfg.rope_theta),
                   cfg.rope_layout)
    k, v = new
    b, t, h, kd = q.shape
    g, scale = k.shape[2], kd ** -0.5
    q = q.reshape(b, t, g, h // g, kd)
    if past is None:
      o = ops.causal_attention(t, cfg.attn_block,
                               lambda rows, end: ops.gqa_scores(q[:, rows], k[:, :end], scale),
                               lambda end, probs: ops.gqa_attend(v[:, :end], probs, dt))
    else:
      s_new = ops.gqa_scores(q, k, scale)
      p_old, p_new = ops.cached_probs(ops.gqa_scores(q, past.k.astype(dt), scale), s_new, lengths)
      o = ops.gqa_attend(past.v.astype(dt), p_old, dt) + ops.gqa_attend(v, p_new, dt)
    return dense(o.reshape(b, t, h, kd), w(self.wo), n_in=2)

  def _latent(self, x, positions, new, past, lengths):
    cfg, dt = self.cfg, self.cfg.compute_dtype
    w = lambda p: p[...].astype(dt)
    n, r = cfg.nope_dim, cfg.qk_rope_head_dim
    if cfg.q_lora_rank:
      q = dense(self.q_norm(dense(x, w(self.wq_a))), w(self.wq_b))  # [B, T, H, N + R]
    else:
      q = dense(x, w(self.wq))
    cos, sin = rope_angles(positions, r, cfg.rope_theta)
    q_nope, q_rope = q[..., :n], apply_rope(q[..., n:], cos, sin, cfg.rope_layout)
    one_token = past is not None and x.shape[1] == 1
    impl = cfg.mla_decode_impl if one_token else cfg.mla_prefill_impl
    attention = attn.MLA_PATHS[attn.resolve_mla_impl(impl, 0 if past is None else past.c.shape[1])]
    c, k_rope = new
    if past is None:
      o = attention(q_nope, q_rope, c, k_rope, w(self.wkv_b), block=cfg.attn_block)
    else:
      old = (past.c, past.k_rope)
      if attention is not attn.mla_pallas:  # the kernel casts tiles as it reads them
        old = (past.c.astype(dt), past.k_rope.astype(dt))
      o = attention(q_nope, q_rope, c, k_rope, w(self.wkv_b), past=old, lengths=lengths)
    return dense(o, w(self.wo), n_in=2)
