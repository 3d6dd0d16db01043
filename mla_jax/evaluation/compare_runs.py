"""Compare runs you already trained: the sweep report and plots from existing workdirs, no training.

    compare_workdirs(["runs/mha", "runs/mla_s0", "runs/mla_s1"], "out/mine")

scripts/compare.py --workdirs=... is the command line. Each workdir is evaluated as eval.py does
(evaluation.workdir_eval: the whole validation split unless max_tokens, cache bytes, loss by
position) and the results are kept in OUT/evals/<run>.json, reused while newer than the run's
checkpoint and made with the same settings; decode is then timed once for all runs in
interleaved rounds (decode_speed.time_decode_interleaved), as the sweeps do. Runs whose configs
differ only in train.seed (and in how they ran: SEED_FREE fields) are seeds of one variant: the
report gives their mean and sample std, and the differences against seed noise. Then
OUT/results.json, OUT/report.md and the plots (evaluation.report): bpb vs KV bytes with the
Pareto frontier, training curves, decode speed, loss by position.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Callable

from ml_collections import ConfigDict

from mla_jax.evaluation import report
from mla_jax.evaluation.sweep import SweepError, retime_decode
from mla_jax.evaluation.workdir_eval import EvalError, evaluate_workdir
from mla_jax.storage.workdir import Workdir, WorkdirError

# Fields that say how a run ran, not what it trained: runs differing only in these (and the seed)
# are seeds of one variant.
SEED_FREE = {"train": ("seed", "log_every", "eval_every", "ckpt_every", "keep_ckpts",
                       "peak_flops", "log_health", "allow_config_change"),
             "data": ("worker_count",), "mesh": None}  # None: the whole group
BOOKKEEPING = ("config_changes", "origin")
_SEED_SUFFIX = re.compile(r"[_-]?(s|seed)\d+$")


def variant_key(config: dict) -> str:
  """config.json without the seed and SEED_FREE fields, as a canonical string."""
  c = {k: v for k, v in config.items() if k not in BOOKKEEPING}
  for group, fields in SEED_FREE.items():
    if group in c:
      c[group] = {} if fields is None else {k: v for k, v in c[group].items()
                                            if k not in fields}
  return json.dumps(c, sort_keys=True)


def group_runs(workdirs: list[str]) -> list[dict]:
  """[{name, variant, seed, lr, workdir}] in the order given. name: the workdir's basename (its
  parent's too where two share one); variant: the name with a seed suffix (_s1, -seed2) dropped,
  shared by the runs whose configs differ only in seed."""
  if not workdirs:
    raise SweepError("--workdirs: give at least one workdir")
  opened = []
  for path in workdirs:
    try:
      wd = Workdir.open(path)
      wd.resolve_step("latest")
    except WorkdirError as e:
      raise SweepError(f"--workdirs: {e}") from None
    opened.append(wd)
  bases = [os.path.basename(os.path.normpath(w.path)) for w in opened]
  names = [b if bases.count(b) == 1 else
           "_".join(os.path.normpath(w.path).split(os.sep)[-2:]) for b, w in zip(bases, opened)]
  if len(set(names)) != len(names):
    raise SweepError(f"--workdirs: the same workdir twice in {workdirs}")
  groups: dict[str, list[int]] = {}
  for i, wd in enumerate(opened):
    groups.setdefault(variant_key(wd.config), []).append(i)
  variant_of, used = {}, set()
  for members in groups.values():
    stems = {_SEED_SUFFIX.sub("", names[i]) or names[i] for i in members}
    label = stems.pop() if len(stems) == 1 else names[members[0]]
    while label in used:
      label += "_"
    used.add(label)
    for i in members:
      variant_of[i] = label
  runs = []
  for i, wd in enumerate(opened):
    runs.append({"name": names[i], "variant": variant_of[i], "workdir": wd.path,
                 "seed": wd.config["train"].get("seed", 0),
                 "lr": (wd.config.get("optim") or {}).get("lr")})
  seeds = {}
  for r in runs:
    if r["seed"] in seeds.setdefault(r["variant"], set()):
      raise SweepError(f"--workdirs: {r['name']} trains variant {r['variant']} with seed "
                       f"{r['seed']} like another workdir given; give each seed once")
    seeds[r["variant"]].add(r["seed"])
  return runs


def _evaluate(run: dict, out: str, settings: dict, reuse: bool, say) -> dict:
  """evaluate_workdir without decode timing, kept in OUT/evals/<name>.json and reused while it
  is newer than the run's latest checkpoint and made with the same settings."""
  path = os.path.join(out, "evals", f"{run['name']}.json")
  wd = Workdir.open(run["workdir"])
  ckpt = os.path.join(wd.checkpoint_dir, str(wd.resolve_step("latest")))
  if reuse and os.path.isfile(path) and os.path.getmtime(path) > os.path.getmtime(ckpt):
    with open(path) as f:
      saved = json.load(f)
    if saved.get("settings") == settings and saved.get("workdir") == os.path.abspath(wd.path):
      say(f"{run['name']}: evaluation reused from {path}")
      return saved["result"]
  say(f"{run['name']}: evaluating {run['workdir']}")
  try:
    result = evaluate_workdir(run["workdir"], max_tokens=settings["max_tokens"], decode_lengths="")
  except EvalError as e:
    raise SweepError(f"evaluating {run['workdir']}: {e}") from None
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"workdir": os.path.abspath(wd.path), "settings": settings, "result": result}, f,
              indent=1)
  return result


