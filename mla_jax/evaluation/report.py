"""Comparison report of a sweep: results.json, report.md and its plots (evaluation/plots.py).

`write_report(sweep, runs, results, out, runs_dir, command)` is what scripts/compare.py calls:
`runs` are its expanded runs ({name, variant, seed, ...}), `results` eval.py's dict per run name.
Everything the plots need is copied into results.json, so `render(json.load(...), out)` redraws
them from that file alone.
"""

from __future__ import annotations

import json
import os

from mla_jax.evaluation import stats as stats_lib
from mla_jax.evaluation.plots import (
  PLOTS,
  plot_curves,
  plot_decode,
  plot_lr,
  plot_pareto,
  plot_position,
)
from mla_jax.storage.workdir import read_metrics

# Data -------------------------------------------------------------------------------------------


def read_curve(workdir: str) -> list[list[float]]:
  """[[tokens, val_loss], ...] from a workdir's metrics.jsonl (evaluation records only)."""
  return [[r["tokens"], r["val_loss"]] for r in read_metrics(workdir)
          if "val_loss" in r and "tokens" in r]


def dims(r: dict) -> str:
  a = r["attention"]
  if a["variant"] == "mla":
    return (f"C={a['kv_lora_rank']} R={a['qk_rope_head_dim']} Q={a['q_lora_rank']} "
            f"N={a['qk_nope_head_dim']} E={a['v_head_dim']}")
  return f"G={a['n_kv_heads']} K={a['head_dim']}"


def collect(sweep, runs, results: dict, runs_dir: str, command: str,
            train_seconds: dict | None = None, lr_table: dict | None = None,
            wall: dict | None = None) -> dict:
  """The results.json document: setup, one entry per run, seed statistics per variant, the
  learning-rate tuning table and the pairwise comparisons (evaluation.stats conventions)."""
  ref_name = sweep.get("reference", runs[0]["name"])
  if ref_name not in results:  # e.g. compare.py --only without the reference run
    ref_name = runs[0]["name"]
  ref = results[ref_name]
  out_runs = {}
  for run in runs:
    r = dict(results[run["name"]])
    workdir = run.get("workdir") or os.path.join(runs_dir, run["name"])
    # A run kept from an earlier report (sweep.keep_earlier) brings its curve; its workdir is gone.
    curve = r["curve"] if "curve" in r and not os.path.isdir(workdir) else read_curve(workdir)
    r.update(variant=run["variant"], seed=run["seed"], lr=run.get("lr"), dims=dims(r),
             cache_pct_of_reference=100 * r["kv_bytes_per_token"] / ref["kv_bytes_per_token"],
             curve=curve,
             train_seconds=(train_seconds or {}).get(run["name"]))
    out_runs[run["name"]] = r
  variants = {}
  for name, r in out_runs.items():
    variants.setdefault(r["variant"], []).append(name)
  stats = {}
  for v, names in variants.items():
    bpb = [out_runs[n]["val_bpb"] for n in names]
    mean, std = stats_lib.mean_std(bpb)
    stats[v] = {"runs": names, "seeds": [out_runs[n]["seed"] for n in names],
                "lr": out_runs[names[0]]["lr"],
                "val_bpb_mean": mean, "val_bpb_std": std, "val_bpb_min": min(bpb),
                "val_bpb_max": max(bpb), "val_bpb_spread": max(bpb) - min(bpb),
                "kv_bytes_per_token": out_runs[names[0]]["kv_bytes_per_token"],
                "attention": out_runs[names[0]]["attention"]["variant"]}
  first = out_runs[runs[0]["name"]]
  setup = {
      "sweep": sweep.name, "reference": ref_name, "command": command,
      "tokens_per_run": sorted({r["tokens_trained"] for r in out_runs.values()}),
      "steps": sorted({r["train_steps"] for r in out_runs.values()}),
      "data": {k: first["data"][k] for k in ("source", "path", "seq_len", "bytes_per_token",
                                             "val_tokens_total", "val_bytes", "max_tokens")},
      "model": {k: first["model"][k] for k in ("d_model", "n_layers", "n_heads", "vocab_size",
                                               "max_seq_len", "dtype", "cache_dtype")},
      "device": first.get("device"),
      "code": code_version(),  # at report time: timings re-taken then, training possibly earlier
      "seeds": {v: s["seeds"] for v, s in stats.items()},
      "wall": wall,  # this invocation of the sweep: jobs, seconds per phase, runs it trained
  }
  tuning = {v: {"grid": {repr(lr): b for lr, b in e["grid"].items()}, "chosen": e["chosen"],
               "on_edge": e["on_edge"]} for v, e in (lr_table or {}).items()}
  return {"setup": setup, "runs": out_runs, "variants": stats, "tuning": tuning,
          "comparisons": comparisons(out_runs, stats, runs[0]["variant"] if ref_name not in
                                     out_runs else out_runs[ref_name]["variant"])}


