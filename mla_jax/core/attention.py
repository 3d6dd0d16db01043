"""Attention: one GQA module for MHA / GQA / MQA, and DeepSeek's Multi-head Latent Attention.

Both take x [B, T, D] and positions [B, T] and return [B, T, D]. With a layer cache, the T new
tokens attend over two key blocks, the cache AS PASSED IN (S slots, before this call's write) and
the new tokens themselves, with one softmax over both; the new tokens are then written into the
returned cache (slots `lengths[b] + t`). Attention never reads the written buffer, so the write
only feeds the returned cache and can update a donated input in place (reading the written buffer
made XLA:CPU copy the whole cache several times per step: scripts/bench_decode.py); `write_after`
(core/ties.py) orders the write after the reads. The math itself is core/ops.py's; a DecodePlan
that splits the cache length hands the cached attention to core/decode_sharded.py.

Einsum letters: B batch, T query length, S key / cache length, D width, H heads, G kv heads, M heads
per kv head, K head dim, N nope dim, R rope dim, E value dim, C latent.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax.core import cache as cache_lib
from mla_jax.core import decode_sharded, ops, probes
from mla_jax.core.config import ModelConfig
from mla_jax.core.layers import RMSNorm, apply_rope, dense, param, rope_angles
from mla_jax.core.ties import schedule_after, write_after
from mla_jax.kernels import mla_decode


def resolve_attn_impl(impl: str, dtype, dims: tuple[int, ...]) -> str:
  """cfg.attn_impl -> 'blocked' | 'xla' | 'cudnn'. 'auto': cuDNN's fused kernel on a GPU when the
  compute dtype is bfloat16 / float16 and every padded head dim `dims` is a multiple of 8 and at
  most 128 (what cuDNN's flash attention takes), XLA's dot_product_attention on a TPU (a splash
  kernel is not wired in), and the blocked einsums elsewhere: on XLA:CPU they were measured
  faster (scripts/bench_train.py) and skip the masked half of the scores. Not yet measured on a
  GPU or TPU."""
  if impl != "auto":
    return impl
  backend = jax.default_backend()
  if backend == "gpu":
    ok = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and all(d % 8 == 0 and d <= 128
                                                                  for d in dims)
    return "cudnn" if ok else "blocked"
  return "xla" if backend == "tpu" else "blocked"


class GQAttention(nnx.Module):
  """H query heads share G key/value heads: G = H is MHA, G = 1 is MQA."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, h, g, k, std, dt = (cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.qk_head_dim, cfg.init_std,
                           cfg.params_dtype)
    self.cfg = cfg
    self.wq = param(rngs, (d, h, k), ("embed", "heads", "head_dim"), std, dt)
    self.wk = param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), std, dt)
    self.wv = param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), std, dt)
    self.wo = param(rngs, (h, k, d), ("heads", "head_dim", "embed"), std / (2 * cfg.n_layers) ** .5,
                    dt)
    if cfg.qk_norm:  # one learned scale [K] each, shared by the heads
      self.q_norm = RMSNorm(k, cfg.norm_eps, dt, rngs)
      self.k_norm = RMSNorm(k, cfg.norm_eps, dt, rngs)

  def _project(self, x, positions):
    """x [B, T, D], positions [B, T] -> q [B, T, H, K], k [B, T, G, K] (both rotated; with
    qk_norm RMS-normalised per head first), v [B, T, G, K]."""
    cfg, dt = self.cfg, self.cfg.compute_dtype
    c = lambda p: p[...].astype(dt)
    q = dense(x, c(self.wq))  # [B, T, H, K]
    k = dense(x, c(self.wk))  # [B, T, G, K]
    v = dense(x, c(self.wv))
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    cos, sin = rope_angles(positions, cfg.qk_head_dim, cfg.rope_theta)
    return apply_rope(q, cos, sin, cfg.rope_layout), apply_rope(k, cos, sin, cfg.rope_layout), v

  @staticmethod
  def init_cache(cfg: ModelConfig, batch: int, slots: int) -> cache_lib.KVCache:
    """Zeros for `batch` sequences of `slots` tokens: k, v [B, S, G, K]."""
    shape = (batch, slots, cfg.kv_heads, cfg.qk_head_dim)
    return cache_lib.KVCache(k=jnp.zeros(shape, cfg.kv_cache_dtype),
                             v=jnp.zeros(shape, cfg.kv_cache_dtype))

  def __call__(self, x, positions, cache: cache_lib.KVCache | None = None, lengths=None, *,
               plan=None):
    """x [B, T, D], positions [B, T] -> (out [B, T, D], cache); cache as in MLAttention. plan: a
    DecodePlan (core/decode_plan.py) whose sequence axis splits the cache, or None."""
    cfg, dt = self.cfg, self.cfg.compute_dtype
    q, k, v = self._project(x, positions)
    probes.record("q_rms", probes.rms(q))
    probes.record("k_rms", probes.rms(k))
    b, t, h, kd = q.shape
    g, scale = k.shape[2], kd ** -0.5
    q = q.reshape(b, t, g, h // g, kd)  # M = H / G query heads per kv head
    out_proj = lambda o: dense(o.reshape(b, t, h, kd), self.wo[...].astype(dt), n_in=2)
    if cache is None:
      impl = resolve_attn_impl(cfg.attn_impl, dt, (kd,))
      if impl != "blocked" and not probes.active():  # probes read the blocked path's max logit
        return out_proj(ops.fused_causal_attention(q.reshape(b, t, h, kd), k, v, scale, impl)), None
      o = ops.causal_attention(t, cfg.attn_block,
                               lambda rows, end: ops.gqa_scores(q[:, rows], k[:, :end], scale),
                               lambda end, probs: ops.gqa_attend(v[:, :end], probs, dt))
      return out_proj(o), None
    k, v = cache_lib.as_stored(k, cache.k), cache_lib.as_stored(v, cache.v)
    if plan is not None and plan.shards_sequence:  # cache length split over the mesh
      o, new_cache = decode_sharded.gqa_attend(plan, q, k, v, cache, lengths, scale, dt)
      return out_proj(o), new_cache
    # With G > 1 the dots first relayout the cache to [B, G, S, K] (a full copy): tie each copy to
    # what it waits for, keys to k and values to the probs (core/ties.py).
    tie = schedule_after if g > 1 else lambda x, dep: x
    s_new = ops.gqa_scores(q, k, scale)
    p_old, p_new = ops.cached_probs(ops.gqa_scores(q, tie(cache.k.astype(dt), k), scale), s_new,
                                    lengths)
    out = out_proj(ops.gqa_attend(tie(cache.v.astype(dt), p_old), p_old, dt)
                   + ops.gqa_attend(v, p_new, dt))
    return out, cache_lib.KVCache(k=write_after(cache.k, k, lengths, out),
                                  v=write_after(cache.v, v, lengths, out))


# Multi-head Latent Attention ----------------------------------------------------------------------
# The projections are one method (MLAttention._project); attention itself is one of two functions
# with the same arguments and result: mla_naive (the paper's equations) and mla_absorbed (W_UK
# absorbed into the query, then a latent backend over [c ; k_R], then W_UV). The latent backends:
# latent_einsum (ops' einsums; jax.nn.dot_product_attention with `fused`), latent_pallas (the
# cached block as one fused kernel, kernels/mla_decode.py), decode_sharded.latent_attend (a
# sequence-split cache) and kvcompress/decode.py's budget cache. mla_naive and mla_absorbed take
# the new tokens' queries q_nope [B, T, H, N], q_rope [B, T, H, R], latents c [B, T, C] and rope
# key k_rope [B, T, R], and wkv_b [C, H, N + E] (per head W_UK, then W_UV), and return
# o [B, T, H, E] (before wo). Without `past` the T tokens attend causally to themselves, `block`
# queries at a time (ops.causal_attention); with past = (c [B, S, C], k_rope [B, S, R]), the cache
# before this call with lengths [B] slots filled, they attend over [past; new tokens] with one
# softmax (ops.cached_probs).


def _rope_key_per_head(k_rope: jax.Array, h: int) -> jax.Array:
  """The rope key(s) [B, T, R] or [B, T, G, R] -> [B, T, H, R], query head h's own copy."""
  if k_rope.ndim == 3:
    return jnp.broadcast_to(k_rope[:, :, None], k_rope.shape[:2] + (h, k_rope.shape[-1]))
  return jnp.repeat(k_rope, h // k_rope.shape[2], axis=2)


def mla_naive(q_nope, q_rope, c, k_rope, wkv_b, *, block=0, past=None, lengths=None,
              fused=None):
  """MLA as DeepSeek-V2 section 2.1 writes it: per-head keys and values rebuilt from the latents.

    k_C[j, h] = W_UK,h c_j      v[j, h] = W_UV,h c_j
    s[h, t, j] = (q_N[t, h] . k_C[j, h] + q_R[t, h] . k_R[j]) * (N + R)^-1/2
    o[t, h] = sum_j softmax_j(s[h, t]) v[j, h]                                    -> [B, T, H, E]

  Rebuilds H * (N + E) numbers per slot: for training and prefill, where T ~ S; 20x slower than
  mla_absorbed at 16k decode (scripts/bench_decode.py). fused ('xla' | 'cudnn'), without past:
  the causal attention runs in jax.nn.dot_product_attention over keys [k_C ; k_R] of N + R dims
  and values of E dims (ops.fused_causal_attention pads them to one width).
  """
  n, dt = q_nope.shape[-1], wkv_b.dtype
  w_uk, w_uv = wkv_b[..., :n], wkv_b[..., n:]  # [C, H, N], [C, H, E]
  scale = (n + q_rope.shape[-1]) ** -0.5

  def scores(k_c, k_r, rows=slice(None)):  # [B, S, H, N], [B, S, R] -> [B, H, T, S]
    nope = jnp.einsum("BTHN,BSHN->BHTS", q_nope[:, rows], k_c, preferred_element_type=jnp.float32)
    return (nope + ops.rope_scores(q_rope[:, rows], k_r)) * scale

  attend = lambda v, probs: jnp.einsum("BHTS,BSHE->BTHE", probs.astype(dt), v)  # -> [B, T, H, E]
  if past is None:
    k_c, v = dense(c, w_uk), dense(c, w_uv)  # [B, T, H, N], [B, T, H, E]
    if fused:
      q = jnp.concatenate([q_nope, q_rope], axis=-1)  # [B, T, H, N + R]
      k = jnp.concatenate([k_c, _rope_key_per_head(k_rope, q_nope.shape[2]).astype(dt)], axis=-1)
      return ops.fused_causal_attention(q, k, v, scale, fused)
    return ops.causal_attention(q_nope.shape[1], block,
                                lambda rows, end: scores(k_c[:, :end], k_rope[:, :end], rows),
                                lambda end, probs: attend(v[:, :end], probs))
  c_old, k_rope_old = past
  # Decompressing the cache makes full [B, S, H, *] copies: tie each to what it waits for, keys to
  # the new latents and values to the probs (core/ties.py), as GQA ties its relayouts.
  s_new = scores(dense(c, w_uk), k_rope)
  p_old, p_new = ops.cached_probs(scores(dense(schedule_after(c_old, c), w_uk), k_rope_old), s_new,
                                  lengths)
  return attend(dense(schedule_after(c_old, p_old), w_uv), p_old) + attend(dense(c, w_uv), p_new)


def mla_absorbed(q_nope, q_rope, c, k_rope, wkv_b, *, block=0, past=None, lengths=None,
                 fused=None, backend=None):
  """The same attention with W_UK folded into the query and W_UV applied after attending, so it
  runs over the C-wide latents directly, like MQA with one shared key [c; k_R] and value c:

    q~[t, h] = W_UK,h^T q_N[t, h]                                           [B, T, H, C]
    s[h, t, j] = (q~[t, h] . c_j + q_R[t, h] . k_R[j]) * (N + R)^-1/2
    o~[t, h] = sum_j softmax_j(s[h, t]) c_j                                 [B, T, H, C]
    o[t, h] = W_UV,h o~[t, h]                                               [B, T, H, E]

  Equal to mla_naive: q_N . (W_UK c) = (W_UK^T q_N) . c and sum_j p_j W_UV c_j = W_UV sum_j p_j c_j.
  Reads C + R numbers per slot and nothing per head: the decode path. The middle two lines are
  the latent backend (default latent_einsum; latent_pallas).
  """
  n, dt = q_nope.shape[-1], wkv_b.dtype
  w_uk, w_uv = wkv_b[..., :n], wkv_b[..., n:]  # [C, H, N], [C, H, E]
  scale = (n + q_rope.shape[-1]) ** -0.5
  o = (backend or latent_einsum)(ops.absorb_query(q_nope, w_uk), q_rope, c, k_rope, scale, dt,
                                 block=block, past=past, lengths=lengths, fused=fused)
  return ops.expand_values(o, w_uv)  # W_UV once, after both key blocks


def latent_einsum(q_c, q_rope, c, k_rope, scale, dt, *, block=0, past=None, lengths=None,
                  fused=None):
  """Absorbed attention over latents: q_c [B, T, H, C], q_rope [B, T, H, R], the new tokens'
  c [B, T, C] and k_rope [B, T, R] (or [B, T, G_R, R]), past as mla_absorbed's -> o~ [B, T, H, C]
  in dt. fused ('xla' | 'cudnn'), without past and with one shared rope key:
  jax.nn.dot_product_attention as MQA, one kv head with key [c ; k_R] (C + R dims) and value c."""
  if past is None and fused and k_rope.ndim == 3:
    q = jnp.concatenate([q_c, q_rope], axis=-1)  # [B, T, H, C + R]
    k = jnp.concatenate([c, k_rope], axis=-1)[:, :, None]  # [B, T, 1, C + R]
    return ops.fused_causal_attention(q, k, c[:, :, None], scale, fused)  # [B, T, H, C]
  if past is None:
    return ops.causal_attention(
        q_c.shape[1], block,
        lambda rows, end: ops.latent_scores(q_c[:, rows], q_rope[:, rows], c[:, :end],
                                            k_rope[:, :end], scale),
        lambda end, probs: ops.latent_attend(c[:, :end], probs, dt))
  c_old, k_rope_old = past
  s_new = ops.latent_scores(q_c, q_rope, c, k_rope, scale)
  p_old, p_new = ops.cached_probs(ops.latent_scores(q_c, q_rope, c_old, k_rope_old, scale), s_new,
                                  lengths)
  return ops.latent_attend(c_old, p_old, dt) + ops.latent_attend(c, p_new, dt)


def latent_pallas(q_c, q_rope, c, k_rope, scale, dt, *, block=0, past=None, lengths=None,
                  fused=None):
  """latent_einsum with the cached block as one fused Pallas kernel that reads each cached latent
  once (kernels/mla_decode.py; on CPU it runs in interpret mode: slow, for tests). The kernel
  returns the unnormalised softmax partial (o~, max, sum) over the filled slots; the new tokens'
  own block (causal among themselves) is merged with it by the same log-sum-exp combine.
  past may be stored in another dtype than the queries: the kernel casts each tile as it reads it.
  Without past (training, prefill without a cache) this is latent_einsum's blocked path."""
  del fused  # the kernel is decode-only; without past the einsums run unfused
  if past is None:
    return latent_einsum(q_c, q_rope, c, k_rope, scale, dt, block=block)
  b, t, h, latent = q_c.shape
  # Every new token sees the same filled slots, so the T x H queries are the kernel's heads.
  o_old, m_old, l_old = mla_decode.mla_decode_partial(
      q_c.reshape(b, t * h, latent), q_rope.reshape(b, t * h, -1), *past, lengths, scale)
  o_new, m_new, l_new = ops.partial(
      ops.latent_scores(q_c, q_rope, c, k_rope, scale), ops.causal_mask(t),
      lambda p: ops.latent_attend(c, p, dt).astype(jnp.float32))  # m, l [B, H, T]
  to_bth = lambda x: jnp.moveaxis(x, 1, 2)  # [B, H, T] -> [B, T, H]
  o = ops.merge_partials([(o_old.reshape(b, t, h, latent), m_old.reshape(b, t, h),
                           l_old.reshape(b, t, h)), (o_new, to_bth(m_new), to_bth(l_new))])
  return o.astype(dt)


def mla_pallas(q_nope, q_rope, c, k_rope, wkv_b, **kw):
  """mla_absorbed with the latent_pallas backend."""
  return mla_absorbed(q_nope, q_rope, c, k_rope, wkv_b, backend=latent_pallas, **kw)


MLA_PATHS = {"naive": mla_naive, "absorbed": mla_absorbed, "pallas": mla_pallas}


def resolve_mla_impl(impl: str, seq_len: int) -> str:
  """'auto' -> 'pallas' where the compiled kernel runs (one GPU, S >= 16: kernels/mla_decode.py
  `supported`), else 'absorbed'. With several devices the cache may be sharded, which the kernel
  does not handle (it would gather the cache), so auto keeps the einsums there."""
  if impl != "auto":
    return impl
  single = jax.device_count() == 1
  return "pallas" if single and mla_decode.supported(seq_len) else "absorbed"


class MLAttention(nnx.Module):
  """Multi-head Latent Attention (DeepSeek-V2 section 2.1, names as in DeepSeek-V3's model.py).

  Keys and values come from one latent c = RMSNorm(x wkv_a[:, :C]) per token; positions enter
  through a decoupled rope part: R dims per query head and ONE rope key shared by all heads.
  MHA2MLA conversions may keep one rope key per KV group (cfg.mla_rope_kv_heads), per-layer RoPE
  frequencies (cfg.mla_rope_pairs, hence `layer`) and no latent norm (cfg.mla_latent_norm).
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layer: int = 0):
    d, h, std, dt = cfg.d_model, cfg.n_heads, cfg.init_std, cfg.params_dtype
    n, r, e, c, q = cfg.nope_dim, cfg.qk_rope_head_dim, cfg.v_dim, cfg.kv_lora_rank, cfg.q_lora_rank
    up_std = lambda fan_in: (std * (d / fan_in) ** .5 if cfg.mla_up_init_fan_in
                             else cfg.mla_up_init_std or std)
    self.cfg = cfg
    if q:
      self.wq_a = param(rngs, (d, q), ("embed", "q_latent"), std, dt)
      self.q_norm = RMSNorm(q, cfg.norm_eps, dt, rngs)
      self.wq_b = param(rngs, (q, h, n + r), ("q_latent", "heads", "head_dim"), up_std(q), dt)
    else:
      self.wq = param(rngs, (d, h, n + r), ("embed", "heads", "head_dim"), std, dt)
    # Latent columns first, then the shared rope key (DeepSeek's kv_a_proj_with_mqa layout).
    self.wkv_a = param(rngs, (d, c + cfg.mla_rope_kv_heads * r), ("embed", "kv_latent"), std, dt)
    self.rope_pairs = cfg.mla_layer_rope_pairs(layer)  # static ints (or None), not a parameter
    self.kv_norm = RMSNorm(c, cfg.norm_eps, dt, rngs)
    # Per head: W_UK (first N outputs) then W_UV (last E outputs).
    self.wkv_b = param(rngs, (c, h, n + e), ("kv_latent", "heads", "head_dim"), up_std(c), dt)
    self.wo = param(rngs, (h, e, d), ("heads", "head_dim", "embed"), std / (2 * cfg.n_layers) ** .5,
                    dt)
    if cfg.qk_norm:  # learned scales: the absorbed query's [C], the rope query's and key's [R]
      self.q_absorbed_norm = RMSNorm(c, cfg.norm_eps, dt, rngs)
      self.q_rope_norm = RMSNorm(r, cfg.norm_eps, dt, rngs)
      self.k_rope_norm = RMSNorm(r, cfg.norm_eps, dt, rngs)

  def _qk_norm_nope(self, q_nope, wkv_b):
    """QK-norm of the content scores in a form both paths keep: with q~ = W_UK^T q_N [B, T, H, C]
    (per head) and its learned scale g [C], the score RMSNorm(q~) . c = (g * q~ / rms(q~)) . c is
    (q_N / rms(q~)) . (W_UK diag(g) c). So the query is divided by rms(q~) and W_UK's latent rows
    are scaled by g: mla_naive rebuilds keys with the scaled W_UK, mla_absorbed folds it into the
    query as before, and the cache (the latents) is unchanged. -> (q_nope, wkv_b)."""
    n = self.cfg.nope_dim
    w_uk = wkv_b[..., :n]  # [C, H, N]
    q_c = jnp.einsum("BTHN,CHN->BTHC", q_nope, w_uk, preferred_element_type=jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(q_c * q_c, axis=-1, keepdims=True) + self.cfg.norm_eps)
    g = self.q_absorbed_norm.scale[...].astype(wkv_b.dtype)
    return (q_nope * inv.astype(q_nope.dtype),
            jnp.concatenate([w_uk * g[:, None, None], wkv_b[..., n:]], axis=-1))

  def _project(self, x, positions):
    """x [B, T, D], positions [B, T] -> q_nope [B, T, H, N], q_rope [B, T, H, R] (rotated),
    latent [B, T, C] (normalised unless mla_latent_norm is off), k_rope [B, T, R] (rotated; one
    rope key for all heads) or, with mla_rope_kv_heads = G_R > 1, [B, T, G_R, R], and the
    up-projection wkv_b [C, H, N + E] the attention paths use (in the compute dtype; with qk_norm
    its W_UK carries the absorbed query's norm scale: _qk_norm_nope)."""
    cfg, dt = self.cfg, self.cfg.compute_dtype
    w = lambda p: p[...].astype(dt)
    n, c, r, g = cfg.nope_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.mla_rope_kv_heads
    # MLRA's latent scale: a normalised latent of rank Q or C enters its up-projection at the
    # scale of a D-wide one.
    scale = (lambda a, rank: a * (cfg.d_model / rank) ** .5) if cfg.mla_latent_scale else (
        lambda a, rank: a)
    if cfg.q_lora_rank:  # low-rank query: q = RMSNorm(x W_DQ) W_UQ
      q_latent = scale(self.q_norm(dense(x, w(self.wq_a))), cfg.q_lora_rank)
      q = dense(q_latent, w(self.wq_b))  # [B, T, H, N + R]
    else:
      q = dense(x, w(self.wq))
    kv = dense(x, w(self.wkv_a))  # [B, T, C + R] (or C + G_R * R)
    latent = self.kv_norm(kv[..., :c]) if cfg.mla_latent_norm else kv[..., :c]
    latent = scale(latent, c)
    q_nope, q_rope, k_rope, wkv_b = q[..., :n], q[..., n:], kv[..., c:], w(self.wkv_b)
    if cfg.qk_norm:
      q_nope, wkv_b = self._qk_norm_nope(q_nope, wkv_b)
      q_rope = self.q_rope_norm(q_rope)
      k_rope = self.k_rope_norm(k_rope.reshape(k_rope.shape[:-1] + (g, r))).reshape(k_rope.shape)
    if g == 1 and self.rope_pairs is None:  # DeepSeek's MLA
      cos, sin = rope_angles(positions, r, cfg.rope_theta)
      rope = lambda a: apply_rope(a, cos, sin, cfg.rope_layout)
      return q_nope, rope(q_rope), latent, rope(k_rope), wkv_b
    # Per-group frequencies [G_R, R/2], computed as rope_angles does (bit-identical for the same
    # pairs); query head h turns at its group's, h // (H / G_R).
    if self.rope_pairs is None:
      pairs, base = jnp.broadcast_to(jnp.arange(0, r // 2, dtype=jnp.float32), (g, r // 2)), r
    else:
      pairs, base = jnp.asarray(self.rope_pairs, jnp.float32), cfg.mla_rope_base_dim or r
    inv_freq = cfg.rope_theta ** (-(2 * pairs) / base)
    angles = positions.astype(jnp.float32)[..., None, None] * inv_freq  # [B, T, G_R, R/2]
    per_head = jnp.repeat(angles, cfg.n_heads // g, axis=2)  # [B, T, H, R/2]
    q_rope = apply_rope(q_rope, jnp.cos(per_head), jnp.sin(per_head), cfg.rope_layout)
    k_rope = k_rope.reshape(kv.shape[:-1] + (g, r))  # [B, T, G_R, R]
    k_rope = apply_rope(k_rope, jnp.cos(angles), jnp.sin(angles), cfg.rope_layout)
    return q_nope, q_rope, latent, k_rope if g > 1 else k_rope[..., 0, :], wkv_b

  @staticmethod
  def init_cache(cfg: ModelConfig, batch: int, slots: int) -> cache_lib.LatentCache:
    """Zeros for `batch` sequences of `slots` tokens: c [B, S, C], k_rope [B, S, G_R * R]."""
    dt = cfg.kv_cache_dtype
    return cache_lib.LatentCache(
        c=jnp.zeros((batch, slots, cfg.kv_lora_rank), dt),
        k_rope=jnp.zeros((batch, slots, cfg.mla_rope_kv_heads * cfg.qk_rope_head_dim), dt))

  def __call__(self, x, positions, cache: cache_lib.LatentCache | None = None, lengths=None, *,
               impl: str | None = None, plan=None):
    """x [B, T, D], positions [B, T] -> (out [B, T, D], cache).

    cache: this layer's LatentCache (S slots, lengths [B] of them filled) or None. The new tokens
    attend over the filled slots and themselves, then are written at slots lengths[b] + t of the
    returned cache. impl ('naive' | 'absorbed' | 'pallas' | 'auto') overrides the config's choice,
    mla_decode_impl for one-token steps with a cache and mla_prefill_impl otherwise; all give the
    same output ('auto': resolve_mla_impl). plan: as GQAttention's; a sequence-split cache runs
    the absorbed form per shard (decode_sharded.latent_attend) whatever impl says.
    """
    q_nope, q_rope, latent, k_rope, wkv_b = self._project(x, positions)
    _probe(q_nope, q_rope, latent, k_rope)
    impl = self._impl(impl, cache, x.shape[1])
    wo = self.wo[...].astype(self.cfg.compute_dtype)
    if cache is None:
      return dense(self._self_attention(impl, q_nope, q_rope, latent, k_rope, wkv_b), wo,
                   n_in=2), None
    latent = cache_lib.as_stored(latent, cache.c)
    k_rope = cache_lib.as_stored(k_rope, cache.k_rope)
    if plan is not None and plan.shards_sequence:  # cache length split: absorbed, per shard
      return self._sharded(plan, q_nope, q_rope, latent, k_rope, wkv_b, wo, cache, lengths)
    o = MLA_PATHS[impl](q_nope, q_rope, latent, k_rope, wkv_b, past=self._past(impl, cache, k_rope),
                        lengths=lengths)
    out = dense(o, wo, n_in=2)
    k_flat = k_rope.reshape(k_rope.shape[:2] + (-1,))  # [B, T, R] or [B, T, G_R * R]
    return out, cache_lib.LatentCache(c=write_after(cache.c, latent, lengths, out),
                                      k_rope=write_after(cache.k_rope, k_flat, lengths, out))

  def _impl(self, impl, cache, t: int) -> str:
    """The path: mla_decode_impl for one-token steps with a cache, else mla_prefill_impl (or the
    caller's impl), 'auto' resolved; the kernel reads one shared rope key only."""
    cfg = self.cfg
    if impl is None:
      impl = cfg.mla_decode_impl if cache is not None and t == 1 else cfg.mla_prefill_impl
    impl = resolve_mla_impl(impl, 0 if cache is None else cache.c.shape[1])
    return "absorbed" if impl == "pallas" and cfg.mla_rope_kv_heads > 1 else impl

  def _self_attention(self, impl, q_nope, q_rope, latent, k_rope, wkv_b):
    """No cache: the T tokens over themselves -> o [B, T, H, E]; through
    jax.nn.dot_product_attention where attn_impl resolves to it (not for the kernel's path)."""
    cfg, kw = self.cfg, {}
    if impl != "pallas":
      n, r, e = cfg.nope_dim, cfg.qk_rope_head_dim, cfg.v_dim
      dims = (max(n + r, e),) if impl == "naive" else (cfg.kv_lora_rank + r,)
      fused = resolve_attn_impl(cfg.attn_impl, cfg.compute_dtype, dims)
      if fused != "blocked" and not probes.active():  # probes read the blocked max logit
        kw["fused"] = fused
    return MLA_PATHS[impl](q_nope, q_rope, latent, k_rope, wkv_b, block=cfg.attn_block, **kw)

  def _past(self, impl, cache, k_rope):
    """The cache's (c, k_rope) for the paths: in the compute dtype (the kernel casts tiles as it
    reads them: no converted copy), per-group rope keys [B, S, G_R, R]."""
    past = (cache.c, cache.k_rope)
    if impl != "pallas":
      dt = self.cfg.compute_dtype
      past = (cache.c.astype(dt), cache.k_rope.astype(dt))
    if k_rope.ndim == 4:  # per-group rope keys: cached flat [B, S, G_R * R]
      past = (past[0], past[1].reshape(past[1].shape[:2] + k_rope.shape[2:]))
    return past

  def _sharded(self, plan, q_nope, q_rope, latent, k_rope, wkv_b, wo, cache, lengths):
    """Absorb, the sequence-sharded latent backend (which writes the cache on its shards), W_UV."""
    cfg, n = self.cfg, self.cfg.nope_dim
    o, new_cache = decode_sharded.latent_attend(
        plan, ops.absorb_query(q_nope, wkv_b[..., :n]), q_rope, latent, k_rope, cache, lengths,
        (n + cfg.qk_rope_head_dim) ** -0.5, cfg.compute_dtype)
    return dense(ops.expand_values(o, wkv_b[..., n:]), wo, n_in=2), new_cache


def _probe(q_nope, q_rope, latent, k_rope) -> None:
  """Training health: the latent after kv_norm, the queries, the rope key."""
  if probes.active():
    probes.record("latent_rms", probes.rms(latent))
    probes.record("q_rms", probes.rms(jnp.concatenate([q_nope, q_rope], axis=-1)))
    probes.record("k_rope_rms", probes.rms(k_rope))
