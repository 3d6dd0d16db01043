"""Attention-level checks: RoPE algebra, GQA/MHA/MQA equivalences, MLA absorbed == naive.

Weights use init_std 0.2 (not the 0.02 training default) so attention is far from uniform and a
wrong head mapping, RoPE layout or absorption order moves outputs by O(1), not O(1e-4).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_helpers import FAST_COMPILE, random_module, tiny

from mla_jax.core.attention import GQAttention, MLAttention
from mla_jax.core.layers import apply_rope, interleaved_to_half_perm, rope_angles
from mla_jax.core.model import Transformer, init_cache

ATOL = 1e-5


@functools.partial(jax.jit, static_argnums=(0, 2), compiler_options=FAST_COMPILE)
def _jit_call(graphdef, state, impl, *args):
  module = nnx.merge(graphdef, state)
  return module(*args, impl=impl) if impl else module(*args)


def call(module, *args, impl=None):
  """module(*args[, impl=impl]) under jit: one compile per config and shape, not one per op."""
  graphdef, state = nnx.split(module)
  return _jit_call(graphdef, state, impl, *args)


def rope(x, positions, layout, theta=10000.0):
  """x [B, T, R] rotated at positions [B, T]."""
  cos, sin = rope_angles(jnp.asarray(positions), x.shape[-1], theta)
  return apply_rope(x, cos, sin, layout)


# RoPE ---------------------------------------------------------------------------------------------


def rope_reference(x: np.ndarray, pos: int, layout: str, theta=10000.0) -> np.ndarray:
  """Textbook rotation of one vector x [R] at position pos, in float64."""
  r = x.shape[0]
  out = np.empty_like(x, dtype=np.float64)
  for i in range(r // 2):
    a = pos * theta ** (-2 * i / r)
    j, k = (i, i + r // 2) if layout == "half" else (2 * i, 2 * i + 1)
    out[j] = x[j] * np.cos(a) - x[k] * np.sin(a)
    out[k] = x[k] * np.cos(a) + x[j] * np.sin(a)
  return out


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope_matches_reference_rotation(layout):
  r = 8
  x = np.asarray(jax.random.normal(jax.random.key(0), (1, 5, r)))
  positions = np.array([[0, 1, 3, 7, 12]])
  got = np.asarray(rope(jnp.asarray(x), positions, layout))
  want = np.stack([rope_reference(x[0, t], positions[0, t], layout) for t in range(5)])[None]
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(got[0, 0], x[0, 0], atol=1e-7)  # position 0 is the identity


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope_dot_product_depends_only_on_position_difference(layout):
  r, n = 16, 12
  q, k = jax.random.normal(jax.random.key(1), (2, r))
  pos = jnp.arange(n)[None]
  rq = rope(jnp.broadcast_to(q, (1, n, r)), pos, layout)[0]  # q rotated at every position m
  rk = rope(jnp.broadcast_to(k, (1, n, r)), pos, layout)[0]
  dots = np.asarray(rq @ rk.T)  # dots[m, n] = <R_m q, R_n k>
  for offset in range(-(n - 1), n):
    diag = np.diagonal(dots, offset=offset)
    np.testing.assert_allclose(diag, diag[0], atol=1e-4, err_msg=f"m - n = {-offset}")
  # ...and it does depend on the difference (a no-op RoPE would pass the check above).
  assert np.abs(dots[0, 0] - dots[0, 1]) > 1e-2
  assert np.abs(dots[0, 0] - dots[0, 5]) > 1e-2
  # Rotations preserve norms.
  np.testing.assert_allclose(np.linalg.norm(rq, axis=-1), np.linalg.norm(q), rtol=1e-5)


def test_rope_interleaved_equals_half_after_permutation():
  r = 16
  perm = interleaved_to_half_perm(r)
  assert sorted(np.asarray(perm).tolist()) == list(range(r))
  x, y = jax.random.normal(jax.random.key(2), (2, 2, 7, r))
  pos = jnp.array([[0, 1, 2, 5, 9, 100, 1000], [3, 3, 4, 8, 15, 16, 17]])
  inter = rope(x, pos, "interleaved")
  half = rope(x[..., perm], pos, "half")
  np.testing.assert_allclose(inter[..., perm], half, atol=1e-5)
  dots_inter = jnp.einsum("BTR,BSR->BTS", inter, rope(y, pos, "interleaved"))
  dots_half = jnp.einsum("BTR,BSR->BTS", half, rope(y[..., perm], pos, "half"))
  np.testing.assert_allclose(dots_inter, dots_half, atol=1e-4)
  # Without the permutation the layouts disagree: the trap docs/model.md warns about.
  assert np.abs(np.asarray(inter) - np.asarray(rope(x, pos, "half"))).max() > 0.1


def _permute_rope_dims(w, n, perm):
  """Permutes the last R entries of the last axis (the rope part) of w by perm."""
  return jnp.concatenate([w[..., :n], w[..., n:][..., perm]], axis=-1)


@pytest.mark.parametrize("q_lora_rank", [0, 8])
def test_mla_interleaved_equals_half_with_permuted_weights(q_lora_rank):
  """Loading interleaved-layout weights into a half-layout model is exact once the rope output
  dims of the query and the shared rope key are permuted."""
  cfg_i = tiny(attention="mla", rope_layout="interleaved", q_lora_rank=q_lora_rank)
  cfg_h = tiny(attention="mla", rope_layout="half", q_lora_rank=q_lora_rank)
  att_i = random_module(MLAttention, cfg_i, seed=0)
  att_h = random_module(MLAttention, cfg_h, seed=0)  # same shapes, so the same weights
  n, c, perm = cfg_i.nope_dim, cfg_i.kv_lora_rank, interleaved_to_half_perm(cfg_i.qk_rope_head_dim)
  x = jax.random.normal(jax.random.key(3), (2, 6, cfg_i.d_model))
  pos = jnp.broadcast_to(jnp.arange(6) * 3, (2, 6))  # spread positions so rotations matter
  out_i, _ = call(att_i, x, pos)
  unpermuted, _ = call(att_h, x, pos)
  assert np.abs(np.asarray(out_i - unpermuted)).max() > 1e-3  # the layouts really differ
  q_param = att_h.wq_b if q_lora_rank else att_h.wq
  q_param[...] = _permute_rope_dims(q_param[...], n, perm)
  att_h.wkv_a[...] = _permute_rope_dims(att_h.wkv_a[...], c, perm)
  out_h, _ = call(att_h, x, pos)
  np.testing.assert_allclose(out_h, out_i, atol=ATOL)


def test_gqa_interleaved_equals_half_with_permuted_weights():
  cfg_i = tiny(attention="gqa", n_kv_heads=2, rope_layout="interleaved")
  cfg_h = tiny(attention="gqa", n_kv_heads=2, rope_layout="half")
  att_i = random_module(GQAttention, cfg_i, seed=0)
  att_h = random_module(GQAttention, cfg_h, seed=0)
  perm = interleaved_to_half_perm(cfg_i.qk_head_dim)
  x = jax.random.normal(jax.random.key(4), (2, 6, cfg_i.d_model))
  pos = jnp.broadcast_to(jnp.arange(6) * 3, (2, 6))
  out_i, _ = call(att_i, x, pos)
  att_h.wq[...] = att_h.wq[...][..., perm]
  att_h.wk[...] = att_h.wk[...][..., perm]  # v and wo are untouched: RoPE never sees them
  out_h, _ = call(att_h, x, pos)
  np.testing.assert_allclose(out_h, out_i, atol=ATOL)


# GQA family ---------------------------------------------------------------------------------------


def test_gqa_with_all_kv_heads_equals_mha():
  tokens = jax.random.randint(jax.random.key(5), (2, 9), 0, 64)
  mha = Transformer(tiny(attention="mha"), rngs=nnx.Rngs(7))
  gqa = Transformer(tiny(attention="gqa", n_kv_heads=4), rngs=nnx.Rngs(7))
  jax.tree.map(np.testing.assert_array_equal, nnx.state(mha, nnx.Param), nnx.state(gqa, nnx.Param))
  np.testing.assert_array_equal(call(gqa, tokens), call(mha, tokens))


def test_mqa_equals_gqa_with_one_kv_head():
  tokens = jax.random.randint(jax.random.key(6), (2, 9), 0, 64)
  mqa = Transformer(tiny(attention="mqa"), rngs=nnx.Rngs(8))
  gqa = Transformer(tiny(attention="gqa", n_kv_heads=1), rngs=nnx.Rngs(8))
  assert mqa.blocks[0].attn.wk[...].shape == (32, 1, 8)
  np.testing.assert_array_equal(call(gqa, tokens), call(mqa, tokens))


@pytest.mark.parametrize("n_kv_heads", [1, 2])
def test_gqa_equals_mha_with_repeated_kv_heads(n_kv_heads):
  """Query head h reads kv head h // (H / G): an MHA whose k/v heads are copies must agree."""
  gqa = random_module(GQAttention, tiny(attention="gqa", n_kv_heads=n_kv_heads), seed=0)
  mha = random_module(GQAttention, tiny(attention="mha"), seed=1)
  m = 4 // n_kv_heads
  for name in ("wq", "wo"):
    getattr(mha, name)[...] = getattr(gqa, name)[...]
  mha.wk[...] = jnp.repeat(gqa.wk[...], m, axis=1)
  mha.wv[...] = jnp.repeat(gqa.wv[...], m, axis=1)
  x = jax.random.normal(jax.random.key(9), (2, 7, 32))
  pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
  out_g, _ = call(gqa, x, pos)
  out_m, _ = call(mha, x, pos)
  np.testing.assert_allclose(out_g, out_m, atol=ATOL)
  assert np.abs(np.asarray(out_g)).max() > 0.1  # not a degenerate all-zero comparison


