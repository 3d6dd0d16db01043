r"""Training throughput and MFU: tokens/s of the whole loop (data loading included) and MFU.

  python scripts/bench_train.py --json=out/bench_train.json [--quick] [--text=PATH]

Runs, each through `trainer.train` exactly as train.py does:
  shakespeare_char   nanoGPT's CPU recipe (configs/shakespeare_char.py, MHA, chars, batch 12 x 64).
                     Full mode trains all 2000 steps and also reports the final validation loss
                     (nanoGPT: 1.88); quick mode trains 300 steps for the speed figure only.
  base_512           configs/lm.py:size=base (width 512, 8 layers, context 512): MFU here.
  125m_bf16          configs/lm.py:size=125m in bfloat16, only when an accelerator is present.
tokens/s is the median over the logging intervals after the first (which holds the compile);
MFU = tokens/s * analytic FLOPs per token (mla_jax/perf.py) / (measured matmul peak * devices).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile

if __name__ == "__main__":  # before anything runs: the same malloc settings as train.py
  from mla_jax import host_memory  # noqa: E402
  host_memory.configure_entry_point()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mla_jax.evaluation import perf  # noqa: E402
from mla_jax.experiment import load_config  # noqa: E402
from mla_jax.training import logger, trainer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TEXT = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt")


def run(name: str, spec: str, overrides: dict, peak: float, workroot: str) -> dict:
  workdir = os.path.join(workroot, name)
  summary = trainer.train(load_config(spec, {**overrides, "train.peak_flops": peak}), workdir)
  records = [r for r in logger.read_metrics(workdir) if "tokens_per_s" in r]
  steady = records[1:] or records
  tok_s = statistics.median(r["tokens_per_s"] for r in steady)
  cfg = summary["model"]
  seq_len = overrides.get("data.seq_len") or load_config(spec).data.seq_len
  batch = overrides.get("train.global_batch") or load_config(spec).train.global_batch
  flops = perf.train_flops_per_token(cfg, summary["params"]["total"], seq_len)
  final = summary["final"] or {}
  shown = {k: os.path.relpath(v, REPO) if k == "data.path" else v for k, v in overrides.items()}
  return {"name": name, "config": spec, "overrides": shown, "steps": summary["step"],
          "params": summary["params"]["total"], "tokens_per_s": tok_s,
          "step_ms": 1e3 * batch * seq_len / tok_s,
          "mfu": tok_s * flops / (peak * jax.device_count()), "peak_flops": peak,
          "val_loss": final.get("val_loss"), "device": jax.devices()[0].device_kind}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", required=True, help="where to write the JSON records")
  parser.add_argument("--quick", action="store_true", help="short runs (speed figures only)")
  parser.add_argument("--text", default=DEFAULT_TEXT, help="tiny Shakespeare text file")
  args = parser.parse_args()
  if not os.path.exists(args.text):
    sys.exit(f"error: --text: no such file {args.text}")
  accelerator = jax.default_backend() != "cpu"
  peak = perf.measure_peak_flops(jnp.bfloat16 if accelerator else jnp.float32,
                                 n=8192 if accelerator else 2048)
  print(f"measured matmul peak: {peak / 1e9:.1f} GFLOP/s on {jax.devices()[0].device_kind}")
  steps = 300 if args.quick else 2000
  runs = [("shakespeare_char", "configs/shakespeare_char.py",
           {"data.path": args.text, "train.steps": steps, "train.eval_every": steps,
            "train.ckpt_every": steps, "optim.warmup_steps": 100})]
  runs.append(("base_512", "configs/lm.py:attn=mha,size=base",
               {"train.steps": 30 if args.quick else 60, "train.log_every": 10,
                "train.eval_every": 1000, "train.ckpt_every": 1000, "optim.warmup_steps": 5,
                "train.final_eval_tokens": 65536, "data.max_bytes": 20_000_000}))
  if accelerator:
    runs.append(("125m_bf16", "configs/lm.py:attn=mla,size=125m",
                 {"train.steps": 60, "train.log_every": 10, "train.eval_every": 1000,
                  "train.ckpt_every": 1000, "optim.warmup_steps": 5,
                  "train.final_eval_tokens": 65536}))
  with tempfile.TemporaryDirectory() as workroot:
    records = [run(name, spec, overrides, peak, workroot) for name, spec, overrides in runs]
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  with open(args.json, "w") as f:
    json.dump(records, f, indent=2)
  print("\n| run | params | steps | tokens/s | step ms | MFU | val loss |")
  print("|---|---|---|---|---|---|---|")
  for r in records:
    val = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
    print(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['steps']} | {r['tokens_per_s']:.0f} | "
          f"{r['step_ms']:.1f} | {100 * r['mfu']:.1f}% | {val} |")


if __name__ == "__main__":
  main()
