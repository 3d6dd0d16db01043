"""Attention: one GQA module for MHA / GQA / MQA, and DeepSeek's Multi-head Latent Attention.

Both take x [B, T, D] and positions [B, T] and return [B, T, D]; with a layer cache they also write
the new tokens into it (at slots `lengths[b] + t`) and attend over the whole cache. Scores and
softmax are float32 whatever the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax import cache as cache_lib
from mla_jax.config import ModelConfig
from mla_jax.layers import RMSNorm, apply_rope, param, rope_angles

_NEG = -1e30  # finite "minus infinity": a fully masked row stays NaN-free


def causal_probs(scores: jax.Array, positions: jax.Array) -> jax.Array:
  """scores [B, ..., T, S] float32 -> probabilities, where query t sees slots s <= positions[b, t]."""
  visible = jnp.arange(scores.shape[-1]) <= positions[..., None]  # [B, T, S]
  visible = visible.reshape(visible.shape[:1] + (1,) * (scores.ndim - 3) + visible.shape[1:])
  return jax.nn.softmax(jnp.where(visible, scores, _NEG), axis=-1)


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
    q = jnp.einsum("BTD,DHK->BTHK", x, c(self.wq))
    k = jnp.einsum("BTD,DGK->BTGK", x, c(self.wk))
    v = jnp.einsum("BTD,DGK->BTGK", x, c(self.wv))
    cos, sin = rope_angles(positions, cfg.qk_head_dim, cfg.rope_theta)
    q = apply_rope(q, cos, sin, cfg.rope_layout)
    k = apply_rope(k, cos, sin, cfg.rope_layout)
    if cache is not None:
      cache = cache_lib.KVCache(k=cache_lib.write(cache.k, k, lengths),
                                v=cache_lib.write(cache.v, v, lengths))
      k, v = cache.k.astype(dt), cache.v.astype(dt)
    b, t, h, kd = q.shape
    g = k.shape[2]
    q = q.reshape(b, t, g, h // g, kd)  # M = H / G query heads per kv head
    scores = jnp.einsum("BTGMK,BSGK->BGMTS", q, k, preferred_element_type=jnp.float32)
    probs = causal_probs(scores * kd ** -0.5, positions).astype(dt)
    # Operand order matters on XLA:CPU: with probs first, this decode-shaped dot (contracting the
    # long S axis) runs ~2-7x slower than with the cache first (scripts/bench_decode.py).
    o = jnp.einsum("BSGK,BGMTS->BTGMK", v, probs).reshape(b, t, h, kd)
    return jnp.einsum("BTHK,HKD->BTD", o, c(self.wo)), cache


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
      q = jnp.einsum("BTQ,QHK->BTHK", self.q_norm(jnp.einsum("BTD,DQ->BTQ", x, w(self.wq_a))),
                     w(self.wq_b))
    else:
      q = jnp.einsum("BTD,DHK->BTHK", x, w(self.wq))
    q_nope, q_rope = q[..., :n], q[..., n:]
    kv = jnp.einsum("BTD,DC->BTC", x, w(self.wkv_a))
    latent, k_rope = self.kv_norm(kv[..., :cfg.kv_lora_rank]), kv[..., cfg.kv_lora_rank:]
    cos, sin = rope_angles(positions, r, cfg.rope_theta)
    q_rope = apply_rope(q_rope, cos, sin, cfg.rope_layout)
    k_rope = apply_rope(k_rope, cos, sin, cfg.rope_layout)
    if cache is not None:
      cache = cache_lib.LatentCache(c=cache_lib.write(cache.c, latent, lengths),
                                    k_rope=cache_lib.write(cache.k_rope, k_rope, lengths))
      latent, k_rope = cache.c.astype(dt), cache.k_rope.astype(dt)
    if impl is None:
      one_token = cache is not None and x.shape[1] == 1
      impl = cfg.mla_decode_impl if one_token else cfg.mla_prefill_impl
    w_uk, w_uv = w(self.wkv_b)[..., :n], w(self.wkv_b)[..., n:]
    scale = (n + r) ** -0.5
    f32 = jnp.float32
    rope_scores = jnp.einsum("BTHR,BSR->BHTS", q_rope, k_rope, preferred_element_type=f32)
    if impl == "naive":
      # Rebuild per-head keys and values from every cached latent: H*(N+E) numbers per slot.
      k_nope = jnp.einsum("BSC,CHN->BSHN", latent, w_uk)
      v = jnp.einsum("BSC,CHE->BSHE", latent, w_uv)
      scores = jnp.einsum("BTHN,BSHN->BHTS", q_nope, k_nope, preferred_element_type=f32)
      probs = causal_probs((scores + rope_scores) * scale, positions).astype(dt)
      o = jnp.einsum("BHTS,BSHE->BTHE", probs, v)
    else:
      # Absorbed: fold W_UK into the query and apply W_UV after attending, so attention runs over
      # the C-wide latents directly, like MQA with one shared key [c; k_rope] and value c.
      q_latent = jnp.einsum("BTHN,CHN->BTHC", q_nope, w_uk)
      scores = jnp.einsum("BTHC,BSC->BHTS", q_latent, latent, preferred_element_type=f32)
      probs = causal_probs((scores + rope_scores) * scale, positions).astype(dt)
      # Cache operand first: ~3.5x faster on XLA:CPU than "BHTS,BSC->BTHC" (see GQAttention).
      o = jnp.einsum("BTHC,CHE->BTHE", jnp.einsum("BSC,BHTS->BTHC", latent, probs), w_uv)
    return jnp.einsum("BTHE,HED->BTD", o, w(self.wo)), cache