def pos7():
  return jnp.broadcast_to(jnp.arange(7), (2, 7))


def _row_sequences(x, lengths, new):
  """Row b: its first lengths[b] inputs, then new[b], then zero padding to x's length (7). A
  causal no-cache pass over this gives, at index lengths[b], what a cached decode step should."""
  rows = [jnp.concatenate([x[b, :n], new[b], jnp.zeros((x.shape[1] - n - 1, x.shape[2]))])
          for b, n in enumerate(lengths)]
  return jnp.stack(rows)


def test_gqa_cache_matches_no_cache():
  """Prefill rows of different lengths into a layer cache, decode one token per row; each row's
  output equals the no-cache output on its own sequence."""
  cfg = tiny(attention="gqa", n_kv_heads=2)
  att = random_module(GQAttention, cfg, seed=0)
  x = jax.random.normal(jax.random.key(10), (2, 7, 32))
  layer = init_cache(cfg, 2, 12).layers[0]
  pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
  _, layer = call(att, x[:, :6], pos, layer, jnp.zeros((2,), jnp.int32))
  lengths = jnp.array([4, 6], jnp.int32)  # row 0's slots 4, 5 are stale padding from now on
  new = jnp.stack([x[0, 6], x[1, 6]])[:, None]
  out, layer = call(att, new, lengths[:, None], layer, lengths)
  ref, _ = call(att, _row_sequences(x, [4, 6], new), pos7())
  for b, n in enumerate([4, 6]):
    np.testing.assert_allclose(out[b, 0], ref[b, n], atol=ATOL)


