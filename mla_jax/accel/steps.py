"""The accelerator check's steps, each run in its own process:
python -m mla_jax.accel --step=NAME --part=FILE --context=FILE."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from mla_jax.accel.spec import (
  BANDWIDTH_TARGET,
  DECODE_ROWS,
  DRY_DECODE,
  DRY_TRAIN,
  EQUALITY_RTOL,
  MFU_TARGET,
  QUALITY_CACHE_FRACTION,
  QUALITY_EACH_S,
  REPO,
  STEP_NAMES,
  TRAIN_RUNS,
  VERSIONS,
  _plain,
)


class Part:
  """A step's result, rewritten whole after every measurement (the parent reads what is there
  when the step ends, however it ends)."""

  def __init__(self, path: str):
    self.path, self.data = Path(path), {}

  def emit(self, **values) -> None:
    self.data.update(values)
    tmp = self.path.with_suffix(".tmp")
    tmp.write_text(json.dumps(self.data, default=_plain))
    os.replace(tmp, self.path)


def versions() -> dict[str, str]:
  out = {}
  for name in VERSIONS:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return out


def measure_copy_gbps(n_bytes: int, repeats: int = 10) -> float:
  """Device memory bandwidth, GB/s: a jitted elementwise pass over n_bytes of float32 (read once,
  written once), 2 * n_bytes / the best time. The decode step's bandwidth is a fraction of it."""
  import jax
  import jax.numpy as jnp

  x = jnp.zeros((n_bytes // 4,), jnp.float32)
  f = jax.jit(lambda a: a + 1)
  f(x).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    t = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * (n_bytes // 4 * 4) / best / 1e9


def step_env(ctx: dict, dry: bool, part: Part, limit_s: float) -> None:
  import jax
  import jax.numpy as jnp

  from mla_jax.evaluation.perf import measure_peak_flops

  devices = jax.devices()
  d0 = devices[0]
  try:
    stats = d0.memory_stats() or {}
  except Exception:  # some backends have none
    stats = {}
  smi = None
  if not dry and shutil.which("nvidia-smi"):
    try:
      smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                            "clocks.max.sm,clocks.max.mem", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      smi = None
  part.emit(platform=d0.platform, device_kind=d0.device_kind, device_count=len(devices),
            devices=[str(d) for d in devices[:16]], memory_bytes=stats.get("bytes_limit"),
            host_memory_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            cpu_count=os.cpu_count(), python=platform.python_version(), versions=versions(),
            nvidia_smi=smi)
  n = 256 if dry else 8192
  flops = measure_peak_flops(jnp.bfloat16, n=n, repeats=3 if dry else 10)
  part.emit(matmul_bf16_flops=flops, matmul_n=n)
  print(f"bf16 matmul {n}^3: {flops / 1e12:.2f} TFLOP/s", flush=True)
  n_bytes = (8 << 20) if dry else (4 << 30)
  gbps = measure_copy_gbps(n_bytes, repeats=3 if dry else 10)
  part.emit(copy_gbps=gbps, copy_bytes=n_bytes)
  print(f"copy {n_bytes / 2**30:.3f} GiB: {gbps:.1f} GB/s (bytes read + written)", flush=True)


PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


class KernelTests:
  """tests/test_kernels.py's GPU cases (-k gpu: the compiled kernel against the reference and the
  tile rules; on a CPU the compiled ones skip) in a pytest subprocess, started here and read by
  result(): the decode equality check runs meanwhile."""

  def __init__(self):
    self.cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs",
                "tests/test_kernels.py", "-k", "gpu"]
    # Not the whole GPU: this step's own process runs the equality check alongside.
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    self.output = tempfile.TemporaryFile("w+")
    self.start = time.monotonic()
    self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=self.output,
                                 stderr=subprocess.STDOUT, text=True, env=env)

  def result(self, timeout_s: float) -> dict:
    """Waits at most timeout_s more -> counts, the summary line and the last lines."""
    try:
      rc = self.proc.wait(timeout=max(timeout_s, 1.0))
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
      rc = None
    self.output.seek(0)
    lines = self.output.read().strip().splitlines()
    if rc is None:
      lines.append(f"timed out after {time.monotonic() - self.start:.0f} s")
    print("\n".join(lines[-15:]), flush=True)
    counts = {k: 0 for k in ("passed", "failed", "skipped", "errors")}
    summary = next((line for line in reversed(lines) if PYTEST_COUNT.search(line)), "")
    for n, what in PYTEST_COUNT.findall(summary):
      counts["errors" if what.startswith("error") else what] = int(n)
    return {"command": " ".join(self.cmd[2:]), "returncode": rc,
            "seconds": time.monotonic() - self.start, **counts, "summary": summary.strip("= "),
            "tail": lines[-30:]}


def decode_equality(dry: bool) -> dict:
  """Whole-model decode, mla_decode_impl=pallas vs absorbed, bf16 weights, compute and cache, on
  the same parameters and tokens: a prefill, the rows rewound to ragged fill levels, then token
  by token. -> the largest logit difference against the largest logit, and argmax agreement."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from mla_jax.core.generate import decode_step_jit
  from mla_jax.core.model import Transformer, init_cache
  from mla_jax.evaluation import decode_bench, decode_speed

  batch, prompt, steps, slots = (2, 8, 3, 16) if dry else (4, 256, 32, 1024)
  overrides = dict(decode_bench.MLA, dtype="bfloat16", param_dtype="bfloat16",
                   mla_decode_impl="absorbed", **(DRY_DECODE if dry else {}))
  cfg = decode_bench.make_config(overrides, slots)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  _, state = nnx.split(model)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, prompt + steps)), jnp.int32)
  lengths = np.linspace(prompt, 1, batch).astype(np.int32)  # ragged: one row full, one at 1
  out = {}
  for impl in ("absorbed", "pallas"):
    graphdef, _ = nnx.split(decode_speed.with_decode_impl(model, impl))
    cache = init_cache(cfg, batch, slots)
    _, cache = decode_step_jit(graphdef, state, cache, tokens[:, :prompt])  # prefill: naive
    cache = cache.replace(lengths=jnp.asarray(lengths))  # a fresh array: the cache is donated
    logits = []
    for i in range(steps):
      step_logits, cache = decode_step_jit(graphdef, state, cache, tokens[:, prompt + i:][:, :1])
      logits.append(step_logits)
    out[impl] = np.asarray(jnp.stack(logits), np.float32)
  want, got = out["absorbed"], out["pallas"]
  diff, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
  rel = diff / max(scale, 1e-6)
  return {"dtype": "bfloat16", "batch": batch, "prompt": prompt, "decode_steps": steps,
          "cache_slots": slots, "lengths": [int(x) for x in lengths],
          "kv_lora_rank": cfg.kv_lora_rank, "qk_rope_head_dim": cfg.qk_rope_head_dim,
          "n_heads": cfg.n_heads, "max_abs_diff": diff, "max_abs_logit": scale,
          "rel_diff": rel, "tolerance": EQUALITY_RTOL, "passed": bool(rel <= EQUALITY_RTOL),
          "argmax_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
          "finite": bool(np.isfinite(got).all() and np.isfinite(want).all()),
          "backend": jax.default_backend()}


# tests/test_kernels.py's GPU cases (B, H, C, R, S): the bench's MLA, DeepSeek's C / R with an S no
# tile divides, odd sizes (padded tiles); and the decode step's largest cell.
LOWERING_SHAPES = ((1, 8, 256, 32, 4096), (8, 16, 512, 64, 1000), (3, 5, 100, 6, 300),
                   (64, 8, 256, 32, 32768))


def lower_kernel_for_gpu() -> list[dict]:
  """The compiled kernel (not interpret mode) lowered to its Triton call for an H200, without
  running it: on a CPU too, where an abstract GPU stands in, so that a Pallas or Triton API change
  shows before a GPU is at hand. -> one record per (shape, dtype): ok, or the error."""
  import contextlib
  import functools
  from unittest import mock

  import jax
  import jax.numpy as jnp
  from jax import export

  from mla_jax.kernels import mla_decode

  target, backend = contextlib.nullcontext(), contextlib.nullcontext()
  if jax.default_backend() != "gpu":
    sh = jax.sharding
    device = sh.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="gpu")
    target = sh.use_abstract_mesh(sh.AbstractMesh((1,), ("x",), abstract_device=device))
    backend = mock.patch.object(jax, "default_backend", lambda: "gpu")  # the kernel's own check
  # Lowered, not serialised: a Triton call has no export compatibility guarantee.
  checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  out = []
  for dtype in (jnp.float32, jnp.bfloat16):
    for b, h, c, r, s in LOWERING_SHAPES:
      rec = {"shape": [b, h, c, r, s], "dtype": jnp.dtype(dtype).name}
      f = jax.jit(functools.partial(mla_decode.mla_decode_partials, scale=0.1, interpret=False))
      args = [jax.ShapeDtypeStruct(shape, dtype) for shape in ((b, h, c), (b, h, r), (b, s, c),
                                                               (b, s, r))]
      try:
        with target, backend:
          text = export.export(f, platforms=("cuda",), disabled_checks=checks)(
              *args, jax.ShapeDtypeStruct((b,), jnp.int32)).mlir_module()
        rec["ok"] = "__gpu$xla.gpu.triton" in text
      except Exception as e:  # recorded, and the report says which shape
        rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
      out.append(rec)
  return out


def step_kernels(ctx: dict, dry: bool, part: Part, limit_s: float) -> None:
  begin = time.monotonic()
  tests = KernelTests()
  try:
    eq = decode_equality(dry)
  finally:  # the tests' counts, whatever the equality check did
    part.emit(pytest=tests.result(0.9 * limit_s - (time.monotonic() - begin)))
  part.emit(decode_equality=eq)
  lowered = lower_kernel_for_gpu()
  part.emit(triton_lowering=lowered)
  print(f"kernel lowered to Triton for CUDA: {sum(x['ok'] for x in lowered)} of {len(lowered)} "
        "shapes", flush=True)
  print(f"decode equality pallas vs absorbed (bf16): max |diff| {eq['max_abs_diff']:.4g} of max "
        f"|logit| {eq['max_abs_logit']:.4g} ({eq['rel_diff']:.2e}; tolerance {EQUALITY_RTOL:g}): "
        f"{'passed' if eq['passed'] else 'FAILED'}", flush=True)


def _env_result(ctx: dict) -> dict:
  env = ctx.get("steps", {}).get("env", {})
  return env.get("result") or {}


def step_decode(ctx: dict, dry: bool, part: Part, limit_s: float) -> None:
  import jax
  from flax import nnx

  from mla_jax.core.model import Transformer
  from mla_jax.evaluation import decode_bench

  device = jax.devices()[0]
  peak = _env_result(ctx).get("copy_gbps")
  reference = "measured copy bandwidth (env step)"
  if not peak:
    peak, reference = decode_bench.peak_gbps(device.device_kind), "vendor peak (no env step)"
  batches, contexts = ((2,), (64,)) if dry else ((64, 8, 1), (4096, 16384, 32768))
  steps, max_seconds = (3, 2.0) if dry else (10, 2.0)
  min_batch, min_context = (max(batches), min(contexts)) if dry else (64, 4096)
  variants = {decode_bench.row_name(v, p): (v, p, o) for v, p, o in decode_bench.VARIANTS}
  records = []
  part.emit(records=records, peak_gbps=peak, peak_reference=reference, batches=sorted(batches),
            contexts=list(contexts), bandwidth_target=BANDWIDTH_TARGET,
            target_min_batch=min_batch, target_min_context=min_context)
  for row in DECODE_ROWS:
    variant, path, overrides = variants[row]
    cfg = decode_bench.make_config(
        {**overrides, "dtype": "bfloat16", "param_dtype": "bfloat16",
         **(DRY_DECODE if dry else {})}, max(contexts))
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    for batch in batches:
      for context in contexts:
        rec = decode_bench.measure_cell(variant, path, cfg, graphdef, state, batch, context,
                                        steps, max_seconds, peak)
        records.append(rec)
        targets = decode_bench.kernel_targets(records, BANDWIDTH_TARGET, min_batch, min_context)
        part.emit(records=records, targets=targets)
        frac = f" ({100 * rec['peak_fraction']:.0f}%)" if rec["peak_fraction"] else ""
        print(f"{row:12s} batch {batch:3d} context {context:6d}: {rec['ms_per_token']:8.3f} "
              f"ms/step, {rec['achieved_gbps']:8.1f} GB/s{frac}", flush=True)


def step_train(ctx: dict, dry: bool, part: Part, limit_s: float) -> None:
  import jax.numpy as jnp

  from mla_jax.evaluation.perf import measure_peak_flops
  from mla_jax.experiment import load_config
  from mla_jax.training.throughput import measure_train_step

  peak = _env_result(ctx).get("matmul_bf16_flops")
  reference = "measured bf16 matmul (env step)"
  if not peak:
    peak, reference = measure_peak_flops(jnp.bfloat16, n=256 if dry else 8192), "measured here"
  size = "tiny" if dry else "125m"
  runs = []
  part.emit(runs=runs, peak_flops=peak, peak_reference=reference, size=size,
            mfu_target=MFU_TARGET)
  for attention, impl in TRAIN_RUNS:
    spec = f"configs/lm.py:attn={attention},size={size}"
    overrides = {"model.attn_impl": impl, **(DRY_TRAIN if dry else {})}
    r = measure_train_step(load_config(spec, overrides), peak_flops=peak,
                           steps=2 if dry else 10, warmup=1 if dry else 2)
    r.update(name=f"{attention}-{impl}", config=spec, overrides=overrides,
             mfu_target_met=r["mfu"] >= MFU_TARGET)
    runs.append(r)
    part.emit(runs=runs)
    print(f"{r['name']:12s} ({r['attn_impl_resolved']}): {r['params'] / 1e6:.2f}M params, "
          f"{r['tokens_per_s']:,.0f} tokens/s, {r['step_ms']:.1f} ms/step, MFU "
          f"{100 * r['mfu']:.1f}% (compile + warm-up {r['warmup_s']:.1f} s)", flush=True)


def quality_configs(dry: bool) -> tuple[str, dict, dict]:
  """(configs/lm.py size, overrides of both runs, MLA's own): MLA's C + R is 25% of MHA's 2 H K
  numbers per token and layer, with R = K / 2 as configs/lm.py sets it."""
  from mla_jax.experiment import load_config

  size = "tiny" if dry else "base"
  m = load_config(f"configs/lm.py:attn=mha,size={size}").model
  k = m.d_model // m.n_heads
  rope = k // 2
  latent = int(QUALITY_CACHE_FRACTION * 2 * m.n_heads * k) - rope
  shared = {"train.log_health": False, "optim.warmup_steps": -1}
  if dry:  # this package's own sources: quicker to find than the standard library's
    shared.update({"model.n_layers": 1, "data.path": str(REPO / "mla_jax" / "*" / "*.py"),
                   "train.final_eval_tokens": 2048, "train.global_batch": 4})
  else:
    shared.update({"model.dtype": "bfloat16", "train.global_batch": 32,
                   "train.final_eval_tokens": 0})
  return size, shared, {"model.kv_lora_rank": latent, "model.qk_rope_head_dim": rope}


def step_quality(ctx: dict, dry: bool, part: Part, limit_s: float) -> None:
  import statistics

  import jax

  from mla_jax.core.config import kv_cache_bytes_per_token
  from mla_jax.core.model import abstract_model, count_params
  from mla_jax.evaluation.perf import train_flops_per_token
  from mla_jax.experiment import ExperimentConfig, load_config
  from mla_jax.training import trainer
  from mla_jax.training.logger import read_metrics

  size, shared, mla = quality_configs(dry)
  each_s = min(QUALITY_EACH_S, limit_s / 2)
  peak = _env_result(ctx).get("matmul_bf16_flops") or (1e11 if dry else 7e14)
  shared["train.peak_flops"] = peak  # as the train step's MFU; and no second measurement
  base = load_config(f"configs/lm.py:attn=mha,size={size}", shared)
  tokens_per_step = base.train.global_batch * base.data.seq_len
  if dry:
    steps = 4
  else:
    # Steps from the train step's measured speed: its MFU on this model's FLOPs, halved (a
    # smaller model, a smaller batch, evaluation and checkpoint), after ~40 s of compiling.
    train_runs = (ctx.get("steps", {}).get("train", {}).get("result") or {}).get("runs") or []
    mfu = next((r["mfu"] for r in train_runs if r["name"] == "mla-auto"), 0.2)
    cfg = ExperimentConfig.from_config(base).model_config(256)
    n_params = count_params(abstract_model(cfg))["total"]
    tok_s = 0.5 * mfu * peak / train_flops_per_token(cfg, n_params, base.data.seq_len)
    steps = int(min(20000, max(100, (each_s - 40) * tok_s / tokens_per_step)))
  runs = []
  part.emit(runs=runs, size=size, steps=steps, tokens=steps * tokens_per_step,
            cache_fraction=QUALITY_CACHE_FRACTION, seconds_each=each_s)
  start_all = time.monotonic()
  with tempfile.TemporaryDirectory() as root:
    for attention in ("mha", "mla"):
      left = limit_s - (time.monotonic() - start_all)
      if runs and left < 1.1 * runs[0]["seconds"]:
        part.emit(skipped_mla=f"{left:.0f} s left, the MHA run took {runs[0]['seconds']:.0f} s")
        print(f"mla: skipped ({left:.0f} s left)", flush=True)
        break
      overrides = {**shared, **(mla if attention == "mla" else {}), "train.steps": steps,
                   "train.log_every": max(2, steps // 10), "train.eval_every": steps,
                   "train.ckpt_every": steps}
      spec = f"configs/lm.py:attn={attention},size={size}"
      begin = time.monotonic()
      workdir = os.path.join(root, attention)
      summary = trainer.train(load_config(spec, overrides), workdir)
      logged = [r["tokens_per_s"] for r in read_metrics(workdir) if "tokens_per_s" in r]
      final = summary["final"] or {}
      runs.append({"name": attention, "config": spec, "overrides": overrides,
                   "params": summary["params"]["total"],
                   "kv_bytes_per_token": kv_cache_bytes_per_token(summary["model"]),
                   "steps": summary["step"], "tokens": summary["step"] * tokens_per_step,
                   "val_bpb": final.get("val_bpb"), "val_tokens": final.get("val_tokens"),
                   "tokens_per_s": statistics.median(logged[1:] or logged) if logged else None,
                   "seconds": time.monotonic() - begin,
                   "device_kind": jax.devices()[0].device_kind})
      part.emit(runs=runs)
      print(f"{attention}: val bpb {final.get('val_bpb')} after {summary['step']} steps "
            f"({runs[-1]['seconds']:.0f} s)", flush=True)


STEP_FNS = {"env": step_env, "kernels": step_kernels, "decode": step_decode, "train": step_train,
            "quality": step_quality}


# A step's process: python -m mla_jax.accel --step=NAME --part=FILE --context=FILE -------------


def step_main(argv=None) -> None:
  parser = argparse.ArgumentParser(description="one step of the accelerator check (internal)")
  parser.add_argument("--step", required=True, choices=STEP_NAMES)
  parser.add_argument("--part", required=True, help="where the step writes its result")
  parser.add_argument("--context", default="", help="the results of the steps before")
  parser.add_argument("--limit_s", type=float, default=60.0)
  parser.add_argument("--dry_run", action="store_true")
  args = parser.parse_args(argv)
  ctx = json.loads(Path(args.context).read_text()) if args.context else {}
  STEP_FNS[args.step](ctx, args.dry_run, Part(args.part), args.limit_s)
