"""The accelerator check: GPU kernel, decode bandwidth, bf16 MFU and a short quality run, in one
command of at most 8 minutes (mla_jax/accel/: the steps, their limits and the targets).

    python3 scripts/accel_check.py --out=out/gpu                     # on a GPU machine
    python3 scripts/accel_check.py --dry_run --out=/tmp/accel        # CPU, tiny shapes (a test)
    python3 scripts/accel_check.py --out=out/gpu --steps=decode,train   # a rerun of some steps

Writes OUT/accel_check.json (rewritten after every step), OUT/accel_check.md (the tables) and
OUT/accel_check.log (every step's output). --wheels=DIR first installs DIR/*.whl (packages the
machine lacks, e.g. grain, ml_collections, tensorboardX: docs/accelerator.md) into a temporary
folder that this process and every step import from; it must run before mla_jax is imported,
hence here and not in the package.
"""

import argparse
import glob
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def install_wheels(folder: str) -> str:
  """pip-installs folder/*.whl (no index, no dependencies) into a fresh temporary folder and puts
  it first on this process's path and on the steps' PYTHONPATH. -> that folder."""
  wheels = sorted(glob.glob(os.path.join(folder, "*.whl")))
  if not wheels:
    sys.exit(f"error: --wheels: no .whl files in {folder}")
  site = tempfile.mkdtemp(prefix="accel_site_")
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                  "--no-compile", "--no-cache-dir", "--target", site, *wheels], check=True)
  sys.path.insert(0, site)
  os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (site, os.environ.get("PYTHONPATH")) if p)
  print(f"installed {len(wheels)} wheels from {folder} into {site}", flush=True)
  return site


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="folder for the JSON, markdown and log")
  parser.add_argument("--dry_run", action="store_true",
                      help="every step on the CPU at tiny shapes (the kernel in interpret mode)")
  parser.add_argument("--steps", default="",
                      help="comma list of env,kernels,decode,train,quality (default: all)")
  parser.add_argument("--budget_s", type=float, default=0.0,
                      help="seconds for all steps (default: 480 on a GPU; the dry run's limits)")
  parser.add_argument("--limits", default="",
                      help="seconds per step instead of the defaults, e.g. train=240,decode=150")
  parser.add_argument("--wheels", default="", help="folder of wheels to install first")
  args = parser.parse_args(argv)
  if args.wheels:
    install_wheels(args.wheels)
  sys.path.insert(0, REPO)  # runs from a checkout that is not pip-installed (a GPU machine)
  from mla_jax import accel

  steps = tuple(s for s in args.steps.split(",") if s) or None
  try:
    limits = {k: float(v) for k, _, v in (item.partition("=") for item in args.limits.split(",")
                                          if item)}
    results = accel.run(args.out, dry_run=args.dry_run, steps=steps,
                        budget_s=args.budget_s or None, limits=limits)
  except ValueError as e:
    parser.error(str(e))
  print()
  print(accel.markdown(results))
  print(f"wrote {os.path.join(args.out, accel.JSON_NAME)}, {accel.MD_NAME} and {accel.LOG_NAME}")
  return 0 if all(e["status"] in ("ok", "skipped") for e in results["steps"].values()) else 1


if __name__ == "__main__":
  sys.exit(main())
