"""Decode speed of MHA / GQA / MQA / MLA (naive, absorbed, pallas) at equal model width.

    python scripts/bench_decode.py --json=out/bench_decode.json [--quick]
    # on a GPU (docs/kernels.md): every path, batch 1 / 8 / 64, contexts 1k-32k
    python scripts/bench_decode.py --json=out/bench_decode_gpu.json --batches=1,8,64 \
        --contexts=1k,4k,16k,32k --impls=all

--impls picks the rows (mha, gqa, mqa, mla-naive, mla-absorbed, mla-pallas; 'all'); the default
is all of them except mla-pallas on a CPU, where the kernel only runs in Pallas interpret mode
(correct, but its time says nothing about the compiled kernel). Each record also gives the cache
bytes read per step, the achieved bandwidth (bytes read / step time) and its fraction of the
device's peak memory bandwidth (--peak_gbps, default from PEAK_GBPS by device kind; unknown on a
CPU: no fraction).

Models (all float32, vocab 256, d_model 512, 8 query heads, head dim 64, 2 layers, d_ff 1408):
  mha   8 kv heads                        KV cache 2 * 8 * 64 = 1024 elements / token / layer
  gqa   2 kv heads (4 query heads each)   2 * 2 * 64           =  256
  mqa   1 kv head                         2 * 1 * 64           =  128
  mla   kv_lora_rank C = 256, rope R = 32, nope N = 64, v E = 64, q_lora_rank 0:
        C + R = 288 = 4.5 * head dim, DeepSeek-V2/V3's ratio (d_c = 4 d_h, d_R = d_h / 2; the
        paper's "GQA with 2.25 groups"). mla-naive, mla-absorbed and mla-pallas are the same
        config except for `mla_decode_impl`.

Cache bytes read per step (`bytes_read_per_slot`, per layer, sequence and slot, times `context`
slots: the timed steps decode the buffer's last positions): MHA / GQA / MQA 2 G K (keys and values
once); mla-absorbed and mla-naive 2 C + R (two einsums / two decompressions each read the latent,
the rope key once); mla-pallas C + R per head block of the kernel (one here: 8 heads fit one
block). The weights (`param_bytes`, ~26 MB, read once per step whatever the batch) are not
counted: they dominate batch 1 at short contexts, and are ~10% of MQA's bytes at batch 64, 4k.

What is timed: the jitted `generate.decode_step_jit` (one token per sequence, cache donated), on a
cache buffer of exactly `context` slots filled with random values (no real prefill: the contents
do not change the cost) whose fill level `lengths` is set so that the timed steps decode the last
positions, context - steps .. context - 1. Attention always runs over every slot of the buffer (the
causal mask hides unfilled ones), so every step costs a decode at that context. One warm-up step
(compile + run), then `steps` steps each timed alone and blocked on (the package's one protocol,
`evaluation.decode_speed.step_times`); the median is reported.
`ms_per_token` is the median time of one step, i.e. the per-sequence latency of one new token (a
batch-8 step makes 8 tokens; tokens_per_s = batch / step time).

Memory: the largest cache is MHA at 16k context, batch 8: 1024 el * 2 layers * 4 B * 16384 * 8 =
1.0 GiB (plus the donated copy being rewritten in place); the largest intermediate is mla-naive's
decompressed per-head keys and values, 16384 * 8 * 8 * (64 + 64) * 4 B = 0.5 GiB per layer. Peak
stays around 3 GiB, well under 20 GiB; 2 layers (not 4) keep the full run to a few minutes on a
2-core CPU.

Targets printed at the end: absorbed vs naive speed-up at the longest context (>= 3x) and
absorbed / MQA time (<= 2x).

What the measurements found, and why attention.py looks as it does: docs/performance.md.

Sharded decode (--devices=1,2,4,8; docs/sharding.md): for each device count N, the cache split N
ways over `sequence` (the shard_map log-sum-exp path and plain GSPMD-partitioned einsums), over
batch (`data`) and over `tensor`, for MHA and absorbed MLA at the longest context and the largest
batch: the cache bytes each device holds (from addressable_shards) and ms per decode step. On a
CPU the N devices are fake (XLA_FLAGS=--xla_force_host_platform_device_count, set here) and share
the same cores: only the bytes scale, the times say what the partitioning costs, not a speed-up.
"""

from __future__ import annotations

