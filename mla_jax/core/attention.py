"""Attention: one GQA module for MHA / GQA / MQA, and DeepSeek's Multi-head Latent Attention.

Both take x [B, T, D] and positions [B, T] and return [B, T, D]. With a layer cache, the T new
tokens attend over two key blocks, the cache AS PASSED IN (S slots, before this call's write) and
the new tokens themselves, with one softmax over both; the new tokens are then written into the
returned cache (slots `lengths[b] + t`). Attention never reads the written buffer, so the write
only feeds the returned cache and can update a donated input in place (reading the written buffer
made XLA:CPU copy the whole cache several times per step: scripts/bench_decode.py); cache.after
orders the write after the reads. Scores and softmax are float32 whatever the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax.core import cache as cache_lib
from mla_jax.core.config import ModelConfig
from mla_jax.core.layers import RMSNorm, apply_rope, dense, param, rope_angles

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
    probs = jax.nn.softmax(jnp.where(visible, scores(slice(start, end), end), _NEG), axis=-1)
    outs.append(attend(end, probs))
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


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

  def __call__(self, x, positions, cache: cache_lib.KVCache | None = None, lengths=None):
    cfg, dt = self.cfg, self.cfg.compute_dtype
    c = lambda p: p[...].astype(dt)
    q = dense(x, c(self.wq))  # [B, T, H, K]
    k = dense(x, c(self.wk))  # [B, T, G, K]
    v = dense(x, c(self.wv))
    cos, sin = rope_angles(positions, cfg.qk_head_dim, cfg.rope_theta)
    q = apply_rope(q, cos, sin, cfg.rope_layout)
    k = apply_rope(k, cos, sin, cfg.rope_layout)
    b, t, h, kd = q.shape
    g = k.shape[2]
    q = q.reshape(b, t, g, h // g, kd)  # M = H / G query heads per kv head
    scores = lambda keys, rows=slice(None): jnp.einsum(
        "BTGMK,BSGK->BGMTS", q[:, rows], keys, preferred_element_type=jnp.float32) * kd ** -0.5
    # Operand order matters on XLA:CPU: with probs first, this decode-shaped dot (contracting the
    # long S axis) runs ~2-7x slower than with the cache first (scripts/bench_decode.py).
    attend = lambda values, probs: jnp.einsum("BSGK,BGMTS->BTGMK", values, probs.astype(dt))
    if cache is None:
      o = causal_attention(t, cfg.attn_block, lambda rows, end: scores(k[:, :end], rows),
                           lambda end, probs: attend(v[:, :end], probs))
    else:
      k, v = cache_lib.as_stored(k, cache.k), cache_lib.as_stored(v, cache.v)
      # With G > 1 the dots first relayout the cache to [B, G, S, K] (a full copy): tie each copy
      # to what it waits for, keys to k and values to the probs (see cache_lib.after).
      tie = cache_lib.after if g > 1 else lambda x, dep: x
      p_old, p_new = causal_probs(scores(k), scores(tie(cache.k.astype(dt), k)), lengths)
      o = attend(tie(cache.v.astype(dt), p_old), p_old) + attend(v, p_new)
      # The write only feeds the returned cache and waits for o: in place in a donated buffer.
      write = lambda buf, new: cache_lib.write(buf, cache_lib.after(new, o), lengths)
      cache = cache_lib.KVCache(k=write(cache.k, k), v=write(cache.v, v))
    return dense(o.reshape(b, t, h, kd), c(self.wo), n_in=2), cache


class MLAttention(nnx.Module):
  """Multi-head Latent Attention (DeepSeek-V2 section 2.1, names as in DeepSeek-V3's model.py).

  Keys and values come from one latent c = RMSNorm(x wkv_a[:, :C]) per token; positions enter
  through a decoupled rope part: R dims per query head and ONE rope key shared by all heads.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, h, std, dt = cfg.d_model, cfg.n_heads, cfg.init_std, cfg.params_dtype
    n, r, e, c, q = cfg.nope_dim, cfg.qk_rope_head_dim, cfg.v_dim, cfg.kv_lora_rank, cfg.q_lora_rank
    self.cfg = cfg
    if q:
      self.wq_a = param(rngs, (d, q), ("embed", "q_latent"), std, dt)
      self.q_norm = RMSNorm(q, cfg.norm_eps, dt, rngs)
      self.wq_b = param(rngs, (q, h, n + r), ("q_latent", "heads", "head_dim"), std, dt)
    else:
      self.wq = param(rngs, (d, h, n + r), ("embed", "heads", "head_dim"), std, dt)
    # Latent columns first, then the shared rope key (DeepSeek's kv_a_proj_with_mqa layout).
    self.wkv_a = param(rngs, (d, c + r), ("embed", "kv_latent"), std, dt)
    self.kv_norm = RMSNorm(c, cfg.norm_eps, dt, rngs)
    # Per head: W_UK (first N outputs) then W_UV (last E outputs).
    self.wkv_b = param(rngs, (c, h, n + e), ("kv_latent", "heads", "head_dim"), std, dt)
    self.wo = param(rngs, (h, e, d), ("heads", "head_dim", "embed"), std / (2 * cfg.n_layers) ** .5,
                    dt)

  def __call__(self, x, positions, cache: cache_lib.LatentCache | None = None, lengths=None,
               impl: str | None = None):
    """impl overrides the config's path choice ('naive' | 'absorbed'); both give the same output."""
    cfg, dt = self.cfg, self.cfg.compute_dtype
    n, r = cfg.nope_dim, cfg.qk_rope_head_dim
    w = lambda p: p[...].astype(dt)
    if cfg.q_lora_rank:
      q = dense(self.q_norm(dense(x, w(self.wq_a))), w(self.wq_b))  # [B, T, H, N + R]
    else:
      q = dense(x, w(self.wq))
    q_nope, q_rope = q[..., :n], q[..., n:]
    kv = dense(x, w(self.wkv_a))
    latent, k_rope = self.kv_norm(kv[..., :cfg.kv_lora_rank]), kv[..., cfg.kv_lora_rank:]
    cos, sin = rope_angles(positions, r, cfg.rope_theta)
    q_rope = apply_rope(q_rope, cos, sin, cfg.rope_layout)
    k_rope = apply_rope(k_rope, cos, sin, cfg.rope_layout)
    if impl is None:
      one_token = cache is not None and x.shape[1] == 1
      impl = cfg.mla_decode_impl if one_token else cfg.mla_prefill_impl
    w_uk, w_uv = w(self.wkv_b)[..., :n], w(self.wkv_b)[..., n:]
    scale = (n + r) ** -0.5
    f32 = jnp.float32
    rope_scores = lambda k_r, rows: jnp.einsum("BTHR,BSR->BHTS", q_rope[:, rows], k_r,
                                               preferred_element_type=f32)
    # keys_of(c, k_rope) and values_of(c) give what scores and attend read for latents c [B, S, C].
    if impl == "naive":
      # Rebuild per-head keys and values from every latent: H*(N+E) numbers per slot.
      keys_of = lambda c_, k_r: (dense(c_, w_uk), k_r)  # [B, S, H, N], [B, S, R]
      values_of = lambda c_: dense(c_, w_uv)  # [B, S, H, E]

      def scores(keys, rows=slice(None)):  # -> [B, H, T, S]
        nope = jnp.einsum("BTHN,BSHN->BHTS", q_nope[:, rows], keys[0], preferred_element_type=f32)
        return (nope + rope_scores(keys[1], rows)) * scale

      def attend(values, probs):  # -> [B, T, H, E]
        return jnp.einsum("BHTS,BSHE->BTHE", probs.astype(dt), values)
    else:
      # Absorbed: fold W_UK into the query and apply W_UV after attending, so attention runs over
      # the C-wide latents directly, like MQA with one shared key [c; k_rope] and value c.
      q_latent = jnp.einsum("BTHN,CHN->BTHC", q_nope, w_uk)
      keys_of, values_of = lambda c_, k_r: (c_, k_r), lambda c_: c_

      def scores(keys, rows=slice(None)):
        nope = jnp.einsum("BTHC,BSC->BHTS", q_latent[:, rows], keys[0], preferred_element_type=f32)
        return (nope + rope_scores(keys[1], rows)) * scale

      def attend(values, probs):  # -> [B, T, H, C]; W_UV is applied once, after both blocks
        # Cache operand first: ~3.5x faster on XLA:CPU than "BHTS,BSC->BTHC" (see GQAttention).
        return jnp.einsum("BSC,BHTS->BTHC", values, probs.astype(dt))
    if cache is None:
      keys, values = keys_of(latent, k_rope), values_of(latent)
      o = causal_attention(x.shape[1], cfg.attn_block,
                           lambda rows, end: scores(tuple(a[:, :end] for a in keys), rows),
                           lambda end, probs: attend(values[:, :end], probs))
    else:
      latent = cache_lib.as_stored(latent, cache.c)
      k_rope = cache_lib.as_stored(k_rope, cache.k_rope)
      old_c = cache.c.astype(dt)
      # Naive decompresses the whole cache: tie those copies as GQAttention ties its relayouts.
      tie = cache_lib.after if impl == "naive" else lambda x, dep: x
      p_old, p_new = causal_probs(scores(keys_of(latent, k_rope)),
                                  scores(keys_of(tie(old_c, latent), cache.k_rope.astype(dt))),
                                  lengths)
      o = attend(values_of(tie(old_c, p_old)), p_old) + attend(values_of(latent), p_new)
      write = lambda buf, new: cache_lib.write(buf, cache_lib.after(new, o), lengths)
      cache = cache_lib.LatentCache(c=write(cache.c, latent), k_rope=write(cache.k_rope, k_rope))
    if impl != "naive":
      o = jnp.einsum("BTHC,CHE->BTHE", o, w_uv)
    return dense(o, w(self.wo), n_in=2), cache
