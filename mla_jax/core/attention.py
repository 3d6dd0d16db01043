"""Attention: one GQA module for MHA / GQA / MQA, and DeepSeek's Multi-head Latent Attention.

Both take x [B, T, D] and positions [B, T] and return [B, T, D]. With a layer cache, the T new
tokens attend over two key blocks, the cache AS PASSED IN (S slots, before this call's write) and
the new tokens themselves, with one softmax over both; the new tokens are then written into the
returned cache (slots `lengths[b] + t`). Attention never reads the written buffer, so the write
only feeds the returned cache and can update a donated input in place (reading the written buffer
made XLA:CPU copy the whole cache several times per step: scripts/bench_decode.py); `write_after`
orders the write after the reads. Scores and softmax are float32 whatever the compute dtype.

Einsum letters: B batch, T query length, S key / cache length, D width, H heads, G kv heads, M heads
per kv head, K head dim, N nope dim, R rope dim, E value dim, C latent.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax.core import cache as cache_lib
from mla_jax.core import decode_sharded, probes
from mla_jax.core.cache import schedule_after
from mla_jax.core.config import ModelConfig
from mla_jax.core.layers import RMSNorm, apply_rope, dense, param, rope_angles
from mla_jax.core.layers import rope_scores as _rope_scores
from mla_jax.kernels import mla_decode

_NEG = -1e30  # finite "minus infinity": a fully masked row stays NaN-free


def causal_probs(new: jax.Array, old: jax.Array, lengths: jax.Array):
  """One softmax over the keys [old cache slots; new tokens] -> (old probs, new probs).

  new [B, ..., T, T] float32 scores of the new tokens against themselves: query t sees t' <= t.
  old [B, ..., T, S] float32 scores against the cache before this call's write: slot s is visible
  iff s < lengths[b] (later slots may hold stale right-padding).
  The scores are concatenated (small: [.., T, S + T]), not the keys, so the cache is never copied.
  """
  t, s = new.shape[-1], old.shape[-1]
  new = jnp.where(jnp.tril(jnp.ones((t, t), bool)), new, _NEG)
  filled = jnp.arange(s) < lengths.reshape(lengths.shape + (1,) * (old.ndim - 1))  # [B, 1.., S]
  probs = jax.nn.softmax(jnp.concatenate([jnp.where(filled, old, _NEG), new], axis=-1), axis=-1)
  return probs[..., :s], probs[..., s:]


def causal_attention(t: int, block: int, scores, attend) -> jax.Array:
  """Attention of T tokens over themselves (no cache), one query block at a time.

  scores(rows, end) -> [B, ..., len(rows), end] float32 scores of the queries in slice `rows`
  against keys [0, end); attend(end, probs) -> [B, len(rows), ...] the probs-weighted values
  [0, end). Query block [i, i + block) only scores keys [0, i + block): the masked keys after its
  block are never computed, (n + 1) / 2n of the T x T scores for n blocks. block 0: one block.
  """
  outs = []
  for start in range(0, t, block or t):
    end = min(start + (block or t), t)
    visible = jnp.arange(end) <= jnp.arange(start, end)[:, None]  # [rows, end]
    logits = jnp.where(visible, scores(slice(start, end), end), _NEG)
    probes.record("max_logit", logits.max())  # training health (no-op unless probing)
    probs = jax.nn.softmax(logits, axis=-1)
    outs.append(attend(end, probs))
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def write_after(buffer: jax.Array, new: jax.Array, lengths: jax.Array, out: jax.Array):
  """buffer [B, S, ...] with new [B, T, ...] written at slots lengths[b] + t, once the layer's
  output out [B, T, D] exists. out needs every read of the old buffer, so the write comes after
  them and XLA updates a donated buffer in place instead of copying it (cache.schedule_after)."""
  return cache_lib.write(buffer, schedule_after(new, out), lengths)


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


def fused_causal_attention(q, k, v, scale: float, impl: str) -> jax.Array:
  """Causal self-attention of T tokens through jax.nn.dot_product_attention ('xla' | 'cudnn').

  q [B, T, H, K], k [B, T, G, K], v [B, T, G, E] (query head h reads kv head h // (H / G), as
  GQAttention groups them) -> [B, T, H, E]. The function needs one head dim for q, k and v: when
  E != K (MLA) the narrower side is zero-padded, which changes no score (zeros add nothing to
  q . k) and no output column that is kept (the padded value columns are sliced off).
  """
  kd, e = q.shape[-1], v.shape[-1]
  width = max(kd, e)
  pad = lambda x: x if x.shape[-1] == width else jnp.pad(
      x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])
  out = jax.nn.dot_product_attention(pad(q), pad(k), pad(v.astype(k.dtype)), scale=scale,
                                     is_causal=True, implementation=impl)
  return out[..., :e]


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

  def __call__(self, x, positions, cache: cache_lib.KVCache | None = None, lengths=None):
    """x [B, T, D], positions [B, T] -> (out [B, T, D], cache); cache as in MLAttention."""
    cfg, dt = self.cfg, self.cfg.compute_dtype
    c = lambda p: p[...].astype(dt)
    q, k, v = self._project(x, positions)
    probes.record("q_rms", probes.rms(q))
    probes.record("k_rms", probes.rms(k))
    b, t, h, kd = q.shape
    g = k.shape[2]
    q = q.reshape(b, t, g, h // g, kd)  # M = H / G query heads per kv head
    scores = lambda keys, rows=slice(None): jnp.einsum(
        "BTGMK,BSGK->BGMTS", q[:, rows], keys, preferred_element_type=jnp.float32) * kd ** -0.5
    # Operand order matters on XLA:CPU: with probs first, this decode-shaped dot (contracting the
    # long S axis) runs ~2-7x slower than with the cache first (scripts/bench_decode.py).
    attend = lambda values, probs: jnp.einsum("BSGK,BGMTS->BTGMK", values, probs.astype(dt))
    out_proj = lambda o: dense(o.reshape(b, t, h, kd), c(self.wo), n_in=2)
    if cache is None:
      impl = resolve_attn_impl(cfg.attn_impl, dt, (kd,))
      if impl != "blocked" and not probes.active():  # probes read the blocked path's max logit
        o = fused_causal_attention(q.reshape(b, t, h, kd), k, v, kd ** -0.5, impl)
        return out_proj(o), None
      o = causal_attention(t, cfg.attn_block, lambda rows, end: scores(k[:, :end], rows),
                           lambda end, probs: attend(v[:, :end], probs))
      return out_proj(o), None
    k, v = cache_lib.as_stored(k, cache.k), cache_lib.as_stored(v, cache.v)
    plan = decode_sharded.current()
    if plan is not None and plan.shards_sequence:  # cache length split over the mesh
      o, new_cache = decode_sharded.gqa_attend(plan, q, k, v, cache, lengths, kd ** -0.5, dt)
      return out_proj(o), new_cache
    # With G > 1 the dots first relayout the cache to [B, G, S, K] (a full copy): tie each copy to
    # what it waits for, keys to k and values to the probs (see cache.schedule_after).
    tie = schedule_after if g > 1 else lambda x, dep: x
    p_old, p_new = causal_probs(scores(k), scores(tie(cache.k.astype(dt), k)), lengths)
    out = out_proj(attend(tie(cache.v.astype(dt), p_old), p_old) + attend(v, p_new))
    return out, cache_lib.KVCache(k=write_after(cache.k, k, lengths, out),
                                  v=write_after(cache.v, v, lengths, out))


# Multi-head Latent Attention ----------------------------------------------------------------------
# The projections are one method (MLAttention._project); attention itself is one of three functions
# with the same arguments and result: mla_naive (the paper's equations), mla_absorbed (the
# matrix-absorbed form for decode) and mla_pallas (mla_absorbed with its cached block as one fused
# kernel, kernels/mla_decode.py). All take the new tokens' queries q_nope [B, T, H, N], q_rope
# [B, T, H, R], latents c [B, T, C] and rope key k_rope [B, T, R], and wkv_b [C, H, N + E] (per
# head W_UK, then W_UV), and return o [B, T, H, E] (before wo). Without `past` the T tokens attend
# causally to themselves, `block` queries at a time (causal_attention); with past = (c [B, S, C],
# k_rope [B, S, R]), the cache before this call with lengths [B] slots filled, they attend over
# [past; new tokens] with one softmax (causal_probs).


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
  and values of E dims (fused_causal_attention pads them to one width).
  """
  n, dt = q_nope.shape[-1], wkv_b.dtype
  w_uk, w_uv = wkv_b[..., :n], wkv_b[..., n:]  # [C, H, N], [C, H, E]
  scale = (n + q_rope.shape[-1]) ** -0.5

  def scores(k_c, k_r, rows=slice(None)):  # [B, S, H, N], [B, S, R] -> [B, H, T, S]
    nope = jnp.einsum("BTHN,BSHN->BHTS", q_nope[:, rows], k_c, preferred_element_type=jnp.float32)
    return (nope + _rope_scores(q_rope[:, rows], k_r)) * scale

  attend = lambda v, probs: jnp.einsum("BHTS,BSHE->BTHE", probs.astype(dt), v)  # -> [B, T, H, E]
  if past is None:
    k_c, v = dense(c, w_uk), dense(c, w_uv)  # [B, T, H, N], [B, T, H, E]
    if fused:
      q = jnp.concatenate([q_nope, q_rope], axis=-1)  # [B, T, H, N + R]
      k = jnp.concatenate([k_c, _rope_key_per_head(k_rope, q_nope.shape[2]).astype(dt)], axis=-1)
      return fused_causal_attention(q, k, v, scale, fused)
    return causal_attention(q_nope.shape[1], block,
                            lambda rows, end: scores(k_c[:, :end], k_rope[:, :end], rows),
                            lambda end, probs: attend(v[:, :end], probs))
  c_old, k_rope_old = past
  # Decompressing the cache makes full [B, S, H, *] copies: tie each to what it waits for, keys to
  # the new latents and values to the probs (see cache.schedule_after), as GQA ties its relayouts.
  p_old, p_new = causal_probs(scores(dense(c, w_uk), k_rope),
                              scores(dense(schedule_after(c_old, c), w_uk), k_rope_old), lengths)
  return attend(dense(schedule_after(c_old, p_old), w_uv), p_old) + attend(dense(c, w_uv), p_new)


