"""DMC, Dynamic Memory Compression (arXiv 2403.09636), as a retrofit of MHA / GQA / MQA.

Per layer, kv head g and token t, two numbers are read from the token's own projections (no new
parameters): a decision logit from the first (pre-RoPE) key dimension, alpha_t = sigmoid(k_t[g, 0]
+ ALPHA_BIAS), and an importance omega_t = sigmoid(q_t[h, 0]) of the first query head h of group g.
The constant bias starts a converted model at "append" (alpha ~ 0.007 for a key dim near 0), so the
retrofit begins as the source model. Unlike the paper, the two dims keep taking part in attention:
the retrofit starts exactly at the source model.

  append (alpha = 0): a new slot (k_t, v_t), z = omega_t
  merge  (alpha = 1): last slot <- (z k_last + omega_t k_t) / (z + omega_t), the same for v;
                      z <- z + omega_t
The cache keeps rotated keys: a merged slot averages keys rotated at their own positions.

Training (no cache, all T tokens at once) exposes the partially merged states. With S_t = alpha_t
S_{t-1} + omega_t k_t and z_t = alpha_t z_{t-1} + omega_t (a linear recurrence: one associative
scan over T), k~_t = S_t / z_t is the state of the open slot after token t, and query t attends to
k~_t and to k~_j (j < t) with the additive mask log(1 - alpha_{j+1}): j's slot is still separate
only if token j + 1 did not merge into it. alpha is relaxed with a Gumbel-sigmoid at
cfg.dmc_temperature (Transformer.dmc_forward with an rng; training/step.py adds the
compression loss); without an rng decisions are hard and the full forward equals cached decode.

Inference: hard decisions, a fixed-shape buffer per layer k, v [B, S, G, K] with per-head fill
counts n [B, G] (slots s < n[b, g] are live) and the last slot's importance sum z [B, G]. The
buffer is allocated for S slots whatever the compression: fixed shapes keep allocated memory at
the uncompressed size; compression_stats reports slots used against bytes allocated (what a paged
store would hand back: docs/trained_in.md).

Axis letters: B batch, T new tokens, S slots, D width, H heads, G kv heads, M heads per kv head,
K head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax.core import cache as cache_lib
from mla_jax.core import ops
from mla_jax.core.attention import GQAttention
from mla_jax.core.cache import DMCCache
from mla_jax.core.config import ModelConfig
from mla_jax.core.layers import apply_rope, dense, rope_angles

ALPHA_BIAS = -5.0  # added to the decision neuron: start at "append"


def relaxed_decisions(cfg: ModelConfig, logit: jax.Array, rng=None):
  """logit [B, T, G] -> (alpha, log(1 - alpha)), both [B, T, G] float32, token 0 appending.
  rng: Gumbel-sigmoid (logistic noise, temperature cfg.dmc_temperature); None: hard 0 / 1."""
  logit = logit.astype(jnp.float32)
  if cfg.dmc_decisions != "learned":
    merge = jnp.full(logit.shape, cfg.dmc_decisions == "merge")
  elif rng is None:
    merge = logit > 0
  else:
    u = jax.random.uniform(rng, logit.shape, jnp.float32, 1e-6, 1 - 1e-6)
    x = (logit + jnp.log(u) - jnp.log1p(-u)) / cfg.dmc_temperature
    first = jnp.arange(logit.shape[1])[:, None] == 0
    return (jnp.where(first, 0.0, jax.nn.sigmoid(x)),
            jnp.where(first, 0.0, jax.nn.log_sigmoid(-x)))
  merge = merge.at[:, 0].set(False)
  return merge.astype(jnp.float32), jnp.where(merge, ops.NEG, 0.0)


def merged_states(k, v, alpha, omega):
  """The open slot after each token: k, v [B, T, G, K], alpha, omega [B, T, G] ->
  (k~, v~) [B, T, G, K], k~_t = S_t / z_t, written (S_t - omega_t k_t) / z_t + (omega_t / z_t) k_t
  so that an append (alpha_t = 0: S_t = omega_t k_t and z_t = omega_t exactly) returns k_t bit
  for bit."""
  a, w = alpha[..., None].astype(k.dtype), omega[..., None].astype(k.dtype)
  bk, bv = w * k, w * v

  def combine(early, late):  # h -> a_late (a_early h + b_early) + b_late
    ae, ke, ve, ze = early
    al, kl, vl, zl = late
    return ae * al, al * ke + kl, al * ve + vl, al * ze + zl

  _, s_k, s_v, z = jax.lax.associative_scan(combine, (a, bk, bv, w), axis=1)
  return (s_k - bk) / z + (w / z) * k, (s_v - bv) / z + (w / z) * v


class DMCAttention(GQAttention):
  """GQAttention whose cache appends or merges per kv head (same parameters, so a trained
  MHA / GQA / MQA checkpoint restores into it)."""

  def _project(self, x, positions):
    """-> q [B, T, G, M, K], k [B, T, G, K] (both rotated), v, alpha logit and omega [B, T, G]."""
    cfg, dt = self.cfg, self.cfg.compute_dtype
    c = lambda p: p[...].astype(dt)
    q, k, v = dense(x, c(self.wq)), dense(x, c(self.wk)), dense(x, c(self.wv))
    b, t, h, kd = q.shape
    g = k.shape[2]
    logit = k[..., 0].astype(jnp.float32) + ALPHA_BIAS  # before RoPE mixes the dim
    omega = jax.nn.sigmoid(q.reshape(b, t, g, h // g, kd)[:, :, :, 0, 0].astype(jnp.float32))
    cos, sin = rope_angles(positions, kd, cfg.rope_theta)
    q, k = apply_rope(q, cos, sin, cfg.rope_layout), apply_rope(k, cos, sin, cfg.rope_layout)
    return q.reshape(b, t, g, h // g, kd), k, v, logit, omega

  @staticmethod
  def init_cache(cfg: ModelConfig, batch: int, slots: int) -> DMCCache:
    """Zeros for `batch` sequences of `slots` slots per kv head, none in use (n = 0)."""
    shape, counts = (batch, slots, cfg.kv_heads, cfg.qk_head_dim), (batch, cfg.kv_heads)
    return DMCCache(k=jnp.zeros(shape, cfg.kv_cache_dtype), v=jnp.zeros(shape, cfg.kv_cache_dtype),
                    n=jnp.zeros(counts, jnp.int32), z=jnp.zeros(counts, jnp.float32))

  def __call__(self, x, positions, cache: DMCCache | None = None, lengths=None, *,
               n_valid=None, rng=None):
    """x [B, T, D], positions [B, T] -> (out [B, T, D], new DMCCache), or without a cache
    (out, fraction of appended slots [] float32: 1 / this layer's compression). n_valid [B]: the
    real tokens of a padded prefill (None: all); rng: relaxed training decisions (None: hard)."""
    cfg, dt = self.cfg, self.cfg.compute_dtype
    q, k, v, logit, omega = self._project(x, positions)
    b, t, g, m, kd = q.shape
    out_proj = lambda o: dense(o.reshape(b, t, g * m, kd), self.wo[...].astype(dt), n_in=2)
    if cache is None:
      alpha, log_keep = relaxed_decisions(cfg, logit, rng)
      k_m, v_m = merged_states(k, v, alpha, omega)
      # Key j < t stays a separate slot for query t iff token j + 1 appended: log(1 - alpha_{j+1}).
      keep = jnp.concatenate([log_keep[:, 1:], jnp.zeros_like(log_keep[:, :1])], axis=1)
      keep = keep.transpose(0, 2, 1)[:, :, None, None, :]  # [B, G, 1, 1, T]

      def scores(rows, end):
        s = ops.gqa_scores(q[:, rows], k_m[:, :end], kd ** -0.5)
        earlier = jnp.arange(end) < jnp.arange(rows.start, rows.stop)[:, None]  # [rows, end]
        return s + jnp.where(earlier, keep[..., :end], 0.0)

      attend = lambda end, probs: ops.gqa_attend(v_m[:, :end], probs, dt)
      o = ops.causal_attention(t, cfg.attn_block, scores, attend)
      return out_proj(o), 1.0 - jnp.mean(alpha)
    merge = logit > 0 if cfg.dmc_decisions == "learned" else jnp.full(
        logit.shape, cfg.dmc_decisions == "merge")
    n_valid = jnp.full((b,), t) if n_valid is None else n_valid
    valid = jnp.arange(t) < n_valid[:, None]  # [B, T]: padding is neither merged nor appended
    o, new_cache = decode_tokens(cache, q, cache_lib.as_stored(k, cache.k),
                                 cache_lib.as_stored(v, cache.v), merge, omega, valid, dt)
    return out_proj(o), new_cache


def update(cache: DMCCache, k, v, merge, omega, valid) -> DMCCache:
  """One token per sequence into the buffer: k, v [B, G, K], merge [B, G] bool, omega [B, G],
  valid [B] bool (False: leave the row unchanged). A head with no slot yet appends; an append to
  a full buffer overwrites its last slot (allocate S >= tokens to rule that out)."""
  b, s, g, _ = cache.k.shape
  merge = merge & (cache.n > 0)
  idx = jnp.minimum(jnp.where(merge, cache.n - 1, cache.n), s - 1)  # [B, G]
  rows, heads = jnp.arange(b)[:, None], jnp.arange(g)[None]
  z, w = cache.z, omega.astype(jnp.float32)
  write = valid[:, None]

  def slot(buf, new):
    old = buf[rows, idx, heads].astype(jnp.float32)  # [B, G, K]
    new = new.astype(jnp.float32)
    avg = (z[..., None] * old + w[..., None] * new) / (z + w)[..., None]
    val = jnp.where(write[..., None], jnp.where(merge[..., None], avg, new), old)
    return buf.at[rows, idx, heads].set(val.astype(buf.dtype))

  return DMCCache(k=slot(cache.k, k), v=slot(cache.v, v),
                  n=jnp.where(write & ~merge, cache.n + 1, cache.n),
                  z=jnp.where(write, jnp.where(merge, z + w, w), z))


def decode_tokens(cache: DMCCache, q, k, v, merge, omega, valid, dt):
  """The T new tokens one at a time (a scan): write token t, then its queries q [B, T, G, M, K]
  attend to each head's live slots. -> (o [B, T, G, M, K], new cache)."""
  kd = q.shape[-1]

  def step(layer, xs):
    q_t, k_t, v_t, merge_t, omega_t, valid_t = xs
    layer = update(layer, k_t, v_t, merge_t, omega_t, valid_t)
    s = ops.gqa_scores(q_t[:, None], layer.k.astype(dt), kd ** -0.5)  # [B, G, M, 1, S]
    live = jnp.arange(layer.k.shape[1]) < layer.n[:, :, None, None, None]  # [B, G, 1, 1, S]
    probs = jax.nn.softmax(jnp.where(live, s, ops.NEG), axis=-1)
    return layer, ops.gqa_attend(layer.v.astype(dt), probs, dt)[:, 0]

  time_major = lambda a: jnp.moveaxis(a, 1, 0)
  cache, o = jax.lax.scan(step, cache, tuple(map(time_major, (q, k, v, merge, omega, valid))))
  return jnp.moveaxis(o, 0, 1), cache


# Training: the compression target and its loss (training/step.py) ---------------------------------


def target_at(cfg: ModelConfig, step) -> jax.Array:
  """The compression target at a training step: 1 -> cfg.dmc_target linearly over
  cfg.dmc_ramp_steps (0: the target from the start)."""
  if not cfg.dmc_ramp_steps:
    return jnp.float32(cfg.dmc_target)
  frac = jnp.minimum(jnp.asarray(step, jnp.float32) / cfg.dmc_ramp_steps, 1.0)
  return 1.0 + (cfg.dmc_target - 1.0) * frac


def compression_loss(cfg: ModelConfig, slots: jax.Array, step) -> jax.Array:
  """weight * |slots per token - 1 / target|: an L1 pull of the (relaxed) fraction of appended
  slots, over all tokens, layers and heads, towards the target compression."""
  return cfg.dmc_loss_weight * jnp.abs(slots - 1.0 / target_at(cfg, step))


# Evaluation: what a filled cache achieved and what it allocated -----------------------------------


def compression_stats(cache: cache_lib.Cache, cfg: ModelConfig) -> dict:
  """Achieved compression of a filled DMC cache, with the bytes it allocated and used.

  tokens: sum of lengths; slots_used: live (layer, head, slot)s; compression: token-slots
  (tokens * L * G) / slots_used; bytes_allocated: every array as allocated (fixed shape:
  S slots per head); bytes_used: the live slots' k and v; bytes_uncompressed: what the source
  model's cache holds for the same tokens.
  """
  item = jnp.dtype(cfg.kv_cache_dtype).itemsize
  slot_bytes = 2 * cfg.qk_head_dim * item
  tokens = int(jnp.sum(cache.lengths))
  used = [int(jnp.sum(layer.n)) for layer in cache.layers]
  token_slots = tokens * cfg.kv_heads
  return {
      "tokens": tokens,
      "slots_used": sum(used),
      "compression": token_slots * len(used) / max(sum(used), 1),
      "compression_per_layer": [token_slots / max(u, 1) for u in used],
      "bytes_allocated": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache.layers)),
      "bytes_used": sum(used) * slot_bytes,
      "bytes_uncompressed": token_slots * len(used) * slot_bytes,
  }


def measure(model: nnx.Module, tokens) -> dict:
  """compression_stats after model.extend wrote tokens [B, T] into a cache of exactly T slots
  (a one-shot prefill: the same decisions as token-by-token decode)."""
  tokens = jnp.asarray(tokens, jnp.int32)
  graphdef, state = nnx.split(model)
  def fill(st, tok):
    m = nnx.merge(graphdef, st)
    return m.extend(tok, m.init_cache(tok.shape[0], tok.shape[1]))[1]

  return compression_stats(jax.jit(fill)(state, tokens), model.cfg)
