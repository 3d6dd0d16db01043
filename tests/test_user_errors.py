"""A new user's second hour (issue 24): bad input gets one line naming the field or file, a stop
signal is honoured during evaluation, long phases show signs of life, finished runs say what they
ignore, a directory is a corpus, and the docs stand on their own.

One tiny run (`trained`: configs/lm.py:size=tiny, 6 steps on a generated text, checkpoints 3
and 6, the start-up peak faked low) is trained in-process and shared; CLI behaviour that needs a
real process (flags parsed at definition time, another working directory) runs in subprocesses.
"""

import contextlib
import glob
import io
import json
import os
import pathlib
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mla_jax.data import corpus as corpus_lib
from mla_jax.evaluation import metrics, plots
from mla_jax.evaluation import workdir_eval as mla_eval
from mla_jax.experiment import load_config
from mla_jax.storage import checkpoint as ckpt_lib
from mla_jax.storage.workdir import Workdir
from mla_jax.training import preflight, trainer
from mla_jax.training.logger import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = {"train.steps": 6, "train.eval_every": 3, "train.ckpt_every": 3, "train.log_every": 3,
        "train.eval_tokens": 2048, "train.peak_flops": 2e11, "train.log_health": False}
WORDS = ("the of and to in is that for it as with was on be by this are from at or an have not "
         "they which one you were all her his had but what there can out other").split()


