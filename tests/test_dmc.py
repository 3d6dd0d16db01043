"""DMC (core/dmc.py): forced append == the source model, forced merge == hand-computed running
averages, learned (hard) decisions: cached decode == full forward, compression and bytes, the
training step's compression loss, config errors.

Tiny configs (model_helpers.tiny: D 32, H 4, K 8, V 64); a source model and its DMC retrofit
share every parameter (random_module draws by parameter order and shape).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from model_helpers import FAST_COMPILE, full_and_incremental, random_module, tiny

from mla_jax.core import cache as cache_lib
from mla_jax.core import dmc
from mla_jax.core.config import kv_cache_bytes
from mla_jax.core.model import Transformer, init_cache
from mla_jax.training.step import TrainState, make_train_step

ATOL = 1e-5


# Hand-computed running averages ---------------------------------------------------------------

K1 = jnp.array([[1., 2.], [3., 4.], [5., 6.], [7., 8.], [9., 10.]])  # 5 tokens, K = 2
OMEGA = jnp.array([1., .5, .25, 1., .5])


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def fill(merges):
  """The 5 tokens through dmc.update one at a time (B = 1, G = 1; v = -k)."""
  layer = dmc.DMCAttention.init_cache(tiny(attention="mha", n_layers=1, dmc=True), 1, 4)
  layer = jax.tree.map(lambda x: x[:, :, :1, :2] if x.ndim == 4 else x[:, :1], layer)
  for t, merge in enumerate(merges):
    layer = dmc.update(layer, K1[t][None, None], -K1[t][None, None], jnp.array([[merge]]),
                       OMEGA[t][None, None], jnp.array([True]))
  return layer


def test_forced_merge_cache_holds_the_running_average():
  layer = fill((True,) * 5)  # token 0 has nothing to merge into: it opens the slot
  # (1*[1,2] + .5*[3,4] + .25*[5,6] + 1*[7,8] + .5*[9,10]) / 3.25 = [15.25, 18.5] / 3.25
  np.testing.assert_allclose(layer.k[0, 0, 0], [15.25 / 3.25, 18.5 / 3.25], rtol=1e-6)
  np.testing.assert_allclose(layer.v[0, 0, 0], [-15.25 / 3.25, -18.5 / 3.25], rtol=1e-6)
  assert int(layer.n[0, 0]) == 1 and float(layer.z[0, 0]) == 3.25
  np.testing.assert_array_equal(layer.k[0, 1:, 0], 0.0)  # nothing else written


def test_mixed_decisions_and_the_training_states_agree_by_hand():
  merges = (False, True, False, True, True)  # slots: {0, 1}, {2, 3, 4}
  layer = fill(merges)
  slot0 = (1 * K1[0] + .5 * K1[1]) / 1.5  # [2.5, 4] / 1.5
  slot1 = (.25 * K1[2] + 1 * K1[3] + .5 * K1[4]) / 1.75  # [12.75, 14.5] / 1.75
  np.testing.assert_allclose(layer.k[0, :2, 0], jnp.stack([slot0, slot1]), rtol=1e-6)
  assert int(layer.n[0, 0]) == 2 and float(layer.z[0, 0]) == 1.75
  # The training formulation: the open slot's state after each token (end of a run = a slot).
  alpha = jnp.array(merges, jnp.float32)[None, :, None]
  states = jax.jit(dmc.merged_states, compiler_options=FAST_COMPILE)
  k_m, v_m = states(K1[None, :, None], -K1[None, :, None], alpha, OMEGA[None, :, None])
  np.testing.assert_allclose(k_m[0, 1, 0], slot0, rtol=1e-6)
  np.testing.assert_allclose(k_m[0, 4, 0], slot1, rtol=1e-6)
  np.testing.assert_allclose(k_m[0, 3, 0], (.25 * K1[2] + K1[3]) / 1.25, rtol=1e-6)  # partial
  np.testing.assert_array_equal(k_m[0, 0, 0], K1[0])  # an append is the key itself, exactly
  np.testing.assert_array_equal(v_m[0, 2, 0], -K1[2])


# Whole models -----------------------------------------------------------------------------------


def test_forced_append_equals_the_source_model():
  source_cfg = tiny(attention="mha", n_layers=1)
  source = random_module(Transformer, source_cfg, seed=1)
  model = random_module(Transformer, tiny(attention="mha", n_layers=1, dmc=True,
                                          dmc_decisions="append"), seed=1)
  tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, 64)
  full_src, inc_src, _ = full_and_incremental(source, tokens, 4)
  full, inc, cache = full_and_incremental(model, tokens, 4)
  np.testing.assert_array_equal(full, full_src)  # the same computation, bit for bit
  np.testing.assert_allclose(inc, inc_src, atol=ATOL)
  np.testing.assert_allclose(inc, full, atol=ATOL)
  assert all(np.all(np.asarray(layer.n) == 10) for layer in cache.layers)
  stats = dmc.compression_stats(cache, model.cfg)
  assert stats["compression"] == 1.0 and stats["bytes_used"] == stats["bytes_uncompressed"]


def test_forced_merge_model_cache_is_the_omega_weighted_mean_of_its_keys():
  cfg = tiny(attention="gqa", n_kv_heads=2, n_layers=1, dmc=True, dmc_decisions="merge")
  model = random_module(Transformer, cfg, seed=3)
  tokens = jax.random.randint(jax.random.key(4), (1, 6), 0, 64)
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def run(state):
    m = nnx.merge(graphdef, state)
    _, cache = m.extend(tokens, init_cache(cfg, 1, 8))
    x = m.blocks[0].attn_norm(m.embed(tokens))
    _, k, v, _, omega = m.blocks[0].attn._project(x, jnp.arange(6)[None])
    return cache.layers[0], k, v, omega

  layer, k, v, omega = run(state)
  w = omega[..., None]  # [B, T, G, 1]
  np.testing.assert_allclose(layer.k[:, 0], (w * k).sum(1) / w.sum(1), atol=1e-6)
  np.testing.assert_allclose(layer.v[:, 0], (w * v).sum(1) / w.sum(1), atol=1e-6)
  np.testing.assert_array_equal(layer.n, [[1, 1]])
  stats = dmc.compression_stats(cache_lib.Cache(layers=(layer,), lengths=jnp.array([6])), cfg)
  # 6 tokens x 2 heads in 2 slots; allocated: 8 slots x 2 heads x (k, v) x 8 x 4 bytes + counters.
  assert stats["compression"] == 6.0 and stats["slots_used"] == 2
  assert stats["bytes_used"] == 2 * 2 * 8 * 4
  assert stats["bytes_allocated"] == 8 * 2 * 2 * 8 * 4 + 2 * (4 + 4) == kv_cache_bytes(cfg, 8)


def learned_model():
  """GQA-2 with the decision neuron's weights scaled up so hard decisions mix append and merge."""
  model = random_module(Transformer, tiny(attention="gqa", n_kv_heads=2, n_layers=2, dmc=True),
                        seed=5)
  for block in model.blocks:
    block.attn.wk[...] = block.attn.wk[...].at[:, :, 0].multiply(16.0)
  return model


