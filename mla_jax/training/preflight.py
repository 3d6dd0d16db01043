"""What train() checks before it reads data or compiles: the mesh and batch split against the
devices, a workdir's saved model and settings against this run's, train.init_from, and a
start-up peak measurement too low to give an honest MFU. Each problem is a ValueError naming
the field."""

from __future__ import annotations

import collections
import logging
import os
import time
from typing import Any

import jax

from mla_jax.core import sharding as shd
from mla_jax.core.config import ModelConfig
from mla_jax.core.model import diff_param_shapes, param_shapes
from mla_jax.experiment import ExperimentConfig
from mla_jax.storage.workdir import Workdir, WorkdirError

log = logging.getLogger(__name__)
CPU_PEAK_PER_CORE = 100e9  # usual_peak_flops: float32 matmul FLOP/s per idle x86 core
LOW_PEAK_FRACTION = 0.5  # a measured peak below this fraction of the usual one is warned about


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

  Execution choices (core.config.EXECUTION_FIELDS: mla_*_impl, attn_impl, attn_block, remat) and
  DMC's loss settings switch freely. With allow_change, another change is accepted only if every
  parameter keeps its shape (e.g. dtype, rope_layout, norm_eps): the checkpoint then restores
  into the new model.
  The change is appended to config_dict['config_changes'] (the history config.json keeps).
  """
  if not Workdir.exists(workdir):
    return
  saved = Workdir.open(workdir)
  if "config_changes" in saved.config:  # the history so far, kept across resumes
    config_dict["config_changes"] = list(saved.config["config_changes"])
  old_cfg = saved.model_config
  diff = old_cfg.architecture_diff(model_cfg)
  free = {k: v for k, v in old_cfg.diff(model_cfg).items() if k not in diff}
  if free:  # execution / training-loss choices: the same model, run another way
    log.info("continuing %s with %s", workdir,
             ", ".join(f"model.{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(free.items())))
  if not diff:
    return
  fields = ", ".join(f"model.{k}: {a!r} -> {b!r}" for k, a, b in
                     ((k, *v) for k, v in sorted(diff.items())))
  bad = [f"{k}: {a} -> {b}" for k, a, b in diff_param_shapes(param_shapes(old_cfg),
                                                              param_shapes(model_cfg))]
  if not allow_change:
    # allow_config_change only helps when every parameter keeps its shape: suggest it then only.
    raise ValueError(
        f"{saved.config_path}: workdir holds a different model ({fields}); use a new --workdir"
        + (f" (the change reshapes {len(bad)} parameter arrays, e.g. {bad[0]}, so no "
           "checkpoint here can continue it)" if bad else
           ", or set --config.train.allow_config_change=True to continue it with the changed "
           "model (every parameter keeps its shape)"))
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


def setting_changes(saved: dict, config_dict: dict) -> list[tuple[str, Any, Any]]:
  """(group.field, saved value, new value) for every data / optim / train / mesh field that
  differs between a workdir's config.json and this run's (model changes: check_workdir)."""
  out = []
  for group in ("data", "optim", "train", "mesh"):
    old, new = saved.get(group, {}), config_dict.get(group, {})
    out += [(f"{group}.{k}", old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]
  return out


def changes_text(changes) -> str:
  return ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes)


def usual_peak_flops(device) -> float | None:
  """The float32 matmul FLOP/s measure_peak_flops usually reaches on `device` when the machine is
  idle, or None where this project has no figure (accelerators: not measured here yet). CPU: per
  core, AVX2 FMA at ~3 GHz sustains ~100 GFLOP/s (the project's 2-core x86 measured 197-298)."""
  if device.platform != "cpu":
    return None
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return CPU_PEAK_PER_CORE * (cores or 1)


def peak_warning(peak: float, device) -> str | None:
  """A warning when a measured peak is far below the usual (a busy machine): MFU would be
  inflated, e.g. 133% against a start-up reading of 50 GFLOP/s."""
  usual = usual_peak_flops(device)
  if usual is None or peak >= LOW_PEAK_FRACTION * usual:
    return None
  return (f"warning: the matmul peak measured at start, {peak / 1e9:,.1f} GFLOP/s, is far below "
          f"the usual ~{usual / 1e9:,.0f} GFLOP/s of this {device.platform}; the machine is "
          "probably busy and MFU will read too high: set train.peak_flops (FLOP/s per device) "
          "to measure against a fixed peak")
