"""Model-level checks: cached decode == full forward for every variant, cache sizes, tracing,
generation, config validation, parameter counts.

Weights use init_std 0.2 so attention is far from uniform (checks at the
0.02 default are weak).
"""

import functools
import importlib
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_helpers import FAST_COMPILE, full_and_incremental, random_module
from model_helpers import tiny as _tiny

from mla_jax.core import cache as cache_lib
from mla_jax.core.config import ModelConfig, kv_cache_bytes_per_token
from mla_jax.core.model import Transformer, count_params, init_cache


def tiny(**kw):
  """The shared tiny config with 2 layers (decode tests cross a layer boundary)."""
  return _tiny(**{"n_layers": 2, **kw})


# The package re-exports the function `generate`, which shadows the submodule as an attribute.
gen = importlib.import_module("mla_jax.core.generate")

ATOL = 1e-5


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
  return random_module(Transformer, cfg, seed)


VARIANTS = {
    "mha": dict(attention="mha"),
    "gqa2": dict(attention="gqa", n_kv_heads=2),
    "gqa2_interleaved": dict(attention="gqa", n_kv_heads=2, rope_layout="interleaved"),
    "mqa": dict(attention="mqa"),
    "mla_q0": dict(attention="mla"),
    "mla_q12_interleaved": dict(attention="mla", q_lora_rank=12, rope_layout="interleaved"),
}


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _forward(graphdef, state, tokens):
  return nnx.merge(graphdef, state)(tokens)


def forward(model, tokens):
  return _forward(*nnx.split(model), tokens)


# Cached decode == full forward --------------------------------------------------------------------


# Two layers where it matters most (each layer must read and write its own cache), one elsewhere.
DECODE_LAYERS = {"mha": 2, "mla_q12_interleaved": 2}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_and_decode_match_full_forward(variant):
  cfg = tiny(**VARIANTS[variant], n_layers=DECODE_LAYERS.get(variant, 1))
  model = random_model(cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, cfg.vocab_size)
  full, incremental, cache = full_and_incremental(model, tokens, n_prefill=4)
  np.testing.assert_allclose(incremental, full, atol=ATOL)
  np.testing.assert_array_equal(cache.lengths, [10, 10])
  # Logits are not flat: a cache that ignored history would not pass by accident.
  assert float(jnp.std(full)) > 0.3
  # Filled cache: measured bytes per token equal the analytic formula.
  assert cache_lib.cache_bytes_per_token(cache) == kv_cache_bytes_per_token(cfg)


@pytest.mark.parametrize("q_lora_rank", [0, 12])
def test_mla_full_decode_absorbed_equals_naive(q_lora_rank):
  naive_cfg = tiny(attention="mla", q_lora_rank=q_lora_rank, mla_decode_impl="naive")
  absorbed_cfg = tiny(attention="mla", q_lora_rank=q_lora_rank, mla_decode_impl="absorbed")
  assert naive_cfg.diff(absorbed_cfg) == {"mla_decode_impl": ("naive", "absorbed")}
  naive, absorbed = random_model(naive_cfg, seed=3), random_model(absorbed_cfg, seed=3)
  tokens = jax.random.randint(jax.random.key(4), (2, 10), 0, 64)
  full, out_naive, cache_naive = full_and_incremental(naive, tokens, n_prefill=3)
  _, out_absorbed, cache_absorbed = full_and_incremental(absorbed, tokens, n_prefill=3)
  np.testing.assert_allclose(out_absorbed, out_naive, atol=ATOL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=ATOL), cache_naive,
               cache_absorbed)
  np.testing.assert_allclose(out_absorbed, full, atol=ATOL)


# Cache sizes --------------------------------------------------------------------------------------

# Hand counts for tiny(): L = 2, H = 4, head dim K = 8, MLA C = 16, R = 8; 4 bytes (float32).
HAND_BYTES_PER_TOKEN = {
    "mha": 2 * 4 * 8 * 2 * 4,  # 2 (k, v) * H * K * L * 4 = 512
    "gqa2": 2 * 2 * 8 * 2 * 4,  # 2 * G * K * L * 4 = 256
    "mqa": 2 * 1 * 8 * 2 * 4,  # 2 * 1 * K * L * 4 = 128
    "mla_q0": (16 + 8) * 2 * 4,  # (C + R) * L * 4 = 192
}


@pytest.mark.parametrize("cache_dtype", ["", "bfloat16"])
@pytest.mark.parametrize("variant", list(HAND_BYTES_PER_TOKEN))
def test_cache_bytes_per_token(variant, cache_dtype):
  cfg = tiny(**VARIANTS[variant], cache_dtype=cache_dtype)
  itemsize_ratio = 2 if cache_dtype == "bfloat16" else 1
  assert kv_cache_bytes_per_token(cfg) == HAND_BYTES_PER_TOKEN[variant] // itemsize_ratio
  cache = init_cache(cfg, 3, 12)
  # Fill 5 slots per row the way the model writes them (float32 values cast to the cache dtype);
  # the float32 cache filled by real decoding is checked in test_prefill_and_decode_match_full...
  lengths = jnp.array([0, 2, 4], jnp.int32)
  fill = lambda buf: cache_lib.write(buf, jnp.ones((3, 5) + buf.shape[2:], jnp.float32), lengths)
  cache = cache.replace(layers=jax.tree.map(fill, cache.layers), lengths=lengths + 5)
  assert float(jax.tree.leaves(cache.layers)[0][2, 8].sum()) > 0
  want_dtype = jnp.bfloat16 if cache_dtype else jnp.float32
  assert all(x.dtype == want_dtype for x in jax.tree.leaves(cache.layers))
  assert cache_lib.cache_bytes_per_token(cache) == kv_cache_bytes_per_token(cfg)


