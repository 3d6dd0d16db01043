"""Comparing runs: existing workdirs into one report without training (evaluation.compare_runs,
scripts/compare.py --workdirs), and the sweep protocol (evaluation.sweep.run_sweep) driven by a
fake train_fn / evaluate_fn, in-process and in a second: phases, order, learning-rate choice and
the report, without a single real training run.
"""

import json
import math
import os
import pathlib
import shutil

import pytest

from mla_jax.evaluation import compare_runs, report
from mla_jax.evaluation import sweep as sweep_lib
from mla_jax.experiment import load_config
from mla_jax.training import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]


# Existing workdirs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Three workdirs of one tiny MHA checkpoint: `a` and `a_s1` differ only in train.seed (seeds
  of one variant), `b` in optim.lr (another variant). Their numbers coincide; what is tested is
  the grouping, the evaluation and the report."""
  root = tmp_path_factory.mktemp("runs")
  config = load_config(f"{REPO}/configs/lm.py:attn=mha,size=tiny", {
      "train.steps": 4, "train.eval_every": 2, "train.ckpt_every": 4, "train.log_every": 2,
      "train.eval_tokens": 1024, "train.peak_flops": 2e11, "train.log_health": False,
      "data.max_bytes": 640_000})
  trainer.train(config, str(root / "a"))
  for name, group, key, value in (("a_s1", "train", "seed", 1), ("b", "optim", "lr", 1e-2)):
    shutil.copytree(root / "a", root / name)
    path = root / name / "config.json"
    c = json.loads(path.read_text())
    c[group][key] = value
    path.write_text(json.dumps(c))
  return root


def test_compare_existing_workdirs_groups_seeds_and_writes_the_report(runs, tmp_path,
                                                                       monkeypatch):
  out = tmp_path / "out"
  wds = [str(runs / n) for n in ("a", "a_s1", "b")]
  said = []
  paths = compare_runs.compare_workdirs(wds, str(out), decode_lengths="64", decode_steps=4,
                                        decode_rounds=1, progress=said.append)
  doc = json.loads((out / "results.json").read_text())
  assert {v: s["runs"] for v, s in doc["variants"].items()} == {"a": ["a", "a_s1"], "b": ["b"]}
  assert doc["variants"]["a"]["seeds"] == [0, 1] and doc["variants"]["a"]["val_bpb_std"] == 0
  assert doc["setup"]["reference"] == "a" and doc["setup"]["wall"]["runs_trained"] == 0
  for name, r in doc["runs"].items():
    assert math.isfinite(r["val_bpb"]) and r["curve"] and r["decode"]["standard"], name
  assert [(c["a"], c["b"]) for c in doc["comparisons"]] == [("b", "a")]
  text = (out / "report.md").read_text()
  for needle in ("# Existing workdirs compared", "| a_s1 |", "| b |", "nothing was trained",
                 "python3 scripts/compare.py --workdirs=", "### Seeds"):
    assert needle in text, needle
  for png in report.PLOTS.values():
    assert (out / png).read_bytes()[:4] == b"\x89PNG" and str(out / png) in paths
  assert "variants: a = a, a_s1; b = b" in said
  for wd in wds:  # the user's workdirs are only read
    assert not os.path.exists(os.path.join(wd, "eval.json"))
  assert sorted(os.listdir(out / "evals")) == ["a.json", "a_s1.json", "b.json"]

  # Again: the evaluations are reused (nothing scored), the report rewritten.
  def never(*a, **k):
    raise AssertionError("evaluated again")

  monkeypatch.setattr(compare_runs, "evaluate_workdir", never)
  said.clear()
  compare_runs.compare_workdirs(wds, str(out), reference="b", decode_lengths="",
                                progress=said.append)
  assert sum("evaluation reused" in s for s in said) == 3
  assert json.loads((out / "results.json").read_text())["setup"]["reference"] == "b"


def test_compare_existing_workdirs_refuses_bad_lists(runs, tmp_path):
  with pytest.raises(sweep_lib.SweepError, match=r"--workdirs: .*missing: no such directory"):
    compare_runs.group_runs([str(runs / "a"), str(runs / "missing")])
  twin = tmp_path / "twin"
  shutil.copytree(runs / "a", twin)
  with pytest.raises(sweep_lib.SweepError, match="trains variant a with seed 0 like another"):
    compare_runs.group_runs([str(runs / "a"), str(twin)])
  with pytest.raises(sweep_lib.SweepError, match="--reference: 'zzz' is none of the runs"):
    compare_runs.compare_workdirs([str(runs / "a")], str(tmp_path / "o"), reference="zzz")


# The sweep protocol on a fake launcher ----------------------------------------------------------

# Fake validation bpb: MHA is best at lr 4e-3, MLA at 1e-3; seed 1 a little worse.
BPB = {("mha", 1e-3): 2.5, ("mha", 4e-3): 2.2, ("mla", 1e-3): 2.3, ("mla", 4e-3): 2.6}


def _fake_train(calls):
  def train_fn(sweep, run, workdir):
    steps = run["overrides"]["train.steps"]
    calls.append((run["name"], run["lr"], steps, run["seed"]))
    os.makedirs(os.path.join(workdir, "checkpoints", str(steps)))
    bpb = BPB[run["variant"], run["lr"]] + 0.01 * run["seed"] + (0.1 if steps < 8 else 0)
    config = {"model": {}, "data": {}, "optim": {"lr": run["lr"]},
              "train": {"steps": steps, "seed": run["seed"]}}
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config, f)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      f.write(json.dumps({"step": steps, "tokens": steps * 256, "val_loss": bpb * 0.69,
                          "val_bpb": bpb}) + "\n")
    return 1.0
  return train_fn


def _fake_eval(evaluated):
  def evaluate_fn(sweep, workdir, reuse):
    evaluated.append(os.path.basename(workdir))
    bpb = sweep_lib.final_val_bpb(workdir)
    mla = os.path.basename(workdir).startswith("mla")
    kv = 512 if mla else 1024
    return {
        "workdir": workdir, "step": 8, "tokens_trained": 2048, "train_steps": 8, "seed": 0,
        "val_bpb": bpb, "val_loss": bpb * 0.69, "val_tokens": 2048,
        "data": {"source": "stdlib", "path": "", "seq_len": 32, "bytes_per_token": 1.0,
                 "val_tokens_total": 4096, "val_bytes": 4096, "max_tokens": 2048},
        "params": {"total": 50_000, "non_embedding": 40_000},
        "attention": ({"variant": "mla", "kv_lora_rank": 8, "qk_rope_head_dim": 4,
                       "q_lora_rank": 16, "qk_nope_head_dim": 8, "v_head_dim": 8} if mla else
                      {"variant": "mha", "n_kv_heads": 4, "head_dim": 8}),
        "model": {"d_model": 32, "n_layers": 1, "n_heads": 4, "vocab_size": 256,
                  "max_seq_len": 128, "dtype": "float32", "cache_dtype": "float32", "d_ff": 88},
        "kv_bytes_per_token": kv, "kv_bytes_per_token_measured": kv,
        "kv_cache_bytes_at_max": {"bytes": kv * 128 * 8, "max_seq_len": 128, "batch": 8},
        "decode": {"standard": [{"context": 64, "ms_per_token": 1.0, "tokens_per_s": 1000.0}]},
        "device": "cpu", "loss_by_position": [bpb - i / 100 for i in range(32)]}
  return evaluate_fn


def test_sweep_phases_order_lr_choice_and_report_on_a_fake_train_fn(tmp_path):
  sweep_file = tmp_path / "fake.py"
  sweep_file.write_text(
      "from configs.sweeps import tiny\n\n\n"
      "def get_config():\n"
      "  c = tiny.get_config()\n"
      "  c.name, c.jobs, c.decode_rounds = 'fake', 1, 0  # one at a time: a fixed order\n"
      "  return c\n")
  calls, evaluated = [], []
  out = tmp_path / "out"
  sweep_lib.run_sweep(str(sweep_file), str(out), train_fn=_fake_train(calls),
                      evaluate_fn=_fake_eval(evaluated))
  # Phase 1, every variant at every rate for tune_steps; phase 2, the seeds at the chosen rate.
  assert calls == [("tune/mha_lr0.001", 1e-3, 4, 0), ("tune/mha_lr0.004", 4e-3, 4, 0),
                   ("tune/mla_lr0.001", 1e-3, 4, 0), ("tune/mla_lr0.004", 4e-3, 4, 0),
                   ("mha_s0", 4e-3, 8, 0), ("mha_s1", 4e-3, 8, 1),
                   ("mla_s0", 1e-3, 8, 0), ("mla_s1", 1e-3, 8, 1)]
  assert evaluated == ["mha_s0", "mha_s1", "mla_s0", "mla_s1"]
  doc = json.loads((out / "results.json").read_text())
  assert {v: t["chosen"] for v, t in doc["tuning"].items()} == {"mha": 4e-3, "mla": 1e-3}
  assert doc["tuning"]["mha"]["grid"] == {"0.001": pytest.approx(2.6), "0.004": pytest.approx(2.3)}
  assert doc["variants"]["mla"]["val_bpb_mean"] == pytest.approx(2.305)
  assert doc["variants"]["mla"]["val_bpb_std"] == pytest.approx(0.01 / 2 ** 0.5)
  assert doc["setup"]["wall"]["runs_trained"] == 8
  text = (out / "report.md").read_text()
  for needle in ("# Sweep `fake`", "| mha_s0 |", "| mla_s1 |", "### Learning-rate tuning",
                 "| mla vs mha | vs reference |", "--sweep=" + str(sweep_file)):
    assert needle in text, needle
  # Re-run: everything finished is reused, nothing trained.
  calls.clear()
  sweep_lib.run_sweep(str(sweep_file), str(out), train_fn=_fake_train(calls),
                      evaluate_fn=_fake_eval([]))
  assert calls == []
  # Workdirs of seed 0 deleted: with the report as `earlier` they are kept as measured (curve
  # included), the others reused, nothing trained; without it, they would be retrained.
  runs = out / "runs"
  first = json.loads((out / "results.json").read_text())
  shutil.copy(out / "results.json", tmp_path / "earlier.json")
  for name in ("mha_s0", "mla_s0", "tune"):
    shutil.rmtree(runs / name)
  evaluated.clear()
  sweep_lib.run_sweep(str(sweep_file), str(out), train_fn=_fake_train(calls),
                      evaluate_fn=_fake_eval(evaluated), earlier=str(tmp_path / "earlier.json"))
  assert [c[0] for c in calls] == [f"tune/{v}_lr{lr}" for v in ("mha", "mla")
                                   for lr in (0.001, 0.004)]  # tuning has no earlier stand-in
  assert evaluated == ["mha_s1", "mla_s1"]
  doc = json.loads((out / "results.json").read_text())
  for name in ("mha_s0", "mla_s0"):
    assert doc["runs"][name]["val_bpb"] == first["runs"][name]["val_bpb"]
    assert doc["runs"][name]["curve"] == first["runs"][name]["curve"] != []
  assert list(doc["runs"]) == list(first["runs"])
  assert doc["variants"]["mla"]["val_bpb_mean"] == pytest.approx(2.305)


def test_sweep_files_resolve_beside_the_configs_package():
  root = sweep_lib.configs_root()
  assert os.path.isfile(os.path.join(root, "configs", "lm.py"))
  assert sweep_lib.sweep_path("cpu") == os.path.join(root, "configs", "sweeps", "cpu.py")
  assert sweep_lib.experiment_path(sweep_lib.load_sweep("tiny")) == os.path.join(
      root, "configs", "lm.py")
  assert not hasattr(sweep_lib, "train_command")  # the train.py launcher is scripts/compare.py's
