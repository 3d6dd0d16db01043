"""Quantised budget caches (mla_jax/kvcompress/quant.py): error bounds, bytes per token, logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_helpers import FAST_COMPILE, random_module, tiny

from mla_jax.core.model import Transformer, init_cache
from mla_jax.kvcompress import budget, decode, make, quant


@pytest.mark.parametrize("bits", [8, 4])
def test_group_quantisation_error_is_within_half_a_step(bits):
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 10, 40)) * 3, jnp.float32)
  codes, scale, zero = quant.quantize_tokens(x, bits, 16)  # groups 16, 16, 8 (a partial one)
  assert codes.shape == x.shape and scale.shape == (3, 10, 3)
  assert int(codes.max()) <= 2 ** bits - 1
  back = quant.dequantize_tokens(quant.unpack(quant.pack(codes, bits), bits, 40), scale, zero, 16)
  bound = jnp.repeat(quant.error_bound(scale), 16, axis=-1)[..., :40]
  assert (jnp.abs(back - x) <= bound).all()
  codes, scale, zero = quant.quantize_channels(x, bits, 4)  # blocks of 4 slots: 4, 4, 2
  assert scale.shape == (3, 3, 40)
  back = quant.dequantize_channels(codes, scale, zero, 4)
  bound = jnp.repeat(quant.error_bound(scale), 4, axis=-2)[:, :10]
  assert (jnp.abs(back - x) <= bound).all()
  # The step is the range over the levels: int4's is 17x int8's for the same data.
  assert float(jnp.abs(back - x).max()) <= float(jnp.ptp(x)) / (2 ** bits - 1) / 2 + 1e-6


def test_bytes_per_token_follow_the_formula():
  # KIVI int4, group 32, K = 64: codes 32 bytes + per-token value scales 2 groups x (scale, zero)
  # x 4 bytes = 48; per-channel key scales 64 channels x 2 x 4 bytes shared by 32 slots = 16.
  assert quant.bytes_per_slot(64, "token", 4, 32, 4) == 48
  assert quant.bytes_per_slot(64, "channel", 4, 32, 4) == 48
  assert quant.bytes_per_slot(64, "channel", 8, 32, 4) == 80
  assert quant.bytes_per_slot(64, "plain", 0, 32, 4) == 256
  for attention in ("gqa", "mla"):
    cfg = tiny(attention=attention, n_layers=2, **({"n_kv_heads": 2} if attention == "gqa" else {}))
    for q in ("none", "int8", "int4"):
      p = make("h2o", 16, quant=q, group=8)
      cache = jax.eval_shape(lambda: budget.init_cache(cfg, p, 3, 64))
      per = budget.stored_bytes_per_slot(cfg, p)
      g = budget.kv_groups(cfg)
      widths = sum(s.width for s in budget.array_specs(cfg, p))
      ring = p.fp_recent * widths * 4  # float32 ring per group
      expect = 2 * 3 * g * (16 * (per["values"] + per["bookkeeping"]) + ring)
      assert budget.cache_bytes(cache) == expect, (attention, q)
  # MLA int8 (C = 16 latent per token in groups of 8, R = 8 rope dims in bfloat16):
  cfg = tiny(attention="mla")
  assert budget.stored_bytes_per_slot(cfg, make("none", quant="int8", group=8))["values"] == \
      16 + 2 * 2 * 4 + 8 * 2


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _reference_cache(graphdef, state, tokens):
  """The ordinary cache filled with tokens [B, T] (jitted: eager extend compiles op by op)."""
  model = nnx.merge(graphdef, state)
  _, cache = model.extend(tokens, init_cache(model.cfg, tokens.shape[0],
                                                       tokens.shape[1]))
  return model(tokens), cache


@functools.partial(jax.jit, static_argnums=(1, 2))
def _read_all(layer, specs, policy):
  """Every stored array of a layer as [B, G, S, W] float32, none read from the ring."""
  n = jnp.zeros((2,), jnp.int32)
  return [budget.read(layer, spec, policy, n + 10 ** 6, n, jnp.float32) for spec in specs]


@functools.partial(jax.jit, static_argnums=(0, 3, 4), compiler_options=FAST_COMPILE)
def _fill(graphdef, state, tokens, policy, prefill_len):
  """Prefill, then decode the rest token by token -> (logits [B, N, V], cache)."""
  model = nnx.merge(graphdef, state)
  cache = budget.init_cache(model.cfg, policy, tokens.shape[0], tokens.shape[1])
  first, cache = decode.extend(model, cache, tokens[:, :prefill_len], policy)

  def step(cache, tok):
    logits, cache = decode.extend(model, cache, tok[:, None], policy)
    return cache, logits[:, 0]

  cache, rest = jax.lax.scan(step, cache, tokens[:, prefill_len:].T)
  return jnp.concatenate([first, jnp.moveaxis(rest, 0, 1)], axis=1), cache


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_quantised_cache_reads_back_within_its_bound_and_logits_degrade_in_order(attention):
  kw = {"n_kv_heads": 2} if attention == "gqa" else {"mla_prefill_impl": "absorbed"}
  model = random_module(Transformer, tiny(attention=attention, max_seq_len=64, **kw))
  graphdef, state = nnx.split(model)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 20)), jnp.int32)
  ref, exact = _reference_cache(graphdef, state, tokens)
  errors = {}
  for q in ("int8", "int4"):
    # Everything in the full-precision ring: exactly the uncompressed model.
    logits, _ = _fill(graphdef, state, tokens, make("none", 0, quant=q, group=4, n_recent=20,
                                                    window=20), 8)
    np.testing.assert_allclose(logits, ref, atol=2e-5)
    p = make("none", 0, quant=q, group=4, n_recent=2)
    logits, cache = _fill(graphdef, state, tokens, p, 12)
    errors[q] = float(np.abs(np.asarray(logits) - np.asarray(ref)).max())
    # Stored values against the uncompressed cache (n_seen past the end: none read from the ring).
    ref_layer = exact.layers[0]
    layer = cache.layers[0]
    specs = budget.array_specs(model.cfg, p)
    for spec, got in zip(specs, _read_all(layer, specs, p)):
      want = getattr(ref_layer, {"kr": "k_rope"}.get(spec.name, spec.name))
      want = np.asarray(want if want.ndim == 4 else want[:, :, None]).transpose(0, 2, 1, 3)
      got = np.asarray(got)  # [B, G, S, W]; numpy from here: no eager op-by-op compiles
      err = np.abs(got - want)
      if spec.mode == "token":  # quantised once: half a step of its own group
        bound = np.repeat(quant.error_bound(np.asarray(layer[f"{spec.name}_s"])), 4, -1)[
            ..., :spec.width]
        assert (err <= bound).all(), spec.name
      elif spec.mode == "channel":  # a block re-rounds when a write widens its range
        steps = np.repeat(np.asarray(layer[f"{spec.name}_s"]), 4, axis=-2)[..., :20, :]
        assert (err <= 4 * steps / 2 + 1e-6).all()
        assert (err[:, :, :12] <= quant.error_bound(steps[:, :, :12])).all()  # prefill: once
      else:  # MLA's rope key in bfloat16
        np.testing.assert_allclose(got, want, rtol=2 ** -8, atol=1e-6)
  assert 0 < errors["int8"] < errors["int4"], errors