def write_text(path, n_words: int = 40_000, seed: int = 0) -> str:
  rng = np.random.default_rng(seed)
  lines = [" ".join(rng.choice(WORDS, 12)) for _ in range(n_words // 12)]
  pathlib.Path(path).write_text(".\n".join(lines) + ".\n")
  return str(path)


def config(text: str, **overrides):
  return load_config(f"{REPO}/configs/lm.py:size=tiny", {**TINY, "data.path": text, **overrides})


def quiet_train(cfg, workdir) -> tuple[dict, str]:
  """trainer.train with its console output captured: (summary, stdout)."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    summary = trainer.train(cfg, str(workdir))
  return summary, out.getvalue()


def damage(workdir: str, step: int) -> None:
  """Truncates the largest file of checkpoints/<step>/params to half (a half-written step)."""
  files = [p for p in glob.glob(os.path.join(workdir, "checkpoints", str(step), "params", "**"),
                                recursive=True) if os.path.isfile(p)]
  path = max(files, key=os.path.getsize)
  os.truncate(path, os.path.getsize(path) // 2)


def cli(*args, cwd=REPO, timeout=120):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
         "JAX_COMPILATION_CACHE_DIR": str(REPO / ".jax_cache")}
  return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=timeout)


def one_line_error(p) -> str:
  assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
  lines = [line for line in p.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-3000:]
  return lines[0]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
  return write_text(tmp_path_factory.mktemp("text") / "words.txt")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text):
  wd = tmp_path_factory.mktemp("trained") / "run"
  with pytest.MonkeyPatch.context() as mp:  # a busy machine's start-up reading
    mp.setattr(trainer, "measure_peak_flops", lambda: 1e7)
    summary, out = quiet_train(config(text, **{"train.peak_flops": 0.0}), wd)
  return str(wd), summary, out


# 1, 2, 6, 13: command-line errors, one line, from wherever the user stands -----------------------


@pytest.mark.parametrize("script, args, in_tmp, expected", [
    # The README's smoke form without --config=, from another directory: the default resolves,
    # the misspelt key is named.
    ("train.py", ["--workdir=runs/bad", "--config.trian.steps=10"], True,
     "error: flag --config.trian.steps: unknown config field 'trian'; Did you mean \"train\""),
    ("scripts/plan.py", ["--config.model.d_modle=3"], False,
     "error: flag --config.model.d_modle: unknown config field 'd_modle'; Did you mean "
     "\"d_model\""),
    ("scripts/plan.py", ["--devices=3", "--mesh.data=2"], False,
     "error: mesh: data=2 x fsdp=1 x tensor=1 x sequence=1 (--config.mesh.data/fsdp/tensor/"
     "sequence) does not match the 3 devices"),
    ("scripts/plan.py", ["--config=configs/nope.py"], True,
     "error: --config: no such file 'configs/nope.py' (looked in "),
    ("scripts/launch_tpu.py", ["--tpu=t", "--zone=z", "--dry_run", "--",
                               "--config=configs/lm.py:size=tiny", "--workdir=/mnt/s/x",
                               "--config.train.stepz=2"], True,
     "error: flag --config.train.stepz: unknown config field 'stepz'"),
])
def test_cli_errors_are_one_line(tmp_path, script, args, in_tmp, expected):
  p = cli(REPO / script, *args, cwd=tmp_path if in_tmp else REPO)
  line = one_line_error(p)
  assert line.startswith(expected), line
  assert p.stdout == ""  # launch_tpu: no command printed, nothing launched
  assert not (tmp_path / "runs").exists()


def test_launch_tpu_setup_installs_the_pinned_accelerator_jax(tmp_path):
  pin = next(line.split("==")[1].strip() for line in
             (REPO / "requirements.txt").read_text().splitlines() if line.startswith("jax=="))
  p = cli(REPO / "scripts/launch_tpu.py", "--tpu=t", "--zone=z", "--setup", "--dry_run", "--",
          "--config=configs/lm.py:size=tiny", "--workdir=/mnt/s/x", cwd=tmp_path)
  assert p.returncode == 0, p.stderr
  unpack = [line for line in p.stdout.splitlines() if "tar xzf" in line][0]
  assert f'pip install -q "jax[tpu]=={pin}"' in unpack
  assert unpack.index("-r requirements.txt") < unpack.index("jax[tpu]")  # replaces the CPU build


def test_workdir_of_another_shape_suggests_a_new_workdir_only(trained, text, tmp_path):
  wd = tmp_path / "other"
  shutil.copytree(trained[0], wd)
  with pytest.raises(ValueError) as e:
    trainer.train(config(text, **{"model.d_ff": 96}), str(wd))
  msg = str(e.value)
  assert "model.d_ff: 0 -> 96" in msg and "use a new --workdir" in msg
  assert "allow_config_change" not in msg and "reshapes" in msg
  with pytest.raises(ValueError, match="allow_config_change=True") as e:  # shape-preserving
    trainer.train(config(text, **{"model.rope_layout": "interleaved"}), str(wd))


def test_execution_choices_switch_on_an_existing_workdir(trained, text, tmp_path):
  """attn_impl, attn_block, remat, mla_*_impl: the same model run another way, so a finished
  workdir takes them without allow_config_change and records them; its parameters stay."""
  wd = tmp_path / "exec"
  shutil.copytree(trained[0], wd)
  before = json.loads((wd / "config.json").read_text())["model"]
  switch = {"model.attn_impl": "xla", "model.attn_block": 2, "model.remat": True,
            "model.mla_decode_impl": "naive"}
  summary, _ = quiet_train(config(text, **switch), wd)
  assert summary["step"] == TINY["train.steps"]
  after = json.loads((wd / "config.json").read_text())["model"]
  assert {k: after[k] for k in after if after[k] != before[k]} == {
      k.split(".")[1]: v for k, v in switch.items()}
  assert "config_changes" not in json.loads((wd / "config.json").read_text())


# 3: a damaged checkpoint -------------------------------------------------------------------------


def test_eval_falls_back_past_a_damaged_checkpoint_and_says_so(trained, tmp_path):
  wd = str(tmp_path / "broken")
  shutil.copytree(trained[0], wd)
  damage(wd, 6)
  before = sorted(os.listdir(os.path.join(wd, "checkpoints")))
  said = []
  r = mla_eval.evaluate_workdir(wd, decode_lengths="", progress=said.append)
  assert r["step"] == 3
  note = [s for s in said if "damaged" in s]
  assert note and note[0].startswith(f"{wd}/checkpoints/6: checkpoint is damaged (unreadable: ")
  assert note[0].endswith("using step 3, the newest readable one")
  assert "pybind11" not in note[0] and "does not match" not in note[0]
  with pytest.raises(mla_eval.EvalError) as e:  # an explicit step is refused, naming the others
    mla_eval.evaluate_workdir(wd, which="6", decode_lengths="")
  msg = str(e.value)
  assert msg.startswith(f"{wd}/checkpoints/6: checkpoint is damaged") and "\n" not in msg
  assert msg.endswith("other steps: [3] (--which=N)") and "does not match" not in msg
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == before  # eval moves nothing


def test_failed_restore_debris_is_dropped_and_other_reports_kept(monkeypatch):
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  ckpt_lib.quiet_orbax_logs()
  hook = sys.unraisablehook

  async def _read_array_index_and_device_put():
    pass

  class Report:
    def __init__(self, obj, exc):
      self.object, self.exc_value = obj, exc

  coroutine = _read_array_index_and_device_put()
  hook(Report(coroutine, RuntimeError("boom")))
  hook(Report(None, RuntimeError("Event loop is closed")))
  other = Report("something else", ValueError("real"))
  hook(other)
  coroutine.close()
  assert seen == [other]


# 4: generate's limits, before anything loads --------------------------------------------------


@pytest.mark.parametrize("n, expected", [
    (0, "error: --max_new_tokens: must be >= 1, got 0"),
    (5000, "error: --max_new_tokens: 5000 does not fit: the 2-token prompt leaves 1022 of the "
           "model's 1024 positions (model.max_seq_len); use --max_new_tokens=1022 or less"),
])
def test_generate_refuses_lengths_it_cannot_produce(trained, n, expected):
  p = cli(REPO / "scripts/generate.py", f"--workdir={trained[0]}", "--prompt=ab",
          f"--max_new_tokens={n}")
  assert one_line_error(p) == expected


# 5: an infeasible compression point is skipped, named, before anything is measured --------------


def test_compress_sweep_skips_infeasible_points_and_keeps_rows(trained, tmp_path):
  from mla_jax.kvcompress import sweep as kv_sweep

  points, skipped = kv_sweep.plan_points(64, ("streaming", "h2o"), (0.5, 0.875), ("none",), False)
  assert [(p, r) for p, r, _, _ in points] == [("streaming", 0.5), ("h2o", 0.5), ("h2o", 0.875)]
  assert skipped == [{"policy": "streaming", "quant": "none", "ratio": 0.875, "budget": 4,
                      "reason": "4 is below sinks + window = 4 + 1; the cache could not keep "
                                "them"}]
  runs = tmp_path / "runs"
  shutil.copytree(trained[0], runs / "tiny")
  said = []
  result = kv_sweep.run_compress_sweep(str(runs), str(tmp_path / "out"), policies=("streaming",),
                                       ratios=(0.875,), quants=("none",), windows=2,
                                       progress=said.append)
  assert said[0] == ("skipped tiny: streaming none evict 0.875 (budget 4 slots): 4 is below "
                     "sinks + window = 4 + 1; the cache could not keep them")
  assert [r["policy"] for r in result["rows"]] == ["none"]  # the model's own cache, measured
  assert result["skipped"][0]["run"] == "tiny"
  assert json.loads((tmp_path / "out" / "rows" / "tiny.json").read_text())["rows"]
  assert "- tiny: streaming none evict 0.875 (budget 4 slots)" in (
      tmp_path / "out" / "report.md").read_text()


# 7, 8: a stop during evaluation; the final evaluation shows progress ----------------------------


@pytest.mark.parametrize("when", ["periodic", "final"])
def test_stop_during_evaluation_is_honoured_at_once(text, tmp_path, monkeypatch, when):
  """SIGTERM after the evaluation's second batch: at most one more batch, the evaluation left
  within 2 s, the step's checkpoint kept; an interrupted final evaluation runs on the next
  invocation. (The wait for that checkpoint is not counted: on the tests' 8 fake devices orbax's
  first save slices every replica eagerly, seconds on a loaded CPU; one device saves at once.)"""
  scored, sent, left = [], [], []
  real_init, real_call = metrics.Evaluator.__init__, metrics.Evaluator.__call__

  def call(self, *a, **k):
    try:
      return real_call(self, *a, **k)
    finally:
      left.append(time.perf_counter())

  def init(self, *a, **k):
    real_init(self, *a, **k)
    step = self.step

    def counted(*args):
      scored.append(time.perf_counter())
      if len(scored) == 2 and not sent:
        sent.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGTERM)
      return step(*args)

    self.step = counted

  monkeypatch.setattr(metrics.Evaluator, "__init__", init)
  monkeypatch.setattr(metrics.Evaluator, "__call__", call)
  # Periodic: the whole split every 3 steps (as size=tiny's default); final: only the last step.
  extra = ({"train.eval_tokens": 0} if when == "periodic" else
           {"train.eval_every": 100, "train.steps": 3})
  wd = tmp_path / "wd"
  summary, out = quiet_train(config(text, **extra), wd)
  assert sent and len([t for t in scored if t > sent[0]]) <= 1, len(scored)
  assert left[-1] - sent[0] < 2.0, left[-1] - sent[0]
  assert summary["stopped_by"] == "SIGTERM" and summary["step"] == 3
  assert Workdir.open(str(wd)).steps == [3]
  assert "interrupted after" in out
  assert not [r for r in read_metrics(str(wd)) if "val_loss" in r]  # no partial score logged
  if when == "periodic":
    assert "re-run the same command to resume" in trainer.summary_text(summary)
    return
  life = re.search(r"^step 1/3 done after [\d.]+ s \(compilation included\)", out, re.M)
  final = re.search(r"^final evaluation: the whole validation split, [\d,]+ tokens in \d+ batches$",
                    out, re.M)
  assert life and final and life.start() < final.start(), out  # signs of life before step 3
  text_ = trainer.summary_text(summary)
  assert "the final evaluation of step 3 was interrupted" in text_ and "re-run" in text_
  monkeypatch.undo()
  again, out = quiet_train(config(text, **extra), wd)
  assert again["final_eval_only"] and again["final"]["val_whole_split"]
  assert "its interrupted final evaluation ran now" in trainer.summary_text(again)
  assert [r["step"] for r in read_metrics(str(wd)) if "val_loss" in r] == [3]
  assert Workdir.open(str(wd)).steps == [3]  # nothing retrained


# 9, 10, 11: honest numbers on the console and in the plot ----------------------------------------


def test_low_measured_peak_is_warned_about(trained):
  out = trained[2]
  assert re.search(r"^warning: the matmul peak measured at start, 0\.0 GFLOP/s, is far below the "
                   r"usual ~[\d,]+ GFLOP/s of this cpu; .* set train.peak_flops", out, re.M), out
  assert "warning: MFU " in out and "is impossible" in out
  import jax

  assert preflight.peak_warning(1e15, jax.devices()[0]) is None


def test_curves_mark_the_whole_split_point_apart(trained):
  c = plots.run_curves(read_metrics(trained[0]))
  assert [s for s, _ in c["prefix"]] == [3] and c["prefix_tokens"] == 2048
  assert [s for s, _ in c["whole"]] == [6] and c["whole_tokens"] == trained[1]["final"][
      "val_tokens"]
  assert os.path.getsize(os.path.join(trained[0], "curves.png")) > 1000


def test_final_line_names_the_field_that_set_the_prefix(text, tmp_path):
  summary, _ = quiet_train(config(text, **{"train.steps": 3, "train.final_eval_tokens": 1024}),
                           tmp_path / "wd")
  line = trainer.summary_text(summary).splitlines()[0]
  assert line.endswith("over a 1,024-token prefix of the validation split "
                       "(train.final_eval_tokens): 1,024 tokens"), line


def test_finished_run_names_ignored_settings_and_extending_steps_continues(trained, text,
                                                                           tmp_path):
  wd = tmp_path / "done"
  shutil.copytree(trained[0], wd)
  saved = (wd / "config.json").read_text()
  again, _ = quiet_train(config(text, **{"optim.lr": 0.01}), wd)
  assert again["already_finished"]
  assert ("ignored, since this run is finished: optim.lr: 0.003 -> 0.01"
          in trainer.summary_text(again))
  assert (wd / "config.json").read_text() == saved  # the settings it was trained with
  more, out = quiet_train(config(text, **{"train.steps": 8}), wd)
  assert more["step"] == 8 and not more["already_finished"]
  assert "train.steps: 6 -> 8: this run had finished at step 6; it continues to step 8" in out


# 12: a directory as data.path (and eval.py --data=text:DIR) ------------------------------------


def test_a_directory_is_its_text_files_in_sorted_order(trained, tmp_path):
  root = tmp_path / "corpus"
  (root / "b" / "deeper").mkdir(parents=True)
  (root / ".git").mkdir()
  write_text(root / "b" / "deeper" / "z.txt", 3000, 1)
  write_text(root / "a.md", 3000, 2)
  write_text(root / "b" / "c.txt", 3000, 3)
  (root / ".git" / "HEAD").write_text("ref: x\n")
  (root / "blob.bin").write_bytes(b"\x00\x01binary")
  files = corpus_lib.text_files(str(root) + "/")
  assert [os.path.relpath(f, root) for f in files] == ["a.md", "b/c.txt", "b/deeper/z.txt"]
  joined = corpus_lib.load_corpus("text", str(root), "bytes")
  assert joined.train_bytes + joined.val_bytes == sum(os.path.getsize(f) for f in files) + 2 * 2
  r = mla_eval.evaluate_workdir(trained[0], data=f"text:{root}", decode_lengths="")
  assert r["data"]["path"] == str(root) and r["val_tokens"] > 0
  (tmp_path / "binary").mkdir()
  (tmp_path / "binary" / "blob.bin").write_bytes(b"\x00\x01binary")
  with pytest.raises(FileNotFoundError, match="holds no text file"):
    corpus_lib.text_files(str(tmp_path / "binary"))


# 14, 15: the Hugging Face tools -----------------------------------------------------------------


def test_check_hf_export_without_torch_says_how_to_get_it(monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "torch", None)  # not installed
  monkeypatch.setattr(sys, "argv", ["check_hf_export.py", "--hf_dir=x", "--reference=y"])
  with pytest.raises(SystemExit) as e:
    runpy.run_path(str(REPO / "scripts/check_hf_export.py"), run_name="__main__")
  err = capsys.readouterr().err.strip()
  assert e.value.code == 1 and "\n" not in err
  assert err.startswith("error: scripts/check_hf_export.py needs torch and transformers")
  assert "python3 -m venv /tmp/hfenv && /tmp/hfenv/bin/pip install torch transformers" in err


def test_export_names_the_conversion_flags_and_keeps_special_tokens(tmp_path):
  from mla_jax.core.config import ModelConfig
  from mla_jax.interop import hf_export, hf_import

  cfg = ModelConfig(attention="mla", d_model=64, n_heads=4, n_layers=1, kv_lora_rank=16,
                    qk_rope_head_dim=8, mla_rope_kv_heads=2, vocab_size=64,
                    norm_eps=hf_import.DEEPSEEK_LATENT_EPS)
  with pytest.raises(hf_export.HFExportError) as e:
    hf_export.hf_tensors(cfg, {})
  assert str(e.value).startswith("model.mla_rope_kv_heads: 2: DeepSeek-V3 has one shared rope key")
  assert "--rope_key=shared --latent_norm --rope_strategy=high" in str(e.value)

  src = REPO / "tests" / "fixtures" / "hf" / "llama_gqa"
  hf = json.loads((src / "config.json").read_text())
  hf_import.import_hf(str(src), str(tmp_path / "wd"))
  hf_export.export_hf(str(tmp_path / "wd"), str(tmp_path / "hf"))
  out = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert (out["bos_token_id"], out["eos_token_id"]) == (hf["bos_token_id"], hf["eos_token_id"])
  # A workdir fine-tuned from the import (train.init_from) inherits them.
  tuned = {"model": {}, "train": {"init_from": str(tmp_path / "wd")}}
  assert hf_export.special_token_ids(tuned)["eos_token_id"] == hf["eos_token_id"]


# 16: the docs stand on their own in a clone ------------------------------------------------------


def test_docs_links_resolve_inside_the_checkout():
  docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
  for doc in docs:
    text = doc.read_text()
    assert "../shared" not in text and "/work/" not in text, doc
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
      if not re.match(r"[a-z]+://", target):
        assert (doc.parent / target).exists(), (doc.name, target)
