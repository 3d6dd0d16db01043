"""Tests of eval.py (evaluation.workdir_eval), decode_speed, report, sweeps and the sweep files.

Two tiny trained workdirs are shared (module-scoped):
  stdlib_wd  configs/lm.py:attn=mla,size=tiny, 20 steps on 520 kB of stdlib bytes (trainer.train)
  greek_wd   the same model, 2 steps, char tokenizer on a Greek text: every character is 2 UTF-8
             bytes, so bits per byte must be exactly loss / ln 2 / 2.
"""

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mla_jax.core import cache as cache_lib
from mla_jax.core.config import ModelConfig, kv_cache_bytes_per_token
from mla_jax.core.model import Transformer, count_params, init_cache
from mla_jax.evaluation import decode_speed, plots, report, stats
from mla_jax.evaluation import sweep as compare
from mla_jax.evaluation import workdir_eval as mla_eval
from mla_jax.experiment import load_config
from mla_jax.storage.workdir import load_model
from mla_jax.training import trainer
from mla_jax.training.logger import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
GREEK = "αβγδεζηθικλμνξοπρστυφχψω"




def _train(workdir, **overrides):
  base = {"train.peak_flops": 2e11, "train.log_every": 10}
  config = load_config(f"{REPO}/configs/lm.py:attn=mla,size=tiny", {**base, **overrides})
  return trainer.train(config, str(workdir))


@pytest.fixture(scope="module")
def stdlib_wd(tmp_path_factory):
  wd = tmp_path_factory.mktemp("stdlib_wd")
  # 520 kB: the first 20 sorted stdlib files, so that one (abc.py) is validation.
  _train(wd, **{"train.steps": 20, "train.eval_every": 20, "train.ckpt_every": 20,
                "data.max_bytes": 640_000})
  return str(wd)


def greek_text(n_chars: int, seed: int) -> str:
  rng = np.random.default_rng(seed)
  words = ["".join(rng.choice(list(GREEK), size=rng.integers(2, 7))) for _ in range(40)]
  out = []
  while sum(map(len, out)) < n_chars:
    out.append(words[rng.integers(len(words))] + "·")  # U+00B7: also 2 bytes
  return "".join(out)[:n_chars]


@pytest.fixture(scope="module")
def greek_wd(tmp_path_factory):
  root = tmp_path_factory.mktemp("greek")
  path = root / "greek.txt"
  path.write_text(greek_text(20_000, 0), encoding="utf-8")
  wd = root / "wd"
  _train(wd, **{"train.steps": 2, "train.eval_every": 2, "train.ckpt_every": 2,
                "optim.warmup_steps": 1,
                "data.source": "text", "data.path": str(path), "data.tokenizer": "char"})
  return str(wd), str(path)


# eval.py on a trained workdir ---------------------------------------------------------------------


def test_eval_reports_finite_numbers_matching_the_trainer(stdlib_wd):
  r = mla_eval.evaluate_workdir(stdlib_wd, decode_lengths="64,max", decode_steps=4)
  for key in ("val_loss", "val_ppl", "val_bpb"):
    assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])
  assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2))  # bytes: 1 byte per token
  # The trainer's last evaluation (size=tiny scores the whole split) is the same number.
  last = [m for m in read_metrics(stdlib_wd) if "val_loss" in m][-1]
  assert r["val_loss"] == pytest.approx(last["val_loss"], rel=1e-5)
  assert r["val_tokens"] == last["val_tokens"]
  assert r["step"] == 20 and r["tokens_trained"] == 20 * 8 * 64
  model = load_model(stdlib_wd)
  assert r["params"] == count_params(model)
  assert r["attention"]["variant"] == "mla" and r["attention"]["kv_lora_rank"] == 32
  # Cache: analytic == measured, and the size at max length x batch follows from it.
  assert r["kv_bytes_per_token"] == kv_cache_bytes_per_token(model.cfg) == 4 * 2 * (32 + 8)
  assert r["kv_bytes_per_token_measured"] == r["kv_bytes_per_token"]
  assert r["kv_cache_bytes_at_max"] == {"bytes": 320 * 1024 * 8, "max_seq_len": 1024, "batch": 8}
  # Decode: both MLA paths at both lengths, positive times.
  assert set(r["decode"]) == {"absorbed", "naive"}
  for points in r["decode"].values():
    assert [p["context"] for p in points] == [64, 1024]
    assert all(p["ms_per_token"] > 0 and p["tokens_per_s"] > 0 for p in points)
  assert len(r["loss_by_position"]) == 64 and len(r["loss_by_position_buckets"]) == 8
  assert np.mean(r["loss_by_position"]) == pytest.approx(r["val_loss"], rel=1e-5)
  json.dumps(r)  # JSON-able as written by --json
  assert "val_bpb" in mla_eval.format_table(r)


