"""Reliability: exact resume after a crash or preemption, damaged checkpoints, non-finite numbers,
failing disks, bad configuration and bad input.

The end-to-end drills run train.py in subprocesses (mla_jax/training/drills.py, which
scripts/fault_drill.py also runs by hand); they are marked `slow` but run by default (deselect with
`-m "not slow"`). One uninterrupted reference run is shared by the drills that compare with it.
"""

import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mla_jax.core.config import ModelConfig  # noqa: E402
from mla_jax.core.model import Transformer  # noqa: E402
from mla_jax.storage import checkpoint as ckpt_lib
from mla_jax.storage.workdir import CONFIG_FILE, Workdir  # noqa: E402
from mla_jax.training import drill_runner
from mla_jax.training import drills as fd
from mla_jax.training.step import TrainState, make_train_step  # noqa: E402

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  return str(tmp_path_factory.mktemp("drills"))


@pytest.fixture(scope="module")
def ref(base):
  return fd.reference(base)


# Crash, preemption --------------------------------------------------------------------------------


@slow
def test_sigkill_resumes_bitwise(base, ref):
  # Killed past the first checkpoint: the same command resumes from the last committed step,
  # drops the stale metrics records and ends bitwise equal to the uninterrupted run.
  print(fd.drill_crash(base, ref, kill_at=fd.CKPT_EVERY + 3))


@slow
@pytest.mark.parametrize("sig, resume", [(signal.SIGTERM, True), (signal.SIGINT, False)])
def test_preemption_checkpoints_and_exits_0(base, ref, sig, resume):
  print(fd.drill_preempt(base, ref, sig, at=fd.CKPT_EVERY + 2, resume=resume))


# Damaged checkpoints -----------------------------------------------------------------------------


@slow
def test_truncated_newest_checkpoint_falls_back_with_a_warning(base, ref):
  # Also re-saves the damaged step's number (moved aside first) and keeps the good one.
  print(fd.drill_corrupt(base, ref, "truncate"))


def _params_target(workdir):
  cfg = ModelConfig.from_mapping(Workdir.open(workdir).config["model"])
  params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))[1]
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return ckpt_lib.abstract_with_shardings(params, jax.tree.map(lambda _: sharding, params))


@slow
def test_restore_skips_damaged_and_tmp_steps_and_never_deletes(base, ref, caplog):
  wd = os.path.join(base, "restore_level")
  shutil.copytree(ref.workdir, wd)
  steps = fd.ckpt_steps(wd)
  newest, previous = steps[-1], steps[-2]
  # An interrupted async save: orbax's tmp dir of a later step, half-written.
  tmp = os.path.join(wd, "checkpoints", f"{newest + 4}.orbax-checkpoint-tmp-1234")
  shutil.copytree(os.path.join(wd, "checkpoints", str(newest), "params"),
                  os.path.join(tmp, "params"))
  fd.damage(wd, newest, "delete")  # a file of the newest step deleted
  target = _params_target(wd)

  ckpt = ckpt_lib.Checkpointer(wd)
  assert ckpt.steps() == steps  # the tmp dir is not a step
  with caplog.at_level("WARNING", logger="mla_jax.storage.checkpoint"):
    step, params, _, meta = ckpt.restore_latest_good(target)
  assert step == previous and meta["step"] == previous
  assert f"checkpoint step {newest} in" in caplog.text and "unreadable" in caplog.text
  assert ckpt.steps() == steps[:-1]  # the damaged step no longer counts among the latest N
  ckpt.close()
  names = os.listdir(os.path.join(wd, "checkpoints"))
  assert [n for n in names if n.startswith(f"{newest}.corrupt-")]  # moved aside, not deleted
  assert os.path.isdir(tmp)
  for a, b in zip(jax.tree.leaves(params), fd.params(wd, previous)):
    assert np.array_equal(np.asarray(a), b)

  # Every step damaged: an error, not a silent fresh start; nothing is moved.
  for s in fd.ckpt_steps(wd):
    fd.damage(wd, s, "truncate")
  ckpt = ckpt_lib.Checkpointer(wd)
  with pytest.raises(ckpt_lib.CheckpointError, match=f"step {previous}"):
    ckpt.restore_latest_good(target)
  ckpt.close()
  assert fd.ckpt_steps(wd) == steps[:-1]


# Non-finite numbers ------------------------------------------------------------------------------


@slow
def test_nonfinite_stops_naming_step_checkpoint_and_cause(base, ref):
  print(fd.drill_nonfinite(base, ref))


