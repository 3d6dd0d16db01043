"""Sweeps of runs: train every run of a sweep file, evaluate each, write the comparison report.

scripts/compare.py is the command line; see it for usage. A sweep is a config file,
configs/sweeps/<name>.py (or any path), whose get_config() lists the runs (configs/sweeps/cpu.py).
For each run, in order:
  1. train: `python train.py --config=<experiment>:<arg> --workdir=<runs_dir>/<run> --config.k=v`
     in a subprocess (clean memory per run, exactly what a user would type; its output goes to
     <workdir>/train.log). A run is finished when its newest checkpoint step equals train.steps;
     finished runs are never retrained, unfinished ones resume (train.py resumes a workdir), so
     re-running after an interruption picks up where it stopped.
  2. evaluate in this process (workdir_eval.evaluate_workdir: whole validation split, cache bytes,
     decode timing, loss by position) -> <workdir>/eval.json. With reuse, an eval.json newer than
     the run's last checkpoint is read back instead (re-render the report without re-timing).
Then OUT/results.json, OUT/report.md and OUT/*.png (evaluation.report).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
import time

import mla_jax
from mla_jax.core.model import abstract_model, count_params
from mla_jax.evaluation import decode_speed, report
from mla_jax.evaluation.workdir_eval import EvalError, decode_contexts, evaluate_workdir
from mla_jax.experiment import ExperimentConfig, load_config
from mla_jax.storage.workdir import Workdir, load_model

# The checkout: sweep files name configs/ and train.py relative to it (installed editable).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(mla_jax.__file__)))


class SweepError(Exception):
  pass


# Sweep files -------------------------------------------------------------------------------------


def sweep_path(name: str) -> str:
  """A sweep name ('cpu') -> configs/sweeps/cpu.py in the checkout; a path stays a path."""
  if name.endswith(".py") or os.sep in name:
    return name
  return os.path.join(REPO, "configs", "sweeps", f"{name}.py")


def load_sweep(name: str):
  path = sweep_path(name)
  if not os.path.isfile(path):
    known = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs", "sweeps"))
                   if f.endswith(".py") and not f.startswith("_"))
    raise SweepError(f"--sweep: no sweep file {path} (known: {', '.join(known)})")
  spec = importlib.util.spec_from_file_location(f"_sweep_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  sweep = module.get_config()
  for field in ("name", "experiment", "overrides", "runs", "steps"):
    if field not in sweep:
      raise SweepError(f"{path}: sweep config has no {field!r}")
  return sweep


def flatten(tree, prefix: str = "") -> dict:
  """Nested dicts / ConfigDicts -> {'a.b': value}; already-dotted keys pass through."""
  out = {}
  for key, value in dict(tree).items():
    name = f"{prefix}{key}"
    if hasattr(value, "items"):
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


def cadence(sweep, steps: int) -> dict:
  """train.steps and the settings that scale with it (evals, checkpoints, warmup)."""
  return {"train.steps": steps,
          "train.eval_every": max(1, steps // sweep.get("evals", 10)),
          "train.ckpt_every": max(1, steps // sweep.get("ckpts", 3)),
          "optim.warmup_steps": max(1, round(steps * sweep.get("warmup_fraction", 0.05)))}


def expand_runs(sweep, steps: int | None = None) -> list[dict]:
  """[{name, variant, seed, arg, overrides}] with sweep-wide overrides applied, plus one extra run
  '<variant>_seed<k>' (train.seed=k) per entry of sweep.seeds[variant]."""
  steps = steps or sweep.steps
  common = {**flatten(sweep.overrides), **cadence(sweep, steps)}
  base = []
  for entry in sweep.runs:
    name, arg, overrides = entry
    base.append({"name": name, "variant": name, "arg": arg,
                 "overrides": {**common, **flatten(overrides)}})
  names = [r["name"] for r in base]
  if len(set(names)) != len(names):
    raise SweepError(f"sweep {sweep.name}: duplicate run names in {names}")
  runs = []
  for run in base:
    run["seed"] = run["overrides"].get("train.seed", 0)
    runs.append(run)
    for seed in dict(sweep.get("seeds", {}) or {}).get(run["name"], ()):
      runs.append({**run, "name": f"{run['name']}_seed{seed}", "seed": seed,
                   "overrides": {**run["overrides"], "train.seed": seed}})
  unknown = set(dict(sweep.get("seeds", {}) or {})) - set(names)
  if unknown:
    raise SweepError(f"sweep {sweep.name}: seeds for unknown runs {sorted(unknown)}")
  return runs


def run_config(sweep, run):
  return load_config(f"{os.path.join(REPO, sweep.experiment)}:{run['arg']}", run["overrides"])


def model_config(config):
  """The run's ModelConfig without reading data (byte tokens: vocab 0 is 256)."""
  exp = ExperimentConfig.from_config(config)
  if not exp.model.get("vocab_size") and (exp.data.tokenizer != "bytes"
                                          or exp.data.resolved_source == "tokens"):
    raise SweepError("set model.vocab_size in the sweep: parameter counts need the vocabulary "
                     "before any data is read")
  return exp.model_config()


