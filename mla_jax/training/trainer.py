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
)
from mla_jax.data import corpus as data_lib
from mla_jax.data import pipeline
from mla_jax.evaluation.metrics import EvalInterrupted, Evaluator
from mla_jax.evaluation.perf import measure_peak_flops, train_flops_per_token
from mla_jax.evaluation.plots import write_run_plot
from mla_jax.experiment import ExperimentConfig
from mla_jax.storage.checkpoint import Checkpointer, CheckpointError, abstract_with_shardings
from mla_jax.storage.workdir import TOKENIZER_DIR, Workdir
from mla_jax.training.health import make_health_fn
from mla_jax.training.logger import MetricsLogger, read_metrics
from mla_jax.training.optim import make_optimizer
from mla_jax.training.preflight import (
  changes_text,
  check_config,
  check_process_rows,
  check_workdir,
  epochs,
  init_from_workdir,
  peak_warning,
  setting_changes,
)
from mla_jax.training.step import TrainState, make_train_step
from mla_jax.training.stop import AgreedStop, StopFlag

log = logging.getLogger(__name__)
# Above this many passes over the training split the run is told it will mostly memorise.
MAX_EPOCHS_QUIET = 4
MAX_IN_FLIGHT = 2  # train steps dispatched ahead of the one the host waits for
PROGRESS_EVERY_S = 2.0  # the final evaluation's progress lines, at most one per this many s


class NonFiniteError(RuntimeError):
  pass


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


# The loop ---------------------------------------------------------------------------------------