def test_mla_cache_holds_only_latent_and_shared_rope_key():
  cfg = tiny(attention="mla", q_lora_rank=12)  # H = 4; B, S, C, R below avoid the value 4
  cache = init_cache(cfg, 3, 12)
  assert len(cache.layers) == cfg.n_layers
  for layer in cache.layers:
    assert isinstance(layer, cache_lib.LatentCache)
    assert layer.c.shape == (3, 12, 16)  # [B, S, C]
    assert layer.k_rope.shape == (3, 12, 8)  # [B, S, R]
    for leaf in jax.tree.leaves(layer):
      assert leaf.ndim == 3 and cfg.n_heads not in leaf.shape
  # Per token: (C + R) * L numbers, against H * (N + E) * L for decompressed per-head k/v.
  per_token = sum(x.size for x in jax.tree.leaves(cache.layers)) // (3 * 12)
  assert per_token == (16 + 8) * 2
  assert per_token < cfg.n_heads * (cfg.nope_dim + cfg.v_dim) * cfg.n_layers


# Tracing ------------------------------------------------------------------------------------------


def test_decode_step_is_traced_once_across_steps():
  cfg = tiny(attention="gqa", n_kv_heads=2, max_seq_len=15)  # a config no other test traces
  model = random_model(cfg, seed=5)
  graphdef, state = nnx.split(model)
  tokens = jax.random.randint(jax.random.key(6), (3, 13), 0, 64)
  cache = init_cache(cfg, 3)
  before = gen.decode_step_jit._cache_size()
  steps = []
  for t in range(13):
    logits, cache = gen.decode_step_jit(graphdef, state, cache, tokens[:, t:t + 1])
    steps.append(logits)
  assert gen.decode_step_jit._cache_size() == before + 1  # one compile for all 13 steps
  np.testing.assert_array_equal(cache.lengths, [13, 13, 13])
  np.testing.assert_allclose(jnp.stack(steps, axis=1), forward(model, tokens), atol=ATOL)


# Generation ---------------------------------------------------------------------------------------

PROMPTS = [[5, 9, 2, 33, 7], [12, 40]]
NEW = 8


@pytest.fixture(scope="module")
def gen_model():
  return random_model(tiny(attention="mla"), seed=11)


def reference_continuation(model, prompt, n, pick=None):
  """Greedy continuation from full forward passes (no cache): argmax of the last logit, n times.
  Sequences are right-padded to max_seq_len so one compiled forward serves every length."""
  seq = list(prompt)
  for _ in range(n):
    padded = np.zeros((1, model.cfg.max_seq_len), np.int32)
    padded[0, :len(seq)] = seq
    logits = np.asarray(forward(model, jnp.asarray(padded))[0, len(seq) - 1])
    top2 = np.sort(logits)[-2:]
    assert top2[1] - top2[0] > 1e-4, "near-tie: pick another prompt"
    seq.append(int(np.argmax(logits)))
  return seq[len(prompt):]


@pytest.fixture(scope="module")
def greedy_refs(gen_model):
  return [reference_continuation(gen_model, p, NEW) for p in PROMPTS]


def test_generate_greedy_batch_of_different_lengths_equals_argmax_of_full_forward(
    gen_model, greedy_refs):
  """Right-padded prompts of lengths 5 and 2, one batch: each row continues its own prompt."""
  out = gen.generate(gen_model, PROMPTS, NEW)
  assert out == greedy_refs
  assert greedy_refs[0] != greedy_refs[1]


def test_generate_eos_stops_only_its_row(gen_model, greedy_refs):
  ref0, ref1 = greedy_refs
  # A token row 0 emits at step k >= 1 for the first time, and row 1 never emits.
  k = next(i for i in range(1, NEW) if ref0[i] not in ref0[:i] and ref0[i] not in ref1)
  out = gen.generate(gen_model, PROMPTS, NEW, eos_id=ref0[k])
  assert out == [ref0[:k + 1], ref1]


@pytest.mark.parametrize("settings", [dict(top_k=1), dict(top_p=1e-3)])
def test_generate_sampling_that_keeps_one_token_equals_greedy(gen_model, greedy_refs, settings):
  out = gen.generate(gen_model, PROMPTS, NEW, temperature=1.0, seed=123, **settings)
  assert out == greedy_refs