@functools.lru_cache(maxsize=None)
def count(cfg) -> dict:
  """count_params on an abstract model (no memory, any size)."""
  return count_params(abstract_model(cfg))


def matching_d_ff(cfg, target_total: int, multiple: int = 8) -> int:
  """d_ff (a multiple of `multiple`) whose total parameter count is closest to target_total.
  The count is linear in d_ff, so two evaluations give the slope."""
  import dataclasses

  a, b = (count(dataclasses.replace(cfg, d_ff=f))["total"] for f in (multiple, 2 * multiple))
  f = multiple + (target_total - a) / ((b - a) / multiple)
  return max(multiple, int(round(f / multiple)) * multiple)


def param_table(sweep, runs, match: bool = False) -> list[dict]:
  """Per run: total and non-embedding params, relative difference to the reference run, and
  with match=True the d_ff that would bring the total closest to the reference's."""
  rows = []
  for run in runs:
    cfg = model_config(run_config(sweep, run))
    rows.append({"name": run["name"], "cfg": cfg, **count(cfg)})
  ref_name = sweep.get("reference", runs[0]["name"])
  ref = next(r for r in rows if r["name"] == ref_name)
  for r in rows:
    r["rel"] = r["total"] / ref["total"] - 1
    r["d_ff"] = r["cfg"].mlp_dim
    if match:
      r["match_d_ff"] = matching_d_ff(r["cfg"], ref["total"])
  return rows


# Running ----------------------------------------------------------------------------------------


def is_finished(workdir: str, steps: int) -> bool:
  return Workdir.exists(workdir) and Workdir.open(workdir).steps[-1:] == [steps]


def check_existing(workdir: str, steps: int) -> None:
  """A workdir trained for another number of steps cannot be resumed into this sweep."""
  if Workdir.exists(workdir):
    saved = Workdir.open(workdir).config["train"]["steps"]
    if saved != steps:
      raise SweepError(f"{workdir}: trained for train.steps={saved} but the sweep asks for "
                       f"{steps}; use another --out/--runs_dir or --steps={saved}")


def format_flag(value) -> str:
  return repr(value) if isinstance(value, float) else str(value)


def train_command(sweep, run, workdir: str) -> list[str]:
  return ([sys.executable, os.path.join(REPO, "train.py"),
           f"--config={os.path.join(REPO, sweep.experiment)}:{run['arg']}", f"--workdir={workdir}"]
          + [f"--config.{k}={format_flag(v)}" for k, v in run["overrides"].items()])


def train(sweep, run, workdir: str) -> float:
  """Trains (or resumes) one run in a subprocess; returns wall seconds. Raises on failure."""
  os.makedirs(workdir, exist_ok=True)
  log_path = os.path.join(workdir, "train.log")
  start = time.time()
  with open(log_path, "a") as log:
    log.write(f"\n$ {' '.join(train_command(sweep, run, workdir))}\n")
    log.flush()
    proc = subprocess.run(train_command(sweep, run, workdir), cwd=REPO, stdout=log,
                          stderr=subprocess.STDOUT)
  if proc.returncode:
    with open(log_path, errors="replace") as f:
      tail = [l for l in f.read().replace("\r", "\n").splitlines() if l.strip()][-3:]
    raise SweepError(f"run {run['name']}: train.py exited {proc.returncode} (log {log_path}): "
                     + " | ".join(tail))
  return time.time() - start


