"""End-to-end tests of the training loop (mla_jax.trainer via train.py and in-process).

One tiny MLA config (D=32, L=1, T=32, batch 8, 30 steps on ~0.5 MB of stdlib bytes) is trained a few
times, each run shared by the tests that read it (module-scoped fixtures):

  run_a        in-process, default mesh (data=8 over the 8 fake CPU devices), uninterrupted
  run_b        the same config, SIGTERM'd after step 15, then the same call again (resume)
  run_mesh     mesh data=2, fsdp=2, tensor=2
  run_micro    mesh data=2, tensor=4 with train.microbatches=4
  run_single   `python train.py` in a subprocess that sees ONE CPU device (CLI overrides)
"""

import json
import math
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from configs import lm
from mla_jax.core import sharding as shd
from mla_jax.core.config import ModelConfig
from mla_jax.core.model import Transformer
from mla_jax.storage import checkpoint as ckpt_lib
from mla_jax.storage.workdir import CONFIG_FILE, Workdir, load_model
from mla_jax.training import logger as logger_lib
from mla_jax.training import stop, trainer
from mla_jax.training.step import TrainState, make_train_step

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 30
STOP_AT = 15  # run_b is interrupted after this step (not a multiple of ckpt_every)
# 520 kB: the first 20 sorted stdlib files, so that one (abc.py) is validation.
OVERRIDES = {
    "model.d_model": 32, "model.n_layers": 1, "model.kv_lora_rank": 16,
    "model.qk_rope_head_dim": 4,
    "data.seq_len": 32, "data.max_bytes": 640_000,
    "optim.warmup_steps": 3,
    "train.steps": STEPS, "train.global_batch": 8, "train.log_every": 1, "train.eval_every": 10,
    "train.ckpt_every": 10, "train.keep_ckpts": 2, "train.eval_tokens": 512,
    "train.peak_flops": 2e11,
}
CONFIG_ARG = "attn=mla,size=tiny"


def make_config(**extra):
  """configs/lm.py:attn=mla,size=tiny with OVERRIDES, then `extra` ('mesh__data'='mesh.data')."""
  config = lm.get_config(CONFIG_ARG)
  for key, value in {**OVERRIDES, **{k.replace("__", "."): v for k, v in extra.items()}}.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def cli_flags(**extra) -> list[str]:
  return [f"--config.{k}={v}" for k, v in {**OVERRIDES, **extra}.items()]


def run_cli(workdir, flags, devices: int, config_arg: str = CONFIG_ARG, timeout: int = 240):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_COMPILATION_CACHE_DIR"] = str(REPO / ".jax_cache")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  cmd = [sys.executable, "train.py", f"--config=configs/lm.py:{config_arg}",
         f"--workdir={workdir}", *flags]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def by_step(metrics, key):
  return {m["step"]: m[key] for m in metrics if key in m}


def losses(metrics):
  out = by_step(metrics, "loss")
  assert sorted(out) == list(range(1, STEPS + 1)), sorted(out)
  return np.array([out[s] for s in range(1, STEPS + 1)])


def flat_params(model_or_state):
  state = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state
  return {jax.tree_util.keystr(p, simple=True, separator="/"): x
          for p, x in jax.tree_util.tree_leaves_with_path(state)}


class _Recorder:
  """Patches, for one trainer.train call: the training batches the loop sends to the devices, the
  jitted functions it creates, the shardings of what it checkpoints; optionally SIGTERMs itself
  after step `stop_at` (through the real signal handler of stop.StopFlag)."""

  def __init__(self, mp: pytest.MonkeyPatch, stop_at: int | None = None):
    self.batches, self.jitted, self.saved = [], [], {}
    rec = self
    real_make_array, real_jit = jax.make_array_from_process_local_data, jax.jit

    def make_array(sharding, local_data, *args, **kwargs):
      rec.batches.append(np.array(local_data))
      return real_make_array(sharding, local_data, *args, **kwargs)

    def jit(fun, *args, **kwargs):
      jitted = real_jit(fun, *args, **kwargs)
      rec.jitted.append((getattr(fun, "__module__", ""), getattr(fun, "__qualname__", ""), jitted))
      return jitted

    class Logger(logger_lib.MetricsLogger):
      def dispatched(self, step, output):
        super().dispatched(step, output)
        if step == stop_at:
          handler = signal.getsignal(signal.SIGTERM)
          assert isinstance(getattr(handler, "__self__", None), stop.StopFlag), handler
          os.kill(os.getpid(), signal.SIGTERM)

    class Checkpointer(ckpt_lib.Checkpointer):
      def save(self, step, params, opt, data_iter, meta):
        rec.saved[step] = (jax.tree.map(lambda x: x.sharding, params),
                           jax.tree.map(lambda x: x.sharding, opt["opt_state"]))
        return super().save(step, params, opt, data_iter, meta)

    mp.setattr(jax, "make_array_from_process_local_data", make_array)
    mp.setattr(jax, "jit", jit)
    mp.setattr(trainer, "MetricsLogger", Logger)
    mp.setattr(trainer, "Checkpointer", Checkpointer)


