"""MHA / GQA -> MLA conversion (mla_jax.interop.mha2mla): exactness at full rank, the partial-RoPE
model, per-KV-group rope keys in the cache and in absorbed decode, and the cache arithmetic."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mla_jax.core import cache as cache_lib
from mla_jax.core.config import ModelConfig, kv_cache_bytes_per_token
from mla_jax.core.model import Transformer, init_cache
from mla_jax.interop import mha2mla, workdir_io
from mla_jax.storage.workdir import Workdir

TOKENS = np.random.default_rng(0).integers(0, 40, (2, 12))


def _source(attention="gqa", layout="half", seed=0):
  cfg = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, attention=attention,
                    n_kv_heads=2 if attention == "gqa" else 0, head_dim=8, rope_layout=layout,
                    max_seq_len=32, init_std=0.35, tie_embeddings=False)
  model = Transformer(cfg, rngs=nnx.Rngs(seed))
  return cfg, model, workdir_io.model_params(model)


def _logits(model, tokens=TOKENS):
  return np.asarray(model(jnp.asarray(tokens)))


def _partial_rope_logits(model, pairs, tokens=TOKENS):
  """The source model with RoPE only on the kept pairs [L, G, R/2] (original frequencies): an
  independent reference, written here from the definition (dropped pairs turn by angle 0)."""
  cfg = model.cfg
  k, g, h = cfg.qk_head_dim, cfg.kv_heads, cfg.n_heads
  t = tokens.shape[1]
  pos = jnp.arange(t, dtype=jnp.float32)
  inv_freq = cfg.rope_theta ** (-jnp.arange(0, k, 2, dtype=jnp.float32) / k)  # [K/2]

  def rotate(x, kept):  # x [B, T, K] one head, kept: pair indices
    mask = np.zeros(k // 2, np.float32)
    mask[np.asarray(kept)] = 1
    ang = pos[:, None] * inv_freq * mask  # [T, K/2]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    if cfg.rope_layout == "half":
      a, b = x[..., :k // 2], x[..., k // 2:]
      return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], -1)
    a, b = x[..., 0::2], x[..., 1::2]
    return jnp.stack([a * cos - b * sin, b * cos + a * sin], -1).reshape(x.shape)

  x = model.embed(jnp.asarray(tokens))
  causal = jnp.tril(jnp.ones((t, t), bool))
  for i, block in enumerate(model.blocks):
    y = block.attn_norm(x)
    q = jnp.einsum("BTD,DHK->BTHK", y, block.attn.wq[...])
    kk = jnp.einsum("BTD,DGK->BTGK", y, block.attn.wk[...])
    v = jnp.einsum("BTD,DGK->BTGK", y, block.attn.wv[...])
    heads = []
    for head in range(h):
      j = head // (h // g)
      s = jnp.einsum("BTK,BSK->BTS", rotate(q[:, :, head], pairs[i, j]),
                     rotate(kk[:, :, j], pairs[i, j])) * k ** -0.5
      p = jax.nn.softmax(jnp.where(causal, s, -1e30), -1)
      heads.append(jnp.einsum("BTS,BSK->BTK", p, v[:, :, j]))
    x = x + jnp.einsum("BTHK,HKD->BTD", jnp.stack(heads, 2), block.attn.wo[...])
    x = x + block.mlp(block.mlp_norm(x))
  return np.asarray(jnp.einsum("BTD,DV->BTV", model.final_norm(x), model.head[...]))


def _convert(cfg, params, rope_dims, kv_rank, strategy="high", svd="joint", scores=None):
  pairs = mha2mla.select_pairs(strategy, cfg.qk_head_dim, rope_dims, cfg.n_layers, cfg.kv_heads,
                               scores)
  new_cfg, new = mha2mla.convert_params(cfg, params, rope_dims, kv_rank, pairs, svd)
  return new_cfg, workdir_io.build_model(new_cfg, new), pairs


@pytest.mark.parametrize("attention, layout", [("gqa", "half"), ("mha", "interleaved"),
                                               ("mqa", "half")])
def test_all_rope_dims_at_full_rank_reproduce_the_source(attention, layout):
  cfg, model, params = _source(attention, layout)
  k = cfg.qk_head_dim
  new_cfg, mla, _ = _convert(cfg, params, k, mha2mla.full_rank(cfg, k))
  assert new_cfg.attention == "mla" and new_cfg.mla_rope_kv_heads == cfg.kv_heads
  np.testing.assert_allclose(_logits(mla), _logits(model), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy, layout, svd", [("high", "half", "joint"),
                                                   ("uniform", "interleaved", "joint"),
                                                   ("low", "half", "split")])
def test_partial_rope_at_full_rank_is_the_partial_rope_model(strategy, layout, svd):
  cfg, model, params = _source("gqa", layout)
  rank = mha2mla.full_rank(cfg, 4) * (2 if svd == "split" else 1)
  _, mla, pairs = _convert(cfg, params, 4, rank, strategy, svd)
  ref = _partial_rope_logits(model, pairs)
  np.testing.assert_allclose(_logits(mla), ref, atol=1e-5, rtol=1e-5)
  assert np.abs(ref - _logits(model)).max() > 1e-3  # dropping rope pairs does change the model


def test_low_rank_is_approximate_and_rank_ordered():
  cfg, model, params = _source("mha")
  pairs = mha2mla.select_pairs("high", 8, 4, 2, 4)
  ref = _partial_rope_logits(model, pairs)
  errs = [np.abs(_logits(_convert(cfg, params, 4, c)[1]) - ref).mean() for c in (8, 16, 32)]
  assert errs[0] > errs[1] > errs[2]
  # Weighted by the inputs it sees, the same rank loses less on those inputs.
  inputs = mha2mla.attn_inputs(model, TOKENS)
  act_cfg, act = mha2mla.convert_params(cfg, params, 4, 16, pairs, "joint_act", inputs=inputs)
  assert np.abs(_logits(workdir_io.build_model(act_cfg, act)) - ref).mean() < errs[1]
  full = mha2mla.full_rank(cfg, 4)
  act_cfg, act = mha2mla.convert_params(cfg, params, 4, full, pairs, "joint_act", inputs=inputs)
  np.testing.assert_allclose(_logits(workdir_io.build_model(act_cfg, act)), ref, atol=1e-4)


def test_strategies_pick_the_documented_pairs():
  assert mha2mla.select_pairs("high", 16, 6, 1, 1)[0, 0].tolist() == [0, 1, 2]
  assert mha2mla.select_pairs("low", 16, 6, 1, 1)[0, 0].tolist() == [5, 6, 7]
  assert mha2mla.select_pairs("uniform", 16, 4, 1, 1)[0, 0].tolist() == [0, 4]
  scores = np.zeros((2, 3, 8))
  scores[0, 1, [6, 2]] = 1
  scores[1, 2, [0, 7]] = 2
  pairs = mha2mla.select_pairs("2norm", 16, 4, 2, 3, scores)
  assert pairs.shape == (2, 3, 2) and pairs[0, 1].tolist() == [2, 6]
  assert pairs[1, 2].tolist() == [0, 7]


def test_2norm_scores_and_decode_with_per_group_rope_keys():
  cfg, model, params = _source("gqa")
  scores = mha2mla.pair_scores(model, TOKENS)
  assert scores.shape == (2, 2, 4) and (scores > 0).all()
  pairs = mha2mla.select_pairs("2norm", 8, 4, 2, 2, scores)
  assert len({tuple(p) for p in pairs.reshape(-1, 2).tolist()}) > 1  # varies by layer / head
  new_cfg, new = mha2mla.convert_params(cfg, params, 4, 12, pairs)
  full = _logits(workdir_io.build_model(new_cfg, new))
  for impl in ("absorbed", "naive"):
    mla = workdir_io.build_model(dataclasses.replace(new_cfg, mla_decode_impl=impl), new)
    extend = nnx.jit(lambda m, tokens, cache: m.extend(tokens, cache))
    cache = init_cache(new_cfg, 2, 16)
    out, cache = extend(mla, jnp.asarray(TOKENS[:, :9]), cache)
    steps = [np.asarray(out)]
    for t in range(9, 12):  # one-token decode steps through the per-group rope-key cache
      out, cache = extend(mla, jnp.asarray(TOKENS[:, t:t + 1]), cache)
      steps.append(np.asarray(out))
    np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=2e-5, rtol=1e-5)
  assert cache.layers[0].k_rope.shape == (2, 16, 2 * 4)


def test_cache_bytes_follow_the_formula_and_shrink(tmp_path):
  cfg, _, params = _source("mha")
  workdir_io.write_workdir(str(tmp_path / "src"), cfg, params)
  out = mha2mla.convert(str(tmp_path / "src"), str(tmp_path / "dst"), rope_dims=2, kv_rank=12,
                        strategy="high")
  new_cfg = Workdir.open(str(tmp_path / "dst")).model_config
  expected = (12 + 4 * 2) * cfg.n_layers * 4  # (C + G * R) * L float32 elements
  assert kv_cache_bytes_per_token(new_cfg) == expected == out["dst_cache_bytes"]
  measured = cache_lib.cache_bytes_per_token(init_cache(new_cfg, 2, 16))
  assert measured == expected < kv_cache_bytes_per_token(cfg) == out["src_cache_bytes"]
  assert out["cache_fraction"] == expected / (2 * 4 * 8 * 2 * 4)
  assert Workdir.open(str(tmp_path / "dst")).config["origin"]["kind"] == "mha2mla"


def test_bad_arguments_are_one_line_errors(tmp_path):
  cfg, _, params = _source("gqa")
  for kw, arg in ((dict(rope_dims=3), "--rope_dims"), (dict(rope_dims=10), "--rope_dims"),
                  (dict(kv_rank=0), "--kv_rank"), (dict(strategy="odd"), "--rope_strategy")):
    args = {"rope_dims": 4, "kv_rank": 8, "strategy": "high", "svd": "joint", **kw}
    with pytest.raises(ValueError, match=arg):
      mha2mla.check_args(cfg, **args)


def test_config_refuses_bad_rope_fields():
  base = dict(vocab_size=40, d_model=32, n_layers=2, n_heads=4, attention="mla",
              qk_rope_head_dim=4, kv_lora_rank=8)
  with pytest.raises(ValueError, match="mla_rope_kv_heads"):
    ModelConfig(**base, mla_rope_kv_heads=3)
  with pytest.raises(ValueError, match="mla_rope_pairs"):
    ModelConfig(**base, mla_rope_kv_heads=2, mla_rope_pairs=[0, 1])
  with pytest.raises(ValueError, match="mla_decode_impl"):
    ModelConfig(**base, mla_rope_kv_heads=2, mla_decode_impl="pallas")
  ok = ModelConfig(**base, mla_rope_kv_heads=2, mla_rope_pairs=[0, 1] * 4, mla_rope_base_dim=8)
  assert ModelConfig.from_mapping(ok.to_dict()) == ok and hash(ok)


def test_shared_rope_key_from_mqa_is_exact_and_plain_deepseek():
  """One KV head: the shared rope key is that head's, so the conversion stays exact; 'high' pairs
  are standard RoPE over R dims with theta^(R/K), so no per-layer frequency table is needed."""
  cfg, model, params = _source("mqa")
  pairs = mha2mla.select_pairs("high", 8, 4, 2, 1)
  new_cfg, new = mha2mla.convert_params(cfg, params, 4, mha2mla.full_rank(cfg, 4), pairs,
                                        rope_key="shared")
  assert new_cfg.mla_rope_kv_heads == 1 and new_cfg.mla_rope_pairs == ()
  assert new_cfg.rope_theta == pytest.approx(cfg.rope_theta ** 0.5)
  np.testing.assert_allclose(_logits(workdir_io.build_model(new_cfg, new)),
                             _partial_rope_logits(model, pairs), atol=1e-5, rtol=1e-5)


def test_shared_key_latent_norm_conversion_exports_to_deepseek(tmp_path):
  from mla_jax.interop import hf_export, hf_import
  cfg, _, params = _source("mha")
  workdir_io.write_workdir(str(tmp_path / "src"), cfg, params)
  out = mha2mla.convert(str(tmp_path / "src"), str(tmp_path / "conv"), 4, 16, "uniform",
                        calib_tokens=TOKENS, rope_key="shared", latent_norm=True)
  conv = Workdir.open(str(tmp_path / "conv"))
  new_cfg = conv.model_config
  assert new_cfg.mla_latent_norm and new_cfg.mla_rope_kv_heads == 1 and not new_cfg.mla_rope_pairs
  assert out["dst_cache_bytes"] == (16 + 4) * 2 * 4
  scale = workdir_io.model_params(conv.load_model())["blocks.0.attn.kv_norm.scale"]
  assert np.ptp(scale) == 0 and scale[0] > 0 and scale[0] != 1  # calibrated, one value
  hf_export.export_hf(str(tmp_path / "conv"), str(tmp_path / "hf"))
  hf_import.import_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
  np.testing.assert_allclose(_logits(Workdir.open(str(tmp_path / "back")).load_model()),
                             _logits(conv.load_model()), atol=2e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="model.mla_rope_kv_heads"):  # a per-group conversion
    mha2mla.convert(str(tmp_path / "src"), str(tmp_path / "group"), 4, 16, "high")
    hf_export.export_hf(str(tmp_path / "group"), str(tmp_path / "hf2"))
