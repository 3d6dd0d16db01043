"""A launch of train.py on every worker of a Cloud TPU VM, as shell commands (scripts/launch_tpu.py
runs or prints them): copy the checkout, optionally install the TPU build of the pinned jax,
train; plus the checks made here first (the workdir, the config)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

# The checkout this package runs from (an editable install): what is copied to the workers.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = "~/mla_jax"
REMOTE_ARCHIVE = "~/mla_jax.tar.gz"


def jax_pin(requirements: str | None = None) -> str:
  """The jax version requirements.txt pins (the accelerator build must match it)."""
  path = requirements or os.path.join(REPO, "requirements.txt")
  with open(path) as f:
    for line in f:
      if line.strip().startswith("jax=="):
        return line.strip().split("==", 1)[1]
  raise ValueError(f"{path}: no jax==VERSION pin")


def commands(tpu: str, zone: str, train_args: list[str], project: str = "",
             worker: str = "all", setup: bool = False,
             archive: str = "/tmp/mla_jax_checkout.tar.gz") -> list[str]:
  """The shell commands of one launch, in order (what --dry_run prints)."""
  target = [f"--zone={zone}", *([f"--project={project}"] if project else []),
            f"--worker={worker}"]
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, *target]
  unpack = (f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && "
            f"tar xzf {REMOTE_ARCHIVE} -C {REMOTE_DIR}")
  if setup:  # requirements.txt installs the CPU jaxlib; the TPU build of the same jax replaces it
    unpack += (f" && cd {REMOTE_DIR} && python3 -m pip install -q -r requirements.txt"
               f' && python3 -m pip install -q "jax[tpu]=={jax_pin()}"')
  train = f"cd {REMOTE_DIR} && python3 train.py {shlex.join(train_args)}".rstrip()
  return [
      f"git -C {shlex.quote(REPO)} ls-files -z | tar czf {shlex.quote(archive)} "
      f"-C {shlex.quote(REPO)} --null -T -",
      shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "scp", archive,
                  f"{tpu}:{REMOTE_ARCHIVE}", *target]),
      shlex.join([*ssh, f"--command={unpack}"]),
      shlex.join([*ssh, f"--command={train}"]),
  ]


def check_workdir(train_args: list[str]) -> str | None:
  """A warning when the workdir cannot be shared by the workers, else None."""
  workdir = next((a.split("=", 1)[1] for a in train_args if a.startswith("--workdir=")), None)
  if workdir is None:
    return "error: --workdir: train.py needs one after '--' (a path every worker sees)"
  if workdir.startswith("gs://"):
    return (f"error: --workdir: {workdir} is a bucket URL; train.py writes through the file "
            "system: mount the bucket with gcsfuse at the same path on every worker and pass "
            "that path")
  if not os.path.isabs(workdir) and not workdir.startswith("~"):
    return (f"warning: --workdir={workdir} is relative to ~/mla_jax, which the next launch "
            "replaces, and local to each worker: use a shared mount, e.g. /mnt/shared/runs/x")
  return None


def check_config(train_args: list[str]) -> str | None:
  """train.py --check_config with these flags, here (seconds): its one-line error, or None."""
  proc = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--check_config",
                         *train_args],
                        cwd=REPO, capture_output=True, text=True)
  if proc.returncode == 0:
    return None
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  return (lines[-1] if lines else f"error: train.py --check_config exited {proc.returncode}")