def train_recorded(workdir, config, stop_at=None):
  with pytest.MonkeyPatch.context() as mp:
    rec = _Recorder(mp, stop_at)
    summary = trainer.train(config, str(workdir))
  return summary, rec


# Runs --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run_a")
  summary, rec = train_recorded(workdir, make_config())
  return dict(workdir=str(workdir), summary=summary, rec=rec,
              metrics=logger_lib.read_metrics(str(workdir)))


@pytest.fixture(scope="module")
def run_b(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run_b")
  first, rec1 = train_recorded(workdir, make_config(), stop_at=STOP_AT)
  steps_after_stop = ckpt_lib.Checkpointer(str(workdir)).steps()
  second, rec2 = train_recorded(workdir, make_config())
  return dict(workdir=str(workdir), first=first, second=second, rec1=rec1, rec2=rec2,
              steps_after_stop=steps_after_stop, metrics=logger_lib.read_metrics(str(workdir)))


@pytest.fixture(scope="module")
def run_mesh(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run_mesh")
  summary, rec = train_recorded(workdir, make_config(mesh__data=2, mesh__fsdp=2, mesh__tensor=2))
  return dict(workdir=str(workdir), summary=summary, rec=rec,
              metrics=logger_lib.read_metrics(str(workdir)))


@pytest.fixture(scope="module")
def run_micro(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run_micro")
  summary, rec = train_recorded(workdir, make_config(mesh__data=2, mesh__tensor=4,
                                                     train__microbatches=4))
  return dict(workdir=str(workdir), summary=summary, rec=rec,
              metrics=logger_lib.read_metrics(str(workdir)))


@pytest.fixture(scope="module")
def run_single(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run_single")
  proc = run_cli(workdir, cli_flags(), devices=1)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return dict(workdir=str(workdir), proc=proc, metrics=logger_lib.read_metrics(str(workdir)))


# 1. Config parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize("config_arg, flags, expected", [
    (CONFIG_ARG, ["--config.model.d_modle=3"], ["d_modle", "did you mean", "d_model"]),
    (CONFIG_ARG, ["--config.train.stepz=3"], ["stepz", "did you mean", "steps"]),
    ("attn=mla,size=tinyy", [], ["size='tinyy'"]),
])
def test_cli_rejects_bad_config(tmp_path, config_arg, flags, expected):
  proc = run_cli(tmp_path / "w", flags, devices=1, config_arg=config_arg, timeout=120)
  assert proc.returncode != 0
  for text in expected:
    assert text.lower() in proc.stderr.lower(), (text, proc.stderr[-2000:])
  assert not (tmp_path / "w" / CONFIG_FILE).exists()  # nothing ran


def test_cli_overrides_reach_config_json(run_single, run_a):
  saved = Workdir.open(run_single["workdir"]).config
  default = lm.get_config(CONFIG_ARG)
  assert default.train.steps != STEPS and default.data.seq_len != 32  # the overrides change these
  assert saved["train"]["steps"] == STEPS
  assert saved["data"]["seq_len"] == 32 and saved["data"]["max_bytes"] == 640_000
  assert saved["model"]["d_model"] == 32 and saved["model"]["n_layers"] == 1
  assert saved["model"]["vocab_size"] == 256  # 0 in the config: resolved from the byte tokenizer
  assert saved["train"]["peak_flops"] == 2e11
  # The command line gives exactly the config that make_config() builds in-process.
  assert saved == Workdir.open(run_a["workdir"]).config
  assert "val_loss" in run_single["proc"].stdout  # train.py's final summary line


def test_lm_config_args():
  c = lm.get_config("attn=gqa,size=tiny")
  assert (c.model.attention, c.model.d_model, c.model.n_layers, c.model.n_heads) == (
      "gqa", 64, 2, 4)
  assert c.model.n_kv_heads == 1 and c.train.steps == 50 and c.data.seq_len == 64
  ModelConfig.from_mapping({**dict(c.model), "vocab_size": 256})  # a valid model
  c = lm.get_config("")
  assert (c.model.attention, c.model.d_model) == ("mla", 256)
  assert lm.get_config("size=tiny,attn=mqa").model.attention == "mqa"
  with pytest.raises(ValueError, match="unknown argument 'atn'"):
    lm.get_config("atn=gqa")
  with pytest.raises(ValueError, match="attn='gqa2'"):
    lm.get_config("attn=gqa2")
  with pytest.raises(ValueError, match="size='huge'"):
    lm.get_config("size=huge")


# 2. Training lowers the loss ---------------------------------------------------------------------


def test_loss_goes_down(run_a):
  assert run_a["summary"]["step"] == STEPS and run_a["summary"]["stopped_by"] is None
  loss = losses(run_a["metrics"])
  assert np.all(np.isfinite(loss))
  assert abs(loss[0] - math.log(256)) < 0.3, loss[0]  # starts near uniform over 256 bytes
  assert loss[-1] < loss[0] - 0.5, (loss[0], loss[-1])
  val = by_step(run_a["metrics"], "val_loss")
  assert sorted(val) == [10, 20, 30]
  assert val[30] < val[10] - 0.2, val
  assert run_a["summary"]["final"]["val_loss"] == val[30]
  assert by_step(run_a["metrics"], "skipped_updates")[STEPS] == 0


# 3 + 4. Exact resume -----------------------------------------------------------------------------


def test_resume_is_exact(run_a, run_b):
  assert run_b["first"]["stopped_by"] == "SIGTERM" and run_b["first"]["step"] == STOP_AT
  assert run_b["steps_after_stop"] == [10, STOP_AT]  # SIGTERM checkpointed step 15
  assert run_b["second"]["step"] == STEPS and run_b["second"]["stopped_by"] is None
  a, b = run_a["metrics"], run_b["metrics"]
  assert [m["step"] for m in b] == list(range(1, STEPS + 1))  # no duplicated or missing step
  for key in ("loss", "grad_norm", "val_loss"):
    assert by_step(b, key) == by_step(a, key), key  # bitwise on CPU, after the restart too
  for name, x in flat_params(load_model(run_a["workdir"])).items():
    y = flat_params(load_model(run_b["workdir"]))[name]
    assert np.array_equal(np.asarray(x), np.asarray(y)), name
  assert ckpt_lib.Checkpointer(run_b["workdir"]).steps() == [20, 30]


def test_resume_continues_with_the_next_batch(run_a, run_b):
  ref = run_a["rec"].batches
  first, second = run_b["rec1"].batches, run_b["rec2"].batches
  assert len(ref) == STEPS and len(first) == STOP_AT and len(second) == STEPS - STOP_AT
  assert ref[0].shape == (8, 33) and ref[0].dtype == np.int32
  assert not np.array_equal(ref[STOP_AT - 1], ref[STOP_AT])
  for i, batch in enumerate(first):
    assert np.array_equal(batch, ref[i]), i
  # The resumed run starts on the batch the uninterrupted run saw at step 16, and goes on alike.
  for i, batch in enumerate(second):
    assert np.array_equal(batch, ref[STOP_AT + i]), STOP_AT + i


# 5. Sharded training -----------------------------------------------------------------------------


def test_mesh_shards_params_as_the_table_says(run_mesh):
  assert run_mesh["summary"]["step"] == STEPS
  param_sh, opt_sh = run_mesh["rec"].saved[STEPS]
  shardings = flat_params(param_sh)
  mesh = shardings["embed/table/value"].mesh
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}
  expected = {
      "embed/table/value": ("tensor", "fsdp"),  # [V, D]
      "blocks/0/mlp/gate/value": ("fsdp", "tensor"),  # [D, F]
      "blocks/0/mlp/up/value": ("fsdp", "tensor"),
      "blocks/0/mlp/down/value": ("tensor", "fsdp"),  # [F, D]
      "blocks/0/attn/wq/value": ("fsdp", "tensor", None),  # [D, H, N + R]
      "blocks/0/attn/wkv_a/value": ("fsdp", None),  # [D, C + R]
      "blocks/0/attn/wkv_b/value": (None, "tensor", None),  # [C, H, N + E]
      "blocks/0/attn/wo/value": ("tensor", None, "fsdp"),  # [H, E, D]
      "blocks/0/attn_norm/scale/value": (),
      "final_norm/scale/value": (),
  }
  model = load_model(run_mesh["workdir"])
  shapes = {k: v.shape for k, v in flat_params(model).items()}
  for name, spec in expected.items():
    assert shardings[name].is_equivalent_to(NamedSharding(mesh, PartitionSpec(*spec)),
                                            len(shapes[name])), (name, shardings[name].spec)
  # Every parameter, against the table applied to the abstract model.
  table = flat_params(shd.param_shardings(nnx.state(model), mesh, shd.DEFAULT_RULES))
  assert table.keys() == shardings.keys()
  for name, s in shardings.items():
    assert s.is_equivalent_to(table[name], len(shapes[name])), (name, s.spec, table[name].spec)
  # Adam's moments follow their parameter.
  mus = [flat_params(o.mu) for o in jax.tree.leaves(
      opt_sh, is_leaf=lambda o: isinstance(o, optax.ScaleByAdamState))
         if isinstance(o, optax.ScaleByAdamState)]
  assert len(mus) == 1
  for name, s in mus[0].items():
    assert s.is_equivalent_to(shardings[name], len(shapes[name])), name


def test_mesh_matches_single_device(run_mesh, run_single, run_a):
  one = losses(run_single["metrics"])
  np.testing.assert_allclose(losses(run_mesh["metrics"]), one, rtol=1e-5)
  np.testing.assert_allclose(losses(run_a["metrics"]), one, rtol=1e-5)  # data=8
  val_one, val_mesh = by_step(run_single["metrics"], "val_loss"), by_step(run_mesh["metrics"],
                                                                          "val_loss")
  assert sorted(val_one) == sorted(val_mesh) == [10, 20, 30]
  np.testing.assert_allclose([val_mesh[s] for s in (10, 20, 30)],
                             [val_one[s] for s in (10, 20, 30)], rtol=1e-5)


# 6. Gradient accumulation ------------------------------------------------------------------------


def test_microbatches_equal_one_big_batch_step():
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, attention="mla",
                    kv_lora_rank=16, qk_rope_head_dim=4)
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  tx = optax.sgd(1.0)  # new params = params - grads: compares the gradients themselves
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     skipped=jnp.zeros((), jnp.int32), first_bad_step=-jnp.ones((), jnp.int32))
  # Rows of different difficulty, so a wrong per-microbatch weighting would show.
  batch = jax.random.randint(jax.random.key(1), (8, 17), 0, 64)
  batch = batch.at[:2].set(jnp.arange(17) % 4)
  one, m1 = jax.jit(make_train_step(graphdef, tx, 1))(state, batch)
  four, m4 = jax.jit(make_train_step(graphdef, tx, 4))(state, batch)
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
  np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
  delta = lambda s: {k: np.asarray(v) - np.asarray(flat_params(params)[k])
                     for k, v in flat_params(s.params).items()}
  d1, d4 = delta(one), delta(four)
  for name in d1:
    assert np.abs(d1[name]).max() > 0, name  # the test can see a gradient
    np.testing.assert_allclose(d4[name], d1[name], rtol=1e-4, atol=1e-5 * np.abs(d1[name]).max(),
                               err_msg=name)
  assert int(four.step) == 1 and int(four.skipped) == 0