def test_learned_decisions_cached_decode_matches_full_forward():
  model = learned_model()
  tokens = jax.random.randint(jax.random.key(6), (2, 12), 0, 64)
  full, inc, cache = full_and_incremental(model, tokens, 5)
  np.testing.assert_allclose(inc, full, atol=ATOL)
  stats = dmc.compression_stats(cache, model.cfg)
  assert 1.2 < stats["compression"] < 6, stats  # both decisions occur
  assert stats["bytes_allocated"] == kv_cache_bytes(model.cfg, 16, batch=2)
  assert stats["bytes_used"] == stats["slots_used"] * 2 * 8 * 4 < stats["bytes_uncompressed"]


def test_train_step_pulls_towards_the_ramped_target():
  cfg = tiny(attention="mha", n_layers=1, dmc=True, dmc_target=4.0, dmc_ramp_steps=10)
  assert float(dmc.target_at(cfg, 0)) == 1.0 and float(dmc.target_at(cfg, 5)) == 2.5
  assert float(dmc.target_at(cfg, 99)) == 4.0
  assert float(dmc.compression_loss(cfg, jnp.float32(0.5), 10)) == 0.25  # |0.5 - 1/4|
  model = random_module(Transformer, cfg, seed=7)
  graphdef, params = nnx.split(model)
  tx = optax.sgd(0.1)
  zero = jnp.zeros((), jnp.int32)
  state = TrainState(step=zero + 10, params=params, opt_state=tx.init(params), skipped=zero,
                     first_bad_step=zero - 1)
  step = jax.jit(make_train_step(graphdef, tx, microbatches=2), compiler_options=FAST_COMPILE)
  batch = jax.random.randint(jax.random.key(8), (4, 9), 0, 64)
  new, metrics = step(state, batch)
  assert int(new.step) == 11 and int(new.skipped) == 0
  assert float(metrics["dmc_target"]) == 4.0
  assert 0.9 < float(metrics["dmc_slots"]) <= 1.0  # starts near "append everything"
  np.testing.assert_allclose(float(metrics["dmc_loss"]), float(metrics["dmc_slots"]) - 0.25,
                             rtol=1e-5)


