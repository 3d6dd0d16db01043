"""The decode benchmark's building blocks: its models, the cache bytes one step reads, the timed
step, one measured cell and the fused kernel's targets.

scripts/bench_decode.py (the CPU tables, sharded decode) and mla_jax.accel (the accelerator
check) both measure with these; the script's docstring says what is timed and which bytes count.

    cfg = make_config(dict(MLA, mla_decode_impl="pallas"), max_seq_len=4096)
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    rec = measure_cell("mla", "pallas", cfg, graphdef, state, batch=8, context=4096, steps=10,
                       max_seconds=5.0, peak=3350.0)   # ms_per_token, achieved_gbps, ...
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import numpy as np

from mla_jax.core.config import ModelConfig, kv_cache_bytes_per_token
from mla_jax.core.generate import decode_step_jit
from mla_jax.core.model import init_cache
from mla_jax.evaluation import decode_speed
from mla_jax.kernels import mla_decode

BASE = dict(vocab_size=256, d_model=512, n_heads=8, head_dim=64, n_layers=2, d_ff=1408,
            init_std=0.02, dtype="float32", param_dtype="float32")
MLA = dict(attention="mla", kv_lora_rank=256, qk_rope_head_dim=32, qk_nope_head_dim=64,
           v_head_dim=64, q_lora_rank=0)
# (variant, path, config overrides)
VARIANTS = [
    ("mha", "kv", dict(attention="mha")),
    ("gqa", "kv", dict(attention="gqa", n_kv_heads=2)),
    ("mqa", "kv", dict(attention="mqa")),
    ("mla", "naive", dict(MLA, mla_decode_impl="naive")),
    ("mla", "absorbed", dict(MLA, mla_decode_impl="absorbed")),
    ("mla", "pallas", dict(MLA, mla_decode_impl="pallas")),
]
# Peak memory bandwidth in GB/s (vendor figures) by a substring of jax's device_kind; first match.
PEAK_GBPS = [("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100-SXM4-80GB", 2039.0),
             ("A100 80GB", 1935.0), ("A100", 1555.0), ("L40S", 864.0)]


def row_name(variant: str, path: str) -> str:
  return variant if path == "kv" else f"{variant}-{path}"


def parse_contexts(text: str) -> list[int]:
  """'1k,4k,32k' or '1024,4096' -> [1024, 4096, 32768]."""
  return [int(c[:-1]) * 1024 if c.lower().endswith("k") else int(c) for c in text.split(",")]


def peak_gbps(device_kind: str) -> float | None:
  return next((gbps for key, gbps in PEAK_GBPS if key.lower() in device_kind.lower()), None)


def bytes_read_per_slot(cfg: ModelConfig, path: str) -> int:
  """Cache bytes one decode step reads per filled slot, per layer and sequence: 2 G K for the GQA
  family, 2 C + R for the einsum MLA paths, C + R per head block of the kernel."""
  item = jnp.dtype(cfg.kv_cache_dtype).itemsize
  if cfg.attention != "mla":
    return 2 * cfg.kv_heads * cfg.qk_head_dim * item
  c, r = cfg.kv_lora_rank, cfg.qk_rope_head_dim
  if path == "pallas":
    return (c + r) * -(-cfg.n_heads // mla_decode.default_block_h(cfg.n_heads)) * item
  return (2 * c + r) * item


def make_config(overrides: dict, max_seq_len: int) -> ModelConfig:
  return ModelConfig(**{**BASE, **overrides, "max_seq_len": max_seq_len})


@jax.jit
def _random_like(key, cache):
  """The same cache with N(0, 1) contents (lengths untouched)."""
  leaves, treedef = jax.tree.flatten(cache.layers)
  keys = jax.random.split(key, len(leaves))
  leaves = [jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype)
            for k, x in zip(keys, leaves)]
  return cache.replace(layers=jax.tree.unflatten(treedef, leaves))


def time_decode(graphdef, state, cfg: ModelConfig, context: int, batch: int, steps: int,
                max_seconds: float) -> list[float]:
  """Seconds per decode step (after one warm-up step) at `context` slots, batch `batch`."""
  cache = init_cache(cfg, batch, context)
  cache = _random_like(jax.random.key(context + batch), cache)
  start = context - steps - 1  # warm-up decodes position start, timed steps the rest
  cache = cache.replace(lengths=jnp.full((batch,), start, jnp.int32))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, 1)), jnp.int32)
  # decode_speed.step_times: one warm-up step, then each step timed alone; slow cells (mla-naive
  # at long context) stop after max_seconds, with at least 3 samples.
  step = lambda c, t: decode_step_jit(graphdef, state, c, t)
  times, logits, cache = decode_speed.step_times(step, cache, tokens, steps, 1, max_seconds)
  assert int(cache.lengths[0]) == start + 1 + len(times)
  assert bool(jnp.all(jnp.isfinite(logits)))
  del cache
  return times


def measure_cell(variant: str, path: str, cfg: ModelConfig, graphdef, state, batch: int,
                 context: int, steps: int, max_seconds: float, peak: float | None) -> dict:
  """One benchmark record: the median step time at (batch, context), the cache bytes it read
  and the bandwidth that is, as a fraction of `peak` GB/s when given."""
  times = time_decode(graphdef, state, cfg, context, batch, steps, max_seconds)
  median = statistics.median(times)
  read = bytes_read_per_slot(cfg, path) * cfg.n_layers * batch * context
  return dict(variant=variant, path=path, context=context, batch=batch,
              ms_per_token=1e3 * median, kv_bytes_per_token=kv_cache_bytes_per_token(cfg),
              tokens_per_s=batch / median, steps_timed=len(times), ms_min=1e3 * min(times),
              device_kind=jax.devices()[0].device_kind,
              param_bytes=sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)),
              cache_bytes_read_per_step=read, achieved_gbps=read / median / 1e9,
              peak_gbps=peak, peak_fraction=read / median / 1e9 / peak if peak else None)


def kernel_targets(records: list[dict], bandwidth_target: float = 0.7, min_batch: int = 64,
                   min_context: int = 4096) -> list[dict]:
  """The fused kernel's targets (docs/kernels.md), per MLA path at batch >= min_batch and context
  >= min_context: achieved bandwidth >= bandwidth_target of the records' peak, and (MLA time /
  MQA time) / bytes ratio (C + R) / 2K <= 1.1."""
  mqa = {(r["batch"], r["context"]): r for r in records if r["variant"] == "mqa"}
  out = []
  for r in records:
    if (r["variant"] != "mla" or r["path"] == "naive" or r["batch"] < min_batch
        or r["context"] < min_context):
      continue
    t = dict(path=r["path"], batch=r["batch"], context=r["context"], peak_fraction=None,
             over_bytes_ratio=None)
    if r.get("peak_fraction") is not None:
      t["peak_fraction"] = r["peak_fraction"]
      t["bandwidth_target_met"] = r["peak_fraction"] >= bandwidth_target
    m = mqa.get((r["batch"], r["context"]))
    if m is not None:
      ratio = r["ms_per_token"] / m["ms_per_token"]
      t["over_bytes_ratio"] = ratio / (r["kv_bytes_per_token"] / m["kv_bytes_per_token"])
      t["mqa_target_met"] = t["over_bytes_ratio"] <= 1.1
    out.append(t)
  return out
