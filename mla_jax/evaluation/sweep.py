"""Sweeps of runs: train every run of a sweep file, evaluate each, write the comparison report.

scripts/compare.py is the command line; see it for usage. A sweep is a config file,
configs/sweeps/<name>.py (or any path), whose get_config() lists the runs (configs/sweeps/cpu.py).
For each run (up to sweep.jobs / --jobs trainings at once; each is evaluated as soon as its
training ends, in the sweep's order):
  1. train: train_fn(sweep, run, workdir) -> seconds, the caller's launcher (scripts/compare.py:
     `python train.py --config=<experiment>:<arg> --workdir=<runs_dir>/<run> --config.k=v` in a
     subprocess; tests: a fake). A run is finished when its newest checkpoint step equals
     train.steps; finished runs are never retrained, unfinished ones resume (train.py resumes a
     workdir), so re-running after an interruption picks up where it stopped.
  2. evaluate in this process (workdir_eval.evaluate_workdir: whole validation split, cache bytes,
     loss by position; decode timing only when the sweep does not re-time decode interleaved
     afterwards, decode_rounds) -> <workdir>/eval.json. With reuse, an eval.json newer than
     the run's last checkpoint is read back instead (re-render the report without re-timing).
Then OUT/results.json, OUT/report.md and OUT/*.png (evaluation.report). Sweep names and the
experiment paths in sweep files resolve against the directory holding the `configs` package (the
checkout, or site-packages when installed), never against where mla_jax lives.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from mla_jax.core.model import abstract_model, count_params
from mla_jax.evaluation import decode_speed, report, stats
from mla_jax.evaluation.workdir_eval import EvalError, decode_contexts, evaluate_workdir
from mla_jax.experiment import ExperimentConfig, load_config
from mla_jax.storage.workdir import Workdir, load_model, read_metrics


class SweepError(Exception):
  pass


# train_fn(sweep, run, workdir) -> wall seconds: trains (or resumes) one run into workdir, raising
# SweepError on failure (its message containing 'non-finite' for a diverged run).
TrainFn = Callable[[object, dict, str], float]


def configs_root() -> str:
  """The directory holding the `configs` package, found without importing it (mla_jax never
  imports configs): sweep names and sweep files' experiment paths resolve against it."""
  spec = importlib.util.find_spec("configs")
  locations = list(spec.submodule_search_locations or []) if spec else []
  if not locations:
    raise SweepError("the configs package is not importable; install this checkout "
                     "(python3 -m pip install -e .)")
  return os.path.dirname(os.path.abspath(locations[0]))


def experiment_path(sweep) -> str:
  """The sweep's experiment file (e.g. 'configs/lm.py'), absolute."""
  path = sweep.experiment
  return path if os.path.isabs(path) else os.path.join(configs_root(), path)


# Sweep files -------------------------------------------------------------------------------------


def sweep_path(name: str) -> str:
  """A sweep name ('cpu') -> configs/sweeps/cpu.py beside the configs package; a path stays a
  path."""
  if name.endswith(".py") or os.sep in name:
    return name
  return os.path.join(configs_root(), "configs", "sweeps", f"{name}.py")