def test_microbatches_same_loss_sequence(run_micro, run_a):
  assert run_micro["summary"]["step"] == STEPS
  np.testing.assert_allclose(losses(run_micro["metrics"]), losses(run_a["metrics"]), rtol=1e-5)


# 7. No recompilation -----------------------------------------------------------------------------


def test_jit_cache_size_detects_a_sharding_change():
  """The check below would see a recompile caused by inputs arriving with another sharding."""
  mesh = shd.make_mesh({"data": -1})
  f = jax.jit(lambda x: x * 2)
  x = jnp.ones((8, 4))
  f(jax.device_put(x, NamedSharding(mesh, PartitionSpec())))
  assert f._cache_size() == 1
  f(jax.device_put(x, NamedSharding(mesh, PartitionSpec("data"))))
  assert f._cache_size() == 2


def test_no_recompilation_after_step_one(run_mesh, run_a):
  for run in (run_mesh, run_a):
    ours = [(m, q, f) for m, q, f in run["rec"].jitted if m.startswith("mla_jax")]
    names = [(m, q) for m, q, _ in ours]
    assert ("mla_jax.training.step", "make_train_step.<locals>.step") in names, names
    for module, qualname, jitted in ours:
      # One executable for 30 steps (and 3 evaluations of 2 batches each): shardings and shapes
      # of the state never change between steps.
      assert jitted._cache_size() == 1, (module, qualname, jitted._cache_size())


