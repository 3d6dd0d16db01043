"""Decode-step timing: milliseconds per generated token at a given context length.

    ms = time_decode(model, context=1024)            # {'ms_per_token': ..., 'tokens_per_s': ...}
    both = time_decode_impls(model, contexts=(256, 1024))   # MLA: absorbed and naive
    times, logits, cache = step_times(step, cache, tokens, steps=16)   # any decode step

`step_times` is the one timing protocol of the package and its benchmarks (scripts/bench_decode.py,
scripts/bench_kvcompress.py, kvcompress.evaluate.decode_ms, accel): `warmup` untimed steps (the
compile), then each step timed alone, blocked on until its logits and cache are ready; callers
report the median, which is robust to a busy machine.

`time_decode` times `generate.decode_step_jit` (one token per sequence, jitted, cache donated) with
a cache buffer of exactly `context` slots, the first `context - warmup - steps` counted as filled.
Attention runs over every slot of the buffer (the causal mask hides the unfilled ones), so the cost
per step is the cost of decoding at that context. The cache contents stay zero: timing does not
depend on the values. The median over steps is reported (the mean too). With a plan
(core.decode_plan.DecodePlan) the parameters and the cache live on its mesh and
`cache_bytes_per_device` is the largest amount of cache one device holds (from the arrays'
addressable shards).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax.core import sharding as shd
from mla_jax.core.decode_plan import DecodePlan
from mla_jax.core.generate import decode_step_jit
from mla_jax.core.model import abstract_model, init_cache


def step_times(step, cache, tokens, steps: int, warmup: int = 1,
               max_seconds: float | None = None):
  """`step(cache, tokens[:, i:i + 1]) -> (logits, cache)`, `warmup` times untimed, then up to
  `steps` times, each timed alone and blocked on (logits and cache). tokens [B, n]: step i feeds
  column i % n. With max_seconds, stops once the timed steps took that long (at least 3 of them:
  slow cells of a benchmark). -> (seconds per timed step, the last logits, the last cache)."""
  n = tokens.shape[1]
  times, logits = [], None
  for i in range(warmup + steps):
    start = time.perf_counter()
    logits, cache = step(cache, tokens[:, i % n:i % n + 1])
    jax.block_until_ready((logits, cache))
    if i >= warmup:
      times.append(time.perf_counter() - start)
      if max_seconds is not None and sum(times) > max_seconds and len(times) >= 3:
        break
  return times, logits, cache


def time_decode(model: nnx.Module, context: int, batch: int = 1, steps: int = 32,
                warmup: int = 3, plan: DecodePlan | None = None) -> dict:
  """Median wall time of one decode step with `context` cache slots, batch `batch` (on the plan's
  mesh when given)."""
  cfg = model.cfg
  if context > cfg.max_seq_len:
    raise ValueError(f"context: {context} is above model.max_seq_len={cfg.max_seq_len}")
  if context <= warmup + steps:
    raise ValueError(f"context: {context} must exceed warmup + steps = {warmup + steps}")
  graphdef, state = nnx.split(model)
  if plan is None:
    cache = init_cache(cfg, batch, context)
  else:
    plan.check_cache_length(context)
    state = jax.device_put(state, shd.param_shardings(state, plan.mesh, plan.rules_dict))
    cache = init_cache(cfg, batch, context, plan)
  cache = cache.replace(lengths=jnp.full((batch,), context - warmup - steps, jnp.int32))
  step = lambda c, t: decode_step_jit(graphdef, state, c, t, plan)
  times, _, cache = step_times(step, cache, jnp.zeros((batch, 1), jnp.int32), steps, warmup)
  ms = 1000 * statistics.median(times)
  return {"context": context, "batch": batch, "ms_per_token": ms,
          "mean_ms_per_token": 1000 * statistics.fmean(times), "tokens_per_s": batch * 1000 / ms,
          "cache_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache.layers)),
          "cache_bytes_per_device": max(shd.per_device_bytes(cache.layers).values())}


def with_decode_impl(model: nnx.Module, impl: str) -> nnx.Module:
  """The same parameters behind an MLA model whose config picks another decode path."""
  cfg = dataclasses.replace(model.cfg, mla_decode_impl=impl)
  graphdef, _ = nnx.split(abstract_model(cfg))
  return nnx.merge(graphdef, nnx.state(model))


def time_decode_impls(model: nnx.Module, contexts=(256, 1024), batch: int = 1,
                      steps: int = 32, plan: DecodePlan | None = None
                      ) -> dict[str, list[dict]]:
  """{impl name: [time_decode(...) per context]}. The GQA family has one path ('standard');
  MLA is timed with both the absorbed and the naive decode path on the same parameters (over a
  sequence-split cache both run the absorbed per-shard attention: core.decode_sharded)."""
  impls = ("absorbed", "naive") if model.cfg.attention == "mla" else ("standard",)
  out = {}
  for impl in impls:
    m = model if impl == "standard" else with_decode_impl(model, impl)
    out[impl] = [time_decode(m, c, batch, steps, plan=plan) for c in contexts]
  return out


def time_decode_interleaved(models: dict, contexts=(256, 1024), batch: int = 1, steps: int = 16,
                            rounds: int = 3) -> dict[str, dict[str, list[dict]]]:
  """time_decode_impls for several models, measured in interleaved rounds: every (model, path,
  context) is timed once per round, so a burst of load from another process hits all of them
  alike instead of one unlucky model. ms_per_token is the median of the rounds' medians.
  Returns {name: {impl: [point per context]}}."""
  variants = {}
  for name, model in models.items():
    impls = ("absorbed", "naive") if model.cfg.attention == "mla" else ("standard",)
    for impl in impls:
      variants[(name, impl)] = model if impl == "standard" else with_decode_impl(model, impl)
  samples = {key: {c: [] for c in contexts} for key in variants}
  for _ in range(rounds):
    for key, model in variants.items():
      for c in contexts:
        samples[key][c].append(time_decode(model, c, batch, steps))
  out: dict[str, dict[str, list[dict]]] = {}
  for (name, impl), by_context in samples.items():
    points = []
    for runs in by_context.values():
      ms = statistics.median(r["ms_per_token"] for r in runs)
      points.append({**runs[0], "ms_per_token": ms, "tokens_per_s": batch * 1000 / ms,
                     "mean_ms_per_token": statistics.fmean(r["mean_ms_per_token"] for r in runs),
                     "min_round_ms_per_token": min(r["ms_per_token"] for r in runs),
                     "max_round_ms_per_token": max(r["ms_per_token"] for r in runs),
                     "rounds": rounds, "steps_per_round": steps})
    out.setdefault(name, {})[impl] = points
  return out
