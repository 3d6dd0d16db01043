"""Compression sweep over a comparison sweep's trained models: (trained variant x policy x budget x
quantisation) -> bpb, passkey accuracy and effective bytes per token, on one Pareto chart.

    run_compress_sweep("runs/sweep_cpu", "docs/results/kvcompress", policies=("h2o", "streaming"))

Every workdir under runs_dir with a checkpoint is one trained variant; its uncompressed point is
the trained-in compression (MLA, GQA, MQA against MHA: the model's own cache bytes). Each policy
runs at the kvpress grid (a fraction RATIOS of the compressed context, the prefix, evicted) and
each quantisation, on the same validation windows (evaluate.prefix_bpb: the first half of a
seq_len window compressed, the second half scored). Writes OUT/results.json, OUT/report.md,
OUT/pareto_bpb.png (and OUT/pareto_passkey_<length>.png with passkey lengths). YOCO and DMC
workdirs, whose caches are compressed by design and which the budget caches do not cover, are one
point each, scored on the same windows through their own cache (evaluate.own_cache_bpb).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax

from mla_jax.core.config import kv_cache_bytes_per_token
from mla_jax.kvcompress import evaluate
from mla_jax.kvcompress.policy import Policy, PolicyError, validate


def find_workdirs(runs_dir: str) -> list[str]:
  """Sub-directories (one level) with a config.json and at least one checkpoint, sorted."""
  from mla_jax.storage.workdir import Workdir, WorkdirError

  found = []
  for name in sorted(os.listdir(runs_dir)):
    path = os.path.join(runs_dir, name)
    if not os.path.isfile(os.path.join(path, "config.json")):
      continue
    try:
      Workdir.open(path).resolve_step("latest")
    except (WorkdirError, ValueError, FileNotFoundError):
      continue
    found.append(path)
  return found


def configs(policies, ratios, quants, compose: bool) -> list[tuple[str, float, str]]:
  """(policy, fraction evicted, quant): each quantisation alone, each policy at each ratio
  unquantised, and with compose each policy x ratio x quantisation."""
  out = [("none", 0.0, q) for q in quants if q != "none"]
  for p in policies:
    for r in ratios:
      for q in quants:
        if q == "none" or compose:
          out.append((p, r, q))
  return out


def plan_points(seq_len: int, policies, ratios, quants, compose: bool
                ) -> tuple[list[tuple[str, float, str, Policy]], list[dict]]:
  """The points of one model with training window seq_len: ([(policy, ratio, quant, Policy)],
  [skipped: {policy, quant, ratio, budget, reason}]). A point whose budget cannot hold the
  policy's sinks and window (a short window, a high ratio) is skipped, not measured; computed
  from the window alone, so every model's infeasible points are known before anything runs."""
  points, skipped = [], []
  for name, ratio, quant in configs(policies, ratios, quants, compose):
    # The fraction evicted is of the compressed context: the prefix (the first half).
    kept = max(1, round((1 - ratio) * (seq_len - seq_len // 2))) if ratio else 0
    try:
      policy = evaluate.policy_from_flags(name, str(kept), quant, context=seq_len)
    except PolicyError as e:
      reason = str(e).split(": ", 1)[-1]  # the flag named there is this point's budget
      skipped.append({"policy": name, "quant": quant, "ratio": ratio, "budget": kept,
                      "reason": reason})
      continue
    points.append((name, ratio, quant, policy))
  return points, skipped


def point_name(run: str, point: dict) -> str:
  return f"{run}: {point['policy']} {point['quant']} evict {point['ratio']:g}"


def run_compress_sweep(runs_dir: str, out: str, policies=("streaming", "h2o", "tova", "snapkv"),
                       ratios=evaluate.RATIOS, quants=("none", "int8", "int4"),
                       compose: bool = False, windows: int = 8, passkey_lengths=(),
                       passkey_trials: int = 8, only=(), progress=print) -> dict:
  """Every workdir's points, then OUT/results.json, report.md and plots. Each workdir's rows are
  also kept in OUT/rows/<run>.json as soon as they are measured: a re-run with the same settings
  reuses those newer than the workdir's checkpoint, so an interrupted sweep continues and adding
  a model measures only that model."""
  os.makedirs(os.path.join(out, "rows"), exist_ok=True)
  rows, started = [], time.perf_counter()
  workdirs = [w for w in find_workdirs(runs_dir) if not only or os.path.basename(w) in only]
  if not workdirs:
    raise ValueError(f"--runs_dir: no trained workdir under {runs_dir}")
  settings = {"policies": list(policies), "ratios": list(ratios), "quants": list(quants),
              "compose": compose, "windows": windows, "passkey_lengths": list(passkey_lengths),
              "passkey_trials": passkey_trials}
  from mla_jax.storage.workdir import Workdir

  skipped = []  # before measuring anything: every infeasible point, named
  for wd_path in workdirs:
    run = os.path.basename(wd_path)
    for p in plan_points(Workdir.open(wd_path).config["data"]["seq_len"], policies, ratios,
                         quants, compose)[1]:
      skipped.append({"run": run, **p})
      progress(f"skipped {point_name(run, p)} (budget {p['budget']} slots): {p['reason']}")
  measured = 0
  for wd_path in workdirs:
    run = os.path.basename(wd_path)
    path = os.path.join(out, "rows", f"{run}.json")
    saved = _saved_rows(path, settings, wd_path)
    if saved is not None:
      progress(f"{run}: {len(saved)} points reused from {path}")
      rows += saved
      continue
    say = lambda text, run=run: progress(f"[{time.perf_counter() - started:6.0f}s] {run}: {text}")
    new = _workdir_rows(wd_path, policies, ratios, quants, compose, windows, passkey_lengths,
                        passkey_trials, say)
    with open(path, "w") as f:
      json.dump({"settings": settings, "rows": new}, f, indent=1)
    rows += new
    measured += 1
  # Relative: committed results hold no absolute paths.
  result = {"runs_dir": os.path.relpath(runs_dir) if os.path.isabs(runs_dir) else runs_dir,
            "rows": rows, "ratios": list(ratios), "windows": windows,
            "seconds": time.perf_counter() - started, "workdirs_measured": measured,
            "workdirs": len(workdirs), "skipped": skipped}
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(result, f, indent=1)
  write_report(result, out, passkey_lengths)
  return result


def _saved_rows(path: str, settings: dict, wd_path: str) -> list[dict] | None:
  """The rows a previous run wrote for this workdir, if measured with these settings after the
  workdir's latest checkpoint; else None."""
  from mla_jax.storage.workdir import Workdir

  if not os.path.isfile(path):
    return None
  wd = Workdir.open(wd_path)
  ckpt = os.path.join(wd.checkpoint_dir, str(wd.resolve_step("latest")))
  if os.path.getmtime(path) <= os.path.getmtime(ckpt):
    return None
  with open(path) as f:
    saved = json.load(f)
  return saved["rows"] if saved.get("settings") == settings else None


def _workdir_rows(wd_path, policies, ratios, quants, compose, windows, passkey_lengths,
                  passkey_trials, say) -> list[dict]:
  """One trained workdir's points: its own cache, then every policy x ratio x quantisation."""
  from mla_jax.evaluation.workdir_eval import load_val, parse_data
  from mla_jax.storage.workdir import Workdir

  # Each workdir compiles its own decode programs (~20 per policy grid); kept alive, a sweep's
  # executables exhausted LLVM's code memory ("Cannot allocate memory", then a segfault).
  jax.clear_caches()
  wd = Workdir.open(wd_path)
  run = os.path.basename(wd_path)
  model = wd.load_model("latest")
  cfg, tok = model.cfg, wd.tokenizer()
  seq_len = wd.config["data"]["seq_len"]
  val, bpt, _ = load_val(wd, parse_data(None, wd.config))
  if cfg.attention == "yoco" or cfg.dmc:  # compressed by design: one point, its own cache
    p = evaluate.own_cache_bpb(model, val, bpt, seq_len, windows, seq_len // 2)
    say(f"its own (trained-in) cache: bpb {p['bpb']:.4f}, {p['bytes_per_token']:.0f} B/token "
        f"over the {p['prefix']}-token prefix")
    return [{"run": run, "variant": "dmc" if cfg.dmc else cfg.attention, "policy": "none",
             "quant": "none", "ratio": 0.0, "budget": 0, "trained_in": True,
             **{k: v for k, v in p.items() if k not in ("prefix", "scored", "windows")}}]
  lengths = tuple(min(n, cfg.max_seq_len) for n in passkey_lengths)

  def point(policy: Policy, ratio: float) -> dict:
    p = evaluate.prefix_bpb(model, val, bpt, policy, seq_len, windows, seq_len // 2)
    row = {"run": run, "variant": cfg.attention, "policy": policy.name, "quant": policy.quant,
           "ratio": ratio, "budget": policy.budget, "bpb": p["bpb"]}
    if policy.name == "none" and policy.quant == "none":  # the trained-in cache, as stored
      row["bytes_per_token"] = float(kv_cache_bytes_per_token(cfg))
    else:
      row["bytes_per_token"] = evaluate.effective_bytes_per_token(
          cfg, policy, seq_len - seq_len // 2)["total"]
    for length in lengths:
      budget = policy.budget and max(policy.sinks + policy.recent, round((1 - ratio) * length))
      pk = validate(dataclasses.replace(policy, budget=budget), length)
      row[f"passkey@{length}"] = evaluate.passkey(model, tok, pk, length, passkey_trials)[
          "accuracy"]
    say(f"{policy.name} {policy.quant} evict {ratio:g}: bpb {row['bpb']:.4f}, "
        f"{row['bytes_per_token']:.0f} B/token")
    return row

  rows = [point(validate(Policy(), seq_len), 0.0)]
  for name, ratio, _quant, policy in plan_points(seq_len, policies, ratios, quants, compose)[0]:
    if name == "fastgen":
      policy = dataclasses.replace(policy, punct_ids=evaluate.punct_ids(tok))
    rows.append(point(policy, ratio))
  return rows


def pareto(points: list[tuple[float, float]]) -> list[int]:
  """Indices of the points no other point beats on both x and y (lower is better), by x."""
  order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
  front, best = [], float("inf")
  for i in order:
    if points[i][1] < best:
      front.append(i)
      best = points[i][1]
  return front


def write_report(result: dict, out: str, passkey_lengths=()) -> None:
  rows = result["rows"]
  base = {r["run"]: r for r in rows if r["policy"] == "none" and r["quant"] == "none"}
  front = set(pareto([(r["bytes_per_token"], r["bpb"]) for r in rows]))
  keys = [f"passkey@{n}" for n in passkey_lengths]
  lines = ["# KV-cache compression sweep: trained-in (MLA, GQA, MQA, YOCO, DMC) and inference-time",
           "",
           f"Models: every trained workdir under `{result['runs_dir']}`. bpb: "
           f"{result['windows']} validation windows of the training seq_len, first half "
           "prefilled into the compressed cache, second half scored "
           "(`mla_jax/kvcompress/evaluate.py: prefix_bpb`). Bytes per token: the model's own "
           "cache for the uncompressed rows; otherwise everything the budget cache holds "
           "(values, scales, full-precision ring, bookkeeping) over the compressed prefix's "
           "tokens. * = on the Pareto front of bpb against bytes.", "",
           "| run | variant | policy | quant | evicted | budget | bytes/token | bpb | vs own "
           "uncompressed |" + "".join(f" {k} |" for k in keys),
           "|---|---|---|---|---|---|---|---|---|" + "---|" * len(keys)]
  for i, r in enumerate(rows):
    delta = r["bpb"] - base[r["run"]]["bpb"]
    lines.append(f"| {r['run']} | {r['variant']} | {r['policy']} | {r['quant']} | {r['ratio']:g} "
                 f"| {r['budget'] or '-'} | {r['bytes_per_token']:.0f}{' *' if i in front else ''}"
                 f" | {r['bpb']:.4f} | {delta:+.4f} |"
                 + "".join(" - |" if k not in r else f" {r[k]:.2f} |" for k in keys))
  designed = [r for r in rows if r.get("trained_in")]
  if designed:
    lines += ["", "Trained-in designs beyond MLA (YOCO, DMC: docs/trained_in.md) are one point "
              "each, scored through their own cache on the same windows "
              "(`evaluate.own_cache_bpb`; no passkey: `-`). Their bytes per token are over the "
              "prefix: YOCO's global cache plus its constant window rings; DMC's slots in use "
              "(its fixed-shape buffers allocate the source model's bytes, below)."]
    lines += [f"- {r['run']}: {r['compression']:.2f}x compression, "
              f"{r['bytes_per_token']:.0f} B/token used, {r['allocated_bytes_per_token']:.0f} "
              "allocated" for r in designed if "compression" in r]
  if result.get("skipped"):
    lines += ["", "Skipped (the budget cannot hold the policy's sinks and recent window at this "
              "training window; not measured):"]
    lines += [f"- {point_name(p['run'], p)} (budget {p['budget']} slots): {p['reason']}"
              for p in result["skipped"]]
  lines += ["", f"{len(rows)} points; this command took {result['seconds']:.0f} s"
            + (f" and measured {result['workdirs_measured']} of the {result['workdirs']} models "
               "(the others' rows were reused from rows/)" if "workdirs" in result else "")
            + ".", ""]
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write("\n".join(lines))
  plot(rows, os.path.join(out, "pareto_bpb.png"), "bpb", "validation bits per byte")
  for k in keys:
    plot(rows, os.path.join(out, f"pareto_{k.replace('@', '_')}.png"), k, f"{k} accuracy",
         lower_is_better=False)


def plot(rows: list[dict], path: str, key: str, ylabel: str, lower_is_better=True) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 5.5))
  colors = {}
  markers = {"none": "o", "int8": "s", "int4": "^"}
  rows = [r for r in rows if key in r]  # trained-in designs have no passkey score
  for r in rows:
    if r["policy"] == "none" and r["quant"] == "none":
      ax.scatter(r["bytes_per_token"], r[key], s=90, marker="P" if r.get("trained_in") else "*",
                 color="purple" if r.get("trained_in") else "black", zorder=3)
      ax.annotate(f"{r['run']} ({r['variant']})", (r["bytes_per_token"], r[key]), fontsize=7,
                  xytext=(4, 4), textcoords="offset points")
  groups: dict = {}
  for r in rows:
    if not (r["policy"] == "none" and r["quant"] == "none"):
      groups.setdefault((r["run"], r["policy"], r["quant"]), []).append(r)
  for (_, policy, q), pts in groups.items():
    color = colors.setdefault(policy, f"C{len(colors)}")
    pts = sorted(pts, key=lambda r: r["bytes_per_token"])
    ax.plot([r["bytes_per_token"] for r in pts], [r[key] for r in pts], marker=markers[q],
            color=color, alpha=.7, lw=1, ms=4)
  for policy, color in colors.items():
    ax.plot([], [], color=color, label=policy)
  for q, m in markers.items():
    ax.plot([], [], ls="", marker=m, color="gray", label=f"quant {q}")
  ax.scatter([], [], marker="*", color="black", label="trained-in (uncompressed)")
  if any(r.get("trained_in") for r in rows):
    ax.scatter([], [], marker="P", color="purple", label="YOCO / DMC (own cache)")
  pts = [(r["bytes_per_token"], r[key] if lower_is_better else -r[key]) for r in rows]
  front = pareto(pts)
  ax.step([rows[i]["bytes_per_token"] for i in front], [rows[i][key] for i in front],
          where="post", color="red", lw=1.5, alpha=.5, label="Pareto front")
  ax.set_xscale("log")
  ax.set_xlabel("effective KV-cache bytes per token (all layers)")
  ax.set_ylabel(ylabel)
  ax.legend(fontsize=7)
  ax.grid(alpha=.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