# 8. Checkpoint retention -------------------------------------------------------------------------


def test_checkpoints_keep_latest_and_best(tmp_path):
  cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, kv_lora_rank=8,
                    qk_rope_head_dim=4)
  (tmp_path / CONFIG_FILE).write_text(json.dumps({"model": cfg.to_dict(), "data": {},
                                                  "train": {"steps": 5}}))
  params = lambda step: nnx.state(Transformer(cfg, rngs=nnx.Rngs(step)), nnx.Param)
  val_losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5, 5: None}

  def save(ckpt, step):
    ckpt.save(step, params(step), {"step": jnp.asarray(step)}, None,
              {"step": step, "val_loss": val_losses[step]})

  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
  for step in (1, 2, 3):
    save(ckpt, step)
  ckpt.wait()
  assert ckpt.steps() == [2, 3]
  ckpt.close()
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=2)  # a resumed run still knows step 2 is best
  for step in (4, 5):
    save(ckpt, step)
  ckpt.wait()
  assert ckpt.steps() == [2, 4, 5]
  assert ckpt.best_step() == 2
  ckpt.close()
  for which, step in (("best", 2), ("latest", 5), (4, 4)):
    got = flat_params(load_model(str(tmp_path), which))
    for name, x in flat_params(params(step)).items():
      assert np.array_equal(np.asarray(got[name]), np.asarray(x)), (which, name)
  with pytest.raises(ValueError, match=r"which: '3' is not latest, best or one of the steps"):
    load_model(str(tmp_path), 3)


