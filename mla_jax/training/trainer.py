"""The training loop: validate the config, load data, build a sharded state, train, evaluate,
checkpoint, resume. `train(config, workdir)` is what train.py calls.

Order matters for the user: every config error is raised before data is read or anything compiles,
nothing is written before the data is read and checked, re-running the same command on a workdir
resumes from its newest readable checkpoint, and re-running a finished one changes nothing.
"""

from __future__ import annotations

import collections
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

from mla_jax import distributed
from mla_jax.core import sharding as shd
from mla_jax.core.config import ModelConfig
from mla_jax.core.model import (
    Transformer,
    abstract_model,
    count_params,
    diff_param_shapes,
    param_shapes,
)
from mla_jax.data import corpus as data_lib
from mla_jax.data import pipeline
from mla_jax.evaluation.metrics import Evaluator
from mla_jax.evaluation.perf import measure_peak_flops, train_flops_per_token
from mla_jax.evaluation.report import write_run_plot
from mla_jax.experiment import ExperimentConfig
from mla_jax.storage.checkpoint import Checkpointer, CheckpointError, abstract_with_shardings
from mla_jax.storage.workdir import TOKENIZER_DIR, Workdir, WorkdirError
from mla_jax.training.health import make_health_fn
from mla_jax.training.logger import MetricsLogger, read_metrics
from mla_jax.training.optim import make_optimizer
from mla_jax.training.step import TrainState, make_train_step

log = logging.getLogger(__name__)
# Above this many passes over the training split the run is told it will mostly memorise.
MAX_EPOCHS_QUIET = 4
MAX_IN_FLIGHT = 2  # train steps dispatched ahead of the one the host waits for


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


def check_config(exp: ExperimentConfig) -> tuple[dict[str, int], dict[str, Any]]:
  """The checks that need the devices (mesh, batch split); returns (mesh sizes, rules)."""
  t = exp.train
  try:
    sizes = shd.resolve_mesh_shape(exp.mesh.shape, jax.device_count())
  except ValueError as e:
    if not str(e).startswith("mesh: "):
      raise
    shape = " x ".join(f"{a}={n}" for a, n in exp.mesh.shape.items())
    procs = jax.process_count()
    raise ValueError(f"mesh: {shape} (--config.mesh.data/fsdp/tensor/sequence) does not match "
                     f"the {jax.device_count()} devices ({procs} process{'es' * (procs > 1)} x "
                     f"{jax.local_device_count()}); set one axis to -1 to fill") from None
  rules = parse_rules(exp.mesh.rules)
  dp = shd.data_parallel_size(sizes, rules)
  if t.global_batch % (dp * t.microbatches):
    raise ValueError(f"train.global_batch: {t.global_batch} is not divisible by data-parallel "
                     f"size {dp} x train.microbatches {t.microbatches}")
  if t.global_batch % jax.process_count():
    raise ValueError(f"train.global_batch: {t.global_batch} is not divisible by the "
                     f"{jax.process_count()} processes")
  return sizes, rules


def check_process_rows(mesh, rules, global_batch: int) -> None:
  """Each process feeds its own rows of the batch (pipeline shards by process), so no two
  processes may hold the same rows: the batch axes must split across processes."""
  if jax.process_count() == 1:
    return
  index = shd.batch_sharding(mesh, rules).devices_indices_map((global_batch, 1))
  owners = collections.defaultdict(set)
  for device, (rows, _) in index.items():
    owners[(rows.start, rows.stop)].add(device.process_index)
  if any(len(p) > 1 for p in owners.values()):
    raise ValueError(f"mesh: the batch axes ({rules['batch']}) must split across the "
                     f"{jax.process_count()} processes, but processes share batch rows with mesh "
                     f"{dict(mesh.shape)}; keep tensor and sequence axes within a process")