def mla_absorbed(q_nope, q_rope, c, k_rope, wkv_b, *, block=0, past=None, lengths=None,
                 fused=None):
  """The same attention with W_UK folded into the query and W_UV applied after attending, so it
  runs over the C-wide latents directly, like MQA with one shared key [c; k_R] and value c:

    q~[t, h] = W_UK,h^T q_N[t, h]                                           [B, T, H, C]
    s[h, t, j] = (q~[t, h] . c_j + q_R[t, h] . k_R[j]) * (N + R)^-1/2
    o~[t, h] = sum_j softmax_j(s[h, t]) c_j                                 [B, T, H, C]
    o[t, h] = W_UV,h o~[t, h]                                               [B, T, H, E]

  Equal to mla_naive: q_N . (W_UK c) = (W_UK^T q_N) . c and sum_j p_j W_UV c_j = W_UV sum_j p_j c_j.
  Reads C + R numbers per slot and nothing per head: the decode path. fused ('xla' | 'cudnn'),
  without past and with one shared rope key: jax.nn.dot_product_attention as MQA, one kv head
  with key [c ; k_R] (C + R dims) and value c (C dims).
  """
  n, dt = q_nope.shape[-1], wkv_b.dtype
  w_uk, w_uv = wkv_b[..., :n], wkv_b[..., n:]  # [C, H, N], [C, H, E]
  scale = (n + q_rope.shape[-1]) ** -0.5
  q_c = jnp.einsum("BTHN,CHN->BTHC", q_nope, w_uk)

  def scores(c_, k_r, rows=slice(None)):  # [B, S, C], [B, S, R] -> [B, H, T, S]
    nope = jnp.einsum("BTHC,BSC->BHTS", q_c[:, rows], c_, preferred_element_type=jnp.float32)
    return (nope + _rope_scores(q_rope[:, rows], k_r)) * scale

  # Cache operand first: ~3.5x faster on XLA:CPU than "BHTS,BSC->BTHC" (see GQAttention).
  attend = lambda c_, probs: jnp.einsum("BSC,BHTS->BTHC", c_, probs.astype(dt))  # -> [B, T, H, C]
  if past is None and fused and k_rope.ndim == 3:
    q = jnp.concatenate([q_c, q_rope], axis=-1)  # [B, T, H, C + R]
    k = jnp.concatenate([c, k_rope], axis=-1)[:, :, None]  # [B, T, 1, C + R]
    o = fused_causal_attention(q, k, c[:, :, None], scale, fused)  # [B, T, H, C]
  elif past is None:
    o = causal_attention(q_nope.shape[1], block,
                         lambda rows, end: scores(c[:, :end], k_rope[:, :end], rows),
                         lambda end, probs: attend(c[:, :end], probs))
  else:
    c_old, k_rope_old = past
    p_old, p_new = causal_probs(scores(c, k_rope), scores(c_old, k_rope_old), lengths)
    o = attend(c_old, p_old) + attend(c, p_new)
  return jnp.einsum("BTHC,CHE->BTHE", o, w_uv)  # W_UV once, after both key blocks


