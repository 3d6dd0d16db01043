r"""Run train.py on every worker of a Cloud TPU VM (a pod slice): copy the checkout, run, resume.

  python3 scripts/launch_tpu.py --tpu=NAME --zone=ZONE [--project=PROJECT] [--setup] [--dry_run] \
      -- --config=configs/lm.py:attn=mla,size=1b --workdir=/mnt/shared/runs/mla_1b

First, here: `train.py --check_config FLAGS` (the flags and the config checked as train.py
would, without data or devices), so a misspelt override fails in one line before any worker is
touched (also with --dry_run). Then, in order (every command printed first; --dry_run prints
them and runs nothing):
  1. tar of the checkout's tracked files (`git ls-files`, as they are in the working tree)
  2. gcloud compute tpus tpu-vm scp  ARCHIVE NAME:~/mla_jax.tar.gz --worker=all
  3. gcloud compute tpus tpu-vm ssh  NAME --worker=all: unpack into ~/mla_jax
     (and, with --setup, `python3 -m pip install -r requirements.txt` and the TPU build of the
     pinned jax, `jax[tpu]==<requirements.txt's jax>`, which brings libtpu)
  4. gcloud compute tpus tpu-vm ssh  NAME --worker=all: cd ~/mla_jax && python3 train.py FLAGS
Each worker is one JAX process; jax.distributed finds its peers on a TPU VM by itself, so train.py
needs no --coordinator_address there. The workdir must be one directory every worker sees (a
gcsfuse-mounted bucket or a Filestore/NFS mount at the same path): orbax writes each worker's
shards of a checkpoint into it. After a preemption, run the same command again: every worker
resumes from the newest checkpoint in that workdir (on another slice shape too).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from mla_jax.tpu_launch import check_config, check_workdir, commands


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
  error = check_config(rest)  # before any worker is touched, dry run or not
  if error:
    print(f"{error} (checked here with train.py --check_config; nothing was launched)",
          file=sys.stderr)
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
