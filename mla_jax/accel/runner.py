"""The parent process of the accelerator check: one subprocess per step, each under its own
time limit, the results rewritten after every step."""

from __future__ import annotations

import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from mla_jax.accel.spec import (
  BUDGET_S,
  JSON_NAME,
  LOG_NAME,
  MD_NAME,
  QUALITY_MIN_S,
  REPO,
  STEP_NAMES,
  STEPS,
  _plain,
)
from mla_jax.accel.tables import markdown


def run_child(cmd: list[str], limit_s: float, log, prefix: str = "", env=None,
              cwd=None) -> dict:
  """Runs cmd, copying each output line (prefixed) to stdout and to `log`; stops its whole
  process group (SIGTERM, then SIGKILL) once it has run limit_s. -> {returncode, seconds,
  timed_out, tail: the last 30 lines}."""
  start, cpu = time.monotonic(), _children_cpu_s()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace", env=env, cwd=cwd, start_new_session=True)
  tail: list[str] = []

  def pump():
    for line in proc.stdout:
      line = line.rstrip("\n")
      print(prefix + line, flush=True)
      if log is not None:
        log.write(prefix + line + "\n")
        log.flush()
      tail.append(line)
      del tail[:-30]

  reader = threading.Thread(target=pump, daemon=True)
  reader.start()
  timed_out = False
  try:
    proc.wait(timeout=max(limit_s, 0.1))
  except subprocess.TimeoutExpired:
    timed_out = True
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
      try:
        os.killpg(proc.pid, sig)  # the step's own session: its pytest or workers too
      except ProcessLookupError:
        break
      try:
        proc.wait(timeout=grace)
        break
      except subprocess.TimeoutExpired:
        continue
  reader.join(timeout=5)
  return {"returncode": proc.returncode, "seconds": time.monotonic() - start,
          "cpu_s": _children_cpu_s() - cpu, "timed_out": timed_out, "tail": list(tail)}


def _children_cpu_s() -> float:
  """CPU seconds of the finished children so far (a step's host cost, whatever else runs)."""
  r = resource.getrusage(resource.RUSAGE_CHILDREN)
  return r.ru_utime + r.ru_stime


def child_env(dry_run: bool) -> dict:
  """The steps' environment: this checkout importable, unbuffered output; a dry run on the CPU,
  one device, XLA's cheapest optimisation level (tiny shapes: compile time dominates)."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
  env["PYTHONUNBUFFERED"] = "1"
  if dry_run:
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  return env


def _compile_cache(env: dict, folder: str) -> dict:
  """A dry run's steps share one fresh persistent compilation cache: on a CPU attn_impl=auto is
  the blocked path, so the train step compiles each model once instead of twice."""
  return dict(env, JAX_COMPILATION_CACHE_DIR=folder,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def write_results(out: Path, results: dict) -> None:
  """accel_check.json and accel_check.md, each replaced whole (never half-written)."""
  for name, text in ((JSON_NAME, json.dumps(results, indent=1, default=_plain)),
                     (MD_NAME, markdown(results))):
    tmp = out / (name + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, out / name)


def run(out_dir: str, dry_run: bool = False, steps: tuple[str, ...] | None = None,
        budget_s: float | None = None, limits: dict[str, float] | None = None,
        python: str = sys.executable) -> dict:
  """Runs the selected steps (default all) in order; returns and writes the results.
  limits: seconds by step name, in place of STEPS' (still within the budget)."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  if budget_s is None:
    budget_s = sum(s.dry_limit_s for s in STEPS) if dry_run else BUDGET_S
  for what, names in (("steps", steps or ()), ("limits", limits or {})):
    unknown = sorted(set(names) - set(STEP_NAMES))
    if unknown:
      raise ValueError(f"{what}: unknown {unknown} (known: {', '.join(STEP_NAMES)})")
  results = {"schema": 1, "dry_run": dry_run, "budget_s": budget_s,
             "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
             "host": platform.node(), "steps": {}}
  env = child_env(dry_run)
  begin = time.monotonic()
  with open(out / LOG_NAME, "w") as log, tempfile.TemporaryDirectory() as tmp:
    for i, step in enumerate(STEPS, 1):
      if steps and step.name not in steps:
        continue
      left = budget_s - (time.monotonic() - begin)
      # None: whatever the budget has left (the quality step on an accelerator).
      base = (limits or {}).get(step.name) or (step.dry_limit_s if dry_run else step.limit_s)
      floor = QUALITY_MIN_S if base is None else min(base, 10.0)
      limit = left if base is None else min(base, left)
      entry = {"title": step.title, "limit_s": round(max(limit, 0), 1)}
      if left < floor:  # the budget is spent
        entry.update(status="skipped", reason=f"{max(left, 0):.0f} s of the {budget_s:.0f} s "
                     "budget left")
        results["steps"][step.name] = entry
        print(f"== {i}. {step.title}: skipped ({entry['reason']})", flush=True)
        write_results(out, results)
        continue
      print(f"== {i}. {step.title} (limit {limit:.0f} s)", flush=True)
      log.write(f"== {i}. {step.title} (limit {limit:.0f} s)\n")
      context, part = Path(tmp, "context.json"), Path(tmp, f"{step.name}.json")
      context.write_text(json.dumps(results, default=_plain))
      cmd = [python, "-m", "mla_jax.accel", f"--step={step.name}", f"--part={part}",
             f"--context={context}", f"--limit_s={limit:.1f}"] + (["--dry_run"] if dry_run else [])
      step_env = _compile_cache(env, os.path.join(tmp, "jax_cache")) if dry_run else env
      r = run_child(cmd, limit, log, prefix=f"[{step.name}] ", env=step_env, cwd=REPO)
      status = ("ok" if r["returncode"] == 0 else f"timed out at {limit:.0f} s" if r["timed_out"]
                else f"failed (exit {r['returncode']})")
      entry.update(status=status, seconds=round(r["seconds"], 1), cpu_s=round(r["cpu_s"], 1))
      if part.exists():
        entry["result"] = json.loads(part.read_text())
      if status != "ok":
        entry["log_tail"] = r["tail"]
      results["steps"][step.name] = entry
      print(f"== {i}. {step.title}: {status} in {r['seconds']:.1f} s", flush=True)
      write_results(out, results)
  results["seconds"] = round(time.monotonic() - begin, 1)
  write_results(out, results)
  return results
