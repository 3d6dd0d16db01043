"""The MHA2MLA experiment (issue 12, section 3): convert trained MHA / GQA workdirs at two cache
sizes, fine-tune briefly, and score each stage beside MLAs of the same cache trained from scratch.

    rows = run(sources={"mha": "runs/sweep_cpu/mha", "gqa2": ...}, runs_dir="runs/mha2mla")

For every source: its bits per byte; then for each planned conversion (`plan`: rope dims R and
latent rank C chosen so that C + G * R, the cached elements per layer with one rope key per KV
head, is ~25% or ~12.5% of MHA's 2 * H * K) the bpb right after conversion and after fine-tuning
on `finetune_fraction` of the source's pretraining tokens (train.init_from), plus decode speed of
the source and of the converted model (absorbed path) at the same context. Every stage is a
workdir under runs_dir, so a rerun skips what is done.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

from mla_jax.core.config import ModelConfig


def default_plan(cfg: ModelConfig, mha_elements: int) -> list[dict[str, Any]]:
  """Conversions of a source: at ~25% of MHA's cache every rope strategy, at ~12.5% 2norm.

  For each target T elements per layer: the largest R (even, <= K/2) whose rope keys take at most
  half of T, and C = T - G * R. Half, because on the CPU sweep's models dropping RoPE dims costs
  far more than the low rank: MHA at 25%, before fine-tuning, R=4/C=32 scored 4.12 bpb and
  R=8/C=16 3.47 (source 3.02), while all 24 rope dims at C=32 (over budget) lost only 0.2%.
  """
  g, k = cfg.kv_heads, cfg.qk_head_dim
  plan = []
  for share, strategies in ((0.25, ("high", "low", "uniform", "2norm")), (0.125, ("2norm",))):
    target = int(round(mha_elements * share))
    r = max(2, min(k // 2, (target // 2) // g) // 2 * 2)
    c = target - g * r
    if c < 2:
      continue
    for s in strategies:
      plan.append({"share": share, "rope_dims": r, "kv_rank": c, "strategy": s})
  return plan


def _decode_ms(result: dict, impl: str | None = None) -> float | None:
  """ms/token at the longest timed context, from evaluate_workdir's 'decode' section."""
  decode = result.get("decode") or {}
  if not decode:
    return None
  points = decode.get(impl) if impl in decode else next(iter(decode.values()))
  return points[-1]["ms_per_token"] if points else None