@pytest.mark.parametrize("microbatches", [1, 2])
def test_step_never_applies_a_nonfinite_update(microbatches):
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, kv_lora_rank=16,
                    qk_rope_head_dim=8, max_seq_len=32)
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  tx = optax.adamw(1e-2)
  zero = jnp.zeros((), jnp.int32)
  state = TrainState(step=zero, params=params, opt_state=tx.init(params), skipped=zero,
                     first_bad_step=zero - 1)
  step = jax.jit(make_train_step(graphdef, tx, microbatches))
  batch = jnp.asarray(np.random.RandomState(0).randint(0, 64, (4, 17)), jnp.int32)
  good, metrics = step(state, batch)
  assert np.isfinite(metrics["loss"]) and int(good.skipped) == 0
  leaves, treedef = jax.tree.flatten(good.params)
  leaves[0] = leaves[0] * jnp.nan  # NaN injected into one parameter -> NaN loss and gradients
  poisoned = good.replace(params=jax.tree.unflatten(treedef, leaves))
  after, metrics = step(poisoned, batch)
  assert not np.isfinite(metrics["loss"])
  assert int(after.skipped) == 1 and int(after.first_bad_step) == 1 and int(after.step) == 2
  same = lambda a, b: all(np.array_equal(x, y, equal_nan=True)
                          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert same(after.params, poisoned.params)  # nothing applied ...
  assert same(after.opt_state, poisoned.opt_state)  # ... and the optimizer moments untouched


# Failing disk ------------------------------------------------------------------------------------


@slow
def test_failed_saves_are_reported_retried_and_never_corrupt(base, ref):
  print(fd.drill_disk(base, ref))


# Reusing a workdir with another model ------------------------------------------------------------


@slow
def test_config_change_refused_or_deliberate(base, ref):
  cases = {
      "refused": ["--config.model.rope_layout=interleaved"],
      "allowed": ["--config.model.rope_layout=interleaved",
                  "--config.train.allow_config_change=True"],
      "shapes": ["--config.model.d_model=32", "--config.train.allow_config_change=True"],
  }
  jobs = []
  for name, extra in cases.items():
    wd = os.path.join(base, f"change_{name}")
    shutil.copytree(ref.workdir, wd)
    jobs.append((wd, ref.args(*extra)))
  refused, allowed, shapes = drill_runner.run_parallel(jobs)

  assert refused.rc == 1 and "Traceback" not in refused.err, refused.describe()
  assert "model.rope_layout: 'half' -> 'interleaved'" in refused.last_line
  assert "allow_config_change" in refused.last_line

  assert allowed.rc == 0, allowed.describe()
  assert "already finished" in allowed.out  # the change is recorded; nothing left to train
  assert "allow_config_change: continuing" in allowed.err  # the warning reaches stderr
  saved = Workdir.open(jobs[1][0]).config
  assert saved["model"]["rope_layout"] == "interleaved"
  assert [c["model"] for c in saved["config_changes"]] == [{"rope_layout": ["half",
                                                                            "interleaved"]}]

  assert shapes.rc == 1 and "Traceback" not in shapes.err, shapes.describe()
  line = shapes.last_line
  assert line.startswith("error: train.allow_config_change:") and "model.d_model: 64 -> 32" in line
  assert "blocks.0.attn.wkv_a: (64, 40) -> (32, 40)" in line
  assert Workdir.open(jobs[2][0]).config["model"]["d_model"] == 64  # left as it was


# Bad configuration: one line naming the field, exit 1, before reading data or compiling ---------

NO_DATA = "--config.data.path=/nonexistent/corpus.txt"  # reading it would fail with data.path
# What the command line itself refuses (flag parsing, the config file's argument): train.py in
# subprocesses, on 2 devices.
BAD_FLAGS = {
    "unknown_key": (["--config.train.stepz=5"], "--config.train.stepz"),
    "unknown_section": (["--config.trian.steps=5"], "--config.trian.steps"),
    "wrong_type_int": (["--config.train.steps=abc"], "--config.train.steps"),
    "wrong_type_float": (["--config.optim.lr=fast"], "--config.optim.lr"),
    "config_arg": (["--config=configs/lm.py:size=huge"], "size='huge'"),
    "heads_do_not_divide": (["--config.model.n_heads=3"], "n_heads=3"),
}
# What the config checks refuse (fields, mesh, batch split): trainer.train in this process, on
# the suite's 8 devices; the CLI turns the same ValueError into its one line (BAD_FLAGS' runs).
BAD_FIELDS = {
    "kv_heads_do_not_divide": ({"model.attention": "gqa", "model.n_kv_heads": 3},
                               "model.n_kv_heads"),
    "mesh_too_big": ({"mesh.data": 3}, "mesh: "),
    "mesh_does_not_divide": ({"mesh.tensor": 3}, "mesh.data"),
    "batch_vs_data_parallel": ({"train.global_batch": 7}, "train.global_batch"),
    "batch_vs_microbatches": ({"train.microbatches": 3}, "train.microbatches"),
    "seq_len_above_max": ({"data.seq_len": 2048}, "data.seq_len"),
    "unknown_source": ({"data.source": "foo"}, "data.source"),
    "unknown_tokenizer": ({"data.tokenizer": "foo"}, "data.tokenizer"),
    "unknown_nonfinite_policy": ({"train.on_nonfinite": "ignore"}, "train.on_nonfinite"),
}


@pytest.fixture(scope="module")
def bad_flag_runs(base):
  jobs = []
  for name, (extra, _) in BAD_FLAGS.items():
    args = ["--config=configs/lm.py:size=tiny", "--config.data.source=text", NO_DATA]
    if extra[0].startswith("--config="):
      args = args[1:]
    jobs.append((os.path.join(base, f"badconfig_{name}"), args + extra))
  procs = drill_runner.run_parallel(jobs, devices=2)  # 2 devices: data-parallel size 2
  return {name: (run, wd) for name, run, (wd, _) in zip(BAD_FLAGS, procs, jobs)}


@slow
@pytest.mark.parametrize("name", list(BAD_FLAGS))
def test_bad_config_is_one_line_naming_the_field(bad_flag_runs, name):
  run, workdir = bad_flag_runs[name]
  assert run.rc == 1, run.describe()
  assert "Traceback" not in run.err, run.describe()
  assert run.last_line.startswith("error: ") and BAD_FLAGS[name][1] in run.last_line, (
      run.last_line)
  assert "data.path" not in run.last_line  # found before any data was read
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))
  assert not os.path.exists(os.path.join(workdir, CONFIG_FILE))


