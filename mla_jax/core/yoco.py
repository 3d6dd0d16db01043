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

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax.core import attention as attn
from mla_jax.core import cache as cache_lib
from mla_jax.core.attention import GQAttention, causal_attention, causal_probs, write_after
from mla_jax.core.config import ModelConfig
from mla_jax.core.layers import RMSNorm, apply_rope, dense, param, rope_angles

_NEG = -1e30  # finite "minus infinity", as attention.py masks


@flax.struct.dataclass
class RingCache:
  """One self-decoder layer: k, v [B, W', G, K] (keys rotated), W' = min(W, S) slots."""
  k: jax.Array
  v: jax.Array

  @property
  def axes(self):
    return RingCache(k=cache_lib.KV_AXES, v=cache_lib.KV_AXES)


def init_layers(cfg: ModelConfig, batch: int, s: int) -> tuple:
  """(RingCache per self-decoder layer) + (global cache,) for `batch` sequences of s slots."""
  dt, k = cfg.kv_cache_dtype, cfg.qk_head_dim
  ring = (batch, min(cfg.yoco_window, s), cfg.kv_heads, k)
  windows = tuple(RingCache(k=jnp.zeros(ring, dt), v=jnp.zeros(ring, dt))
                  for _ in range(cfg.n_layers // 2))
  if cfg.yoco_latent:
    glob = cache_lib.LatentCache(c=jnp.zeros((batch, s, cfg.kv_lora_rank), dt),
                                 k_rope=jnp.zeros((batch, s, cfg.qk_rope_head_dim), dt))
  else:
    shape = (batch, s, cfg.yoco_global_kv_heads, k)
    glob = cache_lib.KVCache(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt))
  return windows + (glob,)


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

  def __call__(self, x, positions, cache: RingCache | None = None, lengths=None, n_valid=None):
    """x [B, T, D], positions [B, T] -> (out [B, T, D], RingCache or None). n_valid [B]: how many
    of the T tokens to write into the ring (the rest are padding; default all)."""
    cfg, dt = self.cfg, self.cfg.compute_dtype
    c = lambda p: p[...].astype(dt)
    q, k, v = dense(x, c(self.wq)), dense(x, c(self.wk)), dense(x, c(self.wv))
    cos, sin = rope_angles(positions, cfg.qk_head_dim, cfg.rope_theta)
    q, k = apply_rope(q, cos, sin, cfg.rope_layout), apply_rope(k, cos, sin, cfg.rope_layout)
    b, t, h, kd = q.shape
    g, w = k.shape[2], cfg.yoco_window
    q = q.reshape(b, t, g, h // g, kd)
    scores = lambda keys, rows=slice(None): jnp.einsum(
        "BTGMK,BSGK->BGMTS", q[:, rows], keys, preferred_element_type=jnp.float32) * kd ** -0.5
    attend = lambda values, probs: jnp.einsum("BSGK,BGMTS->BTGMK", values, probs.astype(dt))
    out_proj = lambda o: dense(o.reshape(b, t, h, kd), c(self.wo), n_in=2)
    if cache is None:
      def window_scores(rows, end):  # causal_attention adds the causal mask
        near = jnp.arange(rows.start, rows.stop)[:, None] - jnp.arange(end) < w
        return jnp.where(near, scores(k[:, :end], rows), _NEG)
      o = causal_attention(t, cfg.attn_block, window_scores,
                           lambda end, probs: attend(v[:, :end], probs))
      return out_proj(o), None
    k, v = cache_lib.as_stored(k, cache.k), cache_lib.as_stored(v, cache.v)
    held = ring_positions(lengths, cache.k.shape[1])  # [B, W']
    old_ok = (held[:, None] >= 0) & (positions[:, :, None] - held[:, None] < w)  # [B, T, W']
    tt = jnp.arange(t)
    new_ok = (tt[:, None] >= tt) & (tt[:, None] - tt < w)  # [T, T]
    logits = jnp.concatenate([jnp.where(old_ok[:, None, None], scores(cache.k.astype(dt)), _NEG),
                              jnp.where(new_ok, scores(k), _NEG)], axis=-1)
    probs = jax.nn.softmax(logits, axis=-1)
    ring = cache.k.shape[1]
    out = out_proj(attend(cache.v.astype(dt), probs[..., :ring]) + attend(v, probs[..., ring:]))
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

  def __call__(self, x, positions):
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

  def __call__(self, x, positions, new, past=None, lengths=None):
    """x [B, T, D] -> out [B, T, D]. new: GlobalKV's pair for these T tokens; past: the global
    cache before this call (lengths [B] slots filled) or None (the T tokens attend causally to
    themselves)."""
    cfg, dt = self.cfg, self.cfg.compute_dtype
    w = lambda p: p[...].astype(dt)
    if cfg.yoco_latent:
      return self._latent(x, positions, new, past, lengths)
    q = apply_rope(dense(x, w(self.wq)), *rope_angles(positions, cfg.qk_head_dim, cfg.rope_theta),
                   cfg.rope_layout)
    k, v = new
    b, t, h, kd = q.shape
    g = k.shape[2]
    q = q.reshape(b, t, g, h // g, kd)
    scores = lambda keys, rows=slice(None): jnp.einsum(
        "BTGMK,BSGK->BGMTS", q[:, rows], keys, preferred_element_type=jnp.float32) * kd ** -0.5
    attend = lambda values, probs: jnp.einsum("BSGK,BGMTS->BTGMK", values, probs.astype(dt))
    if past is None:
      o = causal_attention(t, cfg.attn_block, lambda rows, end: scores(k[:, :end], rows),
                           lambda end, probs: attend(v[:, :end], probs))
    else:
      p_old, p_new = causal_probs(scores(k), scores(past.k.astype(dt)), lengths)
      o = attend(past.v.astype(dt), p_old) + attend(v, p_new)
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


def forward(model, x, positions, cache, n_valid, run):
  """The YOCO layers of model (a Transformer): x [B, T, D] embedded tokens -> (x [B, T, D] after
  the last layer, new cache layers or a tuple of None). run(block, x, positions, layer_cache,
  lengths, extra) runs one block (remat or not)."""
  cfg = model.cfg
  half = cfg.n_layers // 2
  lengths = None if cache is None else cache.lengths
  windows = []
  for i in range(half):
    layer_cache = None if cache is None else cache.layers[i]
    x, layer_cache = run(model.blocks[i], x, positions, layer_cache, lengths, n_valid)
    windows.append(layer_cache)
  new = model.yoco_kv(x, positions)  # the global entries of these T tokens, computed once
  past = None if cache is None else cache.layers[half]
  if past is not None:  # attend to what later tokens will read back
    new = tuple(cache_lib.as_stored(a, buf) for a, buf in zip(new, jax.tree.leaves(past)))
  for i in range(half, cfg.n_layers):
    x, _ = run(model.blocks[i], x, positions, past, lengths, new)
  if cache is None:
    return x, (None,) * (half + 1)
  # Written once, after every cross layer has read the old cache (in place when donated).
  flat = [a.reshape(a.shape[:2] + buf.shape[2:]) for a, buf in zip(new, jax.tree.leaves(past))]
  written = jax.tree.unflatten(jax.tree.structure(past),
                               [write_after(buf, a, lengths, x)
                                for a, buf in zip(flat, jax.tree.leaves(past))])
  return x, tuple(windows) + (written,)