def comparisons(runs: dict, stats: dict, reference: str) -> list[dict]:
  """The pairs a reader asks about: every variant against the reference (MHA), and every MLA
  variant against each non-MLA baseline with the same cache bytes per token."""
  values = {v: [runs[n]["val_bpb"] for n in s["runs"]] for v, s in stats.items()}
  pairs = [(v, reference) for v in stats if v != reference]
  for m, sm in stats.items():
    for b, sb in stats.items():
      if (sm["attention"] == "mla" and sb["attention"] != "mla"
          and sm["kv_bytes_per_token"] == sb["kv_bytes_per_token"]):
        pairs.append((m, b))
  return [{"kind": "vs reference" if b == reference else "equal cache",
           **stats_lib.compare(a, values[a], b, values[b])} for a, b in pairs]


def wall_line(wall: dict | None) -> str:
  """The sweep's wall time as one Setup bullet."""
  if not wall:
    return "- Wall time: not recorded."
  p = wall["phases"]
  if wall.get("existing_workdirs"):  # compare_runs: nothing trained
    return (f"- Wall time of the command that wrote this report: {wall['seconds'] / 60:.1f} min "
            f"(evaluation {p['final'] / 60:.1f}, decode timing {p['decode'] / 60:.1f}); nothing "
            f"was trained: the {wall['runs']} runs are existing workdirs.")
  return (f"- Wall time of the command that wrote this report: {wall['seconds'] / 60:.1f} min, "
          f"{wall['jobs']} training process(es) at once (learning-rate tuning "
          f"{p['tuning'] / 60:.1f}, final runs + evaluation {p['final'] / 60:.1f}, decode timing "
          f"{p['decode'] / 60:.1f}); it trained {wall['runs_trained']} of the "
          f"{wall['runs']} runs, the others were finished already.")


def code_version() -> str:
  """git commit of the repository, '+ local changes' when mla_jax/ differs from it."""
  import subprocess

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                          text=True, timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "mla_jax"], cwd=root,
                           capture_output=True, text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  return (head or "unknown") + (" + local changes in mla_jax/" if dirty else "")


# Markdown ---------------------------------------------------------------------------------------


def _decode_cell(r: dict, context: int) -> str:
  cells = []
  for _impl, points in r["decode"].items():
    p = next((p for p in points if p["context"] == context), None)
    if p:
      cells.append(f"{p['ms_per_token']:.2f}")
  return " / ".join(cells) or "-"


def notes(doc: dict) -> list[str]:
  """A few facts read off the results: best variant, seed noise, MLA decode paths."""
  runs, stats = doc["runs"], doc["variants"]
  ref = doc["setup"]["reference"]
  ref_bytes = runs[ref]["kv_bytes_per_token"]
  best = min(stats, key=lambda v: stats[v]["val_bpb_mean"])
  out = [f"Lowest mean val bpb: {best} ({stats[best]['val_bpb_mean']:.4f}) with "
         f"{100 * stats[best]['kv_bytes_per_token'] / ref_bytes:.0f}% of {ref}'s cache."]
  spread = max((s["val_bpb_spread"] for s in stats.values() if len(s["runs"]) > 1), default=None)
  if spread is not None:
    out.append(f"Largest seed spread: {spread:.4f} bpb; differences between variants smaller than "
               "that are within seed noise at this budget.")
  for v, s in stats.items():
    decode = runs[s["runs"][0]]["decode"]
    if "absorbed" in decode and "naive" in decode and decode["absorbed"]:
      a, n = decode["absorbed"][-1], decode["naive"][-1]
      out.append(f"{v}: absorbed decode {a['ms_per_token']:.2f} ms/token vs naive "
                 f"{n['ms_per_token']:.2f} at context {a['context']} "
                 f"({n['ms_per_token'] / a['ms_per_token']:.1f}x).")
  return out