@pytest.mark.parametrize("name", list(BAD_FIELDS))
def test_bad_field_is_refused_naming_it_before_data_or_compile(base, name):
  from mla_jax.experiment import load_config
  from mla_jax.training import trainer

  overrides, field = BAD_FIELDS[name]
  workdir = os.path.join(base, f"badfield_{name}")
  spec = os.path.join(drill_runner.REPO, "configs", "lm.py") + ":size=tiny"
  config = load_config(spec, {"data.source": "text", "data.path": "/nonexistent/corpus.txt",
                              **overrides})
  with pytest.raises(ValueError) as e:
    trainer.train(config, workdir)
  message = str(e.value).splitlines()[0]
  assert field in message and "data.path" not in message, message  # before any data was read
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))
  assert not os.path.exists(os.path.join(workdir, CONFIG_FILE))


# Bad data: one line, exit 1 ----------------------------------------------------------------------


@slow
def test_bad_data_is_one_line(base):
  d = os.path.join(base, "baddata")
  os.makedirs(os.path.join(d, "tokens"))
  with open(os.path.join(d, "empty.txt"), "w"):
    pass
  with open(os.path.join(d, "short.txt"), "w") as f:
    f.write("just a few words, fewer than one window of 64 tokens\n" * 2)
  with open(os.path.join(d, "latin1.txt"), "wb") as f:
    f.write(("caf\xe9 cr\xe8me br\xfbl\xe9e. " * 500).encode("latin-1"))
  np.arange(4096, dtype=np.uint16).tofile(os.path.join(d, "tokens", "train.bin"))
  np.arange(512, dtype=np.uint16).tofile(os.path.join(d, "tokens", "val.bin"))
  with open(os.path.join(d, "tokens", "meta.json"), "w") as f:
    json.dump({"vocab_size": 1000, "dtype": "uint16", "train_bytes": 4096, "val_bytes": 512}, f)
  cases = {
      "missing": (["--config.data.source=text", f"--config.data.path={d}/missing.txt"],
                  "data.path: no file"),
      "empty": (["--config.data.source=text", f"--config.data.path={d}/empty.txt"],
                "is empty"),
      "too_short": (["--config.data.source=text", f"--config.data.path={d}/short.txt"],
                    "fewer than seq_len+1=65"),
      "invalid_utf8_char": (["--config.data.source=text", f"--config.data.path={d}/latin1.txt",
                             "--config.data.tokenizer=char"], "is not valid UTF-8 at byte 3"),
      "ids_above_vocab": (["--config.data.source=tokens", f"--config.data.path={d}/tokens"],
                          "has id 4095 outside vocab_size=1000"),
  }
  runs = drill_runner.run_parallel(
      [(os.path.join(d, name), ["--config=configs/lm.py:size=tiny", *args])
       for name, (args, _) in cases.items()])
  for (name, (_, expected)), run in zip(cases.items(), runs):
    assert run.rc == 1, (name, run.describe())
    assert "Traceback" not in run.err and run.last_line.startswith("error: "), (name,
                                                                              run.describe())
    assert expected in run.last_line, (name, run.last_line)