import argparse  # noqa: E402
import json  # noqa: E402
import os
import platform  # noqa: E402
import sys


def _fake_devices_from_argv() -> None:
  """--devices=1,2,4,8 needs that many devices; on a CPU they are fake, and XLA reads the flag
  once, when jax is imported: hence before the imports below."""
  for arg in sys.argv[1:]:
    if arg.startswith("--devices="):
      n = max(int(d) for d in arg.split("=", 1)[1].split(",") if d.strip())
      flag = f"--xla_force_host_platform_device_count={n}"
      if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()


_fake_devices_from_argv()

# The benchmark's models, bytes, timed step and targets live in mla_jax.evaluation.decode_bench
# (the accelerator check, mla_jax.accel, measures with them too).
import jax  # noqa: E402
from flax import nnx  # noqa: E402

from mla_jax.core.config import kv_cache_bytes_per_token  # noqa: E402
from mla_jax.core.model import Transformer  # noqa: E402
from mla_jax.evaluation.decode_bench import (  # noqa: E402
    MLA,
    VARIANTS,
    kernel_targets,
    make_config,
    measure_cell,
    parse_contexts,
    peak_gbps,
    row_name,
)


def markdown_table(records: list[dict], cell=lambda r: f"{r['ms_per_token']:.2f}") -> str:
  """One row per variant / path present, one column per (batch, context); cell(record) -> text."""
  contexts = sorted({r["context"] for r in records})
  batches = sorted({r["batch"] for r in records})
  cols = [(b, c) for b in batches for c in contexts]
  head = "| variant | path | KV bytes/token | " + " | ".join(
      f"b{b} ctx {c // 1024}k" for b, c in cols) + " |"
  lines = [head, "|" + "---|" * (3 + len(cols))]
  by_key = {(r["variant"], r["path"], r["batch"], r["context"]): r for r in records}
  for variant, path, _ in VARIANTS:
    mine = [r for r in records if (r["variant"], r["path"]) == (variant, path)]
    if not mine:
      continue
    cells = []
    for b, c in cols:
      r = by_key.get((variant, path, b, c))
      cells.append("-" if r is None else cell(r))
    bytes_ = mine[0]["kv_bytes_per_token"]
    lines.append(f"| {variant} | {path} | {bytes_} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def target_ratios(records: list[dict]) -> list[dict]:
  """At the longest context, per batch: naive / absorbed time and absorbed / MQA time (rows
  missing from the run are skipped)."""
  longest = max(r["context"] for r in records)
  ms = {(r["variant"], r["path"], r["batch"]): r["ms_per_token"] for r in records
        if r["context"] == longest}
  out = []
  for batch in sorted({r["batch"] for r in records}):
    naive, absorbed = ms.get(("mla", "naive", batch)), ms.get(("mla", "absorbed", batch))
    mqa = ms.get(("mqa", "kv", batch))
    if not (naive and absorbed and mqa):
      continue
    speedup, vs_mqa = naive / absorbed, absorbed / mqa
    out.append(dict(context=longest, batch=batch, absorbed_speedup_over_naive=speedup,
                    absorbed_over_mqa=vs_mqa, speedup_target_met=speedup >= 3.0,
                    mqa_ratio_target_met=vs_mqa <= 2.0))
  return out


# (row name, config overrides, mesh axis the cache is split over, sharded_impl)
SHARDED_ROWS = [
    ("mha", dict(attention="mha"), "sequence", "shard_map"),
    ("mha", dict(attention="mha"), "sequence", "gspmd"),
    ("mha", dict(attention="mha"), "data", "shard_map"),
    ("mha", dict(attention="mha"), "tensor", "shard_map"),
    ("mla-absorbed", dict(MLA, mla_decode_impl="absorbed"), "sequence", "shard_map"),
    ("mla-absorbed", dict(MLA, mla_decode_impl="absorbed"), "sequence", "gspmd"),
    ("mla-absorbed", dict(MLA, mla_decode_impl="absorbed"), "data", "shard_map"),
    ("mla-absorbed", dict(MLA, mla_decode_impl="absorbed"), "tensor", "shard_map"),
]


def bench_devices(devices: list[int], context: int, batch: int, steps: int,
                  rounds: int = 2) -> list[dict]:
  """One record per (row, device count): cache bytes per device and ms per decode step. Every
  cell is timed once per round, rows in reverse order on odd rounds, so a burst of load from
  another process or the order itself does not favour one row; ms_per_token is the smallest of
  the rounds' medians (each round's list is kept in the record)."""
  from mla_jax.core import sharding
  from mla_jax.core.decode_plan import DecodePlan
  from mla_jax.evaluation import decode_speed

  if max(devices) > jax.device_count():
    raise SystemExit(f"error: --devices: {max(devices)} devices asked, {jax.device_count()} "
                     "present")
  models, cells = {}, {}
  for rnd in range(rounds):
    for name, overrides, axis, impl in SHARDED_ROWS[::-1 if rnd % 2 else 1]:
      if name not in models:
        models[name] = Transformer(make_config(overrides, context), rngs=nnx.Rngs(0))
      for n in devices:
        mesh = sharding.make_mesh({axis: n}, devices=jax.devices()[:n])
        plan = DecodePlan.make(mesh, impl=impl)
        r = decode_speed.time_decode(models[name], context, batch, steps, warmup=1, plan=plan)
        cells.setdefault((name, axis, impl, n), []).append(r)
        print(f"round {rnd}: {name:12s} split over {axis:8s} ({impl:9s}) on {n} devices: "
              f"{r['cache_bytes_per_device'] / 2**20:8.2f} MiB cache per device "
              f"(of {r['cache_bytes'] / 2**20:.2f}), {r['ms_per_token']:8.2f} ms/step",
              flush=True)
  records = []
  for name, _, axis, impl in SHARDED_ROWS:
    for n in devices:
      runs = cells[(name, axis, impl, n)]
      records.append(dict(
          variant=name, axis=axis, impl=impl, devices=n, context=context, batch=batch,
          ms_per_token=min(r["ms_per_token"] for r in runs),
          round_ms_per_token=[r["ms_per_token"] for r in runs],
          cache_bytes=runs[0]["cache_bytes"],
          cache_bytes_per_device=runs[0]["cache_bytes_per_device"],
          kv_bytes_per_token=kv_cache_bytes_per_token(models[name].cfg),
          device_kind=jax.devices()[0].device_kind))
  return records


def devices_table(records: list[dict]) -> str:
  """Rows (variant, axis, impl), one column per device count: 'MiB per device / ms per step'."""
  counts = sorted({r["devices"] for r in records})
  lines = ["| variant | cache split over | impl | " + " | ".join(
      f"{n} dev: MiB/dev, ms" for n in counts) + " |", "|" + "---|" * (3 + len(counts))]
  keys = list(dict.fromkeys((r["variant"], r["axis"], r["impl"]) for r in records))
  by = {(r["variant"], r["axis"], r["impl"], r["devices"]): r for r in records}
  for key in keys:
    cells = [f"{by[key + (n,)]['cache_bytes_per_device'] / 2**20:.1f}, "
             f"{by[key + (n,)]['ms_per_token']:.1f}" if key + (n,) in by else "-" for n in counts]
    lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", required=True, help="where to write the list of records")
  parser.add_argument("--quick", action="store_true", help="contexts 1k, 4k and fewer steps")
  parser.add_argument("--steps", type=int, default=0, help="timed steps per cell (0: auto)")
  parser.add_argument("--batches", default="1,8", help="comma list, e.g. 1,8,64")
  parser.add_argument("--contexts", default="",
                      help="comma list, e.g. 1k,4k,16k,32k (default: 1k,4k,16k; --quick 1k,4k)")
  parser.add_argument("--impls", default="",
                      help="rows to run, comma list of " + ",".join(
                          row_name(v, p) for v, p, _ in VARIANTS) + " or 'all' (default: all; "
                      "on CPU all but mla-pallas)")
  parser.add_argument("--peak_gbps", type=float, default=0.0,
                      help="peak memory bandwidth, GB/s (default: PEAK_GBPS by device kind)")
  parser.add_argument("--devices", default="",
                      help="sharded decode instead: comma list of device counts, e.g. 1,2,4,8 "
                      "(fake CPU devices here); longest --contexts, largest --batches")
  args = parser.parse_args(argv)
  if args.devices:
    contexts = parse_contexts(args.contexts) if args.contexts else [4096]
    batch = max(int(b) for b in args.batches.split(","))
    devices = [int(d) for d in args.devices.split(",")]
    print(f"# sharded decode on {jax.device_count()} {jax.devices()[0].platform} devices "
          f"({jax.devices()[0].device_kind}; fake devices share the CPU's cores: only the bytes "
          f"scale), context {max(contexts)}, batch {batch}", flush=True)
    records = bench_devices(devices, max(contexts), batch, args.steps or 5)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(records, f, indent=1)
    print("\ncache MiB per device, ms per decode step (smallest of the rounds' medians):")
    print(devices_table(records))
    print(f"wrote {len(records)} records to {args.json}")
    return

  contexts = (parse_contexts(args.contexts) if args.contexts
              else [1024, 4096] if args.quick else [1024, 4096, 16384])
  batches = [int(b) for b in args.batches.split(",")]
  steps = args.steps or (5 if args.quick else 10)
  max_seconds = 2.0 if args.quick else 5.0
  device = jax.devices()[0]
  names = [row_name(v, p) for v, p, _ in VARIANTS]
  if args.impls in ("", "all"):
    impls = [n for n in names if n != "mla-pallas" or device.platform == "gpu" or args.impls]
  else:
    impls = args.impls.split(",")
    unknown = sorted(set(impls) - set(names))
    if unknown:
      parser.error(f"--impls: unknown {unknown} (known: {names})")
  peak = args.peak_gbps or peak_gbps(device.device_kind)
  print(f"# decode benchmark on {device.platform} ({device.device_kind}; "
        f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores), contexts {contexts}, batches "
        f"{batches}, up to {steps} steps; peak bandwidth "
        f"{f'{peak:.0f} GB/s' if peak else 'unknown (no fraction of peak)'}", flush=True)
  if "mla-pallas" not in impls and "mla-pallas" in names and not args.impls:
    print("# mla-pallas skipped: no GPU; the kernel would run in Pallas interpret mode, whose time "
          "says nothing about the compiled kernel (--impls=all runs it anyway)", flush=True)

  records = []
  for variant, path, overrides in VARIANTS:
    if row_name(variant, path) not in impls:
      continue
    cfg = make_config(overrides, max(contexts))
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    for batch in batches:
      for context in contexts:
        rec = measure_cell(variant, path, cfg, graphdef, state, batch, context, steps,
                           max_seconds, peak)
        records.append(rec)
        frac = f", {100 * rec['peak_fraction']:.0f}% of peak" if peak else ""
        print(f"{variant:4s} {path:8s} batch {batch:2d} context {context:6d}: "
              f"{rec['ms_per_token']:9.2f} ms/step (min {rec['ms_min']:.2f}, "
              f"n={rec['steps_timed']}), "
              f"{rec['achieved_gbps']:7.1f} GB/s{frac}", flush=True)

  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  with open(args.json, "w") as f:
    json.dump(records, f, indent=1)
  print()
  print("ms per decode step (= per generated token of each sequence), median:")
  print(markdown_table(records))
  print()
  print("achieved cache bandwidth, GB/s (cache bytes read per step / median step time)"
        + (f"; % of {peak:.0f} GB/s peak" if peak else "") + ":")
  print(markdown_table(records, lambda r: f"{r['achieved_gbps']:.1f}" + (
      f" ({100 * r['peak_fraction']:.0f}%)" if r["peak_fraction"] is not None else "")))
  print()
  for t in target_ratios(records):
    print(f"context {t['context']}, batch {t['batch']}: absorbed speed-up over naive "
          f"{t['absorbed_speedup_over_naive']:.2f}x (target >= 3x: "
          f"{'met' if t['speedup_target_met'] else 'NOT met'}); absorbed / MQA time "
          f"{t['absorbed_over_mqa']:.2f}x (target <= 2x: "
          f"{'met' if t['mqa_ratio_target_met'] else 'NOT met'})")
  for t in kernel_targets(records):
    parts = []
    if t["peak_fraction"] is not None:
      parts.append(f"{100 * t['peak_fraction']:.0f}% of peak bandwidth (target >= 70%: "
                   f"{'met' if t['bandwidth_target_met'] else 'NOT met'})")
    if t["over_bytes_ratio"] is not None:
      parts.append(f"MLA / MQA time at {t['over_bytes_ratio']:.2f}x the bytes ratio (target <= "
                   f"1.1x: {'met' if t['mqa_target_met'] else 'NOT met'})")
    if parts:
      print(f"mla-{t['path']} batch {t['batch']} context {t['context']}: " + "; ".join(parts))
  print(f"wrote {len(records)} records to {args.json}")


if __name__ == "__main__":
  main()
