"""Memory plan of a run before renting hardware: per-device bytes on a mesh, nothing allocated.

    exp = ExperimentConfig.from_config(load_config("configs/lm.py:attn=mla,size=7b"))
    p = plan_experiment(exp, decode_batch=8, decode_context=4096)   # on jax.devices()
    print(report(p, exp))

scripts/plan.py is the command line (it makes N fake CPU devices first). Compiles ahead of time,
from abstract arrays only (jax.ShapeDtypeStruct with shardings):
  the train step   (grad accumulation, AdamW, the non-finite guard: exactly train.py's step)
  the decode step  (one token for decode_batch sequences against a cache of decode_context slots)
and reports per device: parameters and optimizer state (from their shardings), the batch,
activations / temporaries (the compiled executable's memory analysis: XLA's buffer assignment,
for the CPU backend; an accelerator's compiler schedules differently, so read it as an estimate)
and the decode cache. Model dtypes are the config's (the accelerator sizes use bf16 and remat).
"""

from __future__ import annotations

import math


def shard_bytes(tree) -> int:
  """Bytes one device holds of a pytree of arrays or ShapeDtypeStructs with shardings (the
  largest device's share; shards are equal unless a dimension is not divided)."""
  import jax

  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shape) * leaf.dtype.itemsize
  return total


