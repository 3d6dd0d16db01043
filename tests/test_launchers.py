"""Cluster launchers without a cluster: scripts/launch_tpu.py's dry run for a 4-worker pod, and
scripts/slurm/train.sbatch run by bash with stand-ins for srun, scontrol and python."""

import os
import pathlib
import shlex
import stat
import subprocess
import sys

from mla_jax import distributed
from mla_jax import tpu_launch as launch_tpu

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAIN = ["--config=configs/lm.py:attn=mla,size=1b", "--workdir=/mnt/shared/runs/mla 1b",
         "--config.mesh.fsdp=-1", "--config.mesh.data=1"]


def test_tpu_dry_run_prints_every_command_for_all_workers():
  r = subprocess.run([sys.executable, "scripts/launch_tpu.py", "--tpu=pod-v4-32",
                      "--zone=us-central2-b", "--project=my-proj", "--setup", "--dry_run", "--",
                      *TRAIN], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  cmds = [line[2:] for line in r.stdout.splitlines() if line.startswith("+ ")]
  assert len(cmds) == 4 and r.stdout.count("\n") == 4  # nothing else printed, nothing run
  tar, scp, unpack, train = cmds
  assert tar.startswith(f"git -C {REPO} ls-files -z | tar czf ")
  target = ["--zone=us-central2-b", "--project=my-proj", "--worker=all"]
  assert shlex.split(scp) == ["gcloud", "compute", "tpus", "tpu-vm", "scp",
                              "/tmp/mla_jax_checkout.tar.gz", "pod-v4-32:~/mla_jax.tar.gz",
                              *target]
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-v4-32", *target]
  assert shlex.split(unpack)[:-1] == ssh and "pip install -q -r requirements.txt" in unpack
  assert shlex.split(train) == [*ssh, "--command=cd ~/mla_jax && python3 train.py "
                                + shlex.join(TRAIN)]
  # What each of the 4 workers runs: train.py with the flags intact (the space in the workdir).
  remote = shlex.split(shlex.split(train)[-1].split("&& ", 1)[1])
  assert remote == ["python3", "train.py", *TRAIN]
  # On a TPU VM pod every worker finds its peers without flags.
  hosts = ",".join(f"t1v-n-{i}-w-{i}" for i in range(4))
  assert distributed.settings(environ={"TPU_WORKER_HOSTNAMES": hosts})["source"] == "tpu"


def test_tpu_launcher_refuses_a_workdir_the_workers_cannot_share():
  assert launch_tpu.check_workdir(["--workdir=gs://b/runs/x"]).startswith("error: --workdir:")
  assert launch_tpu.check_workdir(["--config.train.steps=2"]).startswith("error: --workdir:")
  assert launch_tpu.check_workdir(["--workdir=runs/x"]).startswith("warning:")
  assert launch_tpu.check_workdir(["--workdir=/mnt/shared/x"]) is None
  assert launch_tpu.commands("t", "z", [])[1].endswith("--zone=z --worker=all")  # no project


def _stub(path: pathlib.Path, body: str) -> None:
  path.write_text("#!/bin/bash\n" + body)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_script_gives_each_task_the_distributed_environment(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  # scontrol expands the node list; srun starts SLURM_NTASKS tasks, 4 per node, in order.
  _stub(bin_dir / "scontrol", 'echo gpu-node-07; echo gpu-node-08\n')
  _stub(bin_dir / "srun", 'while [[ "$1" == --* ]]; do shift; done\n'
        'for ((i = 0; i < SLURM_NTASKS; i++)); do\n'
        '  SLURM_PROCID=$i SLURM_LOCALID=$((i % 4)) "$@" || exit $?\n'
        'done\n')
  _stub(bin_dir / "fake_python", 'echo "$JAX_COORDINATOR_ADDRESS|$JAX_NUM_PROCESSES|'
        '$JAX_PROCESS_ID|${JAX_LOCAL_DEVICE_IDS-unset}|$PWD|$*"\n')
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "123456",
         "SLURM_JOB_NODELIST": "gpu-node-[07-08]", "SLURM_NTASKS": "8",
         "SLURM_SUBMIT_DIR": str(REPO), "PYTHON": "fake_python"}
  run = lambda **extra: subprocess.run(
      ["bash", str(REPO / "scripts/slurm/train.sbatch"), *TRAIN], cwd=tmp_path,
      env={**env, **extra}, capture_output=True, text=True, timeout=60)
  r = run()
  assert r.returncode == 0, r.stderr
  rows = [line.split("|") for line in r.stdout.splitlines()]
  port = 61440 + 123456 % 4096
  assert [row[:4] for row in rows] == [[f"gpu-node-07:{port}", "8", str(i), str(i % 4)]
                                       for i in range(8)]
  assert {row[4] for row in rows} == {str(REPO)}  # runs from the checkout it was submitted from
  assert {row[5] for row in rows} == {"train.py " + " ".join(TRAIN)}
  # What mla_jax.distributed makes of task 5's environment.
  task = {"JAX_COORDINATOR_ADDRESS": rows[5][0], "JAX_NUM_PROCESSES": "8", "JAX_PROCESS_ID": "5"}
  assert distributed.settings(environ=task) == {
      "source": "env", "coordinator_address": f"gpu-node-07:{port}", "num_processes": 8,
      "process_id": 5}
  # One task per node: every process drives all of its node's GPUs; a port can be chosen.
  r = run(SLURM_NTASKS="2", MLA_TASK_PER="node", JAX_COORDINATOR_PORT="7777")
  assert [line.split("|")[:4] for line in r.stdout.splitlines()] == [
      ["gpu-node-07:7777", "2", "0", "unset"], ["gpu-node-07:7777", "2", "1", "unset"]]
  # A failing task fails the job with its exit code; outside Slurm the script says so.
  _stub(bin_dir / "fake_python", "exit 7\n")
  assert run().returncode == 7
  r = subprocess.run(["bash", "scripts/slurm/train.sbatch"], cwd=REPO, capture_output=True,
                     text=True, env={"PATH": os.environ["PATH"]}, timeout=60)
  assert r.returncode != 0 and "run this under Slurm" in r.stderr
