"""mla_jax.planning (scripts/plan.py): the ahead-of-time memory plan. For a tiny config on the 8
fake devices its parameter, optimizer-state and cache bytes equal those of real arrays with the
same shardings."""

import jax
from flax import nnx

from configs import lm
from mla_jax import planning as plan_lib
from mla_jax.core import sharding as shd
from mla_jax.core.model import Transformer, init_cache
from mla_jax.experiment import ExperimentConfig
from mla_jax.training.preflight import check_config, parse_rules


def _real_bytes(tree) -> int:
  """The largest per-device total of the arrays' shards, read from the shards themselves."""
  per_device = {}
  for leaf in jax.tree.leaves(tree):
    for s in leaf.addressable_shards:
      per_device[s.device] = per_device.get(s.device, 0) + s.data.nbytes
  return max(per_device.values())


def test_plan_bytes_equal_real_arrays():
  config = lm.get_config("attn=mla,size=tiny")
  config.mesh.data, config.mesh.fsdp = 2, 4
  config.model.n_layers, config.data.seq_len = 1, 32  # a small compile: bytes are what is tested
  exp = ExperimentConfig.from_config(config)
  sizes, _ = check_config(exp)
  rules = parse_rules(exp.mesh.rules)
  mesh = shd.make_mesh(sizes)
  p = plan_lib.plan(exp, mesh, rules, decode_batch=4, decode_context=128, vocab_size=256)
  cfg = exp.model_config(256)

  params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))[1]
  params = jax.device_put(params, shd.param_shardings(params, mesh, rules))
  assert p["param_bytes"] == _real_bytes(params)
  assert p["params"] == sum(x.size for x in jax.tree.leaves(params))
  # fsdp=4 shards the embed axis: a device holds about a quarter of the parameters.
  assert p["param_bytes"] < 0.4 * p["params"] * 4
  # AdamW: two moments per parameter, sharded like it (plus replicated counters).
  assert 2 * p["param_bytes"] <= p["opt_bytes"] <= 2 * p["param_bytes"] + 64
  cache = init_cache(cfg, 4, 128)
  cache = jax.device_put(cache, shd.cache_shardings(cache, mesh, rules))
  assert p["cache_bytes"] == _real_bytes(cache)
  assert p["train_temp_bytes"] > 0 and p["decode_temp_bytes"] > 0
  text = plan_lib.report(p, exp)
  assert "activations/temporaries" in text and "decode cache" in text


def test_accelerator_sizes_are_pod_shaped():
  for size, lo, hi in (("1b", 0.9e9, 1.5e9),):  # 7b: ~3x the tracing time; its figures: README
    config = lm.get_config(f"attn=mha,size={size}")
    config.model.vocab_size = 32000
    cfg = ExperimentConfig.from_config(config).model_config()
    n = sum(x.size for x in jax.tree.leaves(
        nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)))
    assert lo < n < hi, (size, n)
    assert cfg.dtype == "bfloat16" and cfg.remat
