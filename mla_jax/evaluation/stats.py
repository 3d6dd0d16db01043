"""The statistics a comparison report states: the best learning rate of a tuning grid, the mean and
standard deviation over seeds, and whether a difference between two variants exceeds seed noise.

Conventions (so a reader can recompute every statement):
  std            the sample standard deviation (n - 1 in the denominator); 0 for one seed.
  seed spread    of a pair: std_a + std_b.
  exceeds        |mean_a - mean_b| > std_a + std_b. With one seed on either side the spread is
                 unknown and the statement says so instead of claiming anything.
"""

from __future__ import annotations

import math
import statistics
from typing import Mapping, Sequence


def best_lr(losses: Mapping[float, float | None]) -> float:
  """The learning rate with the lowest validation loss; a run that diverged (None / non-finite)
  never wins. Ties go to the smaller rate (the safer one)."""
  finite = {lr: v for lr, v in losses.items() if v is not None and math.isfinite(v)}
  if not finite:
    raise ValueError(f"lr_grid: every learning rate diverged ({sorted(losses)})")
  return min(finite, key=lambda lr: (finite[lr], lr))


def on_grid_edge(lr: float, grid: Sequence[float]) -> bool:
  """True when the best rate is the grid's smallest or largest: the optimum may lie outside."""
  return lr in (min(grid), max(grid))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  values = list(values)
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def compare(name_a: str, a: Sequence[float], name_b: str, b: Sequence[float]) -> dict:
  """Mean difference of a - b (bits per byte, lower is better), in absolute and relative terms,
  and whether it exceeds the seed spread; `text` says it in one sentence."""
  mean_a, std_a = mean_std(a)
  mean_b, std_b = mean_std(b)
  diff = mean_a - mean_b
  spread = std_a + std_b
  known = len(a) > 1 and len(b) > 1
  exceeds = known and abs(diff) > spread
  better = name_a if diff < 0 else name_b
  if not known:
    verdict = "seed spread unknown (one seed)"
  elif exceeds:
    verdict = f"{better} is better beyond the seed spread ({spread:.4f})"
  else:
    verdict = f"within the seed spread ({spread:.4f}): no winner at this budget"
  return {"a": name_a, "b": name_b, "mean_a": mean_a, "std_a": std_a, "mean_b": mean_b,
          "std_b": std_b, "diff": diff, "rel_diff": diff / mean_b, "spread": spread,
          "exceeds_spread": exceeds,
          "text": (f"{name_a} {mean_a:.4f} +- {std_a:.4f} vs {name_b} {mean_b:.4f} +- {std_b:.4f}:"
                   f" {diff:+.4f} bpb ({100 * diff / mean_b:+.2f}%), {verdict}")}
