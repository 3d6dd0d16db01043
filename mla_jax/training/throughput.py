"""Throughput of the compiled train step alone: tokens/s and MFU without the loop around it.

    r = measure_train_step(load_config("configs/lm.py:attn=mla,size=125m"), peak_flops=7.9e14)
    r["tokens_per_s"], r["mfu"]

The state and step are built as `trainer.train` builds them (the same optimizer, TrainState and
`make_train_step`), on the default device, and fed one fixed random batch: no data loading,
evaluation or checkpoint, so a GPU check can afford several model variants in a few minutes, and
the figure is what the step itself reaches. `scripts/bench_train.py` measures the whole loop.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax.core.attention import resolve_attn_impl
from mla_jax.core.model import Transformer, abstract_model, count_params
from mla_jax.evaluation.perf import train_flops_per_token
from mla_jax.experiment import ExperimentConfig
from mla_jax.training.optim import make_optimizer
from mla_jax.training.step import TrainState, make_train_step


def measure_train_step(config, *, peak_flops: float, steps: int = 10, warmup: int = 2,
                       vocab_size: int = 256) -> dict:
  """Throughput of `steps` train steps dispatched back to back after `warmup` steps
  (the first compiles): tokens/s, ms per step and MFU against `peak_flops` (one device).

  config: a ConfigDict of an experiment file (or an ExperimentConfig); vocab_size stands in for
  the tokenizer's (bytes: 256)."""
  exp = config if isinstance(config, ExperimentConfig) else ExperimentConfig.from_config(config)
  cfg = exp.model_config(vocab_size)
  t, o, d = exp.train, exp.optim, exp.data
  tx, _ = make_optimizer(
      lr=o.lr, steps=t.steps, warmup_steps=o.warmup(t.steps), schedule=o.schedule,
      min_lr_ratio=o.min_lr_ratio, decay_fraction=o.decay_fraction, weight_decay=o.weight_decay,
      b1=o.b1, b2=o.b2, eps=o.eps, grad_clip=o.grad_clip)
  graphdef, abstract = nnx.split(abstract_model(cfg))
  n_params = count_params(nnx.merge(graphdef, abstract))["total"]

  def init() -> TrainState:  # as trainer.train's: one jit, so no two leaves share a buffer
    params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(t.seed)))[1]
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=tx.init(params), skipped=zero,
                      first_bad_step=zero - 1)

  state = jax.jit(init)()
  step_fn = jax.jit(make_train_step(graphdef, tx, t.microbatches), donate_argnums=0)
  batch = jax.random.randint(jax.random.key(t.seed), (t.global_batch, d.seq_len + 1), 0,
                             vocab_size, jnp.int32)
  begin = time.perf_counter()
  for _ in range(warmup):
    state, metrics = step_fn(state, batch)
    metrics["loss"].block_until_ready()
  warmup_s = time.perf_counter() - begin
  # Dispatched back to back and waited for once, as the trainer keeps steps in flight: the
  # host's dispatch overlaps the device's work.
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step_fn(state, batch)
  jax.block_until_ready((state, metrics))
  seconds = time.perf_counter() - start
  tokens = steps * t.global_batch * d.seq_len
  flops = train_flops_per_token(cfg, n_params, d.seq_len)
  tok_s = tokens / seconds
  # The head dims the attention layer asks cuDNN about (core/attention.py), to report what
  # attn_impl=auto picked here.
  dims = (cfg.qk_head_dim,)
  if cfg.attention == "mla":
    r = cfg.qk_rope_head_dim
    dims = ((cfg.kv_lora_rank + r,) if cfg.mla_prefill_impl == "absorbed"
            else (max(cfg.nope_dim + r, cfg.v_dim),))
  return {"attention": cfg.attention, "attn_impl": cfg.attn_impl,
          "attn_impl_resolved": resolve_attn_impl(cfg.attn_impl, cfg.compute_dtype, dims),
          "dtype": cfg.dtype, "remat": cfg.remat, "params": n_params,
          "global_batch": t.global_batch, "seq_len": d.seq_len, "steps_timed": steps,
          "warmup_steps": warmup, "warmup_s": warmup_s, "tokens_per_s": tok_s,
          "step_ms": 1e3 * seconds / steps, "flops_per_token": flops, "peak_flops": peak_flops,
          "mfu": tok_s * flops / peak_flops, "loss": float(metrics["loss"]),
          "skipped": int(state.skipped), "device_kind": jax.devices()[0].device_kind}