def run(sources: dict[str, str], runs_dir: str, *, finetune_fraction: float = 0.05,
        finetune_lr: float = 1e-3, eval_tokens: int = 0, decode_lengths: str = "256",
        decode_steps: int = 16, scratch: dict[str, str] | None = None,
        plan_fn: Callable = default_plan, say: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs (or resumes) the experiment; returns {'rows': [...], 'scratch': [...], 'sources': ...}."""
  from mla_jax.core.config import kv_cache_bytes_per_token
  from mla_jax.evaluation.workdir_eval import evaluate_workdir
  from mla_jax.interop import mha2mla
  from mla_jax.storage.workdir import Workdir
  from mla_jax.training import trainer

  os.makedirs(runs_dir, exist_ok=True)
  cache: dict[str, dict] = {}

  def evaluate(path: str) -> dict:
    if path not in cache:
      note = os.path.join(path, "mha2mla_eval.json")
      if os.path.isfile(note):
        with open(note) as f:
          cache[path] = json.load(f)
      else:
        say(f"evaluating {path}")
        cache[path] = evaluate_workdir(path, None, eval_tokens, "latest", decode_lengths,
                                       decode_steps)
        with open(note, "w") as f:
          json.dump(cache[path], f, indent=1)
    return cache[path]

  out = {"rows": [], "scratch": [], "sources": {}}
  for name, path in sources.items():
    wd = Workdir.open(path)
    cfg = wd.model_config
    mha_elements = 2 * cfg.n_heads * cfg.qk_head_dim  # per layer: the MHA reference
    src = evaluate(path)
    t, d = wd.config["train"], wd.config["data"]
    pretrain_tokens = t["steps"] * t["global_batch"] * d["seq_len"]
    step_tokens = t["global_batch"] * d["seq_len"]
    ft_steps = max(1, int(finetune_fraction * pretrain_tokens) // step_tokens)
    # Names, not paths: results files are committed (docs/results) and must not hold local paths.
    out["sources"][name] = {"workdir": os.path.basename(os.path.normpath(path)),
                            "attention": cfg.attention, "kv_heads": cfg.kv_heads,
                            "val_bpb": src["val_bpb"], "kv_bytes": kv_cache_bytes_per_token(cfg),
                            "decode_ms": _decode_ms(src), "pretrain_tokens": pretrain_tokens}
    for p in plan_fn(cfg, mha_elements):
      tag = f"{name}_r{p['rope_dims']}_c{p['kv_rank']}_{p['strategy']}"
      conv, ft = os.path.join(runs_dir, tag), os.path.join(runs_dir, tag + "_ft")
      started = time.perf_counter()
      if not Workdir.exists(conv):
        say(f"converting {name} -> {tag}")
        mha2mla.convert(path, conv, p["rope_dims"], p["kv_rank"], p["strategy"])
      after = evaluate(conv)
      config = json.loads(json.dumps(wd.config))
      config.pop("origin", None)
      config["train"].update(init_from=conv, steps=ft_steps, eval_every=ft_steps,
                             ckpt_every=ft_steps, log_every=max(1, ft_steps // 4),
                             final_eval_tokens=eval_tokens, log_health=False)
      config["optim"].update(lr=finetune_lr, warmup_steps=min(ft_steps - 1, max(1, ft_steps // 10)))
      if not (Workdir.exists(ft) and Workdir.open(ft).finished):
        say(f"fine-tuning {tag}: {ft_steps} steps ({ft_steps * t['global_batch'] * d['seq_len']:,}"
            f" tokens, {100 * finetune_fraction:g}% of {pretrain_tokens:,})")
        trainer.train(config, ft)
      tuned = evaluate(ft)
      new_cfg = Workdir.open(conv).model_config
      bytes_ = kv_cache_bytes_per_token(new_cfg)
      out["rows"].append({
          "source": name, "name": tag, **p, "rope_keys": new_cfg.mla_rope_kv_heads,
          "kv_bytes": bytes_, "cache_share_of_mha": bytes_ / (mha_elements * cfg.n_layers * 4),
          "bpb_source": src["val_bpb"], "bpb_converted": after["val_bpb"],
          "bpb_finetuned": tuned["val_bpb"],
          "finetune_gap": tuned["val_bpb"] / src["val_bpb"] - 1,
          "finetune_tokens": ft_steps * t["global_batch"] * d["seq_len"],
          "decode_ms_source": _decode_ms(src), "decode_ms_converted": _decode_ms(tuned, "absorbed"),
          "seconds": time.perf_counter() - started})
  for name, path in (scratch or {}).items():
    r = evaluate(path)
    out["scratch"].append({"name": name, "kv_bytes": r["kv_bytes_per_token"],
                           "val_bpb": r["val_bpb"], "decode_ms": _decode_ms(r, "absorbed")})
  return out


def table(result: dict[str, Any]) -> str:
  """Markdown table of a run() result."""
  lines = ["| source | R x keys | C | strategy | cache (% of MHA) | bpb source | converted | "
           "fine-tuned | gap | decode ms/token src -> conv |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    dec = (f"{r['decode_ms_source']:.2f} -> {r['decode_ms_converted']:.2f}"
           if r["decode_ms_source"] and r["decode_ms_converted"] else "-")
    lines.append(f"| {r['source']} | {r['rope_dims']} x {r['rope_keys']} | {r['kv_rank']} | "
                 f"{r['strategy']} | {100 * r['cache_share_of_mha']:.1f}% | "
                 f"{r['bpb_source']:.4f} | "
                 f"{r['bpb_converted']:.4f} | {r['bpb_finetuned']:.4f} | "
                 f"{100 * r['finetune_gap']:+.2f}% | {dec} |")
  for s in result["scratch"]:
    lines.append(f"| {s['name']} (MLA from scratch) | - | - | - | {s['kv_bytes']} B/token | - "
                 f"| - | "
                 f"{s['val_bpb']:.4f} | - | "
                 f"{'-' if s['decode_ms'] is None else format(s['decode_ms'], '.2f')} |")
  return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
  """bpb against KV-cache bytes per token: sources, converted (before and after fine-tuning),
  MLAs from scratch; the Pareto view of the comparison report."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, s in result["sources"].items():
    ax.scatter(s["kv_bytes"], s["val_bpb"], marker="s", s=60, label=f"{name} (source)")
  rows = result["rows"]
  ax.scatter([r["kv_bytes"] for r in rows], [r["bpb_converted"] for r in rows], marker="x",
             c="grey", label="converted, no fine-tuning")
  ax.scatter([r["kv_bytes"] for r in rows], [r["bpb_finetuned"] for r in rows], marker="o",
             label="converted + fine-tuned")
  if result["scratch"]:
    ax.scatter([s["kv_bytes"] for s in result["scratch"]],
               [s["val_bpb"] for s in result["scratch"]], marker="^", s=60,
               label="MLA from scratch")
  ax.set_xscale("log")
  ax.set_xlabel("KV cache bytes per token (all layers)")
  ax.set_ylabel("validation bits per byte")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