def check_workdir(workdir: str, config_dict: dict, model_cfg: ModelConfig, allow_change: bool):
  """Refuses to resume a workdir whose saved model differs, naming every differing field.

  With allow_change, a change is accepted only if every parameter keeps its shape (e.g. dtype,
  mla_*_impl, rope_layout, norm_eps, remat): the checkpoint then restores into the new model.
  The change is appended to config_dict['config_changes'] (the history config.json keeps).
  """
  if not Workdir.exists(workdir):
    return
  saved = Workdir.open(workdir)
  if "config_changes" in saved.config:  # the history so far, kept across resumes
    config_dict["config_changes"] = list(saved.config["config_changes"])
  old_cfg = saved.model_config
  diff = old_cfg.diff(model_cfg)
  if not diff:
    return
  fields = ", ".join(f"model.{k}: {a!r} -> {b!r}" for k, a, b in
                     ((k, *v) for k, v in sorted(diff.items())))
  if not allow_change:
    raise ValueError(f"{saved.config_path}: workdir holds a different model ({fields}); use a new "
                     "--workdir, or set --config.train.allow_config_change=True to fine-tune "
                     "from it")
  bad = [f"{k}: {a} -> {b}" for k, a, b in diff_param_shapes(param_shapes(old_cfg),
                                                              param_shapes(model_cfg))]
  if bad:
    raise ValueError(
        f"train.allow_config_change: the change ({fields}) changes the shape of {len(bad)} "
        f"parameter arrays ({'; '.join(bad[:3])}{'; ...' if len(bad) > 3 else ''}), so the "
        f"checkpoint in {workdir} cannot be restored into it; only shape-preserving changes can "
        "continue a workdir: use a new --workdir")
  log.warning("train.allow_config_change: continuing %s with a changed model (%s)", workdir, fields)
  config_dict.setdefault("config_changes", []).append(
      {"time": time.strftime("%Y-%m-%dT%H:%M:%S"),
       "model": {k: [a, b] for k, (a, b) in sorted(diff.items())}})


def init_from_workdir(exp: ExperimentConfig) -> tuple[ExperimentConfig, Workdir]:
  """train.init_from: the model (every field) and the tokenizer kind come from that workdir, the
  data, optimiser and loop from this config. Returns (the experiment with that model, the
  Workdir); a workdir without a checkpoint is a ValueError naming train.init_from."""
  try:
    wd = Workdir.open(exp.train.init_from)
    wd.resolve_step("latest")
    src = wd.experiment
  except WorkdirError as e:
    raise ValueError(f"train.init_from: {e}") from None
  config = exp.to_dict()
  config["model"] = dict(wd.config["model"])
  config["data"].update(tokenizer=src.data.tokenizer, vocab_size=src.data.vocab_size)
  return ExperimentConfig.from_config(config), wd


def epochs(exp: ExperimentConfig, train_tokens: int) -> float:
  """How many times the run sees its training split."""
  return exp.train.steps * exp.train.global_batch * exp.data.seq_len / max(train_tokens, 1)


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


class _AgreedStop:
  """Several processes must stop after the same step (the checkpoint is a collective), but a
  SIGTERM reaches each at its own moment. Each step every process contributes its flag to a
  tiny max-reduction, dispatched asynchronously like the step; the result of step s is read at
  step s + lag, when it is done, so all processes see the same value at the same step and the
  host never waits for it. One process: the local flag, at once (no collective)."""

  def __init__(self, flag: _StopFlag, lag: int):
    self.flag, self.lag, self.votes, self.agreed = flag, lag, collections.deque(), False
    if jax.process_count() == 1:
      return
    from jax.sharding import Mesh

    rows = [[d for d in jax.devices() if d.process_index == p] for p in range(jax.process_count())]
    mesh = Mesh(np.array(rows), ("process", "local"))
    self.sharding = NamedSharding(mesh, PartitionSpec("process"))
    self.vote = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))

  @property
  def requested(self) -> str | None:
    if jax.process_count() == 1:
      return self.flag.requested
    return (self.flag.requested or "SIGTERM (another process)") if self.agreed else None

  def step_done(self) -> None:
    if jax.process_count() == 1:
      return
    local = np.array([self.flag.requested is not None], np.int32)
    self.votes.append(self.vote(jax.make_array_from_process_local_data(self.sharding, local)))
    if len(self.votes) > self.lag:
      self.agreed = self.agreed or bool(self.votes.popleft())


