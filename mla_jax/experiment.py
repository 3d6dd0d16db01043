"""The experiment config: typed, validated groups built from an ml-collections ConfigDict.

An experiment file (`configs/*.py`) returns a ConfigDict with five groups, model / data / optim /
train / mesh; `ExperimentConfig.from_config` is the one place it becomes typed values, and each
field's default, type and check live in its dataclass below (the model's in `core.config`).

    config = load_config("configs/lm.py:attn=mla,size=tiny", {"train.steps": 10})
    exp = ExperimentConfig.from_config(config)       # ValueError naming the field on bad input
    exp.train.steps, exp.optim.warmup, exp.model_config(vocab_size=256)

`load_config` does for scripts what `train.py --config=FILE:ARG --config.x=y` does.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Mapping

from ml_collections import ConfigDict

from mla_jax.core.config import ModelConfig
from mla_jax.core.sharding import MESH_AXES

SOURCES = ("auto", "stdlib", "text", "tokens")
TOKENIZERS = ("bytes", "char", "bpe")
SCHEDULES = ("cosine", "wsd", "constant")
NONFINITE_POLICIES = ("stop", "skip")
# Placeholder vocabulary for checking a model before its tokenizer exists (bytes: 256).
PROBE_VOCAB = 256


def _fields(cls) -> dict[str, dataclasses.Field]:
  return {f.name: f for f in dataclasses.fields(cls)}


def from_mapping(cls, group: str, values: Mapping[str, Any]):
  """cls(**values), refusing keys the dataclass does not know, naming `group.key`."""
  known = _fields(cls)
  unknown = sorted(set(values) - set(known))
  if unknown:
    raise ValueError(f"{group}.{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
  return cls(**dict(values))


class _Group:
  """Shared by the groups: a name for messages, to_dict, and integer / choice checks."""

  GROUP = ""

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def _fail(self, name: str, msg: str):
    raise ValueError(f"{self.GROUP}.{name}: {msg}")

  def _ints(self, names, minimum: int):
    for name in names:
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        self._fail(name, f"must be an integer >= {minimum}, got {v!r}")

  def _choice(self, name: str, choices):
    if getattr(self, name) not in choices:
      self._fail(name, f"{getattr(self, name)!r} is not one of {choices}")


def resolve_source(source: str, path: str) -> str:
  """The source actually read: 'auto' means text when a path is given, else stdlib."""
  if source != "auto":
    return source
  return "text" if path else "stdlib"


@dataclasses.dataclass(frozen=True)
class DataConfig(_Group):
  """Where tokens come from (see data.corpus) and the training window."""

  GROUP = "data"
  source: str = "auto"  # auto (text if path is set, else stdlib) | stdlib | text | tokens
  path: str = ""  # text: a file, directory or glob; tokens: a prepare_data.py output directory
  tokenizer: str = "bytes"  # bytes | char | bpe (ignored for tokens: theirs is used)
  vocab_size: int = 0  # BPE vocabulary size (tokenizer=bpe)
  seq_len: int = 256
  val_fraction: float = 0.1  # text sources: the held-out tail of each file
  max_bytes: int = 0  # 0: all of it
  worker_count: int = 0  # grain worker processes (0: threads in this process)

  def __post_init__(self):
    self._choice("source", SOURCES)
    self._choice("tokenizer", TOKENIZERS)
    self._ints(("seq_len",), 1)
    self._ints(("vocab_size", "max_bytes", "worker_count"), 0)
    if not 0.0 < self.val_fraction < 1.0:
      self._fail("val_fraction", f"must be in (0, 1), got {self.val_fraction}")
    if self.source in ("text", "tokens") and not self.path:
      self._fail("path", f"data.source={self.source!r} needs a path (--config.data.path=...)")
    if self.source == "stdlib" and self.path:
      self._fail("path", f"{self.path!r} is set but data.source='stdlib' reads the standard "
                 "library; drop data.source (a path means text) or set data.source=text")

  @property
  def resolved_source(self) -> str:
    return resolve_source(self.source, self.path)


@dataclasses.dataclass(frozen=True)
class OptimConfig(_Group):
  """AdamW with a warmup + decay schedule (training.optim)."""

  GROUP = "optim"
  lr: float = 2e-3
  # -1: 10% of train.steps, at least 40 and at most 2,000, never more than half the run. With 5%
  # (>= 10), MHA at size=small, lr 2e-3, 200 steps ended at 2.913 bpb on tiny Shakespeare against
  # 2.641 with 40 warmup steps (docs/results/stability_defaults.md).
  warmup_steps: int = -1
  schedule: str = "cosine"  # cosine | wsd | constant
  min_lr_ratio: float = 0.1
  decay_fraction: float = 0.2  # wsd: the final linear decay's share of the steps after warmup
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip: float = 1.0  # global-norm clip; 0 disables

  def __post_init__(self):
    self._choice("schedule", SCHEDULES)
    self._ints(("warmup_steps",), -1)
    if not self.lr > 0:
      self._fail("lr", f"must be positive, got {self.lr}")
    for name in ("min_lr_ratio", "weight_decay", "grad_clip", "eps"):
      if getattr(self, name) < 0:
        self._fail(name, f"must be >= 0, got {getattr(self, name)}")
    for name in ("b1", "b2"):
      if not 0 <= getattr(self, name) < 1:
        self._fail(name, f"must be in [0, 1), got {getattr(self, name)}")
    if not 0 < self.decay_fraction <= 1:
      self._fail("decay_fraction", f"must be in (0, 1], got {self.decay_fraction}")

  def warmup(self, steps: int) -> int:
    """Warmup steps for a run of `steps`: the set value, or the default rule for -1."""
    if self.warmup_steps >= 0:
      if self.warmup_steps >= steps and steps > 1:
        self._fail("warmup_steps", f"{self.warmup_steps} must be smaller than train.steps={steps}")
      return min(self.warmup_steps, steps - 1)
    return min(max(steps // 10, 40), 2000, steps // 2)


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Group):
  """The loop: length, batch, cadence of logs / evals / checkpoints, failure policy."""

  GROUP = "train"
  steps: int = 480
  global_batch: int = 16  # sequences per step, over all processes and devices
  microbatches: int = 1  # gradient accumulation: the batch in this many sequential pieces
  seed: int = 0
  log_every: int = 50
  eval_every: int = 48
  eval_tokens: int = 65536  # validation tokens per periodic eval (0: the whole split)
  final_eval_tokens: int = 0  # the last step's eval (0: the whole split, as eval.py scores)
  ckpt_every: int = 96
  keep_ckpts: int = 2  # latest N kept, plus the best by validation loss
  on_nonfinite: str = "stop"  # stop | skip
  allow_config_change: bool = False  # resume a workdir with shape-preserving model changes
  peak_flops: float = 0.0  # per device, for MFU; 0: measure a matmul at start
  log_health: bool = True  # per-layer gradient / update / activation statistics at log steps
  # Fine-tuning: a workdir (e.g. scripts/import_hf.py's or convert_mha2mla.py's) whose latest
  # checkpoint initialises the model; its model config and tokenizer replace this config's.
  init_from: str = ""

  def __post_init__(self):
    self._ints(("steps", "global_batch", "microbatches", "log_every", "eval_every", "ckpt_every",
                "keep_ckpts"), 1)
    self._ints(("eval_tokens", "final_eval_tokens"), 0)
    self._choice("on_nonfinite", NONFINITE_POLICIES)
    if self.peak_flops < 0:
      self._fail("peak_flops", f"must be >= 0 (0: measure), got {self.peak_flops}")


@dataclasses.dataclass(frozen=True)
class MeshConfig(_Group):
  """Device mesh sizes (-1 fills with the remaining devices) and sharding-rule overrides."""

  GROUP = "mesh"
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  sequence: int = 1
  rules: str = ""  # overrides of core.sharding.DEFAULT_RULES, e.g. "embed=None,batch=data+fsdp"
  # Multi-slice (or multi-host) meshes: slices per axis over the slow network, e.g. "data=2"; each
  # axis keeps its total size above (mla_jax.distributed.make_mesh). "": one slice (several TPU
  # slices then go on data).
  dcn: str = ""

  def __post_init__(self):
    for name in MESH_AXES:
      v = getattr(self, name)
      if not isinstance(v, int) or (v < 1 and v != -1):
        self._fail(name, f"must be a positive integer or -1 (fill), got {v!r}")
    from mla_jax.distributed import parse_dcn

    parse_dcn(self.dcn)  # syntax now; the slice count is checked against the devices at start

  @property
  def shape(self) -> dict[str, int]:
    return {a: getattr(self, a) for a in MESH_AXES}


GROUPS = {"data": DataConfig, "optim": OptimConfig, "train": TrainConfig, "mesh": MeshConfig}


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """All five groups. `model` stays a mapping until the vocabulary is known (vocab_size 0 means
  the tokenizer's); `model_config(vocab)` resolves it, the one place that does."""

  model: Mapping[str, Any]
  data: DataConfig
  optim: OptimConfig
  train: TrainConfig
  mesh: MeshConfig

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> "ExperimentConfig":
    """ConfigDict / dict (e.g. config.json) -> ExperimentConfig; ValueError names the field."""
    missing = [g for g in ("model", *GROUPS) if g not in config]
    if missing:
      raise ValueError(f"config: no {missing[0]!r} group (an experiment config has model, "
                       f"{', '.join(GROUPS)})")
    groups = {g: from_mapping(c, g, dict(config[g])) for g, c in GROUPS.items()}
    exp = cls(model=dict(config["model"]), **groups)
    exp.model_config()  # checks every model field now, before any data is read
    exp.optim.warmup(exp.train.steps)
    if exp.data.seq_len > exp.model_config().max_seq_len:
      raise ValueError(f"data.seq_len: {exp.data.seq_len} is above model.max_seq_len="
                       f"{exp.model_config().max_seq_len}")
    return exp

  def model_config(self, vocab_size: int | None = None) -> ModelConfig:
    """The ModelConfig, with model.vocab_size 0 replaced by `vocab_size` (the tokenizer's).

    A set model.vocab_size must cover the tokenizer's ids. Without vocab_size (no tokenizer yet)
    a 0 becomes PROBE_VOCAB, enough to validate every other field.
    """
    fields = dict(self.model)
    set_vocab = fields.get("vocab_size", 0)
    if set_vocab and vocab_size and set_vocab < vocab_size:
      raise ValueError(f"model.vocab_size: {set_vocab} is smaller than the tokenizer's "
                       f"vocabulary ({vocab_size})")
    fields["vocab_size"] = set_vocab or vocab_size or PROBE_VOCAB
    return ModelConfig.from_mapping(fields)

  def to_dict(self) -> dict[str, Any]:
    return {"model": dict(self.model), **{g: getattr(self, g).to_dict() for g in GROUPS}}


def defaults(group: str) -> dict[str, Any]:
  """A group's defaults as a plain dict: what experiment files start from and override."""
  return ModelConfig().to_dict() if group == "model" else GROUPS[group]().to_dict()


# Experiment files -----------------------------------------------------------------------------


def load_config(spec: str, overrides: Mapping[str, Any] | None = None) -> ConfigDict:
  """spec 'path/to/file.py[:arg]' -> the file's get_config(arg) with dotted-key overrides."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config: no such file {path!r}")
  module_spec = importlib.util.spec_from_file_location(
      f"_config_{os.path.splitext(os.path.basename(path))[0]}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  for key, value in (overrides or {}).items():
    apply_override(config, key, value)
  config.lock()
  return config


def apply_override(config: ConfigDict, dotted: str, value: Any) -> None:
  """Sets config.a.b = value, refusing keys the config does not have (like config_flags)."""
  *parents, leaf = dotted.split(".")
  node = config
  for name in parents:
    if name not in node:
      raise KeyError(f"config.{dotted}: no field {name!r}")
    node = node[name]
  if leaf not in node:
    raise KeyError(f"config.{dotted}: no field {leaf!r}")
  node[leaf] = value