def test_bpb_is_loss_over_ln2_times_tokens_over_bytes(greek_wd):
  wd, path = greek_wd
  r = mla_eval.evaluate_workdir(wd, decode_lengths="")
  # Hand computation: the text source's val split is the last 10% of the characters.
  text = pathlib.Path(path).read_text(encoding="utf-8")
  val_text = text[int(len(text) * 0.9):]
  n_tokens, n_bytes = len(val_text), len(val_text.encode("utf-8"))
  assert n_bytes == 2 * n_tokens  # every character is 2 bytes
  from mla_jax.data.tokenizer import load_tokenizer

  ids = load_tokenizer(os.path.join(wd, "tokenizer")).encode(val_text)
  t = 64
  windows = np.stack([ids[i * t:i * t + t + 1] for i in range((len(ids) - 1) // t)])
  logits = np.asarray(load_model(wd)(jnp.asarray(windows[:, :-1])), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  hand_loss = -np.take_along_axis(logp, windows[:, 1:, None], -1).mean()
  assert r["val_tokens"] == windows.shape[0] * t
  assert r["val_loss"] == pytest.approx(hand_loss, rel=1e-5)
  assert r["data"]["bytes_per_token"] == 2.0
  assert r["val_bpb"] == pytest.approx(hand_loss / math.log(2) * n_tokens / n_bytes, rel=1e-5)
  assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2) / 2, rel=1e-12)


def test_eval_on_another_text_uses_the_workdir_tokenizer(greek_wd, tmp_path):
  wd, _ = greek_wd
  other = tmp_path / "other.txt"
  other.write_text(greek_text(8_000, 1), encoding="utf-8")
  r = mla_eval.evaluate_workdir(wd, data=f"text:{other}", decode_lengths="")
  val_text = other.read_text(encoding="utf-8")[int(8_000 * 0.9):]
  assert r["data"]["source"] == "text" and r["data"]["val_tokens_total"] == len(val_text)
  assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2) / 2)
  bad = tmp_path / "latin.txt"
  bad.write_text("plain ascii is not in a Greek char vocabulary " * 100)
  with pytest.raises(ValueError, match="not in the vocabulary"):
    mla_eval.evaluate_workdir(wd, data=f"text:{bad}", decode_lengths="")


@pytest.mark.parametrize("attention,extra", [("mha", {}), ("gqa", {"n_kv_heads": 2}),
                                             ("mqa", {}), ("mla", {"q_lora_rank": 16})])
def test_measured_cache_bytes_equal_analytic(attention, extra):
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, attention=attention,
                    kv_lora_rank=12, qk_rope_head_dim=4, max_seq_len=32, **extra)
  graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  fill = jax.jit(lambda s: nnx.merge(graphdef, s).extend(jnp.ones((2, 8), jnp.int32),
                                                         init_cache(cfg, 2, 8))[1])
  cache = fill(state)
  expected = {"mha": 2 * 4 * 8, "gqa": 2 * 2 * 8, "mqa": 2 * 8, "mla": 12 + 4}[attention] * 2 * 4
  assert cache_lib.cache_bytes_per_token(cache) == kv_cache_bytes_per_token(cfg) == expected


