"""The fused MLA decode kernel (mla_jax/kernels/mla_decode.py) in Pallas interpret mode (CPU).

Interpret mode runs the very kernel a GPU compiles, with the same padding to power-of-two tiles and
the same masked loads, so these check its indexing: ragged lengths (an empty and a full row), odd
C / R / H, blocks that do not tile S, several splits (including empty ones). Shapes are tiny:
interpret mode costs ~1 s per compiled configuration.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_helpers import FAST_COMPILE, full_and_incremental, random_module, tiny

from mla_jax.core import ops
from mla_jax.core.attention import MLAttention, mla_absorbed, mla_pallas, resolve_mla_impl
from mla_jax.core.model import Transformer, init_cache
from mla_jax.kernels import mla_decode

ATOL = 1e-5
SCALE = 0.3


def inputs(b, h, c, r, s, dtype=jnp.float32, seed=0):
  """q_latent [B, H, C], q_rope [B, H, R] float32; c [B, S, C], k_rope [B, S, R] in dtype."""
  k = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(k[0], (b, h, c)), jax.random.normal(k[1], (b, h, r)),
          jax.random.normal(k[2], (b, s, c)).astype(dtype),
          jax.random.normal(k[3], (b, s, r)).astype(dtype))


@functools.partial(jax.jit, static_argnames=("scale", "block_h", "block_s", "num_splits"),
                   compiler_options=FAST_COMPILE)
def kernel_partial(q, q_r, c, k_r, lengths, scale, **kw):
  return mla_decode.mla_decode_partial(q, q_r, c, k_r, lengths, scale, interpret=True, **kw)


@functools.partial(jax.jit, static_argnames="scale", compiler_options=FAST_COMPILE)
def reference(q, q_r, c, k_r, lengths, scale):
  """(normalised output, m, l) of the plain-JAX reference."""
  o, m, l = mla_decode.reference_partial(q, q_r, c, k_r, lengths, scale)
  return ops.normalise(o, l), m, l


def check_against_reference(q, q_r, c, k_r, lengths, atol=ATOL, **kw):
  o, m, l = map(np.asarray, kernel_partial(q, q_r, c, k_r, lengths, SCALE, **kw))
  want, rm, rl = map(np.asarray, reference(q, q_r, c, k_r, lengths, SCALE))
  filled = np.asarray(lengths) > 0
  np.testing.assert_allclose(m[filled], rm[filled], atol=atol, rtol=atol)
  np.testing.assert_allclose(o / np.where(l > 0, l, 1)[..., None], want, atol=atol, rtol=atol)
  # The unnormalised sums agree too (what a later combine consumes).
  np.testing.assert_allclose(l, rl, rtol=atol, atol=atol)
  # A row with no filled slot: an empty partial (m = -1e30, l = 0, o = 0), not NaN.
  np.testing.assert_array_equal(l[~filled], 0.0)
  np.testing.assert_array_equal(o[~filled], 0.0)
  assert np.all(np.isfinite(o))


# (B, H, C, R, S, lengths, keywords): DeepSeek-like powers of two, odd C / R / H, blocks that do not
# tile S, more splits than blocks (empty splits), a head block count > 1.
CASES = {
    "pow2": (2, 4, 64, 16, 64, [64, 37], dict()),
    "c48_r8_ragged": (3, 4, 48, 8, 40, [0, 40, 17], dict(block_s=16)),
    "c100_r6_h5": (3, 5, 100, 6, 37, [1, 37, 20], dict(block_s=8, num_splits=3, block_h=2)),
    "splits_gt_blocks": (2, 3, 20, 4, 16, [16, 5], dict(block_s=4, num_splits=6)),
    "block_bigger_than_rows": (2, 4, 16, 8, 12, [12, 3], dict(block_s=32, num_splits=2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_equals_reference(case):
  b, h, c, r, s, lengths, kw = CASES[case]
  check_against_reference(*inputs(b, h, c, r, s), jnp.array(lengths, jnp.int32), **kw)


def test_kernel_bfloat16_cache():
  """A bfloat16 cache (float32 queries): scores and softmax still float32, the tile is cast as
  read; against a reference that reads the same rounded cache."""
  q, q_r, c, k_r = inputs(2, 4, 48, 8, 40, jnp.bfloat16, seed=1)
  check_against_reference(q, q_r, c, k_r, jnp.array([40, 23], jnp.int32), block_s=16,
                          num_splits=2)
  # bfloat16 queries as well (bfloat16 dots, float32 accumulation): a looser tolerance.
  lengths = jnp.array([40, 23], jnp.int32)
  o, _, l = kernel_partial(q.astype(jnp.bfloat16), q_r.astype(jnp.bfloat16), c, k_r, lengths,
                           SCALE, block_s=16)
  np.testing.assert_allclose(o / l[..., None], reference(q, q_r, c, k_r, lengths, SCALE)[0],
                             atol=3e-2)


def test_combine_partials_equals_one_split():
  q, q_r, c, k_r = inputs(2, 4, 32, 8, 64, seed=2)
  lengths = jnp.array([64, 9], jnp.int32)  # row 1 fills only the first of 4 splits: 3 empty
  partials = jax.jit(functools.partial(mla_decode.mla_decode_partials, scale=SCALE, block_s=8,
                                       num_splits=4, interpret=True),
                     compiler_options=FAST_COMPILE)(q, q_r, c, k_r, lengths)
  assert partials[0].shape == (2, 4, 4, 32)
  assert np.all(np.asarray(partials[2])[1, 1:] == 0.0)  # the empty splits
  o4, m4, l4 = ops.combine_partials(*partials)
  o1, m1, l1 = kernel_partial(q, q_r, c, k_r, lengths, SCALE, block_s=8, num_splits=1)
  np.testing.assert_allclose(m4, m1, atol=ATOL)
  np.testing.assert_allclose(l4, l1, rtol=ATOL)
  np.testing.assert_allclose(o4, o1, rtol=ATOL, atol=ATOL)
  # Merging the partials of two disjoint key sets equals attending over their union: how the
  # decode step merges the cache with its new token, and a sequence-sharded cache its shards.
  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def halves_merged(q, q_r, c, k_r, lengths):
    halves = [mla_decode.reference_partial(q, q_r, c[:, i:i + 32], k_r[:, i:i + 32],
                                           jnp.clip(lengths - i, 0, 32), SCALE) for i in (0, 32)]
    o, _, l = ops.combine_partials(*[jnp.stack(x, axis=1) for x in zip(*halves)])
    return o / l[..., None]

  np.testing.assert_allclose(halves_merged(q, q_r, c, k_r, lengths), o1 / l1[..., None],
                             atol=ATOL)


def test_attention_path_equals_absorbed_with_new_tokens():
  """mla_pallas (kernel over the cache, merged with the new tokens' causal block) equals
  mla_absorbed for T = 3 new tokens (a chunked prefill into a cache; T = 1 is the model tests')
  over a ragged cache."""
  b, t, h, n, r, c_dim, e, s = 2, 3, 3, 8, 6, 20, 5, 24
  k = jax.random.split(jax.random.key(3), 7)
  wkv_b = 0.3 * jax.random.normal(k[0], (c_dim, h, n + e))
  past = (jax.random.normal(k[1], (b, s, c_dim)), jax.random.normal(k[2], (b, s, r)))
  lengths = jnp.array([0, 13], jnp.int32)
  new = (jax.random.normal(k[3], (b, t, h, n)), jax.random.normal(k[4], (b, t, h, r)),
         jax.random.normal(k[5], (b, t, c_dim)), jax.random.normal(k[6], (b, t, r)), wkv_b)
  both = jax.jit(lambda *a: [f(*a, past=past, lengths=lengths) for f in (mla_pallas, mla_absorbed)],
                 compiler_options=FAST_COMPILE)
  got, want = both(*new)
  np.testing.assert_allclose(got, want, atol=ATOL)
  assert np.abs(np.asarray(want)).max() > 0.1


@pytest.mark.parametrize("cache_dtype", ["", "bfloat16"])
def test_model_decode_pallas_equals_absorbed(cache_dtype):
  """A whole Transformer (2 layers, low-rank query) decoding token by token gives the same logits
  and cache with mla_decode_impl='pallas' as with 'absorbed' (float32 or bfloat16 cache)."""
  kw = dict(attention="mla", n_layers=2, q_lora_rank=12, cache_dtype=cache_dtype)
  tokens = jax.random.randint(jax.random.key(4), (2, 10), 0, 64)
  out = {}
  for impl in ("absorbed", "pallas"):
    model = random_module(Transformer, tiny(mla_decode_impl=impl, **kw), seed=5)
    out[impl] = full_and_incremental(model, tokens, 3)[1:]
  np.testing.assert_allclose(out["pallas"][0], out["absorbed"][0], atol=ATOL)
  # Layer 2's cache holds projections of layer 1's output, equal to ~1e-7: rounded to bfloat16, a
  # value may land one bfloat16 step (2^-8 relative) apart.
  rtol = 2.0 ** -7 if cache_dtype else 0.0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a, np.float32),
                                                       np.asarray(b, np.float32), atol=ATOL,
                                                       rtol=rtol),
               out["pallas"][1], out["absorbed"][1])
  assert float(jnp.std(out["absorbed"][0])) > 0.3  # logits are not flat


def test_layer_ragged_decode_pallas_equals_absorbed():
  """One MLAttention decode step over rows filled to different lengths (3 and 6 of 12 slots)."""
  cfg = tiny(attention="mla", rope_layout="interleaved")
  att = random_module(MLAttention, cfg, seed=1)
  x = jax.random.normal(jax.random.key(12), (2, 7, 32))
  layer = init_cache(cfg, 2, 12).layers[0]
  graphdef, state = nnx.split(att)
  call = jax.jit(lambda state, *a, impl: nnx.merge(graphdef, state)(*a, impl=impl),
                 static_argnames="impl", compiler_options=FAST_COMPILE)
  _, layer = call(state, x[:, :6], jnp.broadcast_to(jnp.arange(6), (2, 6)), layer,
                  jnp.zeros((2,), jnp.int32), impl="absorbed")
  lengths = jnp.array([3, 6], jnp.int32)
  outs = {impl: call(state, x[:, 6:7], lengths[:, None], layer, lengths, impl=impl)
          for impl in ("absorbed", "pallas")}
  np.testing.assert_allclose(outs["pallas"][0], outs["absorbed"][0], atol=ATOL)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), outs["pallas"][1],
               outs["absorbed"][1])


def test_auto_and_config_choices():
  # No GPU here (and 8 fake devices in the tests): auto keeps the einsums.
  assert resolve_mla_impl("auto", 4096) == "absorbed"
  assert resolve_mla_impl("pallas", 4096) == "pallas"
  assert mla_decode.supported(4096, backend="gpu") and not mla_decode.supported(8, backend="gpu")
  assert not mla_decode.supported(4096, backend="cpu")
  assert tiny(attention="mla", mla_decode_impl="auto").mla_decode_impl == "auto"
  with pytest.raises(ValueError, match=r"^model\.mla_decode_impl: .*'pallas', 'auto'"):
    tiny(attention="mla", mla_decode_impl="fused")
  with pytest.raises(ValueError, match=r"^model\.mla_prefill_impl: "):
    tiny(attention="mla", mla_prefill_impl="pallas")


def test_gpu_block_rules():
  """The compiled (GPU) kernel refuses tiles Triton cannot build; defaults satisfy them."""
  assert mla_decode.default_block_s(32768, 512, 2, interpret=False) == 32
  assert mla_decode.default_block_s(32768, 256, 4, interpret=False) == 32
  assert mla_decode.default_block_s(12, 48, 4, interpret=True) == 8
  assert mla_decode.default_num_splits(1, 1, 32768, 64) == 128
  assert mla_decode.default_num_splits(64, 1, 4096, 64) == 5
  assert mla_decode.default_num_splits(64, 1, 128, 64) == 1


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the compiled kernel needs a GPU")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(1, 8, 256, 32, 4096), (8, 16, 512, 64, 1000),
                                   (3, 5, 100, 6, 300)])
def test_compiled_kernel_on_gpu(shape, dtype):
  """The compiled (Triton) kernel against the reference: the bench's MLA, DeepSeek's C / R with a
  ragged batch and an S that no tile divides, and odd sizes (padded tiles)."""
  b, h, c, r, s = shape
  q, q_r, cache_c, cache_r = inputs(b, h, c, r, s, dtype, seed=6)
  lengths = jnp.asarray(np.random.default_rng(0).integers(0, s + 1, b), jnp.int32).at[0].set(s)
  o, _, l = jax.jit(functools.partial(mla_decode.mla_decode_partial, scale=SCALE))(
      q, q_r, cache_c, cache_r, lengths)
  want = reference(q, q_r, cache_c, cache_r, lengths, SCALE)[0]
  np.testing.assert_allclose(ops.normalise(o, l), want, atol=1e-4, rtol=1e-4)
  assert mla_decode.supported(s)
