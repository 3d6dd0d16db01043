"""The small-width MLA ablation knobs (ModelConfig.qk_norm, mla_latent_scale, mla_up_init_fan_in):
each keeps the equivalences every MLA path must keep (absorbed = naive, cached = full, the fused
kernel = the einsums), and each does what its docstring says, checked by an identity it implies."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_helpers import full_and_incremental, random_module, tiny

from mla_jax.core.attention import GQAttention, MLAttention
from mla_jax.core.model import Transformer
from mla_jax.interop.hf_export import HFExportError, _check_exportable

KNOBS = {
    "qk_norm": dict(qk_norm=True),
    "qk_norm_q_lora": dict(qk_norm=True, q_lora_rank=12),
    "qk_norm_rope_keys": dict(qk_norm=True, mla_rope_kv_heads=2),
    "latent_scale": dict(mla_latent_scale=True, q_lora_rank=12),
    "all": dict(qk_norm=True, mla_latent_scale=True, q_lora_rank=12),
}


def _tokens(b=2, t=10, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 64, (b, t)), jnp.int32)


@pytest.mark.parametrize("knob", list(KNOBS))
def test_mla_knob_keeps_absorbed_equal_naive_and_cached_equal_full(knob):
  cfg = tiny(n_layers=2, **KNOBS[knob])
  tokens = _tokens()
  outs = {}
  for impl in ("naive", "absorbed"):
    model = random_module(Transformer, dataclasses.replace(
        cfg, mla_prefill_impl=impl, mla_decode_impl=impl))
    outs[impl] = full_and_incremental(model, tokens, 4)[:2]
  full_naive, inc_naive = outs["naive"]
  full_abs, inc_abs = outs["absorbed"]
  np.testing.assert_allclose(full_abs, full_naive, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(inc_naive, full_naive, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(inc_abs, full_naive, atol=2e-5, rtol=1e-5)


def test_gqa_qk_norm_cached_equals_full():
  cfg = tiny(attention="gqa", n_kv_heads=2, n_layers=2, qk_norm=True)
  full, inc, _ = full_and_incremental(random_module(Transformer, cfg), _tokens(), 3)
  np.testing.assert_allclose(inc, full, atol=2e-5, rtol=1e-5)


def _attn_out(module, x):
  return module(x, jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2]))[0]


def test_qk_norm_makes_scores_independent_of_the_key_and_query_scale():
  """With QK-norm the logits depend on directions only: scaling the query and key projections
  (GQA: wq, wk; MLA: W_UK, the rope query and key columns) leaves the output unchanged, and
  without it the same scaling changes it (so the check can fail)."""
  x = jax.random.normal(jax.random.key(1), (2, 6, 32))
  for cls, cfg, scale in (
      (GQAttention, tiny(attention="gqa", n_kv_heads=2), {"wq": 7.0, "wk": 0.1}),
      (MLAttention, tiny(q_lora_rank=12), None)):
    for norm in (True, False):
      m = random_module(cls, dataclasses.replace(cfg, qk_norm=norm))
      before = _attn_out(m, x)
      if scale:
        for name, s in scale.items():
          getattr(m, name)[...] = getattr(m, name)[...] * s
      else:
        n = cfg.nope_dim
        m.wkv_b[...] = m.wkv_b[...].at[..., :n].multiply(9.0)  # W_UK
        m.wq_b[...] = m.wq_b[...].at[..., n:].multiply(5.0)  # rope query
        m.wkv_a[...] = m.wkv_a[...].at[:, cfg.kv_lora_rank:].multiply(0.2)  # rope key
      after = _attn_out(m, x)
      if norm:
        np.testing.assert_allclose(after, before, atol=1e-4, rtol=1e-4)
      else:
        assert float(jnp.abs(after - before).max()) > 1e-2


def test_latent_scale_equals_norm_scales_times_sqrt_d_over_rank():
  """mla_latent_scale multiplies the normalised latents by sqrt(D / rank): the same as a model
  without it whose q_norm / kv_norm scales are that much larger."""
  cfg = tiny(q_lora_rank=12)
  x = jax.random.normal(jax.random.key(2), (2, 5, 32))
  scaled = random_module(MLAttention, dataclasses.replace(cfg, mla_latent_scale=True))
  plain = random_module(MLAttention, cfg)
  plain.q_norm.scale[...] = plain.q_norm.scale[...] * (32 / 12) ** .5
  plain.kv_norm.scale[...] = plain.kv_norm.scale[...] * (32 / 16) ** .5
  np.testing.assert_allclose(_attn_out(scaled, x), _attn_out(plain, x), atol=1e-5, rtol=1e-5)


def test_fan_in_init_scales_the_up_projections_only():
  cfg = tiny(d_model=96, n_heads=4, kv_lora_rank=40, q_lora_rank=48, init_std=0.02)
  std = lambda c, name: float(jnp.std(getattr(MLAttention(c, nnx.Rngs(0)), name)[...]))
  fan = dataclasses.replace(cfg, mla_up_init_fan_in=True)
  assert std(cfg, "wkv_b") == pytest.approx(0.02, rel=0.05)
  assert std(fan, "wkv_b") == pytest.approx(0.02 * (96 / 40) ** .5, rel=0.05)
  assert std(fan, "wq_b") == pytest.approx(0.02 * (96 / 48) ** .5, rel=0.05)
  assert std(fan, "wkv_a") == pytest.approx(0.02, rel=0.05)  # the down-projections keep init_std


def test_defaults_build_the_same_parameters_as_before():
  """The knobs off add no parameter: the cpu sweep's runs stay bit-reproducible."""
  cfg = tiny(q_lora_rank=12)
  names = lambda c: sorted(str(p) for p, _ in nnx.to_flat_state(nnx.state(
      nnx.eval_shape(lambda: MLAttention(c, nnx.Rngs(0))))))
  assert names(cfg) == names(dataclasses.replace(cfg, mla_up_init_fan_in=True,
                                                 mla_latent_scale=True))
  assert len(names(dataclasses.replace(cfg, qk_norm=True))) == len(names(cfg)) + 3


def test_pallas_kernel_equals_absorbed_with_qk_norm():
  cfg = tiny(n_layers=1, qk_norm=True, max_seq_len=32)
  tokens = _tokens(2, 20)
  out = {}
  for impl in ("absorbed", "pallas"):
    out[impl] = full_and_incremental(
        random_module(Transformer, dataclasses.replace(cfg, mla_decode_impl=impl)), tokens, 17)[1]
  np.testing.assert_allclose(out["pallas"], out["absorbed"], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kw, field", [
    (dict(attention="yoco", qk_norm=True), "model.qk_norm"),
    (dict(attention="mha", dmc=True, qk_norm=True), "model.qk_norm"),
    (dict(mla_up_init_fan_in=True, mla_up_init_std=0.1), "model.mla_up_init_fan_in"),
])
def test_knob_config_errors_name_the_field(kw, field):
  base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, kv_lora_rank=16,
              qk_rope_head_dim=8)
  with pytest.raises(ValueError, match=f"^{field}: "):
    tiny(**{**base, **kw})


@pytest.mark.parametrize("kw, field", [(dict(qk_norm=True), "qk_norm"),
                                       (dict(attention="mha", qk_norm=True), "qk_norm"),
                                       (dict(mla_latent_scale=True), "mla_latent_scale")])
def test_hf_export_refuses_what_its_layouts_cannot_hold(kw, field):
  with pytest.raises(HFExportError, match=f"model.{field}: "):
    _check_exportable(tiny(**kw))