def test_decode_timing_paths_agree_and_validate():
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, attention="mla",
                    kv_lora_rank=8, qk_rope_head_dim=4, max_seq_len=64)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  naive = decode_speed.with_decode_impl(model, "naive")
  assert naive.cfg.mla_decode_impl == "naive" and model.cfg.mla_decode_impl == "absorbed"

  @jax.jit
  def prefill_then_decode(state_a, state_b):  # the same weights behind both decode paths
    out = []
    for m in (nnx.merge(nnx.graphdef(model), state_a), nnx.merge(nnx.graphdef(naive), state_b)):
      _, cache = m.extend(jnp.arange(5, dtype=jnp.int32)[None], init_cache(cfg, 1, 8))
      out.append(m.extend(jnp.full((1, 1), 5, jnp.int32), cache)[0])
    return out

  outs = prefill_then_decode(nnx.state(model), nnx.state(naive))
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
  r = decode_speed.time_decode_impls(model, (16,), steps=3)
  assert set(r) == {"absorbed", "naive"} and [p["context"] for p in r["naive"]] == [16]
  with pytest.raises(ValueError, match="max_seq_len"):
    decode_speed.time_decode(model, 128)


# Errors: one line each ---------------------------------------------------------------------------


def _eval_cli(*args):
  return subprocess.run([sys.executable, "eval.py", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=120)


def test_eval_on_empty_dir_is_a_one_line_error(tmp_path):
  p = _eval_cli(f"--workdir={tmp_path}")
  assert p.returncode == 1 and p.stdout == ""
  assert p.stderr.strip().count("\n") == 0, p.stderr
  assert p.stderr.startswith("error: ") and "config.json" in p.stderr
  p = _eval_cli(f"--workdir={tmp_path}/missing")
  assert p.returncode == 1 and p.stderr.strip() == f"error: {tmp_path}/missing: no such directory"


def test_eval_errors_without_checkpoint_and_on_mismatch(stdlib_wd, tmp_path):
  no_ckpt = tmp_path / "no_ckpt"
  no_ckpt.mkdir()
  shutil.copy(os.path.join(stdlib_wd, "config.json"), no_ckpt)
  with pytest.raises(mla_eval.EvalError, match="no checkpoint"):
    mla_eval.evaluate_workdir(str(no_ckpt))
  assert not (no_ckpt / "checkpoints").exists()  # checking creates nothing
  changed = tmp_path / "changed"
  shutil.copytree(stdlib_wd, changed)
  config = json.loads((changed / "config.json").read_text())
  config["model"]["d_ff"] = 96  # the checkpoint holds d_ff=192
  (changed / "config.json").write_text(json.dumps(config))
  with pytest.raises(mla_eval.EvalError, match=r"does not match.*mlp.down is \(192, 64\) in the "
                     r"checkpoint, \(96, 64\) from config.json") as e:
    mla_eval.evaluate_workdir(str(changed), decode_lengths="")
  assert "\n" not in str(e.value)
  with pytest.raises(mla_eval.EvalError, match="--which"):
    mla_eval.evaluate_workdir(stdlib_wd, which="7")
  with pytest.raises(mla_eval.EvalError, match="--data"):
    mla_eval.evaluate_workdir(stdlib_wd, data="csv:x")


# Sweeps and compare.py --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cpu", "gpu", "tpu"])
def test_sweep_params_matched_within_tolerance(name):
  sweep = compare.load_sweep(name)
  assert sweep.param_tolerance <= 0.03
  rows = compare.param_table(sweep, compare.expand_runs(sweep))
  for row in rows:
    assert abs(row["rel"]) <= sweep.param_tolerance, (row["name"], row["total"], row["rel"])
  cfgs = {r["name"]: r["cfg"] for r in rows}
  by = lambda a: [c for c in cfgs.values() if c.attention == a]
  # Same width and depth everywhere; the variants the sweep promises.
  assert len({(c.d_model, c.n_layers, c.n_heads) for c in cfgs.values()}) == 1
  gqa, mla = by("gqa"), by("mla")
  assert by("mha") and by("mqa") and gqa and {c.kv_heads for c in gqa} == {2}
  kv = kv_cache_bytes_per_token
  mqa = by("mqa")[0]
  assert any(kv(m) == kv(gqa[0]) for m in mla)  # one MLA with GQA-2's cache
  assert any(kv(m) == kv(mqa) for m in mla)  # and one with MQA's
  assert any(kv(m) < kv(mqa) for m in mla)  # and one below MQA's
  if name == "cpu":  # where MQA is 25% of MHA, the third size is ~12%
    assert any(kv(m) <= 0.13 * kv(by("mha")[0]) for m in mla)
  assert all(c.d_ff for c in cfgs.values())  # the sweep lists every d_ff explicitly
  # The fair protocol: >= 4 learning rates spanning >= 8x, tuned on a shorter budget; 3 seeds.
  grid = sorted(sweep.lr_grid)
  assert len(grid) >= 4 and grid[-1] / grid[0] >= 8 and sweep.tune_steps < sweep.steps
  assert len(compare.seeds_of(sweep)) >= 3


def test_cpu_sweep_runs_every_variant_with_every_seed_on_equal_tokens():
  sweep = compare.load_sweep("cpu")
  runs = compare.expand_runs(sweep)
  seeds = {}
  for r in runs:
    seeds.setdefault(r["variant"], set()).add(r["seed"])
  assert all(s == set(compare.seeds_of(sweep)) for s in seeds.values())
  configs = [compare.run_config(sweep, r) for r in runs]
  assert len({(c.train.steps, c.train.global_batch, c.data.seq_len) for c in configs}) == 1
  assert {c.data.source for c in configs} == {"stdlib"}


# The comparison protocol: learning rates, seeds, noise ------------------------------------------


def test_best_lr_from_a_results_table():
  assert stats.best_lr({1e-3: 2.9, 2e-3: 2.7, 4e-3: 2.75, 8e-3: None}) == 2e-3
  assert stats.best_lr({1e-3: 2.7, 2e-3: 2.7}) == 1e-3  # a tie goes to the smaller rate
  assert stats.best_lr({1e-3: float("nan"), 2e-3: 3.0}) == 2e-3  # diverged never wins
  with pytest.raises(ValueError, match="every learning rate diverged"):
    stats.best_lr({1e-3: None})
  grid = [1e-3, 2e-3, 4e-3]
  assert stats.on_grid_edge(1e-3, grid) and not stats.on_grid_edge(2e-3, grid)
  tuning = [{"name": f"tune/{v}_lr{lr}", "variant": v, "lr": lr}
            for v in ("mha", "mla") for lr in (1e-3, 2e-3, 4e-3)]
  table = {"tune/mha_lr0.001": 3.0, "tune/mha_lr0.002": 2.8, "tune/mha_lr0.004": 2.9,
           "tune/mla_lr0.001": 3.1, "tune/mla_lr0.002": 3.0, "tune/mla_lr0.004": 2.95}
  chosen = compare.choose_lrs(tuning, table)
  assert chosen["mha"]["chosen"] == 2e-3 and not chosen["mha"]["on_edge"]
  assert chosen["mla"]["chosen"] == 4e-3 and chosen["mla"]["on_edge"]


def test_mean_std_and_exceeds_spread_match_hand_computed():
  # a: mean 2.0, sample std 0.1 (values 1.9, 2.0, 2.1); b: mean 2.3, std 0.1.
  c = stats.compare("mla", [1.9, 2.0, 2.1], "mha", [2.2, 2.3, 2.4])
  assert c["mean_a"] == pytest.approx(2.0) and c["std_a"] == pytest.approx(0.1)
  assert c["diff"] == pytest.approx(-0.3) and c["spread"] == pytest.approx(0.2)
  assert c["exceeds_spread"] and "mla is better beyond the seed spread" in c["text"]
  assert c["rel_diff"] == pytest.approx(-0.3 / 2.3)
  close = stats.compare("gqa", [2.0, 2.2], "mqa", [2.1, 2.3])  # |diff| 0.1 < 0.1414 * 2
  assert close["std_a"] == pytest.approx(0.1414214, rel=1e-6) and not close["exceeds_spread"]
  assert "within the seed spread" in close["text"]
  one = stats.compare("a", [2.0], "b", [3.0])
  assert not one["exceeds_spread"] and "seed spread unknown" in one["text"]


def test_pareto_front():
  assert plots.pareto_front([(4, 1.0), (2, 1.2), (2, 1.1), (1, 1.5), (4, 1.3)]) == [3, 2, 0]


def test_compare_tiny_sweep_writes_report(tmp_path):
  """The real launcher end to end: scripts/compare.py on the tiny sweep's two variants, one seed,
  no tuning phase (two train.py subprocesses at once), then evaluation, interleaved decode timing,
  the report and its plots. The protocol itself (tuning, the chosen rates, seeds, seed statistics)
  is checked on a fake launcher in test_compare_workdirs.py."""
  sweep = tmp_path / "tiny_real.py"
  sweep.write_text("from configs.sweeps import tiny\n\n\ndef get_config():\n"
                   "  c = tiny.get_config()\n"
                   "  c.name, c.lr_grid, c.seeds = 'tiny_real', [], [0]\n"
                   "  c.overrides.optim = dict(lr=4e-3)\n"
                   "  return c\n")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "JAX_COMPILATION_CACHE_DIR": str(REPO / ".jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}
  out = tmp_path / "out"
  p = subprocess.run([sys.executable, "scripts/compare.py", f"--sweep={sweep}", f"--out={out}"],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  paths = [str(out / f) for f in os.listdir(out)]
  results = json.loads((out / "results.json").read_text())
  assert set(results["runs"]) == {"mha", "mla"} and results["tuning"] == {}
  for name, r in results["runs"].items():
    assert math.isfinite(r["val_bpb"]) and r["kv_bytes_per_token"] > 0, name
    assert r["curve"] and r["decode"] and r["lr"] == 4e-3
    config = json.loads((out / "runs" / name / "config.json").read_text())
    assert config["optim"]["lr"] == 4e-3 and config["train"]["steps"] == 8
    # decode is timed once, interleaved over all runs (decode_rounds), not per run beside training
    assert json.loads((out / "runs" / name / "eval.json").read_text())["decode"] == {}
  wall = results["setup"]["wall"]
  assert (wall["jobs"], wall["runs_trained"], wall["runs"]) == (2, 2, 2)
  assert sum(wall["phases"].values()) == pytest.approx(wall["seconds"], abs=0.2)
  mla, mha = results["variants"]["mla"], results["variants"]["mha"]
  assert mla["kv_bytes_per_token"] < mha["kv_bytes_per_token"]
  (pair,) = results["comparisons"]
  assert (pair["a"], pair["b"], pair["kind"]) == ("mla", "mha", "vs reference")
  text = (out / "report.md").read_text()
  for needle in ("| mha |", "| mla |", f"compare.py --sweep={sweep}",
                 "| mla vs mha | vs reference |",
                 "- Wall time of the command that wrote this report: "):
    assert needle in text, needle
  for png in report.PLOTS.values():
    data = (out / png).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    assert f"]({png})" in text
  assert {str(out / p) for p in report.PLOTS.values()} <= set(paths)
  # Finished runs are not retrained (an interrupted sweep continues); --reuse reads eval.json.
  logs = [out / "runs" / "mha" / "train.log", out / "runs" / "mla" / "train.log"]
  sizes = [log.stat().st_size for log in logs]
  def never(*args):
    raise AssertionError(f"retrained {args[1]['name']}")

  compare.run_sweep(str(sweep), str(out), reuse=True, jobs=1, train_fn=never)
  assert [log.stat().st_size for log in logs] == sizes
  wall = json.loads((out / "results.json").read_text())["setup"]["wall"]
  assert (wall["jobs"], wall["runs_trained"]) == (1, 0)
  # A workdir trained for other steps is refused rather than resumed into the sweep.
  with pytest.raises(compare.SweepError, match="train.steps=8"):
    compare.run_sweep(str(sweep), str(out), steps=9, train_fn=never)
