"""Checkpoints in a workdir: orbax CheckpointManager with four items per step.

    workdir/config.json           the resolved experiment config (written once by the trainer)
    workdir/checkpoints/<step>/   params | opt (optimizer state + counters) | data (grain iterator) |
                                  meta (step, val_loss, tokens seen)

Keeps the latest N steps plus the best by validation loss. A step that fails to restore (a file
truncated or deleted) is skipped with a warning in favour of the previous one; nothing is deleted.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from mla_jax.config import ModelConfig

log = logging.getLogger(__name__)
CONFIG_FILE = "config.json"


def _abstract(tree, shardings):
  """ShapeDtypeStructs carrying shardings: the restore target orbax needs under a mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


class Checkpointer:
  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(n=keep),
        ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: -m["val_loss"], n=1,
                                      keep_checkpoints_without_metrics=False),
    ])
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            preservation_policy=policy, enable_async_checkpointing=async_save, create=True))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, params, opt, data_iter, meta: dict[str, Any]) -> None:
    """Asynchronous; meta['val_loss'] (if present) ranks the step for the best-N policy."""
    items = dict(params=ocp.args.StandardSave(params), opt=ocp.args.StandardSave(opt),
                 meta=ocp.args.JsonSave(meta))
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    metrics = {"val_loss": meta["val_loss"]} if meta.get("val_loss") is not None else None
    self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

  def restore(self, step: int, params_target, opt_target=None, data_iter=None):
    """Restores one step: (params, opt or None, meta). Targets are ShapeDtypeStruct trees."""
    items = dict(params=ocp.args.StandardRestore(params_target), meta=ocp.args.JsonRestore())
    if opt_target is not None:
      items["opt"] = ocp.args.StandardRestore(opt_target)
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return out["params"], out.get("opt") if opt_target is not None else None, out["meta"]

  def restore_latest_good(self, params_target, opt_target=None, data_iter=None):
    """Newest step that restores cleanly -> (step, params, opt, meta), or None if there is none."""
    for step in reversed(self.steps()):
      try:
        return (step,) + self.restore(step, params_target, opt_target, data_iter)
      except Exception as e:  # a damaged step: any orbax / tensorstore / json error
        log.warning("checkpoint step %d is unreadable (%s: %s); falling back to an earlier one",
                    step, type(e).__name__, str(e).splitlines()[0][:200])
    return None

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
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def read_config(workdir: str) -> dict[str, Any]:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no config.json; is this a training workdir?")
  with open(path) as f:
    return json.load(f)


def load_model(workdir: str, which: str | int = "latest") -> nnx.Module:
  """Rebuilds a trained Transformer from its workdir alone: 'latest', 'best' or a step number."""
  from mla_jax.model import Transformer  # model sits below checkpointing in the import order

  cfg = ModelConfig.from_mapping(read_config(workdir)["model"])
  ckpt = Checkpointer(workdir, async_save=False)
  steps = ckpt.steps()
  if not steps:
    raise FileNotFoundError(f"{ckpt.directory}: no checkpoint in this workdir")
  step = {"latest": steps[-1], "best": ckpt.best_step()}.get(which, which)
  if step is None or int(step) not in steps:
    raise ValueError(f"which: no checkpoint {which!r} in {ckpt.directory} (steps: {steps})")
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(abstract)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = _abstract(params, jax.tree.map(lambda _: sharding, params))
  try:
    restored, _, _ = ckpt.restore(int(step), target)
  except ValueError as e:
    raise ValueError(f"{ckpt.directory}/{step}: checkpoint does not match config.json's model "
                     f"({str(e).splitlines()[0][:200]})") from e
  finally:
    ckpt.close()
  return nnx.merge(graphdef, restored)
