"""The accelerator check's results as markdown: one section per step, in order."""

from __future__ import annotations

from mla_jax.accel.spec import MFU_TARGET, STEPS


def _fmt(x, spec: str = ".3g", none: str = "-") -> str:
  return none if x is None else format(x, spec)


def _met(ok) -> str:
  return "-" if ok is None else ("met" if ok else "NOT met")


def markdown(results: dict) -> str:
  """The results as markdown: one section per step, in order, with its status and tables."""
  lines = ["# Accelerator check (scripts/accel_check.py)", ""]
  env = (results["steps"].get("env") or {}).get("result") or {}
  if results.get("dry_run"):
    lines += ["Dry run: CPU, tiny shapes, the kernel in Pallas interpret mode. The numbers check "
              "the script, not the hardware.", ""]
  lines += [f"Started {results.get('started')}; budget {results.get('budget_s'):.0f} s"
            + (f"; took {results['seconds']:.0f} s" if "seconds" in results else "") + ".", ""]
  for i, step in enumerate(STEPS, 1):
    entry = results["steps"].get(step.name)
    if entry is None:
      continue
    took = f" in {entry['seconds']:.1f} s" if "seconds" in entry else ""
    lines += [f"## {i}. {step.title}: {entry['status']}{took} (limit {entry['limit_s']:.0f} s)",
              ""]
    if entry.get("reason"):
      lines += [entry["reason"], ""]
    r = entry.get("result") or {}
    if r:
      lines += SECTIONS[step.name](r, env) + [""]
    if entry.get("log_tail"):
      lines += ["Last output:", "", "```"] + entry["log_tail"][-12:] + ["```", ""]
  return "\n".join(lines).rstrip() + "\n"


