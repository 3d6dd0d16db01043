"""Checkpoints of a run: an orbax CheckpointManager with four items per step.

    workdir/checkpoints/<step>/   params | opt (optimizer state + counters) |
                                  data (grain iterator) | meta (step, val_loss, tokens seen)

The workdir around them (config.json, tokenizer, opening and loading a model) is storage.workdir.

Keeps the latest N steps plus the best by validation loss. A step that fails to restore (a file
truncated or deleted) is skipped with a warning in favour of the previous one and, once an earlier
step restored, renamed to `checkpoints/<step>.corrupt-<time>` (kept for inspection, invisible to
orbax: it neither counts towards the latest N nor blocks re-saving that step); nothing is deleted.
If steps exist but none restores, `CheckpointError` is raised rather than starting from scratch.

A save that fails (disk full, I/O error; synchronously or in orbax's background thread) is logged
as an error and recorded in `failed_saves`; training goes on and the next save is a retry. orbax
deletes old steps only after a new one is committed, so a failed save never costs a good one.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class _NoMetricsNoise(logging.Filter):
  """orbax warns on every save without metrics once best_fn is set; most of ours have none."""

  def filter(self, record):
    return "tracked_metric" not in record.getMessage()


def quiet_orbax_logs() -> None:
  """Entry points call this once: hides orbax's per-save 'no tracked_metric' warning and the
  debris of a failed restore (_quiet_failed_restores); process-wide changes, so the library never
  makes them on import."""
  absl_log = logging.getLogger("absl")
  if not any(isinstance(f, _NoMetricsNoise) for f in absl_log.filters):
    absl_log.addFilter(_NoMetricsNoise())
  if not isinstance(sys.unraisablehook, _QuietFailedRestores):
    sys.unraisablehook = _QuietFailedRestores(sys.unraisablehook)


# A failed restore (a damaged step) leaves orbax's per-array read coroutines never awaited and a
# callback into its closed event loop; when they are collected Python prints 'Exception ignored
# in: <coroutine object _read_array_index_and_device_put ...>' with TensorStore dumps, ~130 lines
# after the one warning that matters. Nothing of ours to close: these two reports are dropped.
RESTORE_DEBRIS = ("_read_array_index_and_device_put", "Event loop is closed")


class _QuietFailedRestores:
  """sys.unraisablehook that drops RESTORE_DEBRIS and passes every other report on."""

  def __init__(self, previous):
    self.previous = previous

  def __call__(self, unraisable) -> None:
    text = f"{unraisable.object!r} {unraisable.exc_value!r}"
    if any(d in text for d in RESTORE_DEBRIS):
      return
    self.previous(unraisable)


class CheckpointError(RuntimeError):
  """No checkpoint could be restored, or the final one could not be saved."""


def first_line(e: BaseException, n: int) -> str:
  """An error's first line, its middle elided past n characters (the cause is often at the end,
  e.g. tensorstore's '...: File too large')."""
  line = (str(e).strip().splitlines() or [""])[0]
  return line if len(line) <= n else f"{line[:n // 2 - 3]} ... {line[-(n // 2 - 2):]}"


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs carrying shardings: the restore target orbax needs under a mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def checkpoint_steps(directory: str) -> list[int]:
  """Finished steps under a checkpoints/ directory, read without orbax: digit-named directories
  (orbax writes a step under a temporary name and renames it when complete)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


class Checkpointer:
  """The orbax manager of a workdir's checkpoints/; usable as a context manager (closes)."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(n=keep),
        ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: -m["val_loss"], n=1,
                                      keep_checkpoints_without_metrics=False),
    ])
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            preservation_policy=policy, enable_async_checkpointing=async_save, create=True,
            # Retention is the policy's alone; best_fn only makes orbax write each step's metrics
            # to disk and read them back on restart, so a resumed run still knows its best step.
            best_fn=lambda m: m["val_loss"], best_mode="min"))
    self.failed_saves: dict[int, str] = {}  # step -> error, for saves that did not complete
    self._pending: int | None = None  # step of the save in flight, if any

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, params, opt, data_iter, meta: dict[str, Any]) -> None:
    """Asynchronous; meta['val_loss'] (if present) ranks the step for the best-N policy."""
    items = dict(params=ocp.args.StandardSave(params), opt=ocp.args.StandardSave(opt),
                 meta=ocp.args.JsonSave(meta))
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    metrics = {"val_loss": meta["val_loss"]} if meta.get("val_loss") is not None else None
    self.wait()  # orbax waits for the previous save anyway; this attributes its errors to it
    self._pending = step
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
    except Exception as e:  # disk full, permissions, I/O: keep training, retry at the next save
      self._failed(step, e)

  def _failed(self, step: int, e: BaseException) -> None:
    self._pending = None
    self.failed_saves[step] = f"{type(e).__name__}: {first_line(e, 300)}"
    good = [s for s in self.steps() if s != step and s not in self.failed_saves]
    log.error("checkpoint step %d could not be saved (%s); training goes on and the next "
              "checkpoint retries; the last saved one is %s", step, self.failed_saves[step],
              f"step {good[-1]}" if good else "none")
    self.manager.reload()  # forget the half-written step; it is an orbax tmp dir on disk

  def data_state_matches(self, step: int) -> bool:
    """Whether step's data item holds this process's iterator state: False only when it was
    saved with another process count (grain writes one process_<i>-of-<n>.json per process); a
    missing item still counts as this run's, so its restore fails like any damaged step's."""
    data_dir = os.path.join(self.directory, str(step), "data")
    names = os.listdir(data_dir) if os.path.isdir(data_dir) else []
    counts = {n[:-5].rsplit("-of-", 1)[1] for n in names
              if n.startswith("process_") and "-of-" in n and n.endswith(".json")}
    return not counts or str(jax.process_count()) in counts

  def restore(self, step: int, params_target, opt_target=None, data_iter=None):
    """Restores one step: (params, opt or None, meta). Targets are ShapeDtypeStruct trees, whose
    shardings may be on another mesh or process count than the save's (orbax reshards).

    data_iter is restored only from a step saved with this process count; otherwise meta
    carries 'data_restored': False and the caller positions its iterator by the step.
    """
    items = dict(params=ocp.args.StandardRestore(params_target), meta=ocp.args.JsonRestore())
    if opt_target is not None:
      items["opt"] = ocp.args.StandardRestore(opt_target)
    with_data = data_iter is not None and self.data_state_matches(step)
    if with_data:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    meta = out["meta"]
    if data_iter is not None and not with_data:
      meta = {**meta, "data_restored": False}
    return out["params"], out.get("opt") if opt_target is not None else None, meta

  def restore_latest_good(self, params_target, opt_target=None, data_iter=None):
    """Newest step that restores cleanly -> (step, params, opt, meta), or None if there is none.

    Unreadable steps newer than the one restored are renamed to `<step>.corrupt-<time>`; if steps
    exist and none restores, raises CheckpointError (starting over would hide the problem).
    """
    damaged = []
    for step in reversed(self.steps()):
      try:
        restored = (step,) + self.restore(step, params_target, opt_target, data_iter)
      except Exception as e:  # a damaged step: any orbax / tensorstore / json error
        reason = f"{type(e).__name__}: {first_line(e, 200)}"
        damaged.append((step, reason))
        log.warning("checkpoint step %d in %s is unreadable (%s); falling back to an earlier one",
                    step, self.directory, reason)
        continue
      if damaged:
        gc.collect()  # the failed reads' coroutines, now (RESTORE_DEBRIS), not mid-training
      for bad, _ in damaged:
        self._move_aside(bad)
      if damaged:
        self.manager.reload()
      return restored
    if damaged:
      gc.collect()
      raise CheckpointError(
          f"{self.directory}: no checkpoint could be restored ("
          + "; ".join(f"step {s}: {r}" for s, r in damaged) + "); fix or move that directory "
          "aside to start from scratch")
    return None

  def _move_aside(self, step: int) -> None:
    """Renames a damaged step so orbax ignores it; the files stay for inspection."""
    if jax.process_index() == 0:
      src = os.path.join(self.directory, str(step))
      dst = f"{src}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
      while os.path.exists(dst):
        dst += "_"
      os.replace(src, dst)
      log.warning("moved the unreadable checkpoint step %d aside to %s", step, dst)
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes(f"mla_jax_move_aside_{step}")

  def meta(self, step: int) -> dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def best_step(self) -> int | None:
    scored = []
    for s in self.steps():
      try:
        val = self.meta(s).get("val_loss")
      except Exception:  # unreadable meta: not a candidate
        continue
      if val is not None:
        scored.append((val, s))
    return min(scored)[1] if scored else None

  def wait(self) -> None:
    """Waits for the save in flight; a failure is logged and recorded, not raised."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # the background write of the pending step failed
      if self._pending is None:
        raise
      self._failed(self._pending, e)
    self._pending = None

  def last_save_failed(self, step: int) -> str | None:
    """The error of step's save if it failed (call after wait()), else None."""
    return self.failed_saves.get(step)

  def close(self) -> None:
    self.wait()
    self.manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