def train(config, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the experiment `config` in `workdir`; returns a summary dict.

  config: an ml-collections ConfigDict (or dict) of an experiment file, or an ExperimentConfig.
  Nothing is created on disk until the config and the data have been checked; a workdir whose
  run already finished is reported and left unchanged (settings passed again differently are
  named as ignored), except that a final evaluation interrupted by a stop signal is run.
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
  saved = Workdir.open(workdir).config if Workdir.exists(workdir) else None
  # Every process has read the data and the workdir before process 0 writes into it (a peer
  # reading a half-written tokenizer or config.json would fail).
  distributed.barrier("workdir_checked")

  # Validated: from here on the workdir is written. A new run's config.json now; an existing
  # run's once the checkpoint says whether it continues (a finished run keeps its settings).
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    if corpus.tokenizer is not None and not os.path.isdir(tok_dir):
      corpus.tokenizer.save(tok_dir)  # evaluation and sampling need only the workdir
    if saved is None:
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
  changes = setting_changes(saved, config_dict) if saved is not None else []
  finished = start >= t.steps  # the newest readable checkpoint is the last step
  if is_main and saved is not None:
    # A finished run keeps the settings it was trained with (only an allowed model change and its
    # history are recorded); one that trains on takes this run's.
    keep = ({**saved, "model": config_dict["model"],
             **{k: config_dict[k] for k in ("config_changes",) if k in config_dict}}
            if finished else config_dict)
    if keep != saved:
      Workdir.write_config(workdir, keep)
  evaluator = Evaluator(graphdef, param_sh, mesh, t.global_batch, d.seq_len, rules)
  n_params = count_params(nnx.merge(graphdef, abstract_params))
  if finished and not (start == t.steps and _final_eval_missing(workdir, start)):
    ckpt.close()
    return _finished(Workdir.open(workdir), model_cfg, start, changes)

  signals = StopFlag()
  stop = AgreedStop(signals, MAX_IN_FLIGHT)
  tokens_per_step = t.global_batch * d.seq_len
  logger = MetricsLogger(workdir, t.steps, start, enabled=is_main, log_every=t.log_every)
  if finished:  # the last step trained, its final evaluation interrupted: run only that
    try:
      logger.message(f"{workdir}: training finished at step {start}, but its final evaluation "
                     "was interrupted; running it now")
      record = {"tokens": start * tokens_per_step}
      val = _evaluate(evaluator, state.params, corpus, d.seq_len, t.final_eval_tokens, logger,
                      True, stop.now)
      if val is not None:
        record.update({k: v for k, v in val.items() if k != "loss_by_position"})
        logger.log(start, record)
    finally:
      ckpt.close()
      logger.close()
      signals.restore()
    if is_main and val is not None:
      write_run_plot(workdir)
    return {"step": start, "stopped_by": stop.requested if val is None else None,
            "final": val, "final_field": "train.final_eval_tokens", "params": n_params,
            "workdir": workdir, "model": model_cfg, "already_finished": False,
            "final_eval_only": True, "eval_interrupted": val is None, "ignored": changes}

  batch_sh = shd.batch_sharding(mesh, rules)
  step_fn = jax.jit(make_train_step(graphdef, tx, t.microbatches),
                    in_shardings=(state_sh, batch_sh),
                    out_shardings=(state_sh, NamedSharding(mesh, PartitionSpec())),
                    donate_argnums=0)
  health_fn = None
  if t.log_health:  # a second jit, run at logging steps only
    health_fn = jax.jit(make_health_fn(graphdef, tx, t.microbatches),
                        in_shardings=(state_sh, batch_sh),
                        out_shardings=NamedSharding(mesh, PartitionSpec()))

  flops_per_token = train_flops_per_token(model_cfg, n_params["total"], d.seq_len)
  peak = t.peak_flops or measure_peak_flops()
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
  warning = None if t.peak_flops else peak_warning(peak, jax.devices()[0])
  if warning:
    logger.message(warning)
  if start and saved is not None and start >= saved["train"]["steps"]:
    logger.message(f"train.steps: {saved['train']['steps']} -> {t.steps}: this run had finished "
                   f"at step {start}; it continues to step {t.steps}")
  moved = [c for c in changes if c[0] != "train.steps"]
  if start and moved:
    logger.message(f"resuming with changed settings: {changes_text(moved)}")
  seen = epochs(exp, len(corpus.train))
  if seen > MAX_EPOCHS_QUIET:
    logger.message(
        f"warning: this run sees the training split {seen:.0f} times ({len(corpus.train):,} "
        f"tokens for {t.steps * tokens_per_step:,}); expect overfitting: use more data "
        "(data.path) or fewer train.steps")

  in_flight = collections.deque()
  last_log_time, last_log_step, eval_time = time.perf_counter(), start, 0.0
  last_saved, val = start if restored else -1, None
  step, final_val, warned_mfu = start, None, False
  try:
    while step < t.steps and stop.requested is None:
      batch = jax.make_array_from_process_local_data(batch_sh, next(it).astype(np.int32))
      state, metrics = step_fn(state, batch)
      step += 1
      # Dispatch is asynchronous: without a bound the loop queues dozens of steps ahead of the
      # device, and a SIGTERM must wait for all of them before the checkpoint. Two in flight
      # keep the device busy.
      in_flight.append(metrics["loss"])
      if len(in_flight) > MAX_IN_FLIGHT:
        in_flight.popleft().block_until_ready()
      logger.dispatched(step, metrics["loss"])  # after the wait: it sees the steps now done
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
        if record["mfu"] > 1 and not warned_mfu:
          warned_mfu = True
          logger.message(f"warning: MFU {100 * record['mfu']:.0f}% is impossible: the peak it is "
                         f"measured against ({peak / 1e9:,.1f} GFLOP/s per device) is too low; "
                         "set train.peak_flops (FLOP/s per device)")
        # The step's own extras (a DMC retrofit: dmc_loss, dmc_slots = 1 / compression, the
        # ramped dmc_target) go to metrics.jsonl and TensorBoard as they are.
        record.update({k: float(v) for k, v in metrics.items() if k not in ("loss", "grad_norm")})
        _check_finite(state, t.on_nonfinite, record, ckpt, logger)
        if health_fn is not None:
          health_start = time.perf_counter()
          record.update({f"health/{k}": float(v)
                         for k, v in jax.device_get(health_fn(state, batch)).items()})
          eval_time += time.perf_counter() - health_start  # not training throughput either
      if (step % t.eval_every == 0 or step == t.steps) and stop.requested is None:
        # Steps dispatched so far may still be running: finish them first, or their time would
        # count as eval time and inflate the next logged tokens/s.
        jax.block_until_ready(state)
        eval_start = time.perf_counter()
        final = step == t.steps
        val = _evaluate(evaluator, state.params, corpus, d.seq_len,
                        t.final_eval_tokens if final else t.eval_tokens, logger, final, stop.now)
        if val is not None:
          final_val = val if final else None
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
  # Stopped at the last step before or during its evaluation: the checkpoint is there, a re-run
  # evaluates it.
  eval_interrupted = step == t.steps and final_val is None
  return {"step": step, "stopped_by": stop.requested, "final": final_val,
          "final_field": "train.final_eval_tokens", "params": n_params, "workdir": workdir,
          "model": model_cfg, "already_finished": False, "eval_interrupted": eval_interrupted}


def _evaluate(evaluator: Evaluator, params, corpus, seq_len: int, max_tokens: int,
              logger: MetricsLogger, final: bool, stop) -> dict | None:
  """One validation pass with val_whole_split set; None if a stop signal interrupted it (said on
  the console). The final one says that it starts, on how many tokens, and how far it got."""
  n_tokens = pipeline.num_eval_windows(len(corpus.val), seq_len, max_tokens) * seq_len
  whole = n_tokens >= pipeline.num_windows(len(corpus.val), seq_len) * seq_len
  started = time.perf_counter()
  progress = None
  if final:
    scope = "the whole validation split" if whole else "a prefix (train.final_eval_tokens)"
    batches = -(-n_tokens // (seq_len * evaluator.batch_size))
    logger.message(f"final evaluation: {scope}, {n_tokens:,} tokens in {batches:,} batches")

    last = [started]

    def progress(done: int, total: int) -> None:  # about every 10%, at most one line per 2 s
      now = time.perf_counter()
      if done and now - last[0] >= PROGRESS_EVERY_S:
        last[0], spent = now, now - started
        logger.message(f"final evaluation: {100 * done / total:.0f}% ({done:,}/{total:,} tokens), "
                       f"{spent:.0f} s, ~{spent * (total - done) / done:.0f} s left")
  try:
    val = evaluator(params, corpus.val, corpus.val_bytes_per_token, max_tokens, progress, stop)
  except EvalInterrupted as e:
    what = "the final evaluation" if final else "the evaluation"
    logger.message(f"stop requested: {what} interrupted after {e.tokens_done:,} of "
                   f"{e.tokens_total:,} tokens ({time.perf_counter() - started:.1f} s)")
    return None
  val["val_whole_split"] = whole
  return val


def _final_eval_missing(workdir: str, step: int) -> bool:
  """Whether the run's last step has no evaluation record (a stop interrupted its final eval)."""
  return not any(r.get("step") == step and "val_loss" in r for r in read_metrics(workdir))


def _finished(wd: Workdir, model_cfg: ModelConfig, step: int, ignored=()) -> dict[str, Any]:
  """The summary of a run that already reached train.steps: its last evaluation, nothing run.
  ignored: this command's setting changes, which a finished run does not use."""
  final, final_step = None, None
  for record in read_metrics(wd.path):
    if "val_loss" in record:
      final = {k: v for k, v in record.items() if k.startswith("val_")}
      final_step = record.get("step")
  n_params = count_params(abstract_model(model_cfg))
  return {"step": step, "stopped_by": None, "final": final, "params": n_params,
          "final_field": ("train.final_eval_tokens" if final_step == step else "train.eval_tokens"),
          "workdir": wd.path, "model": model_cfg, "already_finished": True,
          "ignored": list(ignored)}


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
    if summary.get("eval_interrupted"):
      return (f"{summary['stopped_by']}: the final evaluation of step {summary['step']} was "
              "interrupted; the checkpoint of that step is saved: re-run the same command to "
              "evaluate it (training is done)")
    return (f"{summary['stopped_by']}: stopped at step {summary['step']} with a checkpoint; "
            "re-run the same command to resume")
  lines = []
  if summary["already_finished"]:
    lines.append(f"{wd}: this run already finished (step {summary['step']}); nothing was "
                 "trained or changed")
  if summary.get("final_eval_only"):
    lines.append(f"{wd}: training had finished (step {summary['step']}); its interrupted final "
                 "evaluation ran now")
  if summary.get("ignored"):
    lines.append(f"ignored, since this run is finished: {changes_text(summary['ignored'])} "
                 "(use a new --workdir to train with them, or a larger train.steps to continue)")
  if final:
    whole = final.get("val_whole_split")
    field = summary.get("final_field", "train.final_eval_tokens")
    scope = ("the whole validation split" if whole else
             f"a {final['val_tokens']:,}-token prefix of the validation split ({field})")
    lines.append(f"step {summary['step']}: val_loss {final['val_loss']:.4f}  val_ppl "
                 f"{final['val_ppl']:.3f}  val_bpb {final['val_bpb']:.4f}  over {scope}: "
                 f"{final['val_tokens']:,} tokens")
  lines += ["next:",
            f"  python3 eval.py --workdir={wd}     # whole-split bpb, KV cache, decode speed",
            f"  python3 scripts/generate.py --workdir={wd} --prompt='def main('   # sample text"]
  if os.path.isfile(os.path.join(wd, "curves.png")):
    lines.append(f"  {os.path.join(wd, 'curves.png')}: loss and bpb curves of this run")
  return "\n".join(lines)