def evaluate(sweep, workdir: str, reuse: bool) -> dict:
  path = os.path.join(workdir, "eval.json")
  wd = Workdir.open(workdir)
  ckpt_dir = os.path.join(wd.checkpoint_dir, str(wd.steps[-1]))
  if reuse and os.path.isfile(path) and os.path.getmtime(path) > os.path.getmtime(ckpt_dir):
    with open(path) as f:
      return json.load(f)
  try:
    result = evaluate_workdir(
        workdir, max_tokens=sweep.get("eval_max_tokens", 0),
        decode_lengths=sweep.get("decode_lengths", "256,max"),
        decode_steps=sweep.get("decode_steps", 32))
  except EvalError as e:
    raise SweepError(f"evaluating {workdir}: {e}") from None
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  return result


def retime_decode(sweep, runs, runs_dir: str, results: dict, rounds: int) -> None:
  """Replaces each run's decode timings by ones taken in interleaved rounds over all runs (see
  decode_speed.time_decode_interleaved): per-run timings taken minutes apart on a shared machine
  differ by tens of percent for the same architecture."""
  models = {r["name"]: load_model(os.path.join(runs_dir, r["name"])) for r in runs}
  contexts = decode_contexts(sweep.get("decode_lengths", "256,max"),
                             min(m.cfg.max_seq_len for m in models.values()))
  timed = decode_speed.time_decode_interleaved(models, contexts,
                                               steps=sweep.get("decode_steps", 32), rounds=rounds)
  for name, decode in timed.items():
    results[name] = {**results[name], "decode": decode,
                     "decode_timing": f"interleaved over all runs, {rounds} rounds"}


def say(text: str) -> None:
  print(f"[compare {time.strftime('%H:%M:%S')}] {text}", flush=True)


def run_sweep(sweep_name: str, out: str, runs_dir: str | None = None, steps: int | None = None,
              reuse: bool = False, only: str | None = None,
              command: str | None = None) -> list[str]:
  """Trains what is missing, evaluates, writes the report; returns the written paths."""
  sweep = load_sweep(sweep_name)
  steps = steps or sweep.steps
  runs = expand_runs(sweep, steps)
  if only:
    wanted = set(only.split(","))
    runs = [r for r in runs if r["name"] in wanted]
    if not runs:
      raise SweepError(f"--only: none of {sorted(wanted)} is a run of sweep {sweep.name}")
  runs_dir = runs_dir or os.path.join(out, "runs")
  results, timings = {}, {}
  started = time.time()
  for i, run in enumerate(runs):
    workdir = os.path.join(runs_dir, run["name"])
    check_existing(workdir, steps)
    if is_finished(workdir, steps):
      say(f"{run['name']}: finished run reused ({workdir})")
    else:
      say(f"{run['name']} ({i + 1}/{len(runs)}): training {steps} steps -> {workdir}/train.log")
      timings[run["name"]] = train(sweep, run, workdir)
      say(f"{run['name']}: trained in {timings[run['name']]:.0f} s")
    t = time.time()
    results[run["name"]] = evaluate(sweep, workdir, reuse)
    r = results[run["name"]]
    say(f"{run['name']}: val_bpb {r['val_bpb']:.4f}, kv {r['kv_bytes_per_token']} B/token "
        f"(eval {time.time() - t:.0f} s, total {(time.time() - started) / 60:.1f} min)")
  default_runs = runs_dir == os.path.join(out, "runs")
  rounds = sweep.get("decode_rounds", 0)
  if rounds:
    say(f"decode timing again, all runs interleaved ({rounds} rounds)")
    retime_decode(sweep, runs, runs_dir, results, rounds)
  command = command or (f"python scripts/compare.py --sweep={sweep_name} --out={out}"
                        + ("" if default_runs else f" --runs_dir={runs_dir}")
                        + (f" --steps={steps}" if steps != sweep.steps else ""))
  paths = report.write_report(sweep, runs, results, out, runs_dir, command, train_seconds=timings)
  say(f"wrote {', '.join(paths)} ({(time.time() - started) / 60:.1f} min)")
  return paths
