"""What a new user meets first: the CLIs' help and errors, the console, a finished workdir, the
typed config groups and their defaults, and the data download.

One tiny run (`finished`, configs/lm.py:size=tiny on a generated 150 kB text, 6 steps) is trained
in-process and shared; the CLI tests run train.py / eval.py in subprocesses.
"""

import glob
import json
import os
import pathlib
import subprocess
import sys

import pytest

from mla_jax.data import download as download_data
from mla_jax.experiment import DataConfig, ExperimentConfig, OptimConfig, TrainConfig, load_config
from mla_jax.storage.workdir import Workdir
from mla_jax.training import drills as fd
from mla_jax.training import logger as logger_lib
from mla_jax.training import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = {"train.steps": 6, "train.eval_every": 3, "train.ckpt_every": 3, "train.log_every": 3,
        "train.eval_tokens": 2048, "train.peak_flops": 2e11}


def tiny_config(text: str, **overrides):
  return load_config(f"{REPO}/configs/lm.py:size=tiny",
                     {**TINY, "data.path": text, **overrides})


def cli(script: str, *args, timeout: int = 240):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
         "JAX_COMPILATION_CACHE_DIR": str(REPO / ".jax_cache")}
  return subprocess.run([sys.executable, script, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
  return fd.make_corpus(str(tmp_path_factory.mktemp("text") / "words.txt"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, text):
  wd = str(tmp_path_factory.mktemp("finished") / "run")
  summary = trainer.train(tiny_config(text), wd)
  return wd, summary


# Typed config groups ------------------------------------------------------------------------------


def test_warmup_default_follows_steps():
  o = OptimConfig()
  assert o.warmup_steps == -1
  assert [o.warmup(s) for s in (1, 2, 24, 50, 200, 480, 20000, 100000)] == [
      0, 1, 12, 25, 40, 48, 2000, 2000]
  assert OptimConfig(warmup_steps=5).warmup(100) == 5
  with pytest.raises(ValueError, match="optim.warmup_steps: 100 must be smaller"):
    OptimConfig(warmup_steps=100).warmup(100)


def test_data_path_means_text_and_stdlib_with_a_path_is_refused():
  assert DataConfig(path="x.txt").resolved_source == "text"
  assert DataConfig().resolved_source == "stdlib"
  with pytest.raises(ValueError, match=r"^data.path: 'x.txt' is set but data.source='stdlib'"):
    DataConfig(source="stdlib", path="x.txt")
  with pytest.raises(ValueError, match=r"^data.path: data.source='text' needs a path"):
    DataConfig(source="text")


@pytest.mark.parametrize("key, value, field", [
    ("train.steps", 0, "train.steps"), ("train.on_nonfinite", "ignore", "train.on_nonfinite"),
    ("optim.schedule", "linear", "optim.schedule"), ("optim.b2", 1.0, "optim.b2"),
    ("mesh.tensor", 0, "mesh.tensor"), ("data.val_fraction", 1.5, "data.val_fraction"),
    ("model.n_heads", 0, "model.n_heads"), ("data.seq_len", 4096, "data.seq_len"),
])
def test_each_group_checks_its_fields(key, value, field):
  config = load_config(f"{REPO}/configs/lm.py:size=tiny", {key: value})
  with pytest.raises(ValueError, match=rf"^{field}"):
    ExperimentConfig.from_config(config)


def test_lm_config_starts_from_the_dataclass_defaults():
  exp = ExperimentConfig.from_config(load_config(f"{REPO}/configs/lm.py"))
  assert exp.to_dict()["train"].keys() == TrainConfig().to_dict().keys()
  assert exp.train.steps == 480 and exp.optim.warmup(exp.train.steps) == 48
  assert exp.model_config(300).vocab_size == 300  # vocab 0 means the tokenizer's
  assert exp.model_config().vocab_size == 256  # before a tokenizer exists: a probe value


# A run, finished, and run again ------------------------------------------------------------------


def test_one_flag_smoke_run(tmp_path, text):
  summary = trainer.train(tiny_config(text, **{"train.steps": 1}), str(tmp_path / "smoke"))
  assert summary["step"] == 1 and summary["final"]["val_whole_split"]


def test_final_eval_scores_the_whole_split_and_says_so(finished):
  wd, summary = finished
  final = summary["final"]
  assert final["val_whole_split"] and final["val_tokens"] > TINY["train.eval_tokens"]
  periodic = [r for r in logger_lib.read_metrics(wd) if "val_tokens" in r]
  assert periodic[0]["val_tokens"] == 2048 and not periodic[0]["val_whole_split"]
  text = trainer.summary_text(summary)
  assert f"val_bpb {final['val_bpb']:.4f}  over the whole validation split" in text
  assert f"python3 eval.py --workdir={wd}" in text
  assert os.path.getsize(os.path.join(wd, "curves.png")) > 1000  # the run's own plot


def test_finished_workdir_is_reported_and_left_alone(finished, text):
  wd, first = finished
  before = {p: os.path.getmtime(p) for p in glob.glob(f"{wd}/**", recursive=True)}
  again = trainer.train(tiny_config(text), wd)
  assert again["already_finished"] and again["final"]["val_bpb"] == first["final"]["val_bpb"]
  after = {p: os.path.getmtime(p) for p in glob.glob(f"{wd}/**", recursive=True)}
  assert after == before  # no new TensorBoard file, config.json, metrics or checkpoint
  assert "already finished" in trainer.summary_text(again)


def test_small_corpus_warns_about_epochs(tmp_path, text, capsys):
  small = tmp_path / "small.txt"
  small.write_text(pathlib.Path(text).read_text()[:3_000])  # 2,700 training tokens
  trainer.train(tiny_config(str(small), **{"train.steps": 30}), str(tmp_path / "wd"))
  out = capsys.readouterr().out
  assert "warning: this run sees the training split" in out and "expect overfitting" in out


def test_nothing_is_created_before_the_data_is_read(tmp_path):
  wd = tmp_path / "never"
  with pytest.raises(OSError, match="data.path: no file"):
    trainer.train(tiny_config(str(tmp_path / "missing.txt")), str(wd))
  assert not wd.exists()


# Console ------------------------------------------------------------------------------------------


def test_status_line_and_plain_log_lines(tmp_path, capsys):
  assert logger_lib.status_line(10, 20, {"loss": 1.23456, "val_bpb": 2.5, "tokens_per_s": 24280.4,
                                         "mfu": 0.4213}) == (
      "loss 1.2346 | val_bpb 2.5000 | 24,280 tok/s | MFU 42.1%")
  log = logger_lib.MetricsLogger(str(tmp_path), 20, 0, interactive=False)
  log.message("header")
  log.log(10, {"loss": 2.0, "tokens_per_s": 1000.0, "mfu": 0.1})
  log.log(20, {"loss": 1.5, "val_bpb": 3.0, "tokens_per_s": 1000.0, "mfu": 0.1})
  log.close()
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == "header"  # no empty progress bar before it
  assert lines[1].startswith("step 10/20 | loss 2.0000 | 1,000 tok/s | MFU 10.0% | elapsed ")
  assert lines[2].startswith("step 20/20 | loss 1.5000 | val_bpb 3.0000 | 1,000 tok/s")


def test_progress_counts_finished_steps_only(tmp_path):
  class Pending:  # a step output the device has not finished
    def __init__(self):
      self.ready = False

    def is_ready(self):
      return self.ready

  log = logger_lib.MetricsLogger(str(tmp_path), 10, 0, interactive=False)
  outs = [Pending() for _ in range(3)]
  for i, out in enumerate(outs):
    log.dispatched(i + 1, out)
  assert log.done == 0
  outs[0].ready = outs[1].ready = True
  log.dispatched(4, Pending())
  assert log.done == 2  # steps 1-2 finished; 3 and 4 are still running
  log.close()


# CLIs ---------------------------------------------------------------------------------------------


def test_help_exits_0_and_lists_config_fields():
  p = cli("train.py", "--help")
  assert p.returncode == 0, p.stderr
  for needle in ("--workdir", "model.kv_lora_rank = 128", "train.steps = 480",
                 "optim.warmup_steps = -1", "data.source = 'auto'"):
    assert needle in p.stdout, needle
  p = cli("train.py", "--config=configs/lm.py:size=tiny", "--help")
  assert p.returncode == 0 and "train.steps = 50" in p.stdout
  p = cli("eval.py", "--help")
  assert p.returncode == 0 and "--which" in p.stdout and "--max_tokens" in p.stdout


def test_missing_workdir_says_what_it_wants():
  for script in ("train.py", "eval.py"):
    p = cli(script)
    assert p.returncode == 1 and p.stderr.startswith("error: --workdir is required: "), p.stderr


def test_compare_refuses_an_unknown_compress_policy_before_training(tmp_path):
  p = cli("scripts/compare.py", "--sweep=tiny", f"--out={tmp_path}", "--compress=h2o,lru")
  assert p.returncode == 1 and p.stderr.startswith("error: --compress") and "'lru'" in p.stderr
  assert os.listdir(tmp_path) == []  # nothing trained


def test_cli_finished_run_prints_result_and_next_steps(finished, text):
  wd, first = finished
  p = cli("train.py", "--config=configs/lm.py:size=tiny", f"--workdir={wd}",
          *[f"--config.{k}={v}" for k, v in TINY.items()], f"--config.data.path={text}")
  assert p.returncode == 0, p.stderr
  assert "already finished" in p.stdout and f"{first['final']['val_bpb']:.4f}" in p.stdout
  assert "python3 eval.py" in p.stdout


def test_eval_reports_progress_per_phase(finished):
  from mla_jax.evaluation.workdir_eval import evaluate_workdir

  said = []
  r = evaluate_workdir(finished[0], decode_lengths="", progress=said.append)
  phases = " | ".join(said)
  for needle in ("loading checkpoint step 6", "reading the validation data", "scoring validation",
                 "measuring the KV cache", "done in"):
    assert needle in phases, phases
  assert r["val_bpb"] == pytest.approx(finished[1]["final"]["val_bpb"], rel=1e-5)


# Data download ------------------------------------------------------------------------------------


def test_download_verifies_the_checksum(tmp_path, monkeypatch):
  good = tmp_path / "good.txt"
  good.write_bytes(b"tiny")
  spec = dict(url="unused", file="t.txt", bytes=4,
              sha256="e1ec3b6d5d8c5e9b1b0fa3c0e3c2d0c8d5c9c9a1e6a4e9a1c1bde0e1f2f6e8a7")
  monkeypatch.setitem(download_data.DATASETS, "t", spec)
  with pytest.raises(ValueError, match="SHA-256 .* expected 4 bytes"):
    download_data.download("t", str(tmp_path / "out"), url=good.as_uri())
  assert not (tmp_path / "out" / "t.txt").exists()  # nothing half-saved
  import hashlib

  spec["sha256"] = hashlib.sha256(b"tiny").hexdigest()
  path = download_data.download("t", str(tmp_path / "out"), url=good.as_uri())
  assert pathlib.Path(path).read_bytes() == b"tiny"
  with pytest.raises(ValueError, match="download failed .* any text file"):
    download_data.download("t", str(tmp_path / "none"), url=(tmp_path / "missing").as_uri())
  with pytest.raises(ValueError, match="--dataset: unknown"):
    download_data.download("nope", str(tmp_path))


# Packaging ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pins_file", ["requirements.txt", "requirements-jax011.txt"])
def test_requirements_pin_what_pyproject_allows(pins_file):
  """Each tested stack pins every dependency pyproject.toml declares, at a version in its range
  (jax 0.10.2 on Python 3.11, jax 0.11.2 on Python 3.12)."""
  import tomllib

  from packaging.requirements import Requirement
  from packaging.utils import canonicalize_name

  project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  declared = {canonicalize_name(r.name): r for r in map(
      Requirement, project["dependencies"] + project["optional-dependencies"]["test"])}
  pins = dict(line.strip().split("==") for line in (REPO / pins_file).read_text().splitlines()
              if line.strip() and not line.startswith(("#", "-e")))
  pins = {canonicalize_name(name): version for name, version in pins.items()}
  assert sorted(pins) == sorted(declared)
  for name, req in declared.items():
    assert req.specifier.contains(pins[name]), (pins_file, name, pins[name], str(req.specifier))


def test_lint_is_clean():
  p = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True,
                     text=True)
  assert p.returncode == 0, p.stdout[-3000:]


def test_committed_results_hold_no_absolute_paths():
  for path in glob.glob(str(REPO / "docs" / "results" / "**" / "*.json"), recursive=True):
    text = pathlib.Path(path).read_text()
    assert '"/' not in text and str(REPO) not in text, path
  assert json.loads((REPO / "docs" / "results" / "cpu" / "bench_train.json").read_text())


def test_workdir_opens_once_for_everything(finished):
  wd = Workdir.open(finished[0])
  assert wd.steps == [3, 6] and wd.finished and wd.resolve_step("latest") == 6
  assert wd.tokenizer().name == "bytes" and wd.model_config.n_layers == 2
  assert wd.meta(6)["step"] == 6 and wd.resolve_step("best") in (3, 6)


def test_health_metrics_are_logged_per_layer_and_finite(finished):
  import math

  records = [r for r in logger_lib.read_metrics(finished[0]) if "loss" in r]
  health = {k: v for k, v in records[-1].items() if k.startswith("health/")}
  for layer in (0, 1):  # size=tiny: 2 layers of MLA
    for stat in ("max_logit", "latent_rms", "q_rms", "k_rope_rms"):
      assert f"health/L{layer}/{stat}" in health
    for param in ("attn.wkv_a", "attn.wkv_b", "attn.wo", "mlp.down"):
      assert f"health/grad_norm/L{layer}/{param}" in health
      assert 0 < health[f"health/update_ratio/L{layer}/{param}"] < 1
  assert "health/grad_norm/embed.table" in health
  assert all(math.isfinite(v) for v in health.values())
  assert health["health/L0/latent_rms"] == pytest.approx(1.0, rel=0.2)  # kv_norm's output


def test_ci_runs_the_readme_test_command_exactly():
  """.ci/run's last line is the README's install-and-test command, lint included."""
  readme = (REPO / "README.md").read_text()
  ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
  block = readme.split("Install, lint and run the tests", 1)[1].split("```bash\n", 1)[1]
  assert block.split("\n", 1)[0] == ci
  assert "ruff check ." in ci and "pytest -q -n 2 --dist loadfile tests" in ci


def test_readme_gpu_line_installs_the_pinned_jax():
  """The single-GPU how-to's CUDA jax is requirements.txt's jax (a mismatched jaxlib breaks)."""
  pin = next(line.split("==")[1] for line in (REPO / "requirements.txt").read_text().splitlines()
             if line.startswith("jax=="))
  assert f'python3 -m pip install "jax[cuda12]=={pin}"' in (REPO / "README.md").read_text()