@pytest.mark.parametrize("attention,impl", [("gqa", None), ("mla", "naive"), ("mla", "absorbed")])
def test_blocked_causal_attention_equals_one_block(attention, impl):
  """attn_block=4 over T=13 (blocks 4, 4, 4, 1, each scoring only the keys it sees) gives the same
  outputs and input gradients as one T x T block."""
  x = jax.random.normal(jax.random.key(13), (2, 13, 32))
  pos = jnp.broadcast_to(jnp.arange(13), (2, 13))
  results = []
  for block in (0, 4):
    cfg = tiny(attention=attention, max_seq_len=16, attn_block=block,
               **({"n_kv_heads": 2} if attention == "gqa" else {}))
    att = random_module(GQAttention if attention == "gqa" else MLAttention, cfg, seed=2)
    graphdef, state = nnx.split(att)

    def loss(x_):
      module = nnx.merge(graphdef, state)
      return jnp.sum(jnp.sin((module(x_, pos, impl=impl) if impl else module(x_, pos))[0]))

    results.append((call(att, x, pos, impl=impl)[0], jax.jit(jax.grad(loss))(x)))
  (out0, grad0), (out4, grad4) = results
  np.testing.assert_allclose(out4, out0, atol=ATOL)
  np.testing.assert_allclose(grad4, grad0, atol=ATOL)
  assert np.abs(np.asarray(out0)).max() > 0.1


# MLA: absorbed == naive ---------------------------------------------------------------------------


@pytest.mark.parametrize("q_lora_rank", [0, 12])
def test_mla_absorbed_equals_naive_without_cache(q_lora_rank):
  cfg = tiny(attention="mla", q_lora_rank=q_lora_rank)
  att = random_module(MLAttention, cfg, seed=0)
  x = jax.random.normal(jax.random.key(11), (2, 7, 32))
  pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
  naive, none_cache = call(att, x, pos, impl="naive")
  absorbed, _ = call(att, x, pos, impl="absorbed")
  assert none_cache is None
  np.testing.assert_allclose(absorbed, naive, atol=ATOL)
  assert np.abs(np.asarray(naive)).max() > 0.1


@pytest.mark.parametrize("q_lora_rank", [0, 12])
def test_mla_absorbed_equals_naive_with_cache(q_lora_rank):
  cfg = tiny(attention="mla", q_lora_rank=q_lora_rank, rope_layout="interleaved")
  att = random_module(MLAttention, cfg, seed=1)
  x = jax.random.normal(jax.random.key(12), (2, 7, 32))
  empty = init_cache(cfg, 2, 12).layers[0]
  zeros = jnp.zeros((2,), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
  outs, caches = {}, {}
  for impl in ("naive", "absorbed"):
    prefill, layer = call(att, x[:, :6], pos, empty, zeros, impl=impl)
    lengths = jnp.array([3, 6], jnp.int32)  # different fill levels per row
    step, layer = call(att, x[:, 6:7], lengths[:, None], layer, lengths, impl=impl)
    outs[impl], caches[impl] = (prefill, step), layer
  for a, b in zip(outs["naive"], outs["absorbed"]):
    np.testing.assert_allclose(b, a, atol=ATOL)
  # The cache is written the same way whichever path reads it.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=ATOL), caches["naive"],
               caches["absorbed"])
  # The decode step equals a no-cache pass over each row's own sequence.
  ref, _ = call(att, _row_sequences(x, [3, 6], x[:, 6:7]), pos7(), impl="naive")
  for b, n in enumerate([3, 6]):
    np.testing.assert_allclose(outs["absorbed"][1][b, 0], ref[b, n], atol=ATOL)
