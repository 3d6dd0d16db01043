"""The training loop: validate the config, load data, build a sharded state, train, evaluate,
checkpoint, resume. `train(config, workdir)` is what train.py calls.

Order matters for the user: every config error is raised before data is read or anything compiles,
and re-running the same command on a workdir resumes from its newest readable checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mla_jax import host_memory
from mla_jax.core import sharding as shd
from mla_jax.core.config import ModelConfig
from mla_jax.core.model import Transformer, count_params
from mla_jax.data import corpus as data_lib
from mla_jax.data import pipeline
from mla_jax.evaluation.metrics import Evaluator
from mla_jax.evaluation.perf import measure_peak_flops, train_flops_per_token
from mla_jax.storage.checkpoint import CONFIG_FILE, Checkpointer, CheckpointError, _abstract
from mla_jax.training.logger import MetricsLogger
from mla_jax.training.optim import make_optimizer
from mla_jax.training.step import TrainState, make_train_step

log = logging.getLogger(__name__)
NONFINITE_POLICIES = ("stop", "skip")


class NonFiniteError(RuntimeError):
  pass


# Config checks: cheap, before any data or compile ------------------------------------------------


def parse_rules(text: str) -> dict[str, Any]:
  """'embed=tensor,mlp=None,batch=data+fsdp' -> {'embed': 'tensor', 'mlp': None, ...}."""
  rules = {}
  for item in filter(None, (s.strip() for s in text.split(","))):
    if "=" not in item:
      raise ValueError(f"mesh.rules: {item!r} is not of the form logical=mesh_axis")
    name, target = (s.strip() for s in item.split("=", 1))
    rules[name] = None if target in ("", "None") else (
        tuple(target.split("+")) if "+" in target else target)
  return shd.make_rules(rules)


def check_config(config) -> tuple[dict[str, int], dict[str, Any]]:
  """Validates the parts that need no data; returns (mesh sizes, sharding rules)."""
  t, d = config.train, config.data
  for name in ("steps", "global_batch", "microbatches", "log_every", "eval_every", "ckpt_every",
               "keep_ckpts"):
    if getattr(t, name) <= 0:
      raise ValueError(f"train.{name}: must be positive, got {getattr(t, name)}")
  if t.on_nonfinite not in NONFINITE_POLICIES:
    raise ValueError(f"train.on_nonfinite: {t.on_nonfinite!r} is not one of {NONFINITE_POLICIES}")
  probe = dict(config.model)
  probe["vocab_size"] = probe["vocab_size"] or 256  # the real one comes from the tokenizer
  model_cfg = ModelConfig.from_mapping(probe)
  if d.seq_len <= 0:
    raise ValueError(f"data.seq_len: must be positive, got {d.seq_len}")
  if d.seq_len > model_cfg.max_seq_len:
    raise ValueError(f"data.seq_len: {d.seq_len} is above model.max_seq_len="
                     f"{model_cfg.max_seq_len}")
  mesh = {a: config.mesh[a] for a in shd.MESH_AXES}
  sizes = shd.resolve_mesh_shape(mesh, jax.device_count())
  rules = parse_rules(config.mesh.rules)
  dp = shd.data_parallel_size(sizes, rules)
  if t.global_batch % (dp * t.microbatches):
    raise ValueError(f"train.global_batch: {t.global_batch} is not divisible by data-parallel "
                     f"size {dp} x train.microbatches {t.microbatches}")
  if t.global_batch % jax.process_count():
    raise ValueError(f"train.global_batch: {t.global_batch} is not divisible by the "
                     f"{jax.process_count()} processes")
  return sizes, rules


def resolve_model_config(config, vocab_size: int) -> ModelConfig:
  """model.vocab_size 0 means 'the tokenizer's'; a set one must cover the tokenizer's ids."""
  fields = dict(config.model)
  if fields["vocab_size"] and fields["vocab_size"] < vocab_size:
    raise ValueError(f"model.vocab_size: {fields['vocab_size']} is smaller than the tokenizer's "
                     f"vocabulary ({vocab_size})")
  fields["vocab_size"] = fields["vocab_size"] or vocab_size
  return ModelConfig.from_mapping(fields)


def check_workdir(workdir: str, config_dict: dict, model_cfg: ModelConfig, allow_change: bool):
  """Refuses to resume a workdir whose saved model differs, naming every differing field.

  With allow_change, a change is accepted only if every parameter keeps its shape (e.g. dtype,
  mla_*_impl, rope_layout, norm_eps, remat): the checkpoint then restores into the new model.
  The change is appended to config_dict['config_changes'] (the history config.json keeps).
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  config_dict["config_changes"] = list(saved.get("config_changes", []))
  old_cfg = ModelConfig.from_mapping(saved["model"])
  diff = old_cfg.diff(model_cfg)
  if not diff:
    return
  fields = ", ".join(f"model.{k}: {a!r} -> {b!r}" for k, a, b in
                     ((k, *v) for k, v in sorted(diff.items())))
  if not allow_change:
    raise ValueError(f"{path}: workdir holds a different model ({fields}); use a new --workdir, "
                     "or set --config.train.allow_config_change=True to fine-tune from it")
  old_shapes, new_shapes = _param_shapes(old_cfg), _param_shapes(model_cfg)
  bad = [f"{k}: {old_shapes.get(k)} -> {new_shapes.get(k)}"
         for k in sorted(set(old_shapes) | set(new_shapes)) if old_shapes.get(k) != new_shapes.get(k)]
  if bad:
    raise ValueError(
        f"train.allow_config_change: the change ({fields}) changes the shape of {len(bad)} "
        f"parameter arrays ({'; '.join(bad[:3])}{'; ...' if len(bad) > 3 else ''}), so the "
        f"checkpoint in "
        f"{workdir} cannot be restored into it; only shape-preserving changes can continue a "
        "workdir: use a new --workdir")
  log.warning("train.allow_config_change: continuing %s with a changed model (%s)", workdir, fields)
  config_dict["config_changes"].append(
      {"time": time.strftime("%Y-%m-%dT%H:%M:%S"),
       "model": {k: [a, b] for k, (a, b) in sorted(diff.items())}})


