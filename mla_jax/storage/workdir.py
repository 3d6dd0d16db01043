"""A training workdir, opened one way everywhere: train, eval, compare, load_model and the drills.

    wd = Workdir.open("runs/mla")        # checks config.json; reads no checkpoint, imports no orbax
    wd.steps                             # finished checkpoint steps, oldest first
    wd.model_config                      # the ModelConfig the run trained
    model = wd.load_model("best")        # shape-checked against config.json, then restored
    tok = wd.tokenizer()                 # None for a run trained on token files without one

Layout (written by training.trainer):
    config.json          the resolved experiment config (and `config_changes`, if any)
    tokenizer/           the tokenizer the corpus was encoded with
    checkpoints/<step>/  orbax steps: params | opt | data | meta (storage.checkpoint)
    metrics.jsonl, tb/   training logs

Every problem a user can cause (no such directory, no config.json, no checkpoint, a checkpoint
that does not match the config, a damaged one) is a `WorkdirError` whose message is one line
naming the path. A damaged newest step is skipped for 'latest' (Workdir.load), as in training.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from typing import Any, Callable

import jax
from flax import nnx

from mla_jax.core.config import ModelConfig
from mla_jax.core.model import diff_param_shapes, param_shapes, path_names
from mla_jax.experiment import ExperimentConfig
from mla_jax.storage.checkpoint import (
    Checkpointer,
    abstract_with_shardings,
    checkpoint_steps,
    first_line,
)

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
TOKENIZER_DIR = "tokenizer"
METRICS_FILE = "metrics.jsonl"
log = logging.getLogger(__name__)


class WorkdirError(ValueError):
  """A user-facing problem with a workdir: the message is one line naming the path."""


class Workdir:
  """An existing workdir: open it with `Workdir.open(path)`."""

  def __init__(self, path: str, config: dict[str, Any]):
    self.path = path
    self.config = config  # config.json as saved (plain dicts)

  # Opening --------------------------------------------------------------------------------------

  @classmethod
  def open(cls, path: str) -> "Workdir":
    """Checks the directory and its config.json (cheap: no checkpoint is read)."""
    if not path:
      raise WorkdirError("--workdir is required (a directory train.py wrote)")
    if not os.path.isdir(path):
      raise WorkdirError(f"{path}: no such directory")
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
      raise WorkdirError(f"{path}: no {CONFIG_FILE}; is this a training workdir "
                         "(train.py --workdir)?")
    try:
      with open(config_path) as f:
        config = json.load(f)
    except json.JSONDecodeError as e:
      raise WorkdirError(f"{config_path}: not valid JSON ({e})") from None
    for key in ("model", "data", "train"):
      if key not in config:
        raise WorkdirError(f"{config_path}: no {key!r} section; is this a training workdir?")
    return cls(path, config)

  @staticmethod
  def exists(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))

  @staticmethod
  def write_config(path: str, config: dict[str, Any]) -> None:
    """Writes config.json atomically (a crash mid-write never leaves half a file)."""
    tmp = os.path.join(path, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
      json.dump(config, f, indent=2)
    os.replace(tmp, os.path.join(path, CONFIG_FILE))

  # What it holds --------------------------------------------------------------------------------

  @property
  def config_path(self) -> str:
    return os.path.join(self.path, CONFIG_FILE)

  @property
  def checkpoint_dir(self) -> str:
    return os.path.join(self.path, CHECKPOINT_DIR)

  @property
  def tokenizer_dir(self) -> str:
    return os.path.join(self.path, TOKENIZER_DIR)

  @property
  def model_config(self) -> ModelConfig:
    try:
      return ModelConfig.from_mapping(self.config["model"])
    except (ValueError, TypeError) as e:
      raise WorkdirError(f"{self.config_path}: {e}") from None

  @property
  def experiment(self) -> ExperimentConfig:
    try:
      return ExperimentConfig.from_config(self.config)
    except (ValueError, TypeError) as e:
      raise WorkdirError(f"{self.config_path}: {e}") from None

  @property
  def steps(self) -> list[int]:
    return checkpoint_steps(self.checkpoint_dir)

  @property
  def finished(self) -> bool:
    """True when the newest checkpoint is the run's last step."""
    steps = self.steps
    return bool(steps) and steps[-1] >= self.config["train"]["steps"]

  def tokenizer(self):
    """The workdir's tokenizer, or None when it has none (trained on token ids)."""
    from mla_jax.data import tokenizer as tok_lib

    if not os.path.isfile(os.path.join(self.tokenizer_dir, tok_lib.META_FILE)):
      return None
    return tok_lib.load_tokenizer(self.tokenizer_dir)

  def resolve_step(self, which: str | int = "latest") -> int:
    """'latest', 'best' (lowest validation loss) or a step number -> a checkpoint step."""
    steps = self.steps
    if not steps:
      raise WorkdirError(f"{self.path}: no checkpoint under {self.checkpoint_dir}; train first "
                         "(python train.py --workdir=...)")
    which = str(which)
    if which == "latest":
      return steps[-1]
    if which == "best":
      with self._checkpointer() as ckpt:
        best = ckpt.best_step()
      if best is None:
        raise WorkdirError(f"which=best: no checkpoint in {self.path} has a validation loss")
      return best
    if not which.isdigit() or int(which) not in steps:
      raise WorkdirError(f"which: {which!r} is not latest, best or one of the steps {steps}")
    return int(which)

  def meta(self, step: int) -> dict[str, Any]:
    """The step's meta item (step, tokens, val_loss); {} if unreadable (it is informative)."""
    with self._checkpointer() as ckpt:
      try:
        return ckpt.meta(step)
      except Exception:  # noqa: BLE001 - any orbax / json error: meta is informative only
        return {}

  def _checkpointer(self) -> Checkpointer:
    """A synchronous Checkpointer on this workdir (use as a context manager: it closes)."""
    return Checkpointer(self.path, async_save=False)

  # The model ------------------------------------------------------------------------------------

  def check_checkpoint(self, step: int) -> None:
    """Compares the checkpoint's stored parameter shapes with config.json's model before any
    restore: orbax's own error for a mismatch is a page of TensorStore specs."""
    import orbax.checkpoint as ocp

    path = os.path.join(os.path.abspath(self.checkpoint_dir), str(step), "params")
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # orbax warns about a metadata file it does not need
    try:
      meta = ocp.StandardCheckpointer().metadata(path)
      stored = _flat_shapes(getattr(meta, "item_metadata", meta))
    except Exception:  # unreadable metadata: the restore reports what is wrong
      return
    finally:
      absl_log.setLevel(level)
    diff = diff_param_shapes(param_shapes(self.model_config), stored)
    if diff:
      name, expected, found = diff[0]
      what = (f"config.json's model has {name} {expected}, the checkpoint does not" if not found
              else f"the checkpoint has {name} {found}, config.json's model does not"
              if not expected else
              f"{name} is {found} in the checkpoint, {expected} from config.json")
      raise WorkdirError(f"{self.checkpoint_dir}/{step}: checkpoint does not match config.json's "
                         f"model: {what}")

  def load_model(self, which: str | int = "latest", mesh=None, rules=None) -> nnx.Module:
    """The trained Transformer of checkpoint `which` (load() without the step)."""
    return self.load(which, mesh, rules)[1]

  def load(self, which: str | int = "latest", mesh=None, rules=None,
           warn: Callable[[str], None] | None = None) -> tuple[int, nnx.Module]:
    """(step, the trained Transformer of checkpoint `which`).

    Without a mesh it lives on the default device; with one, every parameter is restored
    straight into its sharding from core.sharding's table (no full copy on one device).
    A damaged step (its files unreadable, though its shapes are config.json's) is a WorkdirError
    saying so and naming the other steps (--which=N); for 'latest' the newest readable step is
    loaded instead, as training does, and warn(message) hears which (default: a logged
    warning). Nothing is moved or deleted here (training moves a damaged step aside).
    """
    step = self.resolve_step(which)
    warn = warn or log.warning
    tried = []
    candidates = [step] + ([s for s in reversed(self.steps) if s < step]
                           if str(which) == "latest" else [])
    for s in candidates:
      try:
        model = self._restore(s, mesh, rules)
      except _Damaged as e:
        tried.append(f"step {s}: {e}")
        continue
      if s != step:
        warn(f"{self.checkpoint_dir}/{step}: checkpoint is damaged ({tried[0].split(': ', 1)[1]}); "
             f"using step {s}, the newest readable one")
      return s, model
    if len(candidates) > 1:
      raise WorkdirError(f"{self.checkpoint_dir}: no checkpoint is readable ("
                         + "; ".join(tried) + ")")
    others = [s for s in self.steps if s != step]
    raise WorkdirError(f"{self.checkpoint_dir}/{step}: checkpoint is damaged "
                       f"({tried[0].split(': ', 1)[1]})"
                       + (f"; other steps: {others} (--which=N)" if others else ""))

  def _restore(self, step: int, mesh, rules) -> nnx.Module:
    """Restores one step; _Damaged when its files cannot be read (check_checkpoint has found
    the shapes right, so a failure is the files', not the config's)."""
    from mla_jax.core import sharding as shd
    from mla_jax.core.model import abstract_model

    cfg = self.model_config
    self.check_checkpoint(step)
    graphdef, params = nnx.split(abstract_model(cfg))
    if mesh is None:
      single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      shardings = jax.tree.map(lambda _: single, params)
    else:
      shardings = shd.param_shardings(params, mesh, rules or shd.DEFAULT_RULES)
    with self._checkpointer() as ckpt:
      try:
        restored, _, _ = ckpt.restore(step, abstract_with_shardings(params, shardings))
      except Exception as e:  # orbax / tensorstore errors: a truncated or missing file
        reason = first_line(e, 240).split(". See full TensorStore")[0]
        raise _Damaged(f"unreadable: {type(e).__name__}: {reason}") from None
      finally:
        gc.collect()  # the failed reads' coroutines (checkpoint.RESTORE_DEBRIS)
    return nnx.merge(graphdef, restored)


class _Damaged(Exception):
  """A checkpoint step whose files cannot be read."""


def _flat_shapes(tree) -> dict[str, tuple]:
  """orbax metadata tree -> {'blocks.0.attn.wq': shape}, the names param_shapes uses."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    out[".".join(path_names(path))] = tuple(leaf.shape)
  return out


def read_metrics(workdir: str) -> list[dict]:
  """workdir/metrics.jsonl as a list of records ([] when nothing is logged yet; a partial last
  line, being written by a running trainer, is left out)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  records = []
  for i, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except ValueError:
      if i < len(lines) - 1:  # only the last line may be one a running trainer is writing
        raise
  return records


def load_model(workdir: str, which: str | int = "latest", mesh=None, rules=None) -> nnx.Module:
  """Rebuilds a trained Transformer from its workdir alone: 'latest', 'best' or a step number.
  With a mesh (core.sharding.make_mesh) each parameter is restored straight into its sharding
  (core.sharding's table, or `rules`): no device ever holds the whole model unless the table
  replicates it."""
  return Workdir.open(workdir).load_model(which, mesh, rules)