def compare_workdirs(workdirs: list[str], out: str, reference: str | None = None,
                     max_tokens: int = 0, decode_lengths: str = "256,max", decode_steps: int = 32,
                     decode_rounds: int = 2, reuse: bool = True, command: str | None = None,
                     progress: Callable[[str], None] = print) -> list[str]:
  """Evaluates existing workdirs and writes the comparison report into `out`; returns the paths.
  reference: a run or variant name the others are compared against (default: the first).
  decode_lengths '' skips decode timing; decode_rounds: interleaved timing rounds."""
  started = time.time()
  runs = group_runs(workdirs)
  if reference is not None:
    ref = next((r for r in runs if reference in (r["name"], r["variant"])), None)
    if ref is None:
      raise SweepError(f"--reference: {reference!r} is none of the runs "
                       f"{[r['name'] for r in runs]} or variants")
    runs = [r for r in runs if r["variant"] == ref["variant"]] + [
        r for r in runs if r["variant"] != ref["variant"]]
  data = {json.dumps(Workdir.open(r["workdir"]).config["data"], sort_keys=True) for r in runs}
  if len(data) > 1:
    progress("warning: the runs were trained (and are scored) on different data settings; their "
             "bpb compare only where the validation text is the same")
  settings = {"max_tokens": max_tokens}
  results = {r["name"]: _evaluate(r, out, settings, reuse, progress) for r in runs}
  phases = {"tuning": 0.0, "final": time.time() - started}
  sweep = ConfigDict({"name": "workdirs", "reference": runs[0]["name"],
                      "decode_lengths": decode_lengths, "decode_steps": decode_steps})
  if decode_lengths and decode_rounds:
    progress(f"decode timing, all runs interleaved ({decode_rounds} rounds)")
    retime_decode(sweep, runs, "", results, decode_rounds)
  phases["decode"] = time.time() - started - phases["final"]
  wall = {"existing_workdirs": True, "jobs": 0, "seconds": time.time() - started,
          "phases": {k: round(v, 1) for k, v in phases.items()}, "runs_trained": 0,
          "runs": len(runs)}
  command = command or ("python3 scripts/compare.py --workdirs=" + ",".join(workdirs)
                        + f" --out={out}")
  paths = report.write_report(sweep, runs, results, out, "", command, wall=wall)
  grouped = {}
  for r in runs:
    grouped.setdefault(r["variant"], []).append(r["name"])
  progress("variants: " + "; ".join(f"{v} = {', '.join(n)}" for v, n in grouped.items()))
  progress(f"wrote {', '.join(paths)} ({time.time() - started:.0f} s)")
  return paths
