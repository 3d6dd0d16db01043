r"""Fault drills: train.py, killed and damaged on purpose, must resume exactly.

    python scripts/fault_drill.py                 # all drills, in a temp dir (~2 min on 2 cores)
    python scripts/fault_drill.py crash corrupt   # some of them
    python scripts/fault_drill.py --keep DIR      # keep the workdirs and logs in DIR
    python scripts/fault_drill.py --plain         # each train.py its own interpreter (slower)

Every drill runs train.py in subprocesses, compares the outcome with one uninterrupted reference
run and prints one line: `PASS <drill>: <key numbers>` or `FAIL <drill>: <what went wrong>`. Exit
status 1 if any drill fails. The drills (crash, preempt, corrupt, nonfinite, disk) and what each
checks: mla_jax/training/drills.py, which tests/test_reliability.py runs too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from mla_jax.training.drill_runner import preload
from mla_jax.training.drills import DRILLS, STEPS, reference


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("drills", nargs="*", default=list(DRILLS), help=f"some of {list(DRILLS)}")
  parser.add_argument("--keep", help="directory for the workdirs and logs (default: a temp dir)")
  parser.add_argument("--plain", action="store_true",
                      help="start every train.py as its own interpreter, not forked from one that "
                      "has imported jax once (drill_runner.preload: the same runs, ~4 s less each)")
  a = parser.parse_args(argv)
  unknown = sorted(set(a.drills) - set(DRILLS))
  if unknown:
    parser.error(f"unknown drill(s) {unknown}; choose from {list(DRILLS)}")
  preload(not a.plain)
  base = a.keep or tempfile.mkdtemp(prefix="fault_drill_")
  os.makedirs(base, exist_ok=True)
  t0 = time.perf_counter()
  failed = 0
  try:
    try:
      ref = reference(base)
      print(f"PASS reference: {STEPS} steps in {ref.seconds:.1f}s, final loss "
            f"{ref.losses[STEPS][0]:.4f}", flush=True)
    except Exception as e:  # pylint: disable=broad-except
      print(f"FAIL reference: {e}", flush=True)
      return 1
    for name in a.drills:
      t = time.perf_counter()
      try:
        summary = DRILLS[name](base, ref)
        print(f"PASS {name} ({time.perf_counter() - t:.0f}s): {summary}", flush=True)
      except Exception as e:  # pylint: disable=broad-except
        failed += 1
        print(f"FAIL {name} ({time.perf_counter() - t:.0f}s): {type(e).__name__}: {e}",
              flush=True)
  finally:
    if not a.keep:
      shutil.rmtree(base, ignore_errors=True)
  print(f"{len(a.drills) - failed}/{len(a.drills)} drills passed in "
        f"{time.perf_counter() - t0:.0f}s" + (f" (kept in {base})" if a.keep else ""))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