def test_generate_top_k_samples_stay_in_top_k(gen_model):
  out = gen.generate(gen_model, PROMPTS, NEW, temperature=2.0, top_k=3, seed=7)
  greedy = gen.generate(gen_model, PROMPTS, NEW)
  assert out != greedy  # at temperature 2 sampling really samples
  for prompt, new in zip(PROMPTS, out):
    assert len(new) == NEW
    seq = prompt + new
    padded = np.zeros((1, 16), np.int32)
    padded[0, :len(seq)] = seq
    logits = np.asarray(forward(gen_model, jnp.asarray(padded))[0])
    for i, tok in enumerate(new):
      top3 = np.argsort(logits[len(prompt) + i - 1])[-3:]
      assert tok in top3


def test_generate_sampling_settings_do_not_retrace(gen_model):
  gen.generate(gen_model, PROMPTS, NEW, temperature=0.7, top_k=5, top_p=0.9, seed=1)
  before = gen._generate._cache_size()
  a = gen.generate(gen_model, PROMPTS, NEW, temperature=1.3, top_k=0, top_p=0.5, seed=2)
  b = gen.generate(gen_model, PROMPTS, NEW, temperature=0.0, top_k=17, top_p=1.0, eos_id=3)
  assert gen._generate._cache_size() == before
  assert all(0 <= t < 64 for row in a + b for t in row)


def test_generate_rejects_too_long_requests(gen_model):
  with pytest.raises(ValueError, match="max_seq_len"):
    gen.generate(gen_model, [[1] * 10], max_new_tokens=7)  # 17 > max_seq_len 16
  with pytest.raises(ValueError, match="vocab_size"):
    gen.generate(gen_model, [[1, 64]], max_new_tokens=2)


# Config validation --------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    (dict(attention="gqa", n_heads=4, n_kv_heads=3), "n_kv_heads"),  # 4 % 3 != 0
    (dict(attention="gqa", n_heads=4, n_kv_heads=0), "n_kv_heads"),  # gqa needs it
    (dict(attention="mha", d_model=36, n_heads=4), "head_dim"),  # head dim 9: odd for RoPE
    (dict(attention="mla", qk_rope_head_dim=7), "qk_rope_head_dim"),  # odd rope dim
    (dict(attention="mla", qk_rope_head_dim=16), "qk_rope_head_dim"),  # 16 > head dim 8
    (dict(d_model=0), "d_model"),
    (dict(n_layers=-1), "n_layers"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(attention="mla", kv_lora_rank=0), "kv_lora_rank"),
    (dict(attention="mlq"), "attention"),
    (dict(rope_layout="rotate"), "rope_layout"),
    (dict(attention="mla", mla_decode_impl="fast"), "mla_decode_impl"),
])
def test_config_errors_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=rf"^model\.{field}: ") as err:
    tiny(**kwargs)
  assert "\n" not in str(err.value)


def test_from_mapping():
  good = {"attention": "gqa", "n_kv_heads": 2, "d_model": 32, "n_heads": 4}
  assert ModelConfig.from_mapping(good) == ModelConfig(**good)
  with pytest.raises(ValueError, match=r"^model\.n_head: unknown model field") as err:
    ModelConfig.from_mapping({"d_model": 32, "n_head": 4})
  assert "\n" not in str(err.value)


# Parameter counts ---------------------------------------------------------------------------------


def test_count_params_matches_hand_count():
  # V = 64, D = 32, H = 4, K = 8, L = 2, F = 128 (8/3 * 32 = 85, rounded up to a multiple of 64).
  cfg = tiny(attention="mha")
  assert cfg.mlp_dim == 128
  per_layer = 2 * 32 + 4 * 32 * 4 * 8 + 3 * 32 * 128  # 2 norms, wq/wk/wv/wo, gate/up/down
  total = 64 * 32 + 2 * per_layer + 32  # embedding, layers, final norm
  assert total == 34976
  counts = count_params(random_model(cfg))
  assert counts == {"total": 34976, "non_embedding": 34976 - 64 * 32}
  untied = count_params(random_model(tiny(attention="mha", tie_embeddings=False)))
  assert untied == {"total": 34976 + 32 * 64, "non_embedding": 34976 - 64 * 32}


def test_count_params_mla_attention():
  # Per layer: wq D*H*(N+R) + wkv_a D*(C+R) + kv_norm C + wkv_b C*H*(N+E) + wo H*E*D.
  mla_attn = 32 * 4 * 16 + 32 * 24 + 16 + 16 * 4 * 16 + 4 * 8 * 32
  mha_attn = 4 * 32 * 4 * 8
  mla = count_params(random_model(tiny(attention="mla")))
  mha = count_params(random_model(tiny(attention="mha")))
  assert mla["total"] - mha["total"] == 2 * (mla_attn - mha_attn)


def test_package_exports_the_documented_functions():
  """`from mla_jax import generate` is the function even after the submodule mla_jax.generate was
  imported (a lazy package __init__ once returned the module here)."""
  importlib.import_module("mla_jax.core.generate")
  from mla_jax import Transformer, generate, load_model
  assert inspect.isfunction(generate) and generate.__module__ == "mla_jax.core.generate"
  assert inspect.isfunction(load_model) and inspect.isclass(Transformer)