def _param_shapes(cfg: ModelConfig) -> dict[str, tuple]:
  """'path/to/param' -> shape for every array of the model's state (no allocation)."""
  state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))[1]
  return {"/".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(state)}


# State ------------------------------------------------------------------------------------------


def state_shardings(abstract: TrainState, tx, param_sh, mesh) -> TrainState:
  """Optimizer moments follow their parameter's sharding; counters are replicated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_sh = optax.tree_map_params(
      tx, lambda _, s: s, abstract.opt_state, param_sh,
      transform_non_params=lambda _: replicated, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return TrainState(step=replicated, params=param_sh, opt_state=opt_sh, skipped=replicated,
                    first_bad_step=replicated)


def _opt_item(state: TrainState) -> dict:
  return {"step": state.step, "opt_state": state.opt_state, "skipped": state.skipped,
          "first_bad_step": state.first_bad_step}


class _StopFlag:
  """SIGTERM / SIGINT ask the loop to finish its step, checkpoint and exit cleanly."""

  def __init__(self):
    self.requested = None
    self.previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self.previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. some test runners): no handler
        pass

  def _handle(self, signum, frame):
    if self.requested is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C means now
    self.requested = signal.Signals(signum).name

  def restore(self):
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)


# The loop ---------------------------------------------------------------------------------------


def train(config, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the experiment `config` in `workdir`; returns a summary dict."""
  t, d, o = config.train, config.data, config.optim
  sizes, rules = check_config(config)
  make_optimizer(lr=o.lr, steps=t.steps, warmup_steps=o.warmup_steps, schedule=o.schedule)  # check
  is_main = jax.process_index() == 0
  host_memory.tune_malloc()  # XLA:CPU's per-step temp buffer stays in the heap: no page faults
  os.makedirs(workdir, exist_ok=True)

  corpus = data_lib.load_corpus(d.source, d.path, d.tokenizer, d.vocab_size, workdir=workdir,
                                val_fraction=d.val_fraction, max_bytes=d.max_bytes)
  data_lib.check_lengths(corpus, d.seq_len)
  model_cfg = resolve_model_config(config, corpus.vocab_size)
  config_dict = json.loads(config.to_json())
  config_dict["model"] = model_cfg.to_dict()
  check_workdir(workdir, config_dict, model_cfg, t.allow_config_change)
  if is_main:
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      json.dump(config_dict, f, indent=2)

  mesh = shd.make_mesh(sizes)
  tx, schedule = make_optimizer(
      lr=o.lr, steps=t.steps, warmup_steps=o.warmup_steps, schedule=o.schedule,
      min_lr_ratio=o.min_lr_ratio, decay_fraction=o.decay_fraction, weight_decay=o.weight_decay,
      b1=o.b1, b2=o.b2, eps=o.eps, grad_clip=o.grad_clip)
  graphdef, abstract_params = nnx.split(
      nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(t.seed))))
  param_sh = shd.param_shardings(abstract_params, mesh, rules)

  def init() -> TrainState:
    params = nnx.split(Transformer(model_cfg, rngs=nnx.Rngs(t.seed)))[1]
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=tx.init(params), skipped=zero,
                      first_bad_step=zero - 1)

  init_shapes = jax.eval_shape(init)
  state_sh = state_shardings(init_shapes, tx, param_sh, mesh)
  local_batch = t.global_batch // jax.process_count()
  it = pipeline.make_train_iterator(corpus.train, d.seq_len, local_batch, t.seed,
                                    jax.process_index(), jax.process_count(), d.worker_count)
  ckpt = Checkpointer(workdir, keep=t.keep_ckpts)
  abstract_state = _abstract(init_shapes, state_sh)
  restored = ckpt.restore_latest_good(abstract_state.params, _opt_item(abstract_state), it)
  if restored is None:
    state = jax.jit(init, out_shardings=state_sh)()
  else:
    _, params, opt, _ = restored
    state = TrainState(params=params, **opt)
    if t.on_nonfinite == "stop" and int(state.skipped):
      # Saved between a skipped update and the log step that stopped on it: its parameters are
      # finite; count afresh, or this run would stop at once on the old skip.
      log.warning("checkpoint step %d records %d skipped non-finite update(s) (first at step %d);"
                  " train.on_nonfinite=stop counts from this run on", int(state.step),
                  int(state.skipped), int(state.first_bad_step) + 1)
      state = state.replace(skipped=jax.device_put(np.int32(0), state_sh.skipped),
                            first_bad_step=jax.device_put(np.int32(-1), state_sh.first_bad_step))
  start = int(state.step)

  batch_sh = shd.batch_sharding(mesh, rules)
  step_fn = jax.jit(make_train_step(graphdef, tx, t.microbatches),
                    in_shardings=(state_sh, batch_sh),
                    out_shardings=(state_sh, NamedSharding(mesh, PartitionSpec())),
                    donate_argnums=0)
  evaluator = Evaluator(graphdef, param_sh, mesh, t.global_batch, d.seq_len, rules)

  n_params = count_params(nnx.merge(graphdef, abstract_params))
  flops_per_token = train_flops_per_token(model_cfg, n_params["total"], d.seq_len)
  peak = t.peak_flops or measure_peak_flops()
  tokens_per_step = t.global_batch * d.seq_len
  logger = MetricsLogger(workdir, t.steps, start, enabled=is_main)
  logger.message(
      f"{model_cfg.attention} | params {n_params['total'] / 1e6:.2f}M "
      f"(non-embedding {n_params['non_embedding'] / 1e6:.2f}M) | mesh {sizes} | "
      f"{'resumed at step ' + str(start) if start else 'from scratch'} | workdir {workdir}")

  stop = _StopFlag()
  last_log_time, last_log_step, eval_time = time.perf_counter(), start, 0.0
  last_saved, val = start if restored else -1, None
  step = start
  try:
    while step < t.steps and stop.requested is None:
      batch = jax.make_array_from_process_local_data(batch_sh, next(it).astype(np.int32))
      state, metrics = step_fn(state, batch)
      step += 1
      record = {}
      if step % t.log_every == 0 or step == t.steps:
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        tok_s = tokens_per_step * (step - last_log_step) / (now - last_log_time - eval_time)
        last_log_time, last_log_step, eval_time = now, step, 0.0
        record.update(loss=float(metrics["loss"]), grad_norm=float(metrics["grad_norm"]),
                      lr=float(schedule(step - 1)), tokens_per_s=tok_s,
                      mfu=tok_s * flops_per_token / (peak * jax.device_count()))
        _check_finite(state, t.on_nonfinite, record, ckpt, logger)
      if step % t.eval_every == 0 or step == t.steps:
        # Steps dispatched so far may still be running: finish them first, or their time would
        # count as eval time and inflate the next logged tokens/s.
        jax.block_until_ready(state)
        eval_start = time.perf_counter()
        val = evaluator(state.params, corpus.val, corpus.val_bytes_per_token, t.eval_tokens)
        record.update({k: v for k, v in val.items() if k != "loss_by_position"})
        eval_time += time.perf_counter() - eval_start  # eval time is not training throughput
      if record:
        record["tokens"] = step * tokens_per_step
        logger.log(step, record)
      logger.advance(step)
      if step % t.ckpt_every == 0 or step == t.steps:
        ckpt.save(step, state.params, _opt_item(state), it, _meta(step, record, tokens_per_step))
        last_saved = step
    if stop.requested is not None and last_saved != step:
      logger.message(f"{stop.requested}: checkpointing step {step} and exiting")
      ckpt.save(step, state.params, _opt_item(state), it, _meta(step, {}, tokens_per_step))
  finally:
    ckpt.wait()
    ckpt.close()
    logger.close()
    stop.restore()
  if ckpt.last_save_failed(step):  # earlier failed saves were retried; the last one must hold
    good = [s for s in ckpt.steps() if s not in ckpt.failed_saves]
    raise CheckpointError(
        f"the final checkpoint (step {step}) could not be saved ({ckpt.failed_saves[step]}); "
        f"the last saved one is {f'step {good[-1]}' if good else 'none'} in {ckpt.directory}; "
        "fix the disk and re-run the same command to resume from it")
  return {"step": step, "stopped_by": stop.requested, "final": val, "params": n_params,
          "workdir": workdir, "model": model_cfg}


def _meta(step: int, record: dict, tokens_per_step: int) -> dict:
  return {"step": step, "tokens": step * tokens_per_step, "val_loss": record.get("val_loss")}


def _check_finite(state, policy, record, ckpt: Checkpointer, logger):
  skipped = int(state.skipped)
  record["skipped_updates"] = skipped
  if skipped and policy == "stop":
    steps = ckpt.steps()
    last = f"step {steps[-1]} in {ckpt.directory}" if steps else "none yet"
    raise NonFiniteError(
        f"non-finite loss or gradients at step {int(state.first_bad_step) + 1}; the update was "
        f"not applied. Last good checkpoint: {last}. Likely cause: a learning rate too high "
        f"for this model (optim.lr), or too little warmup; set train.on_nonfinite=skip to drop "
        f"such updates and go on.")
  if skipped:
    logger.message(f"skipped {skipped} non-finite update(s) so far (first at step "
                   f"{int(state.first_bad_step) + 1})")