def plan(exp, mesh, rules, decode_batch: int = 1, decode_context: int = 0,
         vocab_size: int = 256) -> dict:
  """Per-device bytes of a training run and a decode on `mesh`: a dict of ints (bytes) and the
  compiled memory analyses; nothing is allocated. decode_context 0: the model's max_seq_len."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec

  from mla_jax.core import sharding as shd
  from mla_jax.core.model import Transformer, abstract_model, init_cache
  from mla_jax.storage.checkpoint import abstract_with_shardings
  from mla_jax.training.optim import make_optimizer
  from mla_jax.training.step import TrainState, make_train_step
  from mla_jax.training.trainer import state_shardings

  t, o = exp.train, exp.optim
  cfg = exp.model_config(vocab_size)
  tx, _ = make_optimizer(lr=o.lr, steps=t.steps, warmup_steps=o.warmup(t.steps),
                         schedule=o.schedule, min_lr_ratio=o.min_lr_ratio,
                         decay_fraction=o.decay_fraction, weight_decay=o.weight_decay, b1=o.b1,
                         b2=o.b2, eps=o.eps, grad_clip=o.grad_clip)
  graphdef, abstract_params = nnx.split(abstract_model(cfg))
  param_sh = shd.param_shardings(abstract_params, mesh, rules)

  def init() -> TrainState:
    params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))[1]
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=tx.init(params), skipped=zero,
                      first_bad_step=zero - 1)

  shapes = jax.eval_shape(init)
  state = abstract_with_shardings(shapes, state_shardings(shapes, tx, param_sh, mesh))
  batch_sh = shd.batch_sharding(mesh, rules)
  batch = jax.ShapeDtypeStruct((t.global_batch, exp.data.seq_len + 1), jnp.int32,
                               sharding=batch_sh)
  replicated = NamedSharding(mesh, PartitionSpec())
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  train = jax.jit(make_train_step(graphdef, tx, t.microbatches),
                  in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                  donate_argnums=0).lower(state, batch).compile()

  context = decode_context or cfg.max_seq_len
  cache_shapes = jax.eval_shape(lambda: init_cache(cfg, decode_batch, context))
  cache = abstract_with_shardings(cache_shapes, shd.cache_shardings(cache_shapes, mesh, rules))
  # The new tokens [B, 1] split like the cache's batch (where the mesh axes divide B).
  tokens_spec = shd.logical_to_spec(("cache_batch", "_"), (decode_batch, 1), mesh, rules)
  tokens = jax.ShapeDtypeStruct((decode_batch, 1), jnp.int32,
                                sharding=NamedSharding(mesh, tokens_spec))
  params = state.params

  def decode(params, cache, tokens):
    logits, cache = nnx.merge(graphdef, params).extend(tokens, cache)
    return logits[:, -1], cache

  decode_c = jax.jit(decode, donate_argnums=1,
                     out_shardings=(None, jax.tree.map(lambda x: x.sharding, cache))
                     ).lower(params, cache, tokens).compile()
  train_m, decode_m = train.memory_analysis(), decode_c.memory_analysis()
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params))
  return {
      "devices": mesh.devices.size, "mesh": dict(mesh.shape), "params": n_params,
      "param_bytes": shard_bytes(state.params),
      "opt_bytes": shard_bytes(state.opt_state),
      "batch_bytes": shard_bytes(batch),
      "train_temp_bytes": int(train_m.temp_size_in_bytes),
      "train_argument_bytes": int(train_m.argument_size_in_bytes),
      "train_output_bytes": int(train_m.output_size_in_bytes),
      "train_alias_bytes": int(train_m.alias_size_in_bytes),
      "decode_batch": decode_batch, "decode_context": context,
      "cache_bytes": shard_bytes(cache),
      "decode_temp_bytes": int(decode_m.temp_size_in_bytes),
  }


def peak_train_bytes(p: dict) -> int:
  """Live at once in a train step: its inputs, its outputs not written over donated inputs, and
  the temporaries."""
  return (p["train_argument_bytes"] + p["train_output_bytes"] - p["train_alias_bytes"]
          + p["train_temp_bytes"])


def _gib(n: int) -> str:
  """Bytes in the largest binary unit that keeps the number >= 1."""
  unit = next(u for u in range(3, -1, -1) if n >= 2 ** (10 * u) or u == 0)
  return f"{n / 2 ** (10 * unit):9.3f} {('B', 'KiB', 'MiB', 'GiB')[unit]}"


def report(p: dict, exp) -> str:
  t = exp.train
  decode_total = p["param_bytes"] + p["cache_bytes"] + p["decode_temp_bytes"]
  lines = [
      f"{p['params'] / 1e6:,.2f}M parameters | {p['devices']} devices, mesh {p['mesh']} | "
      f"global batch {t.global_batch} x {exp.data.seq_len} tokens, {t.microbatches} microbatch(es)",
      "per device:",
      f"  parameters                {_gib(p['param_bytes'])}",
      f"  optimizer state           {_gib(p['opt_bytes'])}",
      f"  batch                     {_gib(p['batch_bytes'])}",
      f"  activations/temporaries   {_gib(p['train_temp_bytes'])}   (compiled train step)",
      f"  train step peak           {_gib(peak_train_bytes(p))}",
      f"  decode cache              {_gib(p['cache_bytes'])}   (batch {p['decode_batch']}, "
      f"context {p['decode_context']})",
      f"  decode temporaries        {_gib(p['decode_temp_bytes'])}   (compiled decode step)",
      f"  decode total              {_gib(decode_total)}   (parameters + cache + temporaries)",
  ]
  if exp.model_config(256).remat:
    lines.append(
        "note: model.remat is on, but XLA:CPU keeps the activations anyway (remat on/off moved "
        "a 4-layer, 1024-token step's temporaries by 2%: 1.115 vs 1.139 GiB), so the "
        "temporaries above are those of a step WITHOUT remat: an upper bound for GPU / TPU")
  return "\n".join(lines)


def plan_experiment(exp, decode_batch: int = 1, decode_context: int = 0) -> dict:
  """plan() on the mesh train.py would build from exp.mesh over jax.devices(); a mesh the
  devices cannot take (or a batch it cannot split) is a ValueError naming the field."""
  from mla_jax import distributed
  from mla_jax.training.preflight import check_config, parse_rules

  sizes, _ = check_config(exp)
  rules = parse_rules(exp.mesh.rules)
  mesh = distributed.make_mesh(sizes, exp.mesh.dcn)
  return plan(exp, mesh, rules, decode_batch, decode_context, exp.model.get("vocab_size") or 256)
