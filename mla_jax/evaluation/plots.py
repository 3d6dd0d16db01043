"""The plots of a sweep report (from its results.json document alone) and one run's
curves.png (from its metrics.jsonl)."""

from __future__ import annotations

import math
import os
import statistics

import matplotlib
from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

from mla_jax.storage.workdir import read_metrics

PLOTS = {"pareto": "bpb_vs_kv_bytes.png", "curves": "training_curves.png",
         "decode": "decode_ms_per_token.png", "position": "loss_by_position.png",
         "lr": "bpb_vs_lr.png"}


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
  """Indices of the points no other point beats on both coordinates (both minimised), by x."""
  keep = [i for i, (x, y) in enumerate(points)
          if not any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for x2, y2 in points)]
  return sorted(keep, key=lambda i: points[i])


def _colors(variants: list[str]) -> dict[str, tuple]:
  cmap = matplotlib.colormaps["tab10"]
  return {v: cmap(i % 10) for i, v in enumerate(variants)}


def plot_pareto(doc: dict, path: str) -> None:
  runs, stats = doc["runs"], doc["variants"]
  colors = _colors(list(stats))
  fig = Figure(figsize=(7, 4.8))
  ax = fig.subplots()
  for _name, r in runs.items():
    ax.scatter(r["kv_bytes_per_token"], r["val_bpb"], color=colors[r["variant"]], s=28, alpha=0.6,
               zorder=3)
  names = list(stats)
  means = [(stats[v]["kv_bytes_per_token"], stats[v]["val_bpb_mean"]) for v in names]
  for v, (x, y) in zip(names, means):
    ax.scatter(x, y, color=colors[v], marker="D", s=60, edgecolor="black", zorder=4, label=v)
    if len(stats[v]["runs"]) > 1:
      ax.errorbar(x, y, yerr=stats[v].get("val_bpb_std", 0.0), color=colors[v], lw=2, capsize=4,
                  zorder=4)
  ax.set_xscale("log", base=2)
  # The frontier as a staircase: everything above and to the right of it is dominated.
  front = [means[i] for i in pareto_front(means)]
  right = max(x for x, _ in means) * 1.5
  xs, ys = [], []
  for i, (x, y) in enumerate(front):
    xs += [x, front[i + 1][0] if i + 1 < len(front) else right]
    ys += [y, y]
  ax.plot(xs, ys, "k--", lw=1, zorder=2, label="Pareto frontier (variant means)")
  ax.scatter(*zip(*front), s=160, facecolors="none", edgecolors="black", zorder=5)
  for v, (x, y) in zip(names, means):
    ax.annotate(v, (x, y), textcoords="offset points", xytext=(7, 4), fontsize=8)
  ax.set_xlim(min(x for x, _ in means) / 1.4, right)
  ax.set_xlabel("KV cache bytes per token (all layers)")
  ax.set_ylabel("validation bits per byte (lower is better)")
  ax.set_title("Quality vs KV cache size (dots: runs, diamonds: variant means, bars: +-1 std "
               "over seeds)", fontsize=9)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def plot_lr(doc: dict, path: str) -> None:
  """Validation bpb of the tuning runs against the learning rate, one line per variant."""
  tuning = doc.get("tuning") or {}
  fig = Figure(figsize=(7, 4.8))
  ax = fig.subplots()
  colors = _colors(list(doc["variants"]))
  for v, entry in tuning.items():
    points = sorted((float(lr), b) for lr, b in entry["grid"].items() if b is not None)
    if points:
      ax.plot(*zip(*points), marker="o", color=colors.get(v), label=v)
      best = float(entry["chosen"])
      ax.scatter([best], [dict(points)[best]], s=120, facecolors="none", edgecolors="black")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("peak learning rate")
  ax.set_ylabel("validation bits per byte (tuning budget)")
  ax.set_title("Learning-rate tuning (circled: the rate each variant's final runs use)",
               fontsize=9)
  if not tuning:
    ax.text(0.5, 0.5, "no tuning phase in this sweep", ha="center", transform=ax.transAxes)
  ax.grid(alpha=0.3, which="both")
  if tuning:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def plot_curves(doc: dict, path: str) -> None:
  runs = doc["runs"]
  colors = _colors(list(doc["variants"]))
  fig = Figure(figsize=(7, 4.8))
  ax = fig.subplots()
  tail = []
  for name, r in runs.items():
    if not r["curve"]:
      continue
    x, y = zip(*r["curve"])
    first = doc["variants"][r["variant"]]["runs"][0] == name
    ax.plot(x, y, color=colors[r["variant"]], ls="-" if first else "--", marker=".", label=name)
    tail += list(y[len(y) // 3:])
  if tail:  # zoom on the part of training where the variants separate
    lo, hi = min(tail), max(tail)
    ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.3 * (hi - lo + 1e-9))
  ax.set_xlabel("training tokens")
  ax.set_ylabel("validation loss (nats/token, in-training eval subset)")
  ax.set_title("Training curves (dashed: extra seeds)", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def plot_decode(doc: dict, path: str) -> None:
  runs, stats = doc["runs"], doc["variants"]
  colors = _colors(list(stats))
  fig = Figure(figsize=(7, 4.8))
  ax = fig.subplots()
  for v, s in stats.items():
    r = runs[s["runs"][0]]  # one run per variant: seeds share the architecture
    for impl, points in r["decode"].items():
      ax.plot([p["context"] for p in points], [p["ms_per_token"] for p in points],
              color=colors[v], ls="--" if impl == "naive" else "-", marker="o",
              label=v if impl == "standard" else f"{v} ({impl})")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("context length (cache slots)")
  ax.set_ylabel("decode ms per token (batch 1, median)")
  ax.set_title(f"Decode step time on {doc['setup'].get('device') or '?'} "
               "(MLA dashed: naive path)", fontsize=10)
  ax.grid(alpha=0.3, which="both")
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=8)
  else:  # decode not timed (compare.py --workdirs --decode_lengths='')
    ax.text(0.5, 0.5, "decode not timed", ha="center", transform=ax.transAxes)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def _bucketed(losses: list[float], n: int = 24) -> tuple[list[float], list[float]]:
  """Mean loss in ~n log-spaced position buckets (fine near the start, where loss falls fastest):
  (bucket centres as 1-based positions, means)."""
  t = len(losses)
  edges = sorted({0, t} | {min(t, round(t ** (i / n))) for i in range(n + 1)})
  xs = [math.sqrt(a + 1) * math.sqrt(b) for a, b in zip(edges[:-1], edges[1:])]  # geometric
  return xs, [statistics.fmean(losses[a:b]) for a, b in zip(edges[:-1], edges[1:])]


def plot_position(doc: dict, path: str) -> None:
  runs, stats = doc["runs"], doc["variants"]
  colors = _colors(list(stats))
  ref = doc["setup"]["reference"]
  _, ref_y = _bucketed(runs[ref]["loss_by_position"])
  fig = Figure(figsize=(11, 4.5))
  (ax, ax2) = fig.subplots(1, 2)
  for v, s in stats.items():
    curves = [_bucketed(runs[n]["loss_by_position"]) for n in s["runs"]]
    xs = curves[0][0]
    ys = [statistics.fmean(c[1][i] for c in curves) for i in range(len(xs))]
    ax.plot(xs, ys, color=colors[v], label=v)
    ax2.plot(xs, [y - r for y, r in zip(ys, ref_y)], color=colors[v], label=v)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("position in the window (tokens of context + 1)")
  ax.set_ylabel("validation loss (nats/token)")
  ax.set_title("Loss by context position (mean over seeds)", fontsize=10)
  ax2.axhline(0, color="black", lw=0.8)
  ax2.set_xscale("log", base=2)
  ax2.set_xlabel("position in the window (tokens of context + 1)")
  ax2.set_ylabel(f"loss minus {ref}'s (nats/token)")
  ax2.set_title(f"Difference to {ref} (< 0: better)", fontsize=10)
  for a in (ax, ax2):
    a.grid(alpha=0.3, which="both")
    a.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


# One run ----------------------------------------------------------------------------------------

RUN_PLOT = "curves.png"


def run_curves(records: list[dict]) -> dict:
  """What curves.png plots, from metrics.jsonl records: {'train': [(step, loss)], 'prefix':
  [(step, val_bpb)] of the periodic evals on a validation prefix, 'whole': [(step, val_bpb)] of
  the whole-split ones (the final eval, by default), 'prefix_tokens', 'whole_tokens'}."""
  out = {"train": [(r["step"], r["loss"]) for r in records if "loss" in r],
         "prefix": [], "whole": [], "prefix_tokens": None, "whole_tokens": None}
  for r in records:
    if "val_bpb" in r:
      kind = "whole" if r.get("val_whole_split") else "prefix"
      out[kind].append((r["step"], r["val_bpb"]))
      out[f"{kind}_tokens"] = r.get("val_tokens")
  return out


def write_run_plot(workdir: str) -> str | None:
  """workdir/curves.png from its metrics.jsonl: training loss and validation bits per byte
  against steps, the whole-split evaluations marked apart from the prefix ones (they score other
  text, so the last point is not on the same curve). Returns the path, or None when nothing was
  logged."""
  c = run_curves(read_metrics(workdir))
  if not c["train"] and not c["prefix"] and not c["whole"]:
    return None
  fig = Figure(figsize=(7, 4.2))
  ax = fig.subplots()
  handles = []
  if c["train"]:
    handles += ax.plot(*zip(*c["train"]), color="tab:blue", lw=1, label="train loss (nats/token)")
  ax.set_xlabel("step")
  ax.set_ylabel("train loss (nats/token)", color="tab:blue")
  if c["prefix"] or c["whole"]:
    ax2 = ax.twinx()
    if c["prefix"]:
      n = c["prefix_tokens"]
      handles += ax2.plot(*zip(*c["prefix"]), color="tab:red", marker="o", ms=3,
                          label=f"val bpb, first {n:,} tokens" if n else "val bpb, prefix")
    if c["whole"]:
      n = c["whole_tokens"]
      handles.append(ax2.scatter(*zip(*c["whole"]), color="black", marker="*", s=90, zorder=5,
                                 label=f"val bpb, whole split ({n:,} tokens)" if n else
                                 "val bpb, whole split"))
    ax2.set_ylabel("validation bits per byte", color="tab:red")
  ax.legend(handles=handles, fontsize=8, loc="upper right")
  ax.set_title(os.path.basename(os.path.normpath(workdir)), fontsize=10)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  path = os.path.join(workdir, RUN_PLOT)
  fig.savefig(path, dpi=110)
  return path