# The loop ---------------------------------------------------------------------------------------


def train(config, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the experiment `config` in `workdir`; returns a summary dict.

  config: an ml-collections ConfigDict (or dict) of an experiment file, or an ExperimentConfig.
  Nothing is created on disk until the config and the data have been checked; a workdir whose
  run already finished is reported and left unchanged.
  """
  exp = config if isinstance(config, ExperimentConfig) else ExperimentConfig.from_config(config)
  init_wd = None
  if exp.train.init_from:
    exp, init_wd = init_from_workdir(exp)
  t, d, o = exp.train, exp.data, exp.optim
  sizes, rules = check_config(exp)
  warmup = o.warmup(t.steps)
  is_main = jax.process_index() == 0

  tok_dir = os.path.join(workdir, TOKENIZER_DIR)
  read_tok_dir = tok_dir
  if init_wd is not None and not os.path.isdir(tok_dir):
    read_tok_dir = init_wd.tokenizer_dir  # the initial model's vocabulary; saved here below
  corpus = data_lib.load_corpus(d.resolved_source, d.path, d.tokenizer, d.vocab_size,
                                tokenizer_dir=read_tok_dir, val_fraction=d.val_fraction,
                                max_bytes=d.max_bytes)
  data_lib.check_lengths(corpus, d.seq_len)
  model_cfg = exp.model_config(corpus.vocab_size)
  config_dict = exp.to_dict()
  config_dict["model"] = model_cfg.to_dict()
  config_dict["data"]["source"] = d.resolved_source  # what was read, for eval.py and resumes
  check_workdir(workdir, config_dict, model_cfg, t.allow_config_change)
  # Every process has read the data and the workdir before process 0 writes into it (a peer
  # reading a half-written tokenizer or config.json would fail).
  distributed.barrier("workdir_checked")

  # Validated: from here on the workdir is written (config.json only when it changes, so a
  # finished run re-run is left exactly as it was).
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    if corpus.tokenizer is not None and not os.path.isdir(tok_dir):
      corpus.tokenizer.save(tok_dir)  # evaluation and sampling need only the workdir
    if not Workdir.exists(workdir) or Workdir.open(workdir).config != config_dict:
      Workdir.write_config(workdir, config_dict)

  mesh = distributed.make_mesh(sizes, exp.mesh.dcn)
  check_process_rows(mesh, rules, t.global_batch)
  tx, schedule = make_optimizer(
      lr=o.lr, steps=t.steps, warmup_steps=warmup, schedule=o.schedule,
      min_lr_ratio=o.min_lr_ratio, decay_fraction=o.decay_fraction, weight_decay=o.weight_decay,
      b1=o.b1, b2=o.b2, eps=o.eps, grad_clip=o.grad_clip)
  graphdef, abstract_params = nnx.split(abstract_model(model_cfg))
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
  abstract_state = abstract_with_shardings(init_shapes, state_sh)
  restored = ckpt.restore_latest_good(abstract_state.params, _opt_item(abstract_state), it)
  if restored is not None and restored[3].get("data_restored") is False:
    # Saved by another process count: its iterator states do not apply. Step k's global batch
    # is the k-th whatever the process count (pipeline.make_train_iterator), so skip to it.
    it = pipeline.make_train_iterator(corpus.train, d.seq_len, local_batch, t.seed,
                                      jax.process_index(), jax.process_count(), d.worker_count,
                                      start_batch=restored[0])
  if restored is None:
    state = jax.jit(init, out_shardings=state_sh)()
    if init_wd is not None:  # fine-tuning: its parameters, restored straight into their shardings
      params = nnx.state(init_wd.load_model("latest", mesh, rules), nnx.Param)
      state = state.replace(params=jax.device_put(params, state_sh.params))
      log.warning("train.init_from: initialised from %s step %d", init_wd.path,
                  init_wd.resolve_step("latest"))
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
  if start >= t.steps:  # the newest readable checkpoint is the last step: nothing to do
    ckpt.close()
    return _finished(Workdir.open(workdir), model_cfg, start)

  batch_sh = shd.batch_sharding(mesh, rules)
  step_fn = jax.jit(make_train_step(graphdef, tx, t.microbatches),
                    in_shardings=(state_sh, batch_sh),
                    out_shardings=(state_sh, NamedSharding(mesh, PartitionSpec())),
                    donate_argnums=0)
  evaluator = Evaluator(graphdef, param_sh, mesh, t.global_batch, d.seq_len, rules)
  health_fn = None
  if t.log_health:  # a second jit, run at logging steps only
    health_fn = jax.jit(make_health_fn(graphdef, tx, t.microbatches),
                        in_shardings=(state_sh, batch_sh),
                        out_shardings=NamedSharding(mesh, PartitionSpec()))

  n_params = count_params(nnx.merge(graphdef, abstract_params))
  flops_per_token = train_flops_per_token(model_cfg, n_params["total"], d.seq_len)
  peak = t.peak_flops or measure_peak_flops()
  tokens_per_step = t.global_batch * d.seq_len
  logger = MetricsLogger(workdir, t.steps, start, enabled=is_main)
  logger.message(
      f"{model_cfg.attention} | params {n_params['total'] / 1e6:.2f}M "
      f"(non-embedding {n_params['non_embedding'] / 1e6:.2f}M) | mesh {sizes} | "
      f"{'resumed at step ' + str(start) if start else 'from ' + (t.init_from or 'scratch')} | "
      f"workdir {workdir}")
  logger.message(
      f"data {d.resolved_source}{':' + d.path if d.path else ''} | train {len(corpus.train):,} "
      f"tokens, validation {len(corpus.val):,} | {t.steps} steps x {tokens_per_step:,} tokens | "
      f"MFU against {peak / 1e9:,.1f} GFLOP/s per device "
      f"({'train.peak_flops' if t.peak_flops else 'measured matmul peak'})")
  seen = epochs(exp, len(corpus.train))
  if seen > MAX_EPOCHS_QUIET:
    logger.message(
        f"warning: this run sees the training split {seen:.0f} times ({len(corpus.train):,} "
        f"tokens for {t.steps * tokens_per_step:,}); expect overfitting: use more data "
        "(data.path) or fewer train.steps")

  signals = _StopFlag()
  stop = _AgreedStop(signals, MAX_IN_FLIGHT)
  in_flight = collections.deque()
  last_log_time, last_log_step, eval_time = time.perf_counter(), start, 0.0
  last_saved, val = start if restored else -1, None
  step = start
  try:
    while step < t.steps and stop.requested is None:
      batch = jax.make_array_from_process_local_data(batch_sh, next(it).astype(np.int32))
      state, metrics = step_fn(state, batch)
      step += 1
      logger.dispatched(step, metrics["loss"])
      # Dispatch is asynchronous: without a bound the loop queues dozens of steps ahead of the
      # device, and a SIGTERM must wait for all of them before the checkpoint. Two in flight
      # keep the device busy.
      in_flight.append(metrics["loss"])
      if len(in_flight) > MAX_IN_FLIGHT:
        in_flight.popleft().block_until_ready()
      stop.step_done()
      record = {}
      if step % t.log_every == 0 or step == t.steps:
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        tok_s = tokens_per_step * (step - last_log_step) / (now - last_log_time - eval_time)
        last_log_time, last_log_step, eval_time = now, step, 0.0
        record.update(loss=float(metrics["loss"]), grad_norm=float(metrics["grad_norm"]),
                      lr=float(schedule(step - 1)), tokens_per_s=tok_s,
                      mfu=tok_s * flops_per_token / (peak * jax.device_count()))
        # The step's own extras (a DMC retrofit: dmc_loss, dmc_slots = 1 / compression, the
        # ramped dmc_target) go to metrics.jsonl and TensorBoard as they are.
        record.update({k: float(v) for k, v in metrics.items() if k not in ("loss", "grad_norm")})
        _check_finite(state, t.on_nonfinite, record, ckpt, logger)
        if health_fn is not None:
          health_start = time.perf_counter()
          record.update({f"health/{k}": float(v)
                         for k, v in jax.device_get(health_fn(state, batch)).items()})
          eval_time += time.perf_counter() - health_start  # not training throughput either
      if step % t.eval_every == 0 or step == t.steps:
        # Steps dispatched so far may still be running: finish them first, or their time would
        # count as eval time and inflate the next logged tokens/s.
        jax.block_until_ready(state)
        eval_start = time.perf_counter()
        max_tokens = t.final_eval_tokens if step == t.steps else t.eval_tokens
        val = evaluator(state.params, corpus.val, corpus.val_bytes_per_token, max_tokens)
        whole_split = pipeline.num_windows(len(corpus.val), d.seq_len) * d.seq_len
        val["val_whole_split"] = val["val_tokens"] >= whole_split
        record.update({k: v for k, v in val.items() if k != "loss_by_position"})
        eval_time += time.perf_counter() - eval_start  # eval time is not training throughput
      if record:
        record["tokens"] = step * tokens_per_step
        logger.log(step, record)
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
    signals.restore()
  if ckpt.last_save_failed(step):  # earlier failed saves were retried; the last one must hold
    good = [s for s in ckpt.steps() if s not in ckpt.failed_saves]
    raise CheckpointError(
        f"the final checkpoint (step {step}) could not be saved ({ckpt.failed_saves[step]}); "
        f"the last saved one is {f'step {good[-1]}' if good else 'none'} in {ckpt.directory}; "
        "fix the disk and re-run the same command to resume from it")
  if is_main and step == t.steps:
    write_run_plot(workdir)
  return {"step": step, "stopped_by": stop.requested, "final": val if step == t.steps else None,
          "params": n_params, "workdir": workdir, "model": model_cfg, "already_finished": False}


def _finished(wd: Workdir, model_cfg: ModelConfig, step: int) -> dict[str, Any]:
  """The summary of a run that already reached train.steps: its last evaluation, nothing run."""
  final = None
  for record in read_metrics(wd.path):
    if "val_loss" in record:
      final = {k: v for k, v in record.items() if k.startswith("val_")}
  n_params = count_params(abstract_model(model_cfg))
  return {"step": step, "stopped_by": None, "final": final, "params": n_params,
          "workdir": wd.path, "model": model_cfg, "already_finished": True}


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


def summary_text(summary: dict[str, Any]) -> str:
  """What train.py prints at the end: the result, what was scored, and the next commands."""
  wd, final = summary["workdir"], summary["final"]
  if summary["stopped_by"]:
    return (f"{summary['stopped_by']}: stopped at step {summary['step']} with a checkpoint; "
            "re-run the same command to resume")
  lines = []
  if summary["already_finished"]:
    lines.append(f"{wd}: this run already finished (step {summary['step']}); nothing was "
                 "trained or changed")
  if final:
    whole = final.get("val_whole_split")
    scope = ("the whole validation split" if whole else
             f"a {final['val_tokens']:,}-token prefix of the validation split (train.eval_tokens)")
    lines.append(f"step {summary['step']}: val_loss {final['val_loss']:.4f}  val_ppl "
                 f"{final['val_ppl']:.3f}  val_bpb {final['val_bpb']:.4f}  over {scope}: "
                 f"{final['val_tokens']:,} tokens")
  lines += ["next:",
            f"  python3 eval.py --workdir={wd}     # whole-split bpb, KV cache, decode speed",
            f"  python3 scripts/generate.py --workdir={wd} --prompt='def main('   # sample text"]
  if os.path.isfile(os.path.join(wd, "curves.png")):
    lines.append(f"  {os.path.join(wd, 'curves.png')}: loss and bpb curves of this run")
  return "\n".join(lines)