def test_trainer_checkpoints_keep_latest_and_best(run_a):
  ckpt = ckpt_lib.Checkpointer(run_a["workdir"])
  val = by_step(run_a["metrics"], "val_loss")
  best = min(val, key=val.get)
  assert ckpt.steps() == sorted({20, 30, best})
  assert ckpt.best_step() == best
  assert ckpt.meta(best)["val_loss"] == val[best]
  ckpt.close()
  got = flat_params(load_model(run_a["workdir"], "best"))
  for name, x in flat_params(load_model(run_a["workdir"], best)).items():
    assert np.array_equal(np.asarray(got[name]), np.asarray(x)), name


# 9. A workdir keeps its model --------------------------------------------------------------------


def test_workdir_refuses_another_model(run_a, tmp_path):
  saved = pathlib.Path(run_a["workdir"], CONFIG_FILE).read_text()
  (tmp_path / CONFIG_FILE).write_text(saved)
  config = make_config(model__d_model=48, model__n_layers=2)
  with pytest.raises(ValueError, match=r"model\.d_model") as e:
    trainer.train(config, str(tmp_path))
  assert "model.d_model: 32 -> 48" in str(e.value) and "model.n_layers: 1 -> 2" in str(e.value)
  assert "n_heads" not in str(e.value)  # only the fields that differ
  assert (tmp_path / CONFIG_FILE).read_text() == saved  # left as it was
  assert not (tmp_path / "checkpoints").exists()
