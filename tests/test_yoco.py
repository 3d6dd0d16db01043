"""YOCO (core/yoco.py): cached decode == full forward for the key/value and the latent global
cache, padded prefills, generation, cache bytes by hand, config errors.

Tiny configs (model_helpers.tiny: D 32, H 4, K 8, V 64), 2 layers (1 self-decoder, 1 cross), a
window of 3 tokens so the ring buffer wraps within the 10-token sequences.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_helpers import FAST_COMPILE, full_and_incremental, random_module, tiny

from mla_jax.core import cache as cache_lib
from mla_jax.core import yoco
from mla_jax.core.config import kv_cache_bytes, kv_cache_bytes_per_token
from mla_jax.core.generate import generate
from mla_jax.core.model import Transformer, init_cache

ATOL = 1e-5
GLOBAL = {
    # GQA self-decoder (2 kv heads), global cache with 1 kv head; prefill longer than the window.
    "kv": dict(n_kv_heads=2, yoco_kv_heads=1),
    # MHA self-decoder, latent global cache (C 16, R 8) with a compressed query (Q 12).
    "latent": dict(yoco_latent=True, kv_lora_rank=16, qk_rope_head_dim=8, q_lora_rank=12),
}


def yoco_tiny(**kw):
  return tiny(**{"attention": "yoco", "n_layers": 2, "yoco_window": 3, **kw})


@pytest.mark.parametrize("kind, n_prefill", [("kv", 7), ("latent", 4)])
def test_cached_decode_matches_full_forward(kind, n_prefill):
  cfg = yoco_tiny(**GLOBAL[kind])
  model = random_module(Transformer, cfg, seed=1)
  tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, cfg.vocab_size)
  full, incremental, cache = full_and_incremental(model, tokens, n_prefill)
  np.testing.assert_allclose(incremental, full, atol=ATOL)
  assert float(jnp.std(full)) > 0.3  # not flat: a cache that ignored history would fail
  np.testing.assert_array_equal(cache.lengths, [10, 10])
  # One ring per self-decoder layer (W = 3 slots), then the one global cache of S = 16 slots.
  assert len(cache.layers) == 2
  assert cache.layers[0].k.shape == (2, 3, cfg.kv_heads, 8)
  assert cache.max_len == 16
  # The ring holds positions 9, 7, 8 in slots 0, 1, 2 (position mod 3), as ring_positions says.
  np.testing.assert_array_equal(yoco.ring_positions(cache.lengths, 3), [[9, 7, 8]] * 2)


def test_window_limits_what_a_token_sees():
  """Changing a token more than W - 1 positions back changes nothing in the self-decoder; with
  one layer of each kind, it still reaches the output through the global cache only."""
  cfg = yoco_tiny(**GLOBAL["kv"])
  graphdef, state = nnx.split(random_module(Transformer, cfg, seed=3).blocks[0].attn)
  x = jax.random.normal(jax.random.key(4), (1, 8, 32))
  run = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, jnp.arange(8)[None])[0],
                compiler_options=FAST_COMPILE)
  out, out2 = run(state, x), run(state, x.at[:, 2].add(1.0))
  np.testing.assert_array_equal(out2[:, 5:], out[:, 5:])  # 5 - 2 >= W = 3: outside the window
  assert float(jnp.abs(out2[:, 4] - out[:, 4]).max()) > 1e-3  # 4 - 2 < 3: inside


def test_ring_write_keeps_the_newest_and_skips_padding():
  buf = jnp.zeros((2, 3, 1), jnp.float32)
  new = jnp.arange(1, 6, dtype=jnp.float32).reshape(1, 5, 1).repeat(2, 0)  # values 1..5
  # Row 0: 5 tokens at positions 0..4 -> slots (0 1 2) hold positions 3, 4, 2 = values 4, 5, 3.
  # Row 1: lengths 1 (slot 0 held position 0), only 2 real tokens -> positions 1, 2 in slots 1, 2.
  out = yoco.ring_write(buf.at[1, 0].set(9.0), new, jnp.array([0, 1]), jnp.array([5, 2]))
  np.testing.assert_array_equal(out[..., 0], [[4, 5, 3], [9, 1, 2]])


def test_padded_prefill_with_n_valid_matches_separate_rows():
  """Right-padded prompts (generate's layout): with n_valid the padding is not written to the
  rings, so after rewinding lengths each row decodes as if alone."""
  cfg = yoco_tiny(**GLOBAL["kv"])
  model = random_module(Transformer, cfg, seed=5)
  graphdef, state = nnx.split(model)
  prompts = jnp.array([[5, 9, 2, 33, 7, 1], [12, 40, 3, 0, 0, 0]], jnp.int32)
  lengths = jnp.array([6, 3], jnp.int32)
  nxt = jnp.array([[4], [8]], jnp.int32)

  whole = jnp.array([[5, 9, 2, 33, 7, 1, 4], [12, 40, 3, 8, 0, 0, 0]], jnp.int32)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def run(state):
    m = nnx.merge(graphdef, state)
    _, cache = m.extend(prompts, init_cache(cfg, 2), n_valid=lengths)
    logits, _ = m.extend(nxt, cache.replace(lengths=lengths))
    return logits[:, 0], m(whole)

  got, full = run(state)
  np.testing.assert_allclose(got[0], full[0, 6], atol=ATOL)
  np.testing.assert_allclose(got[1], full[1, 3], atol=ATOL)


def test_generate_greedy_equals_argmax_of_full_forward():
  cfg = yoco_tiny(**GLOBAL["kv"])
  model = random_module(Transformer, cfg, seed=6)
  # Unequal lengths: generate prefills with n_valid, so the short prompt's padding never reaches
  # its ring (window 3 < the 3 padding slots would otherwise overwrite all of it).
  prompts = [[5, 9, 2, 33, 7, 11], [12, 40, 3]]
  out = generate(model, prompts, 5)
  fwd = jax.jit(lambda s, t: nnx.merge(*nnx.split(model)[:1], s)(t),
                compiler_options=FAST_COMPILE)
  state = nnx.split(model)[1]
  for prompt, new in zip(prompts, out):
    seq = prompt + new
    padded = jnp.zeros((1, 16), jnp.int32).at[0, :len(seq)].set(jnp.array(seq))
    logits = fwd(state, padded)[0]
    assert [int(jnp.argmax(logits[len(prompt) + i - 1])) for i in range(5)] == new


@pytest.mark.parametrize("kind, per_token", [("kv", 2 * 1 * 8), ("latent", 16 + 8)])
def test_cache_bytes(kind, per_token):
  """Hand counts, float32: the global cache grows per token; the rings (1 self-decoder layer,
  min(W, S) slots, 2 * G * K elements) are a constant per sequence."""
  cfg = yoco_tiny(**GLOBAL[kind])
  ring = min(3, 12) * 2 * cfg.kv_heads * 8  # kv: G = 2 -> 96; latent: G = H = 4 -> 192
  assert kv_cache_bytes_per_token(cfg) == per_token * 4
  assert kv_cache_bytes(cfg, 12, batch=5) == 5 * (12 * per_token + ring) * 4
  cache = jax.eval_shape(lambda: init_cache(cfg, 5, 12))
  allocated = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache.layers))
  assert allocated == kv_cache_bytes(cfg, 12, batch=5)
  assert cache_lib.cache_bytes_per_token(cache) == allocated / (5 * 12)
  # Against the GQA family at the same head counts: L = 2 layers of 2 * G * K per token.
  assert kv_cache_bytes_per_token(tiny(attention="mha", n_layers=2)) == 2 * 2 * 4 * 8 * 4
  # A window longer than the cache: the rings shrink to S slots.
  short = jax.eval_shape(lambda: init_cache(cfg, 1, 2))
  assert short.layers[0].k.shape[1] == 2 and kv_cache_bytes(cfg, 2) == sum(
      x.size * x.dtype.itemsize for x in jax.tree.leaves(short.layers))


@pytest.mark.parametrize("kwargs, field", [
    (dict(n_layers=3), "n_layers"),
    (dict(yoco_window=0), "yoco_window"),
    (dict(yoco_kv_heads=3), "yoco_kv_heads"),
    (dict(yoco_latent=True, yoco_kv_heads=2), "yoco_kv_heads"),
    (dict(yoco_latent=True, kv_lora_rank=0), "kv_lora_rank"),
    (dict(yoco_latent=True, mla_rope_kv_heads=2), "mla_rope_kv_heads"),
    (dict(n_kv_heads=3), "n_kv_heads"),
])
def test_config_errors_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=rf"^model\.{field}: ") as err:
    yoco_tiny(**kwargs)
  assert "\n" not in str(err.value)
