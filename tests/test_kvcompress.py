"""Budget-cache eviction (mla_jax/kvcompress): exactness, bounds, kept sets, one trace per policy.

Each test jits ONE function over several policies (FAST_COMPILE), so the compile count stays small.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_helpers import FAST_COMPILE, random_module, tiny

from mla_jax.core.model import Transformer, init_cache
from mla_jax.kvcompress import budget, decode, evict, fastgen, make
from mla_jax.kvcompress.policy import PolicyError, parse_budget

EVICTING = ("streaming", "h2o", "tova", "snapkv", "l2norm", "vatp", "fastgen")


def _model(attention):
  kw = dict(attention=attention, n_layers=1, max_seq_len=64)
  if attention == "gqa":
    kw["n_kv_heads"] = 2
  if attention == "mla":
    kw["mla_prefill_impl"] = "absorbed"
  return random_module(Transformer, tiny(**kw))


def _run(model, cache, tokens, policy, prefill_len, chunk):
  """Prefill tokens[:, :prefill_len] in chunks, then decode the rest one token at a time (scan):
  -> (logits [B, N, V], pos [N - prefill_len, B, G, S] after each decode step, cache)."""
  outs = []
  for start in range(0, prefill_len, chunk):
    logits, cache = decode.extend(model, cache, tokens[:, start:min(start + chunk, prefill_len)],
                                  policy)
    outs.append(logits)

  def step(cache, tok):
    logits, cache = decode.extend(model, cache, tok[:, None], policy)
    return cache, (logits[:, 0], cache.layers[0]["pos"], cache.n_valid)

  cache, (logits, pos, n_valid) = jax.lax.scan(step, cache, tokens[:, prefill_len:].T)
  return jnp.concatenate(outs + [jnp.moveaxis(logits, 0, 1)], axis=1), pos, n_valid


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5), compiler_options=FAST_COMPILE)
def _run_all(graphdef, state, tokens, policies, prefill_len, chunk):
  model = nnx.merge(graphdef, state)
  return [_run(model, budget.init_cache(model.cfg, p, tokens.shape[0], tokens.shape[1]), tokens,
               p, prefill_len, chunk) for p in policies]


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _forward(graphdef, state, tokens):
  return nnx.merge(graphdef, state)(tokens)


def _tokens(n, batch=2, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 64, (batch, n)), jnp.int32)


@pytest.mark.parametrize("attention", ["mla", "gqa", "mqa"])
def test_budget_at_least_the_sequence_gives_the_uncompressed_logits(attention):
  model = _model(attention)
  tokens = _tokens(14)
  ref = _forward(*nnx.split(model), tokens)
  policies = tuple(make(n, 16) for n in ("none",) + EVICTING)
  policies += (make("streaming", 16, positions="cache"), make("h2o", 16, positions="cache"))
  for p, (logits, _, _) in zip(policies, _run_all(*nnx.split(model), tokens, policies, 6, 6)):
    np.testing.assert_allclose(logits, ref, atol=2e-5, err_msg=f"{p.name} {p.positions}")


@pytest.mark.parametrize("attention", ["mla", "gqa"])
def test_cache_holds_its_budget_sinks_and_window_at_every_step(attention):
  model = _model(attention)
  n, prefill_len, b = 26, 14, 8  # prefill chunks of 5 and a 4-token remainder exceed the budget
  tokens = _tokens(n)
  policies = tuple(make(name, b, n_sink=2, window=3) for name in EVICTING)
  policies += (make("h2o", b, n_sink=2, window=3, positions="cache"),
               make("streaming", 5, n_sink=2, window=3),
               make("h2o", b, n_sink=2, window=3, quant="int4", group=4))  # composes with quant
  results = _run_all(*nnx.split(model), tokens, policies, prefill_len, 5)
  g = 1 if attention == "mla" else 2
  for p, (_, pos, n_valid) in zip(policies, results):
    pos, n_valid = np.asarray(pos), np.asarray(n_valid)
    assert pos.shape == (n - prefill_len, 2, g, p.budget)  # shapes: the budget, never more
    assert (n_valid == p.budget).all()
    assert ((pos >= 0).sum(-1) == p.budget).all()  # slots in use
    for i in range(n - prefill_len):
      last = prefill_len + i  # the newest token's true position
      for row in pos[i].reshape(-1, p.budget):
        kept = set(row.tolist())
        if p.positions == "cache":  # ranks: contiguous 0 .. budget - 1, sinks and window included
          assert kept == set(range(p.budget))
          continue
        assert {0, 1, last - 2, last - 1, last} <= kept, (p.name, last, sorted(kept))
        if p.name == "streaming" and p.budget == 5:
          assert kept == {0, 1, last - 2, last - 1, last}


def _causal(rows):
  """rows(q) -> the attention weights of query q over keys 0..q; -> [T, T] map."""
  t = 20
  a = np.zeros((t, t), np.float32)
  for q in range(t):
    w = np.asarray(rows(q), np.float32)
    a[q, :q + 1] = w / w.sum()
  return a


def test_fastgen_profile_picks_full_for_spread_and_locality_for_local_heads():
  t = 20
  spread = _causal(lambda q: np.ones(q + 1))
  local = _causal(lambda q: (np.arange(q + 1) > q - 3).astype(float))  # the last 3 tokens only
  sink = _causal(lambda q: (np.arange(q + 1) == 0) + 1e-4)
  punct_ids = np.zeros(t, bool)
  punct_ids[[4, 9, 14]] = True
  punct = _causal(lambda q: ((np.arange(q + 1) == 0) | punct_ids[:q + 1]) + 1e-4)
  attn = jnp.asarray(np.stack([spread, local, sink, punct]))  # four "groups"
  special = jnp.arange(t) < 1
  modes = fastgen.profile(attn, jnp.broadcast_to(special, (4, t)),
                          jnp.broadcast_to(jnp.asarray(punct_ids), (4, t)), 0.95)
  assert [fastgen.MODES[m] for m in np.asarray(modes)] == ["full", "locality", "special",
                                                            "punctuation"]


@pytest.mark.parametrize("name", ("none",) + EVICTING)
def test_decode_step_traces_once_per_policy(name):
  model = _model("gqa")
  graphdef, state = nnx.split(model)
  p = make(name, 6, n_sink=1, window=2, quant="int8" if name == "h2o" else "none", group=2)
  cache = budget.init_cache(model.cfg, p, 1, 32)
  _, cache = decode.prefill(model, cache, _tokens(4, batch=1), p)
  before = decode.TRACES.get(("extend", p, (1, 1)), 0)
  for i in range(5):  # the cache fills at step 2, then evicts: same shapes, no new trace
    _, cache = decode.decode_step(graphdef, state, cache, _tokens(1, batch=1, seed=i), p)
  assert decode.TRACES[("extend", p, (1, 1))] - before == 1
  assert int(cache.n_valid[0]) == 6 and int(cache.n_seen[0]) == 9


@jax.jit
def _insert(layer, score_new):
  p = make("h2o", 4, n_sink=1, window=1)
  book = {"pos": jnp.full((1, 1, 1), 9), "rot": jnp.full((1, 1, 1), 9), "score": score_new,
          "aux": jnp.zeros((1, 1, 1))}
  new = {"k": jnp.ones((1, 1, 1, 2)), "v": jnp.ones((1, 1, 1, 2))}
  specs = (budget.ArraySpec("k", 2, "plain"), budget.ArraySpec("v", 2, "plain"))
  n = jnp.full((1,), 9)
  return evict.insert_one(layer, specs, p, new, book, n, n, jnp.full((1,), 4), jnp.float32)


def test_h2o_evicts_the_lowest_accumulated_score_but_never_a_sink():
  layer = {"k": jnp.zeros((1, 1, 4, 2)), "v": jnp.zeros((1, 1, 4, 2)),
           "pos": jnp.array([[[0, 5, 3, 8]]]), "rot": jnp.array([[[0, 5, 3, 8]]]),
           "score": jnp.array([[[0.0, 0.2, 0.9, 0.1]]]), "aux": jnp.zeros((1, 1, 4))}
  out = _insert(layer, jnp.full((1, 1, 1), .5))
  # Slot 0 is a sink (score 0, kept); window 1 protects only the new token: slot 3 (0.1) goes.
  np.testing.assert_array_equal(out["pos"][0, 0], [0, 5, 3, 9])
  np.testing.assert_array_equal(out["k"][0, 0, 3], [1, 1])


@pytest.mark.parametrize("kwargs, flag", [
    (dict(name="snap"), "--cache_policy"),
    (dict(name="h2o", budget=4, n_sink=2, window=3), "--cache_budget"),
    (dict(name="streaming", budget=3), "--cache_budget"),
    (dict(name="h2o", budget=64, quant="int4", group=5), "--cache_group"),
    (dict(name="h2o", budget=64, quant="fp8"), "--cache_quant"),
])
def test_bad_settings_are_one_line_naming_the_flag(kwargs, flag):
  with pytest.raises(PolicyError) as e:
    make(**kwargs)
  assert str(e.value).startswith(flag) and "\n" not in str(e.value)


@pytest.mark.parametrize("kw", [dict(attention="yoco", n_layers=2, yoco_window=4),
                                dict(attention="mha", dmc=True)])
def test_yoco_and_dmc_models_are_refused_with_one_line(kw):
  with pytest.raises(PolicyError, match="^--cache_policy: YOCO and DMC"):
    budget.check_model(tiny(**kw))


def test_budget_as_tokens_or_fraction():
  assert parse_budget("256", 1024) == 256
  assert parse_budget("0.25", 1024) == 256
  assert parse_budget("0", 1024) == 0
  with pytest.raises(PolicyError, match="--cache_budget"):
    parse_budget("1.5", 1024)


@functools.partial(jax.jit, static_argnums=(0, 3), compiler_options=FAST_COMPILE)
def _prefill_and_reference(graphdef, state, tokens, policy):
  model = nnx.merge(graphdef, state)
  _, ours = decode.extend(model, budget.init_cache(model.cfg, policy, 1, 16), tokens, policy)
  _, ref = model.extend(tokens, init_cache(model.cfg, 1, 16))
  return ours.layers[0]["aux"], ref.layers[0]


@pytest.mark.parametrize("name", ["vatp", "l2norm"])
def test_mla_value_and_key_norms_come_from_the_latent(name):
  model = _model("mla")
  graphdef, state = nnx.split(model)
  aux, ref = _prefill_and_reference(graphdef, state, _tokens(10, batch=1), make(name, 16))
  c, kr = np.asarray(ref.c[0, :10]), np.asarray(ref.k_rope[0, :10])  # [S, C], [S, R]
  if name == "vatp":  # L1 norm of the per-head values W_UV,h c, averaged over heads
    w_uv = np.asarray(model.blocks[0].attn.wkv_b[...])[..., model.cfg.nope_dim:]  # [C, H, E]
    want = np.abs(np.einsum("SC,CHE->SHE", c, w_uv)).sum(-1).mean(-1)
  else:  # L2 norm of the absorbed path's key [c; k_R]
    want = np.linalg.norm(np.concatenate([c, kr], -1), axis=-1)
  np.testing.assert_allclose(np.asarray(aux)[0, 0, :10], want, rtol=1e-5)


def test_own_cache_bpb_equals_the_uncompressed_budget_path_and_counts_bytes():
  """The compression sweep's point for YOCO / DMC (evaluate.own_cache_bpb): on an MHA model it is
  the uncompressed budget-cache bpb; DMC forced to append is its source model at the source's
  bytes; forced to merge it holds one slot per head; YOCO's bytes include its window rings."""
  import dataclasses

  from mla_jax.core.config import kv_cache_bytes, kv_cache_bytes_per_token
  from mla_jax.kvcompress import evaluate
  from mla_jax.kvcompress.policy import Policy, validate

  val = np.random.default_rng(0).integers(0, 64, 4 * 33).astype(np.int32)  # tiny's vocab: 64
  mha = _model("mha")
  seq, windows, scored = 32, 4, 16
  ref = evaluate.prefix_bpb(mha, val, 1.0, validate(Policy(), seq), seq, windows, scored)
  ours = evaluate.own_cache_bpb(mha, val, 1.0, seq, windows, scored)
  assert ours["bpb"] == pytest.approx(ref["bpb"], abs=1e-5)
  assert ours["bytes_per_token"] == kv_cache_bytes_per_token(mha.cfg)

  # random_module: the same parameter shapes get the same weights (DMC adds no parameters)
  appended = random_module(Transformer, dataclasses.replace(mha.cfg, dmc=True,
                                                            dmc_decisions="append"))
  a = evaluate.own_cache_bpb(appended, val, 1.0, seq, windows, scored)
  assert a["bpb"] == pytest.approx(ref["bpb"], abs=1e-5) and a["compression"] == 1.0
  assert a["bytes_per_token"] == kv_cache_bytes_per_token(mha.cfg)
  merged = random_module(Transformer, dataclasses.replace(mha.cfg, dmc=True, dmc_decisions="merge"))
  m = evaluate.own_cache_bpb(merged, val, 1.0, seq, windows, scored)
  # every token merges into the first slot: one slot per (layer, head) for the 16-token prefix
  assert m["compression"] == pytest.approx(16.0)
  assert m["allocated_bytes_per_token"] == kv_cache_bytes(merged.cfg, 16) / 16
  yoco = random_module(Transformer, tiny(attention="yoco", n_layers=2, yoco_window=4,
                                         max_seq_len=64))
  y = evaluate.own_cache_bpb(yoco, val, 1.0, seq, windows, scored)
  assert y["bytes_per_token"] == kv_cache_bytes(yoco.cfg, 16) / 16 > kv_cache_bytes_per_token(
      yoco.cfg)