def load_sweep(name: str):
  path = sweep_path(name)
  if not os.path.isfile(path):
    known = sorted(f[:-3] for f in os.listdir(os.path.join(configs_root(), "configs", "sweeps"))
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


def _variants(sweep, steps: int) -> list[dict]:
  """One entry per sweep.runs line: {variant, arg, overrides} with sweep-wide settings applied."""
  common = {**flatten(sweep.overrides), **cadence(sweep, steps)}
  out = []
  for name, arg, overrides in sweep.runs:
    out.append({"variant": name, "arg": arg, "overrides": {**common, **flatten(overrides)}})
  names = [v["variant"] for v in out]
  if len(set(names)) != len(names):
    raise SweepError(f"sweep {sweep.name}: duplicate run names in {names}")
  return out


def seeds_of(sweep) -> list[int]:
  """The seeds every final run is trained with (sweep.seeds, default [0])."""
  seeds = list(sweep.get("seeds", None) or [0])
  if len(set(seeds)) != len(seeds) or not all(isinstance(s, int) for s in seeds):
    raise SweepError(f"sweep {sweep.name}: seeds must be distinct integers, got {seeds}")
  return seeds


def expand_runs(sweep, steps: int | None = None, lrs: dict | None = None) -> list[dict]:
  """The final runs: [{name, variant, seed, lr, arg, overrides}], one per variant and seed
  ('<variant>' alone for a single seed, else '<variant>_s<seed>'), at the variant's learning
  rate from `lrs` (the tuning phase's choice) or the sweep's own."""
  steps = steps or sweep.steps
  seeds = seeds_of(sweep)
  runs = []
  for v in _variants(sweep, steps):
    lr = (lrs or {}).get(v["variant"], v["overrides"].get("optim.lr"))
    for seed in seeds:
      name = v["variant"] if len(seeds) == 1 else f"{v['variant']}_s{seed}"
      overrides = {**v["overrides"], "train.seed": seed}
      if lr is not None:
        overrides["optim.lr"] = lr
      runs.append({**v, "name": name, "seed": seed, "lr": lr, "overrides": overrides})
  return runs


def tuning_runs(sweep) -> list[dict]:
  """The learning-rate phase: every variant at every rate of sweep.lr_grid, seed 0, for
  sweep.tune_steps steps, scored on sweep.tune_eval_tokens validation tokens (0: all)."""
  grid = list(sweep.get("lr_grid", None) or [])
  if not grid:
    return []
  steps = sweep.tune_steps
  runs = []
  for v in _variants(sweep, steps):
    for lr in grid:
      overrides = {**v["overrides"], "optim.lr": lr, "train.seed": 0,
                   "train.final_eval_tokens": sweep.get("tune_eval_tokens", 0)}
      runs.append({**v, "name": f"tune/{v['variant']}_lr{lr:g}", "seed": 0, "lr": lr,
                   "steps": steps, "overrides": overrides})
  return runs


def final_val_bpb(workdir: str) -> float | None:
  """The last validation bits per byte a run logged (its final evaluation); None if it never
  evaluated or diverged (a non-finite run stops with an error before its final eval)."""
  evals = [r["val_bpb"] for r in read_metrics(workdir) if "val_bpb" in r]
  return evals[-1] if evals else None


def choose_lrs(tuning: list[dict], scores: dict[str, float | None]) -> dict[str, dict]:
  """{variant: {'grid': {lr: val_bpb}, 'chosen': lr, 'on_edge': bool}} from the tuning runs."""
  out = {}
  for run in tuning:
    out.setdefault(run["variant"], {"grid": {}})["grid"][run["lr"]] = scores.get(run["name"])
  for entry in out.values():
    entry["chosen"] = stats.best_lr(entry["grid"])
    entry["on_edge"] = stats.on_grid_edge(entry["chosen"], list(entry["grid"]))
  return out


def run_config(sweep, run):
  return load_config(f"{experiment_path(sweep)}:{run['arg']}", run["overrides"])


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
  """Per variant (seeds share a model): total and non-embedding params, relative difference to
  the reference variant, and with match=True the d_ff that would bring the total closest to the
  reference's."""
  rows, seen = [], set()
  for run in runs:
    if run["variant"] in seen:
      continue
    seen.add(run["variant"])
    cfg = model_config(run_config(sweep, run))
    rows.append({"name": run["variant"], "cfg": cfg, **count(cfg)})
  ref_name = sweep.get("reference", rows[0]["name"])
  ref = next(r for r in rows if r["name"] == ref_name)
  for r in rows:
    r["rel"] = r["total"] / ref["total"] - 1
    r["d_ff"] = r["cfg"].mlp_dim
    if match:
      r["match_d_ff"] = matching_d_ff(r["cfg"], ref["total"])
  return rows


# Running ----------------------------------------------------------------------------------------


def is_finished(workdir: str, steps: int) -> bool:
  """check_existing has made sure the workdir trains for `steps`."""
  return Workdir.exists(workdir) and Workdir.open(workdir).finished


def check_existing(workdir: str, steps: int) -> None:
  """A workdir trained for another number of steps cannot be resumed into this sweep."""
  if Workdir.exists(workdir):
    saved = Workdir.open(workdir).config["train"]["steps"]
    if saved != steps:
      raise SweepError(f"{workdir}: trained for train.steps={saved} but the sweep asks for "
                       f"{steps}; use another --out/--runs_dir or --steps={saved}")


def evaluate(sweep, workdir: str, reuse: bool) -> dict:
  """evaluate_workdir on a final run -> its eval.json. Decode is timed here only when the sweep
  does not time it again for all runs interleaved (decode_rounds): per-run timings would be
  thrown away, and with several jobs they run beside other runs' training."""
  path = os.path.join(workdir, "eval.json")
  wd = Workdir.open(workdir)
  ckpt_dir = os.path.join(wd.checkpoint_dir, str(wd.steps[-1]))
  if reuse and os.path.isfile(path) and os.path.getmtime(path) > os.path.getmtime(ckpt_dir):
    with open(path) as f:
      return json.load(f)
  try:
    result = evaluate_workdir(
        workdir, max_tokens=sweep.get("eval_max_tokens", 0),
        decode_lengths="" if sweep.get("decode_rounds", 0) else sweep.get("decode_lengths",
                                                                           "256,max"),
        decode_steps=sweep.get("decode_steps", 32))
  except EvalError as e:
    raise SweepError(f"evaluating {workdir}: {e}") from None
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  return result


def retime_decode(sweep, runs, runs_dir: str, results: dict, rounds: int) -> None:
  """Replaces each run's decode timings by ones taken in interleaved rounds over all runs (see
  decode_speed.time_decode_interleaved): per-run timings taken minutes apart on a shared machine
  differ by tens of percent for the same architecture. A run's workdir is run['workdir'], else
  runs_dir/<name>."""
  models = {r["name"]: load_model(r.get("workdir") or os.path.join(runs_dir, r["name"]))
            for r in runs}
  contexts = decode_contexts(sweep.get("decode_lengths", "256,max"),
                             min(m.cfg.max_seq_len for m in models.values()))
  timed = decode_speed.time_decode_interleaved(models, contexts,
                                               steps=sweep.get("decode_steps", 32), rounds=rounds)
  for name, decode in timed.items():
    results[name] = {**results[name], "decode": decode,
                     "decode_timing": f"interleaved over all runs, {rounds} rounds"}


def say(text: str) -> None:
  print(f"[compare {time.strftime('%H:%M:%S')}] {text}", flush=True)


def _train_or_reuse(sweep, run, workdir: str, steps: int, label: str, timings: dict,
                    train_fn: TrainFn) -> None:
  """train_in_order has run check_existing on every workdir before any training."""
  if is_finished(workdir, steps):
    say(f"{run['name']}: finished run reused ({workdir})")
    return
  say(f"{run['name']} ({label}): training {steps} steps at lr {run.get('lr')} -> "
      f"{workdir}/train.log")
  try:
    timings[run["name"]] = train_fn(sweep, run, workdir)
  except SweepError as e:
    if run["name"].startswith("tune/") and "non-finite" in str(e):
      say(f"{run['name']}: diverged (counted as a failed rate)")
      return
    raise
  say(f"{run['name']}: trained in {timings[run['name']]:.0f} s")


def jobs_of(sweep, jobs: int | None) -> int:
  """Training processes at once: --jobs, else sweep.jobs, else 1."""
  jobs = jobs or sweep.get("jobs", 1)
  if not isinstance(jobs, int) or jobs < 1:
    raise SweepError(f"--jobs / sweep.jobs: must be a positive integer, got {jobs!r}")
  return jobs


def train_in_order(sweep, items: list[tuple], jobs: int, timings: dict, train_fn: TrainFn):
  """Trains (or reuses) every (run, workdir, steps, label) with up to `jobs` train_fn calls at
  once (scripts/compare.py: train.py processes) and yields each item once its training has ended,
  in the order given (so results and messages come in the sweep's order). A failure raises when
  its item comes up; runs not yet started are cancelled, running ones finish (and stay
  resumable).

  On the 2-core CPU two jobs do at least 1.28x the work of one: two of the cpu sweep's tuning runs
  (MHA, MLA C=40) took 111 s together, the MHA one 71 s alone. A model this small leaves a
  process's cores partly idle (start-up, compile, evaluation, single-threaded fusions)."""
  for _run, workdir, steps, _label in items:  # a wrong workdir fails before anything trains
    check_existing(workdir, steps)
  pool = ThreadPoolExecutor(max_workers=jobs)
  try:
    futures = [pool.submit(_train_or_reuse, sweep, run, workdir, steps, label, timings, train_fn)
               for run, workdir, steps, label in items]
    for item, future in zip(items, futures):
      future.result()
      yield item
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def keep_earlier(path: str, runs: list[dict], runs_dir: str, steps: int) -> dict[str, dict]:
  """The entries of an earlier report (its results.json) for final runs whose workdirs are gone
  from runs_dir: each run of the same name and steps is kept as that report measured it (curve
  included), not retrained, so seeds added later join the ones whose workdirs were deleted.
  -> {run name: entry}."""
  try:
    with open(path) as f:
      earlier = json.load(f).get("runs", {})
  except (OSError, ValueError) as e:
    raise SweepError(f"--earlier: cannot read {path}: {e}") from None
  return {r["name"]: earlier[r["name"]] for r in runs
          if r["name"] in earlier and earlier[r["name"]].get("train_steps") == steps
          and not os.path.isdir(os.path.join(runs_dir, r["name"]))}


def run_sweep(sweep_name: str, out: str, runs_dir: str | None = None, steps: int | None = None,
              reuse: bool = False, only: str | None = None,
              command: str | None = None, jobs: int | None = None, *, train_fn: TrainFn,
              evaluate_fn: Callable[[object, str, bool], dict] | None = None,
              earlier: str | None = None) -> list[str]:
  """Tunes the learning rate per variant (when the sweep has an lr_grid), trains the final runs
  at the chosen rates and seeds, evaluates them and writes the report; returns the paths.
  Everything finished is reused, so re-running after an interruption continues.
  train_fn: the launcher (TrainFn); evaluate_fn(sweep, workdir, reuse) -> eval.py's dict
  (default `evaluate`, in this process). earlier: an earlier report's results.json whose runs
  stand in for final runs without a workdir (keep_earlier)."""
  evaluate_fn = evaluate_fn or evaluate
  sweep = load_sweep(sweep_name)
  steps = steps or sweep.steps
  runs_dir = runs_dir or os.path.join(out, "runs")
  timings, started = {}, time.time()
  tuning = tuning_runs(sweep)
  if only:
    wanted = set(only.split(","))
    tuning = [r for r in tuning if r["variant"] in wanted]
  jobs = jobs_of(sweep, jobs)
  scores, phases = {}, {}
  items = [(run, os.path.join(runs_dir, run["name"]), run["steps"],
            f"tuning {i + 1}/{len(tuning)}") for i, run in enumerate(tuning)]
  for run, workdir, _, _ in train_in_order(sweep, items, jobs, timings, train_fn):
    scores[run["name"]] = final_val_bpb(workdir)
  phases["tuning"] = time.time() - started
  lr_table = choose_lrs(tuning, scores) if tuning else {}
  for v, entry in lr_table.items():
    grid = ", ".join(f"{lr:g}: {'-' if b is None else f'{b:.4f}'}"
                     for lr, b in entry["grid"].items())
    say(f"{v}: lr {entry['chosen']:g} chosen ({grid})"
        + ("; on the grid's edge" if entry["on_edge"] else ""))
  runs = expand_runs(sweep, steps, {v: e["chosen"] for v, e in lr_table.items()})
  if only:
    runs = [r for r in runs if r["name"] in wanted or r["variant"] in wanted]
    if not runs:
      raise SweepError(f"--only: none of {sorted(wanted)} is a run of sweep {sweep.name}")
  kept = keep_earlier(earlier, runs, runs_dir, steps) if earlier else {}
  if kept:
    say(f"{len(kept)} runs kept from {earlier} (no workdir here): {', '.join(kept)}")
  results = {}
  items = [(run, os.path.join(runs_dir, run["name"]), steps, f"final {i + 1}/{len(runs)}")
           for i, run in enumerate(runs) if run["name"] not in kept]
  for run, workdir, _, _ in train_in_order(sweep, items, jobs, timings, train_fn):
    t = time.time()
    results[run["name"]] = evaluate_fn(sweep, workdir, reuse)
    r = results[run["name"]]
    say(f"{run['name']}: val_bpb {r['val_bpb']:.4f}, kv {r['kv_bytes_per_token']} B/token "
        f"(eval {time.time() - t:.0f} s, total {(time.time() - started) / 60:.1f} min)")
  results = {r["name"]: kept.get(r["name"]) or results[r["name"]] for r in runs}  # sweep order
  default_runs = runs_dir == os.path.join(out, "runs")
  rounds = sweep.get("decode_rounds", 0)
  phases["final"] = time.time() - started - phases["tuning"]
  if rounds:
    say(f"decode timing, all runs interleaved ({rounds} rounds)")
    retime_decode(sweep, [r for r in runs if r["name"] not in kept], runs_dir, results, rounds)
  phases["decode"] = time.time() - started - phases["tuning"] - phases["final"]
  wall = {"jobs": jobs, "seconds": time.time() - started,
          "phases": {k: round(v, 1) for k, v in phases.items()},
          "runs_trained": len(timings), "runs": len(tuning) + len(runs)}
  command = command or (f"python3 scripts/compare.py --sweep={sweep_name} --out={out}"
                        + ("" if default_runs else f" --runs_dir={runs_dir}")
                        + (f" --steps={steps}" if steps != sweep.steps else ""))
  paths = report.write_report(sweep, runs, results, out, runs_dir, command, train_seconds=timings,
                              lr_table=lr_table, wall=wall)
  say(f"wrote {', '.join(paths)} ({(time.time() - started) / 60:.1f} min)")
  return paths