def test_compression_loss_trains_only_the_decision_neuron_of_the_keys():
  """Through the relaxed decisions the loss reaches wk[:, :, 0] (and what feeds it), not the
  other key dims nor the queries and values (omega only weighs merges)."""
  model = learned_model()
  graphdef, params = nnx.split(model)
  tokens = jax.random.randint(jax.random.key(9), (2, 12), 0, 64)

  def loss(params):
    slots = nnx.merge(graphdef, params).dmc_forward(tokens, jax.random.key(10))[1]
    return dmc.compression_loss(model.cfg, slots, 0)

  g = jax.jit(jax.grad(loss), compiler_options=FAST_COMPILE)(params)["blocks"][1]["attn"]
  assert float(jnp.abs(g["wk"][...][:, :, 0]).max()) > 1e-6
  assert float(jnp.abs(g["wk"][...][:, :, 1:]).max()) == 0
  assert float(jnp.abs(g["wq"][...]).max()) == 0 and float(jnp.abs(g["wv"][...]).max()) == 0


@pytest.mark.parametrize("kwargs, field", [
    (dict(attention="mla"), "dmc"),
    (dict(dmc_target=0.5), "dmc_target"),
    (dict(dmc_temperature=0.0), "dmc_temperature"),
    (dict(dmc_ramp_steps=-1), "dmc_ramp_steps"),
    (dict(dmc_loss_weight=-1.0), "dmc_loss_weight"),
    (dict(dmc_decisions="sometimes"), "dmc_decisions"),
])
def test_config_errors_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=rf"^model\.{field}: ") as err:
    tiny(**{"attention": "mha", "dmc": True, **kwargs})
  assert "\n" not in str(err.value)


def test_retrofit_script_end_to_end_logs_the_ramped_target_and_reports_compression(tmp_path):
  """scripts/dmc_retrofit.py on a tiny trained MHA run: the copy it writes continues training
  through train.init_from, metrics.jsonl logs dmc_slots and the target ramping from 1 to 2, and
  --report measures the hard decisions' compression on validation windows."""
  import json
  import os
  import pathlib
  import subprocess
  import sys

  from configs import lm
  from mla_jax.storage.workdir import read_metrics
  from mla_jax.training import trainer

  repo = pathlib.Path(__file__).resolve().parents[1]
  base = {"model.d_model": 32, "model.n_layers": 1, "data.seq_len": 32,
          "data.max_bytes": 640_000, "optim.warmup_steps": 2, "train.steps": 6,
          "train.global_batch": 8, "train.log_every": 1, "train.eval_every": 6,
          "train.ckpt_every": 6, "train.eval_tokens": 512, "train.peak_flops": 2e11}

  def config(**kw):
    c = lm.get_config("attn=mha,size=tiny")
    for key, value in {**base, **kw}.items():
      group, leaf = key.split(".")
      c[group][leaf] = value
    return c

  def script(*args):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    out = subprocess.run([sys.executable, "scripts/dmc_retrofit.py", *args], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout

  src, copy, run = (str(tmp_path / n) for n in ("src", "copy", "dmc"))
  trainer.train(config(), src)
  printed = script(f"--source={src}", f"--out={copy}", "--target=2", "--steps=8")
  assert f"--config.train.init_from={copy}" in printed and "dmc_target=2.0" in printed
  trainer.train(config(**{"train.init_from": copy, "train.steps": 8}), run)
  logged = [m for m in read_metrics(run) if "dmc_target" in m]
  targets = [m["dmc_target"] for m in logged]
  assert [m["step"] for m in logged] == list(range(1, 9))
  # ramp over int(0.8 * 8) = 6 steps: the target of step s (0-based) is 1 + min(s / 6, 1)
  np.testing.assert_allclose(targets, [1 + min(s / 6, 1) for s in range(8)], rtol=1e-6)
  assert all(0 < m["dmc_slots"] <= 1 for m in logged)
  stats = json.loads(script(f"--report={run}", "--windows=8").splitlines()[0])
  assert stats["tokens"] == 8 * 32 and stats["compression"] >= 1.0
  assert stats["bytes_used"] == stats["slots_used"] * 2 * 8 * 4  # k and v, K = 8, float32
  # eval.py reports the same measurement (its first 8 validation windows)
  from mla_jax.evaluation.workdir_eval import evaluate_workdir, format_table
  result = evaluate_workdir(run, max_tokens=1024, decode_lengths="")
  flat = lambda d: {k: v for k, v in d.items() if not isinstance(v, list)}  # noqa: E731
  assert flat(result["dmc"]) == pytest.approx(flat(stats))  # approx takes no nested lists
  assert result["dmc"]["compression_per_layer"] == pytest.approx(stats["compression_per_layer"])
  assert result["dmc"].keys() == stats.keys()
  assert f"{stats['compression']:.2f}x compression" in format_table(result)
