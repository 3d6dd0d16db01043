"""Multi-process training (mla_jax.distributed, scripts/launch_local.py) on local CPU processes.

One launch serves the end-to-end assertions (module fixture `runs`):
  two       scripts/launch_local.py: 2 processes x 2 fake devices, a hybrid mesh (mesh.dcn=data=2,
            processes as slices), 3 steps, checkpoint at 3
  one       the same config for 6 steps in this process (1 x 8 devices, mesh data=4, fsdp=2), run
            while `two` runs: the reference
  resumed   `two`'s workdir continued in this process on `one`'s topology to step 6
Same global batches, so the loss sequences must agree (~1e-5) across the topologies. (A
1-process x 4-device reference in a subprocess gave the same figure, 4.8e-7, but costs ~10 s.)
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import lm
from mla_jax import distributed
from mla_jax.core import sharding as shd
from mla_jax.experiment import ExperimentConfig
from mla_jax.storage.workdir import Workdir
from mla_jax.training import preflight, trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
OVERRIDES = {
    "model.d_model": 32, "model.n_layers": 1, "model.kv_lora_rank": 16,
    "model.qk_rope_head_dim": 4, "data.seq_len": 32, "data.max_bytes": 640_000,
    # A constant rate after one warmup step: the 3-step run and the 6-step run see the same rates.
    "optim.warmup_steps": 1, "optim.schedule": "constant",
    "train.global_batch": 8, "train.log_every": 1, "train.eval_every": 3, "train.ckpt_every": 3,
    "train.eval_tokens": 256, "train.final_eval_tokens": 256, "train.peak_flops": 2e11,
    "train.log_health": False,
}


def _flags(steps: int, **extra) -> list[str]:
  return ["--config=configs/lm.py:attn=mla,size=tiny",
          *(f"--config.{k}={v}" for k, v in {**OVERRIDES, "train.steps": steps, **extra}.items())]


def _env(devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_COMPILATION_CACHE_DIR=str(REPO / ".jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  return env


def _losses(workdir) -> dict[int, float]:
  out = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    r = json.loads(line)
    if "loss" in r:
      out[r["step"]] = r["loss"]
  return out


def _record(workdir, step: int) -> dict:
  return [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))
          if json.loads(x)["step"] == step][-1]


def _config(steps: int, **extra):
  config = lm.get_config("attn=mla,size=tiny")
  for k, v in {**OVERRIDES, "train.steps": steps, **extra}.items():
    group, field = k.split(".")
    config[group][field] = v
  return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp("multihost")
  two, one = str(base / "two"), str(base / "one")
  started = time.perf_counter()
  p_two = subprocess.Popen(
      [sys.executable, "scripts/launch_local.py", "--num_processes=2", "--devices_per_process=2",
       "--", *_flags(3, **{"mesh.dcn": "data=2"}), f"--workdir={two}"],
      cwd=REPO, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  # The reference meanwhile, here: one process, 8 devices, mesh data=4 x fsdp=2.
  mesh = {"mesh.data": 4, "mesh.fsdp": 2}
  trainer.train(_config(6, **mesh), one)
  out_two, err_two = p_two.communicate(timeout=600)
  assert p_two.returncode == 0, err_two[-3000:]
  launched = time.perf_counter() - started
  saved_losses = _losses(two)
  # Resume the 2-process checkpoint here, on the reference's topology (its compiles are cached).
  trainer.train(_config(6, **mesh), two)
  return {"two": two, "one": one, "out_two": out_two, "err_two": err_two,
          "saved_losses": saved_losses, "launched_s": launched}


def test_two_processes_match_one_and_resume_on_another_topology(runs):
  ref = _losses(runs["one"])
  assert sorted(ref) == list(range(1, 7))
  assert sorted(runs["saved_losses"]) == [1, 2, 3]  # the 2-process launch itself
  got = _losses(runs["two"])  # steps 1-3 from 2 x 2, steps 4-6 resumed on 1 x 8
  assert sorted(got) == list(range(1, 7))
  np.testing.assert_allclose([got[s] for s in range(1, 7)], [ref[s] for s in range(1, 7)],
                             rtol=1e-5, atol=1e-5)
  # Evaluation aggregates over both processes' devices: the same validation loss.
  np.testing.assert_allclose(_record(runs["two"], 3)["val_loss"],
                             _record(runs["one"], 3)["val_loss"], rtol=1e-5)
  print(f"2x2 launch with the 1x8 reference: {runs['launched_s']:.1f} s; max |loss diff| "
        f"{max(abs(got[s] - ref[s]) for s in ref):.2e}")


def test_each_process_saved_its_data_state_and_only_process_0_logged(runs):
  data = os.listdir(os.path.join(runs["two"], "checkpoints", "3", "data"))
  assert sorted(n for n in data if n.startswith("process_")) == ["process_0-of-2.json",
                                                                 "process_1-of-2.json"]
  lines = runs["out_two"].splitlines()
  assert any(line.startswith("[p0] step 3/3") for line in lines)
  assert not any(line.startswith("[p1]") and "step" in line for line in lines), lines
  assert "val_bpb" in runs["out_two"] and "next:" in runs["out_two"]


def test_checkpoint_restores_to_the_same_parameters_on_any_mesh(runs):
  wd = Workdir.open(runs["two"])
  a = wd.load_model(3, mesh=shd.make_mesh({"data": 1, "fsdp": 8}))
  b = wd.load_model(3)
  ref = Workdir.open(runs["one"]).load_model(3)
  from flax import nnx

  for x, y, z in zip(jax.tree.leaves(nnx.state(a, nnx.Param)),
                     jax.tree.leaves(nnx.state(b, nnx.Param)),
                     jax.tree.leaves(nnx.state(ref, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # Two processes reduce in another order than one: float32 noise (2e-6 seen under jax 0.11.2).
    np.testing.assert_allclose(np.asarray(x), np.asarray(z), rtol=1e-4, atol=1e-5)


# Bad input: one line naming the flag --------------------------------------------------------------


@pytest.mark.parametrize("kwargs, env, flag", [
    ({"coordinator_address": "127.0.0.1:1234", "num_processes": 2}, {}, "--process_id"),
    ({"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 2}, {},
     "--process_id"),
    ({"coordinator_address": "nohost", "num_processes": 2, "process_id": 0}, {},
     "--coordinator_address"),
    ({"num_processes": 0, "process_id": 0, "coordinator_address": "h:1"}, {}, "--num_processes"),
    ({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID"),
    ({"num_processes": 4}, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
                            "SLURM_STEP_NODELIST": "n1"}, "--num_processes"),
])
def test_bad_distributed_settings_name_the_flag(kwargs, env, flag):
  with pytest.raises(distributed.DistributedError) as e:
    distributed.settings(environ=env, **kwargs)
  assert str(e.value).startswith(flag), str(e.value)
  assert "\n" not in str(e.value)


def test_where_settings_come_from():
  assert distributed.settings(environ={}) is None  # one process: nothing to initialise
  slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
           "SLURM_STEP_NODELIST": "n1"}
  assert distributed.settings(environ=slurm) is None  # a one-task Slurm job
  assert distributed.settings(environ={**slurm, "SLURM_NTASKS": "8"})["source"] == "slurm"
  assert distributed.settings(environ={"TPU_WORKER_HOSTNAMES": "a,b,c,d"})["source"] == "tpu"
  assert distributed.settings(environ={"TPU_WORKER_HOSTNAMES": "a"}) is None  # one TPU VM
  env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
  assert distributed.settings(environ=env) == {"source": "env", "coordinator_address": "h:1",
                                               "num_processes": 2, "process_id": 1}


def test_mesh_errors_name_the_field():
  sizes = {"data": 8, "fsdp": 1, "tensor": 1, "sequence": 1}
  with pytest.raises(ValueError, match=r"^mesh\.dcn: .*2 slices but there are 1 \(processes\)"):
    distributed.make_mesh(sizes, "data=2")
  with pytest.raises(ValueError, match=r"^mesh\.dcn: 'pipe' is not a mesh axis"):
    distributed.parse_dcn("pipe=2")
  config = lm.get_config("attn=mla,size=tiny")
  config.mesh.data = 3
  with pytest.raises(ValueError, match=r"^mesh: data=3 .*\(--config\.mesh\.data/fsdp/tensor/seq"
                                       r"uence\) does not match the 8 devices \(1 process x 8\)"):
    preflight.check_config(ExperimentConfig.from_config(config))


def test_unreachable_coordinator_times_out_with_one_line():
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]  # nothing listens there once closed
  started = time.perf_counter()
  # What train.py prints after "error: " (before jax.distributed is touched, so in-process).
  with pytest.raises(distributed.DistributedError) as e:
    distributed.initialize(f"127.0.0.1:{port}", 2, 1, timeout_s=0.5)
  assert 0.5 <= time.perf_counter() - started < 10
  assert str(e.value).startswith(
      f"--coordinator_address: no coordinator answered at 127.0.0.1:{port} within "
      "--distributed_timeout=0.5 s"), str(e.value)
  assert "\n" not in str(e.value)


def test_launch_local_stops_everyone_when_a_process_dies(tmp_path):
  script = tmp_path / "job.py"
  script.write_text(
      "import os, sys, time\n"
      "i = int(os.environ['JAX_PROCESS_ID'])\n"
      "print(f'hello from {i} of', os.environ['JAX_NUM_PROCESSES'], flush=True)\n"
      f"flag = {str(tmp_path / 'p0_up')!r}\n"
      "if i == 0:\n"
      "  open(flag, 'w').close()\n"
      "  time.sleep(120)\n"
      "while not os.path.exists(flag):  # process 1 dies once process 0 is up\n"
      "  time.sleep(0.05)\n"
      "sys.exit(3)\n")
  started = time.perf_counter()
  r = subprocess.run([sys.executable, "scripts/launch_local.py", "--num_processes=2",
                      f"--script={script}"], cwd=REPO, capture_output=True, text=True,
                     timeout=60)
  assert time.perf_counter() - started < 30  # process 0 did not sleep its 120 s
  assert r.returncode == 3
  assert "[p0] hello from 0 of 2" in r.stdout and "[p1] hello from 1 of 2" in r.stdout
  assert "launch_local: process 1 exited with code 3; stopping the other 1 process(es)" in r.stderr
