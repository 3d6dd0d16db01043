"""The accelerator check (mla_jax/accel/, scripts/accel_check.py): its dry run writes every
section with numbers of the right kind, and a failing or hanging step leaves the others' results.
"""

import json
import math
import os
import pathlib
import stat
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest

from mla_jax import accel
from mla_jax.evaluation import decode_bench

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
  """One `scripts/accel_check.py --dry_run` run: (results, markdown, stdout, out dir)."""
  out = tmp_path_factory.mktemp("accel")
  p = subprocess.run([sys.executable, str(REPO / "scripts" / "accel_check.py"), "--dry_run",
                      f"--out={out}"], capture_output=True, text=True, cwd=REPO, timeout=900)
  assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
  results = json.loads((out / accel.JSON_NAME).read_text())
  return results, (out / accel.MD_NAME).read_text(), p.stdout, out


def finite_positive(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_dry_run_every_step_ok(dry):
  results, _, stdout, out = dry
  assert results["dry_run"] is True
  assert list(results["steps"]) == list(accel.STEP_NAMES)
  for name, entry in results["steps"].items():
    assert entry["status"] == "ok", (name, entry.get("log_tail"))
    assert 0 < entry["seconds"] <= entry["limit_s"] and entry["result"], name
  log = (out / accel.LOG_NAME).read_text()
  assert all(f"[{name}] " in log for name in accel.STEP_NAMES)
  assert "# Accelerator check" in stdout  # the tables are printed too


def test_dry_run_env(dry):
  env = dry[0]["steps"]["env"]["result"]
  assert env["platform"] == "cpu" and env["device_count"] == 1
  assert finite_positive(env["matmul_bf16_flops"]) and finite_positive(env["copy_gbps"])
  assert env["copy_bytes"] == 8 << 20 and env["matmul_n"] == 256
  assert env["versions"]["jax"] and env["versions"]["flax"] and env["python"].count(".") == 2


def test_dry_run_kernels(dry):
  r = dry[0]["steps"]["kernels"]["result"]
  t = r["pytest"]
  # On a CPU the compiled cases skip and the tile-rule test runs; none may fail.
  assert t["returncode"] == 0 and t["failed"] == 0 and t["errors"] == 0
  assert t["passed"] >= 1 and t["skipped"] >= 6, t["summary"]
  e = r["decode_equality"]
  assert e["dtype"] == "bfloat16" and e["finite"] and e["passed"]
  assert e["rel_diff"] <= e["tolerance"] == accel.EQUALITY_RTOL
  assert e["max_abs_logit"] > 0.1  # the logits are not flat
  # The two paths round differently in bfloat16: identical logits would mean one path ran twice.
  assert 0 < e["max_abs_diff"] <= e["rel_diff"] * e["max_abs_logit"] * 1.0001
  assert e["lengths"][0] == e["prompt"] and e["lengths"][-1] == 1  # ragged rows


def test_dry_run_decode(dry):
  r = dry[0]["steps"]["decode"]["result"]
  env = dry[0]["steps"]["env"]["result"]
  assert r["peak_gbps"] == env["copy_gbps"] and r["bandwidth_target"] == accel.BANDWIDTH_TARGET
  records = r["records"]
  cells = {(x["variant"], x["path"], x["batch"], x["context"]) for x in records}
  want = {(v, p, b, c) for v, p in (("mqa", "kv"), ("mla", "absorbed"), ("mla", "pallas"))
          for b in r["batches"] for c in r["contexts"]}
  assert cells == want and len(records) == len(want)
  for x in records:
    assert finite_positive(x["ms_per_token"]) and finite_positive(x["achieved_gbps"])
    assert 0 < x["peak_fraction"] == pytest.approx(x["achieved_gbps"] / r["peak_gbps"])
    overrides = next(o for v, p, o in decode_bench.VARIANTS if (v, p) == (x["variant"], x["path"]))
    cfg = decode_bench.make_config({**overrides, "dtype": "bfloat16", "param_dtype": "bfloat16",
                                    **accel.DRY_DECODE}, 64)
    assert jnp.dtype(cfg.kv_cache_dtype) == jnp.bfloat16
    per_slot = decode_bench.bytes_read_per_slot(cfg, x["path"])
    assert x["cache_bytes_read_per_step"] == per_slot * cfg.n_layers * x["batch"] * x["context"]
  # bf16: MQA reads 2 K = 32 numbers a slot, the kernel C + R = 40, the einsums 2C + R = 72.
  slot = {x["path"]: x["cache_bytes_read_per_step"] / (x["batch"] * x["context"]) for x in records}
  assert slot == {"kv": 2 * 32 * 2, "pallas": 2 * 40 * 2, "absorbed": 2 * 72 * 2}
  targets = r["targets"]
  assert {t["path"] for t in targets} == {"pallas", "absorbed"}
  for t in targets:
    assert finite_positive(t["peak_fraction"]) and finite_positive(t["over_bytes_ratio"])
    assert isinstance(t["bandwidth_target_met"], bool) and isinstance(t["mqa_target_met"], bool)


def test_dry_run_train(dry):
  r = dry[0]["steps"]["train"]["result"]
  assert r["peak_flops"] == dry[0]["steps"]["env"]["result"]["matmul_bf16_flops"]
  runs = {x["name"]: x for x in r["runs"]}
  assert list(runs) == [f"{a}-{i}" for a, i in accel.TRAIN_RUNS]
  for x in runs.values():
    assert x["dtype"] == "bfloat16" and x["attn_impl_resolved"] == "blocked"  # CPU: no cuDNN
    assert finite_positive(x["tokens_per_s"]) and finite_positive(x["step_ms"])
    assert 0 < x["mfu"] < 1 and x["mfu"] == pytest.approx(
        x["tokens_per_s"] * x["flops_per_token"] / x["peak_flops"])
    assert math.isfinite(x["loss"]) and x["skipped"] == 0 and x["params"] > 10_000
    assert isinstance(x["mfu_target_met"], bool)
  assert runs["mla-auto"]["attention"] == "mla" and runs["mha-blocked"]["attention"] == "mha"


def test_dry_run_quality(dry):
  r = dry[0]["steps"]["quality"]["result"]
  mha, mla = r["runs"]
  assert (mha["name"], mla["name"]) == ("mha", "mla")
  assert mla["kv_bytes_per_token"] == mha["kv_bytes_per_token"] * accel.QUALITY_CACHE_FRACTION
  assert mha["steps"] == mla["steps"] == r["steps"] and mha["tokens"] == mla["tokens"] > 0
  for x in (mha, mla):
    assert 0 < x["val_bpb"] < 10 and x["val_tokens"] > 0 and finite_positive(x["params"])


def test_dry_run_markdown(dry):
  _, md, _, _ = dry
  for i, step in enumerate(accel.STEPS, 1):
    assert f"## {i}. {step.title}: ok in " in md
  rows = ["| device | cpu x1 (cpu) |", "| bf16 matmul peak (measured, 256^3) |",
          "| compiled-kernel tests (", "| whole-model decode, pallas vs absorbed (bf16,",
          "| mqa | kv | 128 |", "| mla | absorbed | 160 |", "| mla | pallas | 160 |",
          "| pallas | 2 | 64 |", "| mla-auto | auto (blocked) |", "| mha-blocked | blocked",
          "| mha | 0.07M | 512 | 100% |", "| mla | 0.07M | 128 | 25% |"]
  for row in rows:
    assert row in md, row
  assert "): passed; argmax agreement" in md and "FAILED" not in md


def test_failed_and_hung_steps_leave_the_others(tmp_path):
  """A stand-in for the step processes: decode hangs (stopped at its limit, its sleeping child
  too), train exits 3; every other step's result is written, and so is the report."""
  fake = tmp_path / "fake_python"
  fake.write_text(
      "#!/bin/bash\n"
      "for a in \"$@\"; do case $a in --part=*) part=${a#--part=};; "
      "--step=*) step=${a#--step=};; esac; done\n"
      "echo \"{\\\"records\\\": [], \\\"step\\\": \\\"$step\\\"}\" > \"$part\"\n"
      "if [ \"$step\" = decode ]; then echo hanging; sleep 120; fi\n"
      "if [ \"$step\" = train ]; then echo boom; exit 3; fi\n")
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  start = time.monotonic()
  results = accel.run(str(tmp_path / "out"), dry_run=True, python=str(fake),
                      limits={"decode": 2.0})
  assert time.monotonic() - start < 60
  status = {k: v["status"] for k, v in results["steps"].items()}
  assert status == {"env": "ok", "kernels": "ok", "decode": "timed out at 2 s",
                    "train": "failed (exit 3)", "quality": "ok"}
  assert results["steps"]["decode"]["log_tail"] == ["hanging"]
  assert results["steps"]["train"]["log_tail"] == ["boom"]
  assert results["steps"]["quality"]["result"]["step"] == "quality"
  written = json.loads((tmp_path / "out" / accel.JSON_NAME).read_text())
  assert written["steps"] == results["steps"]
  md = (tmp_path / "out" / accel.MD_NAME).read_text()
  assert "## 3. Decode (bf16 cache): timed out at 2 s" in md and "No cell measured." in md
  assert "## 4. Training throughput (bf16): failed (exit 3)" in md


def test_quality_gets_what_the_budget_leaves(tmp_path):
  """On an accelerator the quality step has no limit of its own: the budget's rest, and it is
  skipped below QUALITY_MIN_S (stand-in steps that finish at once)."""
  fake = tmp_path / "fake_python"
  fake.write_text("#!/bin/bash\nexit 0\n")
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  results = accel.run(str(tmp_path / "a"), python=str(fake), budget_s=accel.QUALITY_MIN_S + 30)
  q = results["steps"]["quality"]
  assert q["status"] == "ok" and accel.QUALITY_MIN_S < q["limit_s"] <= accel.QUALITY_MIN_S + 30
  assert results["steps"]["train"]["limit_s"] <= accel.QUALITY_MIN_S + 30  # the budget caps all
  results = accel.run(str(tmp_path / "b"), python=str(fake), budget_s=accel.QUALITY_MIN_S - 5,
                      steps=("env", "quality"))
  assert results["steps"]["env"]["status"] == "ok"
  assert results["steps"]["quality"]["status"] == "skipped"
  assert "## 5. Quality: MHA vs MLA at 25% of the cache: skipped" in (
      tmp_path / "b" / accel.MD_NAME).read_text()


def test_run_refuses_unknown_steps(tmp_path):
  with pytest.raises(ValueError, match=r"steps: unknown \['gpu'\]"):
    accel.run(str(tmp_path), dry_run=True, steps=("env", "gpu"))
  with pytest.raises(ValueError, match=r"limits: unknown \['speed'\]"):
    accel.run(str(tmp_path), dry_run=True, limits={"speed": 1})


def test_budget_adds_up():
  """The accelerator limits fit the 8-minute budget with room for the quality step."""
  fixed = sum(s.limit_s or 0 for s in accel.STEPS)
  assert fixed + accel.QUALITY_MIN_S <= accel.BUDGET_S == 480
  assert os.path.exists(REPO / "docs" / "accelerator.md")
