"""FastGen (arXiv 2310.01801): profile each KV group's attention at prefill, give it the cheapest
policy that recovers a fraction `recovery` of its attention mass, and evict by that policy after.

Candidate kept sets, nested, cheapest first (MODES):
  0 special      the special tokens: here the first `sinks` tokens (byte-level models have no BOS)
  1 punctuation  + punctuation tokens (Policy.punct_ids, from the tokenizer)
  2 locality     + the most recent LOCAL_RATIO of the keys
  3 frequency    + the heavy hitters: the FREQUENT_RATIO keys with the largest accumulated attention
  4 full         everything
Recovery of a set for one query = the attention mass it keeps; a group passes when the mean over
the profiled queries reaches `recovery`. GQA profiles each KV group on its heads' average; MLA
(one latent set per layer) profiles the layer.

In the fixed-budget cache the chosen policy sets the group's eviction priorities (`keep_key`):
the tiers its set contains are kept first, the rest of the budget is filled by recency (or by
accumulated attention for frequency / full); the array stays S slots (fixed shapes), so the saving
is in what is kept, not in the array size. Profiling needs a prefill chunk: a cache filled token
by token (the streaming protocol) keeps every group at 'full' (H2O with a local window).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MODES = ("special", "punctuation", "locality", "frequency", "full")
LOCAL_RATIO = 0.3
FREQUENT_RATIO = 0.3


def candidate_sets(attn, special, punct):
  """attn [..., T, T] head-averaged causal attention of T queries over T keys; special, punct
  [..., T] bool per key -> [..., len(MODES), T] bool kept sets (nested)."""
  t = attn.shape[-1]
  pos = jnp.arange(t)
  base = special | punct
  local = base | (pos >= t - max(1, round(LOCAL_RATIO * t)))
  mass = attn.sum(-2)  # accumulated attention per key [..., T]
  k = max(1, round(FREQUENT_RATIO * t))
  kth = jax.lax.top_k(mass, k)[0][..., -1:]
  frequent = local | (mass >= kth)
  return jnp.stack([special, base, local, frequent, jnp.ones_like(special)], axis=-2)


def profile(attn, special, punct, recovery: float) -> jax.Array:
  """The cheapest mode whose set keeps >= recovery of the attention mass, averaged over the
  queries: attn [..., T, T], special / punct [..., T] -> mode index [...] int32.
  Locality is judged per query (its own last LOCAL_RATIO keys), the others on fixed key sets."""
  t = attn.shape[-1]
  sets = candidate_sets(attn, special, punct).astype(attn.dtype)  # [..., 5, T]
  kept = jnp.einsum("...qk,...mk->...mq", attn, sets)  # [..., 5, T queries]
  # Locality for query q: keys in (q - LOCAL_RATIO * T, q], plus special and punctuation.
  span = max(1, round(LOCAL_RATIO * t))
  q, k = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
  near = (k <= q) & (k > q - span)
  base = (special | punct)[..., None, :]
  local_kept = (attn * (near | base)).sum(-1)  # [..., T]
  kept = kept.at[..., 2, :].set(local_kept)
  kept = kept.at[..., 3, :].set(jnp.maximum(kept[..., 3, :], local_kept))
  ok = kept.mean(-1) >= recovery - 1e-6  # [..., 5]; full always passes
  ok = ok.at[..., -1].set(True)
  return jnp.argmax(ok, axis=-1).astype(jnp.int32)


def keep_key(book: dict, mode, special, end, budget: int) -> jax.Array:
  """Eviction key [B, G, N] (larger keeps) for groups in `mode` [B, G]: the tiers of the mode's
  set first (punctuation, recent LOCAL_RATIO of the budget, accumulated attention), then recency.
  book: pos, score, aux (1.0 for punctuation tokens) [B, G, N]; end [B] newest position + 1."""
  m = mode[..., None]
  recent = book["pos"] >= (end[:, None, None] - max(1, round(LOCAL_RATIO * budget)))
  # Frequency and full contain the local set too (FastGen's hybrid special + punct + frequent +
  # local): without it a bounded 'full' group would be H2O without a window, which evicts each
  # new token first (it has drawn the least attention yet).
  tier = 4.0 * special + 2.0 * ((m >= 1) & (book["aux"] > 0)) + 1.0 * ((m >= 2) & recent)
  # Within a tier (float32 keeps ~1e-6 of it): heavy hitters for frequency / full, else recency.
  score = book["score"] / (book["score"].max(-1, keepdims=True) + 1e-9)
  newest = book["pos"] / (book["pos"].max(-1, keepdims=True) + 1.0)
  return tier + 0.999 * jnp.where(m >= 3, score, newest)
