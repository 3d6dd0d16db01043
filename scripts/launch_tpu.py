r"""Run train.py on every worker of a Cloud TPU VM (a pod slice): copy the checkout, run, resume.

  python3 scripts/launch_tpu.py --tpu=NAME --zone=ZONE [--project=PROJECT] [--setup] [--dry_run] \
      -- --config=configs/lm.py:attn=mla,size=1b --workdir=/mnt/shared/runs/mla_1b

Runs, in order (every command printed first; --dry_run prints them and runs nothing):
  1. tar of the checkout's tracked files (`git ls-files`, as they are in the working tree)
  2. gcloud compute tpus tpu-vm scp  ARCHIVE NAME:~/mla_jax.tar.gz --worker=all
  3. gcloud compute tpus tpu-vm ssh  NAME --worker=all: unpack into ~/mla_jax
     (and, with --setup, `python3 -m pip install -r requirements.txt`)
  4. gcloud compute tpus tpu-vm ssh  NAME --worker=all: cd ~/mla_jax && python3 train.py FLAGS
Each worker is one JAX process; jax.distributed finds its peers on a TPU VM by itself, so train.py
needs no --coordinator_address there. The workdir must be one directory every worker sees (a
gcsfuse-mounted bucket or a Filestore/NFS mount at the same path): orbax writes each worker's
shards of a checkpoint into it. After a preemption, run the same command again: every worker
resumes from the newest checkpoint in that workdir (on another slice shape too).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = "~/mla_jax"
REMOTE_ARCHIVE = "~/mla_jax.tar.gz"


def commands(tpu: str, zone: str, train_args: list[str], project: str = "",
             worker: str = "all", setup: bool = False,
             archive: str = "/tmp/mla_jax_checkout.tar.gz") -> list[str]:
  """The shell commands of one launch, in order (what --dry_run prints)."""
  target = [f"--zone={zone}", *([f"--project={project}"] if project else []),
            f"--worker={worker}"]
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, *target]
  unpack = (f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && "
            f"tar xzf {REMOTE_ARCHIVE} -C {REMOTE_DIR}")
  if setup:
    unpack += f" && cd {REMOTE_DIR} && python3 -m pip install -q -r requirements.txt"
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


def main(argv: list[str]) -> int:
  ours, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (
      argv, [])
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   usage="launch_tpu.py --tpu=NAME --zone=ZONE [options] -- ARGS")
  parser.add_argument("--tpu", required=True, help="TPU VM name (gcloud compute tpus tpu-vm)")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project", default="", help="default: gcloud's configured project")
  parser.add_argument("--worker", default="all", help="'all' (default) or a worker index list")
  parser.add_argument("--setup", action="store_true", help="pip install the requirements too")
  parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  a = parser.parse_args(ours)
  note = check_workdir(rest)
  if note:
    print(note, file=sys.stderr)
    if note.startswith("error:"):
      return 1
  for cmd in commands(a.tpu, a.zone, rest, a.project, a.worker, a.setup):
    print(f"+ {cmd}", flush=True)
    if a.dry_run:
      continue
    rc = subprocess.run(cmd, shell=True).returncode  # noqa: S602 - our own quoted commands
    if rc:
      print(f"error: exit {rc} from: {cmd}", file=sys.stderr)
      return rc
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