def _md_env(r: dict, env: dict) -> list[str]:
  mem = r.get("memory_bytes")
  host = r.get("host_memory_bytes")
  rows = [("device", f"{r.get('device_kind')} x{r.get('device_count')} ({r.get('platform')})"),
          ("device memory", f"{mem / 2**30:.1f} GiB" if mem else "-"),
          ("host", f"{r.get('cpu_count')} CPUs, "
           + (f"{host / 2**30:.0f} GiB" if host else "?") + f", Python {r.get('python')}"),
          ("versions", ", ".join(f"{k} {v}" for k, v in (r.get("versions") or {}).items()))]
  if r.get("nvidia_smi"):
    rows.append(("nvidia-smi", r["nvidia_smi"]))
  if "matmul_bf16_flops" in r:
    rows.append((f"bf16 matmul peak (measured, {r['matmul_n']}^3)",
                 f"{r['matmul_bf16_flops'] / 1e12:.2f} TFLOP/s"))
  if "copy_gbps" in r:
    rows.append((f"copy bandwidth (measured, {r['copy_bytes'] / 2**30:.3g} GiB read + written)",
                 f"{r['copy_gbps']:.1f} GB/s"))
  return ["| what | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


def _md_kernels(r: dict, env: dict) -> list[str]:
  lines = ["| check | result |", "|---|---|"]
  t = r.get("pytest")
  if t:
    lines.append(f"| compiled-kernel tests (`{t['command']}`) | {t['passed']} passed, "
                 f"{t['failed']} failed, {t['skipped']} skipped, {t['errors']} errors |")
  low = r.get("triton_lowering")
  if low:
    bad = [f"{x['dtype']} {x['shape']}" for x in low if not x["ok"]]
    lines.append(f"| kernel lowered to Triton for CUDA (no run; {len(low)} shapes x dtypes) | "
                 + (f"{len(low)} of {len(low)} ok |" if not bad else f"FAILED: {bad} |"))
  e = r.get("decode_equality")
  if e:
    lines.append(
        f"| whole-model decode, pallas vs absorbed (bf16, batch {e['batch']}, {e['decode_steps']}"
        f" steps, lengths {e['lengths']}) | max abs diff {e['max_abs_diff']:.4g} of max |logit| "
        f"{e['max_abs_logit']:.4g} = {e['rel_diff']:.2e} (tolerance {e['tolerance']:g}): "
        f"{'passed' if e['passed'] else 'FAILED'}; argmax agreement "
        f"{100 * e['argmax_agreement']:.0f}% |")
  return [line.replace("|logit|", "logit") for line in lines]


def _md_decode(r: dict, env: dict) -> list[str]:
  records = r.get("records") or []
  if not records:
    return ["No cell measured."]
  contexts = sorted({x["context"] for x in records})
  batches = sorted({x["batch"] for x in records})
  cols = [(b, c) for b in batches for c in contexts]
  ctx = lambda c: f"{c // 1024}k" if c % 1024 == 0 else str(c)
  ref = r.get("peak_gbps")
  lines = [f"ms per decode step / GB/s of cache read / % of {_fmt(ref, '.0f')} GB/s "
           f"({r.get('peak_reference')}):", "",
           "| variant | path | KV bytes/token | " + " | ".join(f"b{b} {ctx(c)}" for b, c in cols)
           + " |", "|" + "---|" * (3 + len(cols))]
  by = {(x["variant"], x["path"], x["batch"], x["context"]): x for x in records}
  for row in ("mqa", "mla-absorbed", "mla-pallas"):
    variant, _, path = row.partition("-")
    path = path or "kv"
    mine = [x for x in records if (x["variant"], x["path"]) == (variant, path)]
    if not mine:
      continue
    cells = []
    for b, c in cols:
      x = by.get((variant, path, b, c))
      cells.append("-" if x is None else f"{x['ms_per_token']:.3f} / {x['achieved_gbps']:.0f}"
                   + (f" / {100 * x['peak_fraction']:.0f}%" if x.get("peak_fraction") else ""))
    lines.append(f"| {variant} | {path} | {mine[0]['kv_bytes_per_token']} | "
                 + " | ".join(cells) + " |")
  targets = r.get("targets") or []
  if targets:
    pct = f"{100 * r['bandwidth_target']:.0f}%"
    lines += ["", f"Targets at batch >= {r['target_min_batch']}, context >= "
              f"{ctx(r['target_min_context'])}:", "",
              f"| path | batch | context | % of copy bandwidth | >= {pct} | MLA / MQA time over "
              "bytes ratio | <= 1.1x |", "|---|---|---|---|---|---|---|"]
    for t in targets:
      frac = t.get("peak_fraction")
      lines.append(f"| {t['path']} | {t['batch']} | {ctx(t['context'])} | "
                   f"{_fmt(frac and 100 * frac, '.1f')} | {_met(t.get('bandwidth_target_met'))} | "
                   f"{_fmt(t.get('over_bytes_ratio'), '.3f')} | {_met(t.get('mqa_target_met'))} |")
  return lines


def _md_train(r: dict, env: dict) -> list[str]:
  lines = [f"size={r.get('size')}, MFU against {_fmt((r.get('peak_flops') or 0) / 1e12, '.1f')} "
           f"TFLOP/s ({r.get('peak_reference')}); compiled step only, data loading excluded:", "",
           "| run | attn_impl (resolved) | params | batch x seq | tokens/s | step ms | MFU | "
           f">= {100 * MFU_TARGET:.0f}% |", "|---|---|---|---|---|---|---|---|"]
  for x in r.get("runs") or []:
    lines.append(f"| {x['name']} | {x['attn_impl']} ({x['attn_impl_resolved']}) | "
                 f"{x['params'] / 1e6:.2f}M | {x['global_batch']} x {x['seq_len']} | "
                 f"{x['tokens_per_s']:,.0f} | {x['step_ms']:.1f} | {100 * x['mfu']:.1f}% | "
                 f"{_met(x['mfu_target_met'])} |")
  return lines


def _md_quality(r: dict, env: dict) -> list[str]:
  runs = r.get("runs") or []
  lines = [f"configs/lm.py size={r.get('size')}, {r.get('steps')} steps, "
           f"{_fmt(r.get('tokens'), ',')} tokens each (the same batches):", "",
           "| model | params | KV bytes/token | % of MHA | steps | tokens/s | val bpb | vs MHA |",
           "|---|---|---|---|---|---|---|---|"]
  mha = next((x for x in runs if x["name"] == "mha"), None)
  for x in runs:
    share = (f"{100 * x['kv_bytes_per_token'] / mha['kv_bytes_per_token']:.0f}%" if mha else "-")
    vs = (f"{100 * (x['val_bpb'] / mha['val_bpb'] - 1):+.1f}%"
          if mha and x["name"] != "mha" and x["val_bpb"] and mha["val_bpb"] else "-")
    lines.append(f"| {x['name']} | {x['params'] / 1e6:.2f}M | {x['kv_bytes_per_token']} | "
                 f"{share} | {x['steps']} | {_fmt(x['tokens_per_s'], ',.0f')} | "
                 f"{_fmt(x['val_bpb'], '.4f')} | {vs} |")
  if r.get("skipped_mla"):
    lines += ["", f"MLA skipped: {r['skipped_mla']}."]
  return lines


SECTIONS = {"env": _md_env, "kernels": _md_kernels, "decode": _md_decode, "train": _md_train,
            "quality": _md_quality}
