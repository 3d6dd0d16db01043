"""Attention math, written once: every attention path of the package is built from these.

Two query / key layouts:
- grouped heads (MHA / GQA / MQA, YOCO, DMC): q [B, T, G, M, K] (M = H / G query heads per kv
  head), keys and values [B, S, G, K]; scores [B, G, M, T, S];
- MLA's absorbed form (docs/model.md), MQA with one C + R wide key [c ; k_R] and value c:
  absorbed queries q~ = W_UK^T q_N [B, T, H, C] and rope queries q_R [B, T, H, R] against latents
  c [B, S, C] and rope keys k_R [B, S, R] (or [B, S, G_R, R] after MHA2MLA); scores [B, H, T, S].

Scores and softmax are float32 whatever the compute dtype; `attend` casts the probabilities to the
values' compute dtype `dt`. Masked scores are NEG, a finite "minus infinity": a row with nothing
visible stays NaN-free. Three ways to normalise, one formula:
- `causal_attention`: T tokens over themselves without a cache, one query block at a time;
- `cached_probs`: T new tokens over [cache as passed in ; themselves], one softmax over both;
- `partial` + `combine_partials`: unnormalised partials over disjoint key sets (kernel splits,
  sequence shards, the cache and the new tokens) merged by log-sum-exp, then `normalise`.

Einsum letters: B batch, T query length, S key length, H heads, G kv heads, M heads per kv head,
K head dim, N nope dim, R rope dim, E value dim, C latent.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mla_jax.core import probes

NEG = -1e30  # finite "minus infinity": a fully masked row stays NaN-free


# Grouped heads ---------------------------------------------------------------------------------


def gqa_scores(q: jax.Array, k: jax.Array, scale: float) -> jax.Array:
  """s[g, m, t, j] = q[t, g, m] . k[j, g] * scale: q [B, T, G, M, K], k [B, S, G, K] ->
  [B, G, M, T, S] float32."""
  return jnp.einsum("BTGMK,BSGK->BGMTS", q, k, preferred_element_type=jnp.float32) * scale


def gqa_attend(v: jax.Array, probs: jax.Array, dt) -> jax.Array:
  """o[t, g, m] = sum_j p[g, m, t, j] v[j, g]: v [B, S, G, K], probs [B, G, M, T, S] ->
  [B, T, G, M, K] in dt."""
  # Operand order matters on XLA:CPU: with probs first, this decode-shaped dot (contracting the
  # long S axis) runs ~2-7x slower than with the values first (scripts/bench_decode.py).
  return jnp.einsum("BSGK,BGMTS->BTGMK", v, probs.astype(dt))


# MLA's absorbed form ---------------------------------------------------------------------------


def absorb_query(q_nope: jax.Array, w_uk: jax.Array) -> jax.Array:
  """q~[t, h] = W_UK,h^T q_N[t, h]: q_nope [B, T, H, N], w_uk [C, H, N] -> [B, T, H, C]."""
  return jnp.einsum("BTHN,CHN->BTHC", q_nope, w_uk)


def expand_values(o: jax.Array, w_uv: jax.Array) -> jax.Array:
  """o[t, h] = W_UV,h o~[t, h]: o~ [B, T, H, C], w_uv [C, H, E] -> [B, T, H, E]."""
  return jnp.einsum("BTHC,CHE->BTHE", o, w_uv)


def rope_scores(q_rope: jax.Array, k_rope: jax.Array) -> jax.Array:
  """q_R . k_R of queries [B, T, H, R] against the ONE rope key per slot [B, S, R] -> [B, H, T, S]
  float32: the same in every MLA path. With one rope key per KV group (MHA2MLA), k_rope
  [B, S, G, R] and query head h reads key h // (H / G), as GQA does."""
  if k_rope.ndim == 3:
    return jnp.einsum("BTHR,BSR->BHTS", q_rope, k_rope, preferred_element_type=jnp.float32)
  b, t, h, r = q_rope.shape
  g = k_rope.shape[2]
  s = jnp.einsum("BTGMR,BSGR->BGMTS", q_rope.reshape(b, t, g, h // g, r), k_rope,
                 preferred_element_type=jnp.float32)
  return s.reshape(b, h, t, k_rope.shape[1])


def latent_scores(q_c, q_rope, c, k_rope, scale: float) -> jax.Array:
  """s[h, t, j] = (q~[t, h] . c_j + q_R[t, h] . k_R[j]) * scale: q_c [B, T, H, C], q_rope
  [B, T, H, R], c [B, S, C], k_rope [B, S, R] (or [B, S, G_R, R]) -> [B, H, T, S] float32."""
  nope = jnp.einsum("BTHC,BSC->BHTS", q_c, c, preferred_element_type=jnp.float32)
  return (nope + rope_scores(q_rope, k_rope)) * scale


def latent_attend(c: jax.Array, probs: jax.Array, dt) -> jax.Array:
  """o~[t, h] = sum_j p[h, t, j] c_j: c [B, S, C], probs [B, H, T, S] -> [B, T, H, C] in dt."""
  # Cache operand first: ~3.5x faster on XLA:CPU than "BHTS,BSC->BTHC" (see gqa_attend).
  return jnp.einsum("BSC,BHTS->BTHC", c, probs.astype(dt))


# Normalising: no cache, [cache ; new], partials ---------------------------------------------------


def causal_mask(t: int) -> jax.Array:
  """[T, T] bool: query t sees t' <= t."""
  return jnp.tril(jnp.ones((t, t), bool))


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
    logits = jnp.where(visible, scores(slice(start, end), end), NEG)
    probes.record("max_logit", logits.max())  # training health (no-op unless probing)
    probs = jax.nn.softmax(logits, axis=-1)
    outs.append(attend(end, probs))
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def two_block_probs(old, new, old_visible, new_visible):
  """One softmax over the keys [old block; new block] -> (old probs, new probs).

  old [..., T, S], new [..., T, T'] float32 scores; the masks broadcast against them. The scores
  are concatenated (small: [.., T, S + T']), not the keys, so a cache is never copied.
  """
  s = old.shape[-1]
  logits = jnp.concatenate([jnp.where(old_visible, old, NEG), jnp.where(new_visible, new, NEG)],
                           axis=-1)
  probs = jax.nn.softmax(logits, axis=-1)
  return probs[..., :s], probs[..., s:]


def cached_probs(old: jax.Array, new: jax.Array, lengths: jax.Array):
  """The new tokens' softmax over [cache slots; themselves] -> (old probs, new probs).

  old [B, ..., T, S] scores against the cache before this call's write: slot s is visible iff
  s < lengths[b] (later slots may hold stale right-padding). new [B, ..., T, T] scores of the new
  tokens against themselves: causal.
  """
  filled = jnp.arange(old.shape[-1]) < lengths.reshape(lengths.shape + (1,) * (old.ndim - 1))
  return two_block_probs(old, new, filled, causal_mask(new.shape[-1]))


def partial(scores: jax.Array, visible, values):
  """The unnormalised softmax partial over one key set: scores [..., T, S] float32, visible a mask
  broadcasting against them, values(p) -> o = sum_j p_j v_j [..., T, X] (float32) with
  p_j = exp(s_j - m). Returns (o, m [..., T], l [..., T]) with m = max_j s_j and l = sum_j p_j.
  A row with no visible key gives m = NEG, l = 0, o = 0: it adds nothing when combined."""
  scores = jnp.where(visible, scores, NEG)
  m = scores.max(axis=-1)
  p = jnp.where(visible, jnp.exp(scores - m[..., None]), 0.0)
  return values(p), m, p.sum(axis=-1)


def combine_partials(o, m, l, axis: int = 1):
  """Log-sum-exp merge of partial softmax results along `axis` (splits, devices, key blocks):

    M = max_p m_p,  o = sum_p exp(m_p - M) o_p,  l = sum_p exp(m_p - M) l_p

  o [..., P, ..., X] unnormalised sums, m and l [..., P, ...] (o without its last axis). Returns
  (o, m, l) without `axis`, still unnormalised: the result over all parts' keys is o / l. A part
  with no keys (m = NEG, l = 0, o = 0) contributes nothing; if every part is empty, l stays 0.
  """
  m_all = m.max(axis=axis, keepdims=True)
  w = jnp.exp(m - m_all)
  return ((o * w[..., None]).sum(axis=axis), jnp.squeeze(m_all, axis), (l * w).sum(axis=axis))


def normalise(o, l):
  """o / l, with 0 where l = 0 (no visible key)."""
  return jnp.where(l[..., None] > 0, o / jnp.where(l > 0, l, 1.0)[..., None], 0.0)


def merge_partials(parts, axis: int = 1):
  """[(o, m, l), ...] over disjoint key sets -> the normalised attention o / l: the parts stacked
  on `axis` and combined (combine_partials)."""
  o, _, l = combine_partials(*(jnp.stack(x, axis=axis) for x in zip(*parts)), axis=axis)
  return normalise(o, l)


# Fused kernels ---------------------------------------------------------------------------------


def fused_causal_attention(q, k, v, scale: float, impl: str) -> jax.Array:
  """Causal self-attention of T tokens through jax.nn.dot_product_attention ('xla' | 'cudnn').

  q [B, T, H, K], k [B, T, G, K], v [B, T, G, E] (query head h reads kv head h // (H / G), the
  grouping above) -> [B, T, H, E]. The function needs one head dim for q, k and v: when E != K
  (MLA) the narrower side is zero-padded, which changes no score (zeros add nothing to q . k) and
  no output column that is kept (the padded value columns are sliced off).
  """
  kd, e = q.shape[-1], v.shape[-1]
  width = max(kd, e)
  pad = lambda x: x if x.shape[-1] == width else jnp.pad(
      x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])
  out = jax.nn.dot_product_attention(pad(q), pad(k), pad(v.astype(k.dtype)), scale=scale,
                                     is_causal=True, implementation=impl)
  return out[..., :e]
