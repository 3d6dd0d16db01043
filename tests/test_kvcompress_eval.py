"""Compression evaluation (mla_jax/kvcompress/evaluate.py, sweep.py) and eval.py's cache flags."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from model_helpers import random_module, tiny

from mla_jax.core.model import Transformer
from mla_jax.data.tokenizer import ByteTokenizer
from mla_jax.kvcompress import evaluate, make, sweep
from mla_jax.kvcompress.policy import PolicyError

REPO = pathlib.Path(__file__).resolve().parents[1]


def _model():
  return random_module(Transformer, tiny(attention="gqa", n_kv_heads=2, max_seq_len=64,
                                         vocab_size=256))


def test_streaming_protocol_without_eviction_is_the_model_loss():
  model = _model()
  val = np.random.default_rng(0).integers(0, 256, 500).astype(np.int32)
  out = evaluate.streaming_bpb(model, val, 1.0, make("none", 0), 24, windows=1)
  window = jnp.asarray(val[:25][None])
  graphdef, state = nnx.split(model)
  logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, window[:, :-1])
  nats = optax.softmax_cross_entropy_with_integer_labels(logits, window[:, 1:])
  assert out["tokens"] == 24
  assert out["bpb"] == pytest.approx(float(nats.mean()) / np.log(2), rel=1e-5)
  squeezed = evaluate.streaming_bpb(model, val, 1.0, make("streaming", 8, positions="cache"), 24)
  assert squeezed["budget"] == 8 and np.isfinite(squeezed["bpb_after_budget"])


def test_passkey_prompts_have_the_length_and_the_key():
  tok = ByteTokenizer()
  prompts, keys = evaluate.passkey_prompts(tok, 200, 3, seed=1)
  assert prompts.shape == (3, 200)
  for row, key in zip(prompts, keys):
    text = tok.decode(row.tolist())
    assert f"The pass key is {key}." in text and text.endswith("The pass key is")
  with pytest.raises(ValueError, match="--passkey_lengths"):
    evaluate.passkey_prompts(tok, 40, 1)


def test_effective_bytes_count_values_bookkeeping_and_ring():
  cfg = tiny(attention="mla", n_layers=2)  # C 16 + R 8 float32 = 96 bytes per slot and layer
  b = evaluate.effective_bytes_per_token(cfg, make("h2o", 8), 32)
  assert b["values"] == 96 * 2 * 8 / 32 and b["bookkeeping"] == 16 * 2 * 8 / 32
  assert b["ring"] == 0 and b["total"] == b["values"] + b["bookkeeping"]


def test_policy_flags_and_pareto():
  assert evaluate.policy_from_flags("streaming", "0.5", "none", context=64).budget == 32
  assert evaluate.policy_from_flags("streaming", "16", "none").positions == "cache"
  for args in (("h2o3", "16", "none"), ("h2o", "16", "int3"), ("h2o", "x", "none")):
    with pytest.raises(PolicyError):
      evaluate.policy_from_flags(*args)
  points = [(1.0, 3.0), (2.0, 2.0), (3.0, 2.5), (4.0, 1.0)]
  assert sweep.pareto(points) == [0, 1, 3]
  assert sweep.configs(("h2o",), (0.5,), ("none", "int4"), compose=True) == [
      ("none", 0.0, "int4"), ("h2o", 0.5, "none"), ("h2o", 0.5, "int4")]


@pytest.mark.parametrize("kwargs, flag", [
    (dict(name="snap", budget="16", quant="none"), "--cache_policy"),
    (dict(name="h2o", budget="4", quant="none", window=3, sinks=2), "--cache_budget"),
    (dict(name="h2o", budget="64", quant="int4", group=5), "--cache_group"),
])
def test_bad_cache_flags_are_one_line_naming_the_flag(kwargs, flag):
  with pytest.raises(PolicyError) as e:
    evaluate.policy_from_flags(**kwargs)
  assert str(e.value).startswith(flag) and "\n" not in str(e.value)


def test_eval_checks_cache_flags_first_one_line_exit_1(tmp_path):
  # An empty workdir: the policy is refused before the workdir is even read.
  out = subprocess.run([sys.executable, str(REPO / "eval.py"), f"--workdir={tmp_path}",
                        "--cache_policy=h2o", "--cache_quant=int4", "--cache_group=5"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
  assert out.returncode == 1
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: --cache_group"), out.stderr


def test_sweep_report_and_plots_from_rows(tmp_path):
  rows = [{"run": r, "variant": v, "policy": p, "quant": q, "ratio": ratio, "budget": b,
           "bpb": bpb, "bytes_per_token": nbytes, "passkey@64": acc}
          for r, v, p, q, ratio, b, bpb, nbytes, acc in [
              ("mha", "mha", "none", "none", 0.0, 0, 2.0, 4096, 1.0),
              ("mha", "mha", "h2o", "none", 0.5, 64, 2.1, 2100, .5),
              ("mla", "mla", "none", "none", 0.0, 0, 2.05, 1024, 1.0),
              ("mla", "mla", "h2o", "int4", 0.5, 64, 2.3, 300, 0.0)]]
  sweep.write_report({"runs_dir": "runs/x", "rows": rows, "windows": 2, "seconds": 1.0},
                     str(tmp_path), passkey_lengths=(64,))
  report = (tmp_path / "report.md").read_text()
  assert "| mla | mla | h2o | int4 | 0.5 | 64 | 300 * | 2.3000 | +0.2500 | 0.00 |" in report
  assert "| mha | mha | h2o | none | 0.5 | 64 | 2100 | 2.1000 | +0.1000 | 0.50 |" in report
  assert (tmp_path / "pareto_bpb.png").stat().st_size > 0
  assert (tmp_path / "pareto_passkey_64.png").stat().st_size > 0


def test_compress_sweep_on_a_tiny_trained_model(tmp_path):
  from mla_jax.experiment import load_config
  from mla_jax.training import trainer

  runs = tmp_path / "runs"
  words = np.random.default_rng(0).choice(["the", "grass", "is", "green.", "sky", "blue,"], 8000)
  (tmp_path / "text.txt").write_text(" ".join(words))
  config = load_config(f"{REPO}/configs/lm.py:attn=mqa,size=tiny",
                       {"train.peak_flops": 2e11, "train.steps": 2, "train.eval_every": 2,
                        "train.ckpt_every": 2, "train.log_every": 1, "train.log_health": False,
                        "data.path": str(tmp_path / "text.txt")})
  trainer.train(config, str(runs / "mqa"))
  (runs / "not_a_run").mkdir()
  result = sweep.run_compress_sweep(str(runs), str(tmp_path / "out"), policies=("h2o",),
                                    ratios=(0.75,), quants=("none", "int8"), windows=2,
                                    progress=lambda text: None)
  rows = {(r["policy"], r["quant"]): r for r in result["rows"]}
  assert set(rows) == {("none", "none"), ("none", "int8"), ("h2o", "none")}
  base, h2o = rows["none", "none"], rows["h2o", "none"]
  assert base["variant"] == "mqa" and h2o["budget"] == 8  # a quarter of the 32-token prefix
  # MQA, 2 layers, head dim 16, float32: 2 * 16 * 2 * 4 = 256 bytes per token uncompressed; the
  # 8 kept slots of 32 plus 16 bytes of bookkeeping per slot and layer.
  assert base["bytes_per_token"] == 256
  assert h2o["bytes_per_token"] == pytest.approx((256 + 2 * 16) * 8 / 32)
  assert all(np.isfinite(r["bpb"]) for r in result["rows"])
  assert all((tmp_path / "out" / f).exists() for f in ("report.md", "pareto_bpb.png"))
  # Re-run with the same settings: the workdir's rows are read back from out/rows, not measured.
  again = sweep.run_compress_sweep(str(runs), str(tmp_path / "out"), policies=("h2o",),
                                   ratios=(0.75,), quants=("none", "int8"), windows=2,
                                   progress=lambda text: None)
  assert again["rows"] == result["rows"] and again["workdirs_measured"] == 0
  # ... but not under other settings, nor once the workdir has a newer checkpoint.
  rows_file = str(tmp_path / "out" / "rows" / "mqa.json")
  settings = json.loads(open(rows_file).read())["settings"]
  assert sweep._saved_rows(rows_file, settings, str(runs / "mqa")) == result["rows"]
  assert sweep._saved_rows(rows_file, {**settings, "windows": 3}, str(runs / "mqa")) is None
  os.utime(rows_file, (0, 0))
  assert sweep._saved_rows(rows_file, settings, str(runs / "mqa")) is None