def mla_pallas(q_nope, q_rope, c, k_rope, wkv_b, *, block=0, past=None, lengths=None):
  """mla_absorbed with the cached block as one fused Pallas kernel that reads each cached latent
  once (kernels/mla_decode.py; on CPU it runs in interpret mode: slow, for tests). The kernel
  returns the unnormalised softmax partial (o~, max, sum) over the filled slots; the new tokens'
  own block (causal among themselves) is merged with it by the same log-sum-exp combine.
  past may be stored in another dtype than the queries: the kernel casts each tile as it reads it.
  Without past (training, prefill without a cache) this is mla_absorbed.
  """
  if past is None:
    return mla_absorbed(q_nope, q_rope, c, k_rope, wkv_b, block=block)
  n, dt = q_nope.shape[-1], wkv_b.dtype
  w_uk, w_uv = wkv_b[..., :n], wkv_b[..., n:]  # [C, H, N], [C, H, E]
  scale = (n + q_rope.shape[-1]) ** -0.5
  q_c = jnp.einsum("BTHN,CHN->BTHC", q_nope, w_uk)
  b, t, h, latent = q_c.shape
  # Every new token sees the same filled slots, so the T x H queries are the kernel's heads.
  o_old, m_old, l_old = mla_decode.mla_decode_partial(
      q_c.reshape(b, t * h, latent), q_rope.reshape(b, t * h, -1), *past, lengths, scale)
  new = (jnp.einsum("BTHC,BSC->BHTS", q_c, c, preferred_element_type=jnp.float32)
         + _rope_scores(q_rope, k_rope)) * scale  # [B, H, T, T]
  new = jnp.where(jnp.tril(jnp.ones((t, t), bool)), new, _NEG)
  m_new = new.max(axis=-1)
  p_new = jnp.exp(new - m_new[..., None])
  o_new = jnp.einsum("BSC,BHTS->BTHC", c, p_new.astype(dt)).astype(jnp.float32)
  to_bth = lambda x: jnp.moveaxis(x, 1, 2)  # [B, H, T] -> [B, T, H]
  o, _, l = mla_decode.combine_partials(
      jnp.stack([o_old.reshape(b, t, h, latent), o_new], axis=1),
      jnp.stack([m_old.reshape(b, t, h), to_bth(m_new)], axis=1),
      jnp.stack([l_old.reshape(b, t, h), to_bth(p_new.sum(axis=-1))], axis=1))
  return jnp.einsum("BTHC,CHE->BTHE", (o / l[..., None]).astype(dt), w_uv)


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

  def __call__(self, x, positions, cache: cache_lib.LatentCache | None = None, lengths=None,
               impl: str | None = None):
    """x [B, T, D], positions [B, T] -> (out [B, T, D], cache).

    cache: this layer's LatentCache (S slots, lengths [B] of them filled) or None. The new tokens
    attend over the filled slots and themselves, then are written at slots lengths[b] + t of the
    returned cache. impl ('naive' | 'absorbed' | 'pallas' | 'auto') overrides the config's choice,
    mla_decode_impl for one-token steps with a cache and mla_prefill_impl otherwise; all give the
    same output ('auto': resolve_mla_impl).
    """
    cfg, dt = self.cfg, self.cfg.compute_dtype
    q_nope, q_rope, latent, k_rope, wkv_b = self._project(x, positions)
    if probes.active():  # training health: the latent after kv_norm, queries, the rope key
      probes.record("latent_rms", probes.rms(latent))
      probes.record("q_rms", probes.rms(jnp.concatenate([q_nope, q_rope], axis=-1)))
      probes.record("k_rope_rms", probes.rms(k_rope))
    if impl is None:
      one_token = cache is not None and x.shape[1] == 1
      impl = cfg.mla_decode_impl if one_token else cfg.mla_prefill_impl
    impl = resolve_mla_impl(impl, 0 if cache is None else cache.c.shape[1])
    if impl == "pallas" and cfg.mla_rope_kv_heads > 1:  # the kernel reads one shared rope key
      impl = "absorbed"
    attention = MLA_PATHS[impl]
    wo = self.wo[...].astype(dt)
    if cache is None:
      kw = {}
      if attention is not mla_pallas:
        n, r, e = cfg.nope_dim, cfg.qk_rope_head_dim, cfg.v_dim
        dims = (max(n + r, e),) if attention is mla_naive else (cfg.kv_lora_rank + r,)
        fused = resolve_attn_impl(cfg.attn_impl, dt, dims)
        if fused != "blocked" and not probes.active():  # probes read the blocked max logit
          kw["fused"] = fused
      o = attention(q_nope, q_rope, latent, k_rope, wkv_b, block=cfg.attn_block, **kw)
      return dense(o, wo, n_in=2), None
    latent = cache_lib.as_stored(latent, cache.c)
    k_rope = cache_lib.as_stored(k_rope, cache.k_rope)
    plan = decode_sharded.current()
    if plan is not None and plan.shards_sequence:  # cache length split: absorbed, per shard
      n = cfg.nope_dim
      q_c = jnp.einsum("BTHN,CHN->BTHC", q_nope, wkv_b[..., :n])
      o, new_cache = decode_sharded.mla_attend(plan, q_c, q_rope, latent, k_rope, cache, lengths,
                                               (n + cfg.qk_rope_head_dim) ** -0.5, dt)
      return dense(jnp.einsum("BTHC,CHE->BTHE", o, wkv_b[..., n:]), wo, n_in=2), new_cache
    past = (cache.c, cache.k_rope)  # the kernel casts tiles as it reads them: no converted copy
    if attention is not mla_pallas:
      past = (cache.c.astype(dt), cache.k_rope.astype(dt))
    if k_rope.ndim == 4:  # per-group rope keys: cached flat [B, S, G_R * R]
      past = (past[0], past[1].reshape(past[1].shape[:2] + k_rope.shape[2:]))
    o = attention(q_nope, q_rope, latent, k_rope, wkv_b, past=past, lengths=lengths)
    out = dense(o, wo, n_in=2)
    k_flat = k_rope.reshape(k_rope.shape[:2] + (-1,))  # [B, T, R] or [B, T, G_R * R]
    return out, cache_lib.LatentCache(c=write_after(cache.c, latent, lengths, out),
                                      k_rope=write_after(cache.k_rope, k_flat, lengths, out))