def markdown(doc: dict) -> str:
  setup, runs, stats = doc["setup"], doc["runs"], doc["variants"]
  ref = setup["reference"]
  contexts = sorted({p["context"] for r in runs.values() for ps in r["decode"].values()
                     for p in ps})
  shown = [c for c in (contexts[:1] + contexts[-1:]) if c] if contexts else []
  shown = sorted(set(shown))
  m, d = setup["model"], setup["data"]
  tokens = ", ".join(f"{t:,}" for t in setup["tokens_per_run"] if t)
  params = sorted(r["params"]["total"] for r in runs.values())
  timing = next(iter(runs.values())).get("decode_timing", "each run timed after its training")
  scored = next(iter(runs.values()))["val_tokens"]
  scored = (f"{scored:,} predicted tokens (every full window)" if not d.get("max_tokens")
            else f"{scored:,} predicted tokens (capped by max_tokens)")
  lines = [
      (f"# Sweep `{setup['sweep']}`: KV cache vs quality and decode speed"
       if not (setup.get("wall") or {}).get("existing_workdirs") else
       "# Existing workdirs compared: KV cache vs quality and decode speed"), "",
      "## Setup", "",
      f"- Model: width D={m['d_model']}, {m['n_layers']} layers, {m['n_heads']} query heads, "
      f"vocab {m['vocab_size']}, max_seq_len {m['max_seq_len']}, compute {m['dtype']}, "
      f"cache {m['cache_dtype']}.",
      f"- Parameters: {params[0]:,} to {params[-1]:,} in total "
      f"({100 * (params[-1] / params[0] - 1):.1f}% apart; "
      + ("d_ff per run in the table)." if (setup.get("wall") or {}).get("existing_workdirs")
         else "matched through d_ff, see the table)."),
      f"- Training: {', '.join(map(str, setup['steps']))} steps, {tokens} tokens per run; "
      f"seeds {json.dumps(setup['seeds'])}.",
      f"- Data: `{d['source']}{':' + d['path'] if d['path'] else ''}`, window {d['seq_len']} "
      f"tokens, {d['bytes_per_token']:.3f} bytes/token; validation: {scored} of the held-out "
      f"split's {d['val_tokens_total']:,} tokens ({d['val_bytes']:,} bytes) scored in "
      "deterministic full windows, token-weighted.",
      f"- Decode timing: batch 1, median of timed `decode_step_jit` steps with a cache of the "
      f"given length, on `{setup.get('device')}` ({timing}); MLA cells read absorbed / naive "
      "path (same weights). tokens/s = 1000 / ms. Compare timings within one sweep only.",
      f"- Code: `{setup.get('code', 'unknown')}` when this report was written.",
      wall_line(setup.get("wall")),
      "",
      "## Results", "",
      "| run | attention | dims | d_ff | params | val bpb | val loss | KV B/token "
      f"| cache % of {ref} | cache @ max (MiB) | "
      + " | ".join(f"decode ms/token @{c}" for c in shown) + " |",
      "|---" * (10 + len(shown)) + "|",
  ]
  order = sorted(runs, key=lambda n: (-runs[n]["kv_bytes_per_token"], runs[n]["variant"], n))
  for n in order:
    r = runs[n]
    cache = r["kv_cache_bytes_at_max"]
    lines.append(
        f"| {n} | {r['attention']['variant']} | {r['dims']} | {r['model']['d_ff']} | "
        f"{r['params']['total']:,} | {r['val_bpb']:.4f} | {r['val_loss']:.4f} | "
        f"{r['kv_bytes_per_token']:,} | {r['cache_pct_of_reference']:.1f}% | "
        f"{cache['bytes'] / 2**20:.1f} | " + " | ".join(_decode_cell(r, c) for c in shown) + " |")
  lines += ["", f"Cache @ max: bytes for max_seq_len x train batch "
            f"({next(iter(runs.values()))['kv_cache_bytes_at_max']['max_seq_len']} x "
            f"{next(iter(runs.values()))['kv_cache_bytes_at_max']['batch']}). "
            "Measured cache bytes/token (from a filled cache) equal the analytic ones for every "
            "run: " + ("yes" if all(r["kv_bytes_per_token"] == r["kv_bytes_per_token_measured"]
                                    for r in runs.values()) else "**NO**") + ".", ""]
  multi = {v: s for v, s in stats.items() if len(s["runs"]) > 1}
  if multi:
    lines += ["### Seeds", "", "| variant | seeds | val bpb (each) | mean | std | max - min |",
              "|---|---|---|---|---|---|"]
    for v, s in multi.items():
      each = ", ".join(f"{runs[n]['val_bpb']:.4f}" for n in s["runs"])
      lines.append(f"| {v} | {', '.join(map(str, s['seeds']))} | {each} | "
                   f"{s['val_bpb_mean']:.4f} | {s.get('val_bpb_std', 0.0):.4f} | "
                   f"{s['val_bpb_spread']:.4f} |")
    lines.append("")
  tuning = doc.get("tuning") or {}
  if tuning:
    grid = sorted({float(lr) for e in tuning.values() for lr in e["grid"]})
    lines += ["### Learning-rate tuning", "",
              "Each variant trained at every rate on the tuning budget (seed 0); its final runs "
              "use the rate with the lowest validation bpb (`-`: diverged).", "",
              "| variant | " + " | ".join(f"lr {lr:g}" for lr in grid) + " | chosen |",
              "|---" * (len(grid) + 2) + "|"]
    for v, e in tuning.items():
      by = {float(k): b for k, b in e["grid"].items()}
      cells = [("-" if by.get(lr) is None else f"{by[lr]:.4f}") for lr in grid]
      lines.append(f"| {v} | " + " | ".join(cells) + f" | {float(e['chosen']):g}"
                   + (" (grid edge)" if e["on_edge"] else "") + " |")
    lines.append("")
  if doc.get("comparisons"):
    lines += ["### Differences against seed noise", "",
              "Difference of mean val bpb (negative: the first is better); it exceeds the seed "
              "spread when |difference| > std_a + std_b (sample std over seeds).", "",
              "| pair | kind | difference | relative | seed spread | exceeds |",
              "|---|---|---|---|---|---|"]
    for c in doc["comparisons"]:
      lines.append(f"| {c['a']} vs {c['b']} | {c['kind']} | {c['diff']:+.4f} | "
                   f"{100 * c['rel_diff']:+.2f}% | {c['spread']:.4f} | "
                   f"{'yes' if c['exceeds_spread'] else 'no'} |")
    lines.append("")
  lines += ["### Variant means (bpb) against the reference", "",
            f"| variant | KV B/token | cache % of {ref} | mean val bpb | vs {ref} |",
            "|---|---|---|---|---|"]
  ref_bpb = stats[runs[ref]["variant"]]["val_bpb_mean"]
  for v, s in sorted(stats.items(), key=lambda kv: -kv[1]["kv_bytes_per_token"]):
    lines.append(f"| {v} | {s['kv_bytes_per_token']:,} | "
                 f"{100 * s['kv_bytes_per_token'] / runs[ref]['kv_bytes_per_token']:.1f}% | "
                 f"{s['val_bpb_mean']:.4f} | {100 * (s['val_bpb_mean'] / ref_bpb - 1):+.2f}% |")
  lines += ["", "### Read-outs (computed from the numbers above)", ""]
  lines += [f"- {n}" for n in notes(doc)]
  lines += ["", "## Figures", ""]
  captions = {"pareto": "Validation bits per byte vs KV cache bytes per token",
              "lr": "Validation bits per byte vs learning rate (tuning phase)",
              "curves": "Training curves (validation loss vs tokens)",
              "decode": "Decode ms per token vs context length",
              "position": "Loss by context position"}
  for key, file in PLOTS.items():
    lines += [f"![{captions[key]}]({file})", ""]
  lines += ["## Reproduce", "", "```bash", setup["command"], "```", ""]
  return "\n".join(lines)


def render(doc: dict, out: str) -> list[str]:
  """Writes the plots and report.md for a results.json document; returns the paths."""
  os.makedirs(out, exist_ok=True)
  paths = []
  for key, fn in (("pareto", plot_pareto), ("curves", plot_curves), ("decode", plot_decode),
                  ("position", plot_position), ("lr", plot_lr)):
    paths.append(os.path.join(out, PLOTS[key]))
    fn(doc, paths[-1])
  paths.append(os.path.join(out, "report.md"))
  with open(paths[-1], "w") as f:
    f.write(markdown(doc))
  return paths


def write_report(sweep, runs, results: dict, out: str, runs_dir: str, command: str,
                 train_seconds: dict | None = None, lr_table: dict | None = None,
                 wall: dict | None = None) -> list[str]:
  doc = collect(sweep, runs, results, runs_dir, command, train_seconds, lr_table, wall)
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "results.json")
  with open(path, "w") as f:
    json.dump(doc, f, indent=1)
  return [path] + render(doc, out)


