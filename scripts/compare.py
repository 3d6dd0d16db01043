r"""Train and evaluate every run of a sweep, then write a comparison report (evaluation.sweep);
or compare runs you already trained (evaluation.compare_runs), training nothing.

  python scripts/compare.py --sweep=cpu --out=docs/results/cpu --runs_dir=runs/sweep_cpu
  python scripts/compare.py --sweep=tiny --out=/tmp/tiny            # runs in /tmp/tiny/runs
  python scripts/compare.py --sweep=cpu --params                   # param counts, d_ff to match
  python scripts/compare.py --workdirs=runs/mha,runs/mla_s0,runs/mla_s1 --out=out/mine

--workdirs: each workdir evaluated as eval.py does (kept in OUT/evals/, reused while newer than
its checkpoint), decode timed once for all of them interleaved, then the same report.md,
results.json and plots as a sweep's (bpb vs KV bytes, curves, decode speed, loss by position).
Workdirs whose configs differ only in train.seed are seeds of one variant (mean, std, and the
differences against seed noise); --reference names the run or variant to compare against.

A sweep is a config file, configs/sweeps/<name>.py (or any path), whose get_config() lists the runs
(see configs/sweeps/cpu.py). For each run, with up to --jobs (default: the sweep's `jobs`) runs
training at once:
  1. train: `python train.py --config=<experiment>:<arg> --workdir=<runs_dir>/<run> --config.k=v`
     in a subprocess (clean memory per run, exactly what a user would type; its output goes to
     <workdir>/train.log). A run is finished when its newest checkpoint step equals train.steps;
     finished runs are never retrained, unfinished ones resume (train.py resumes a workdir), so
     re-running this command after an interruption picks up where it stopped.
  2. evaluate in this process, as eval.py does (whole validation split, cache bytes,
     decode timing, loss by position) -> <workdir>/eval.json. With --reuse, an eval.json newer
     than the run's last checkpoint is read back instead (re-render the report without re-timing).
Then OUT/results.json, OUT/report.md and OUT/*.png (evaluation.report). Only those go in OUT when
--runs_dir points elsewhere (keep workdirs out of docs/). --earlier=PATH (an earlier report's
results.json): its final runs stand in for those whose workdirs are gone, as they were measured,
so seeds trained later join the report of seeds whose workdirs were deleted.

With --compress=h2o,tova,... the first seed's final run of every variant then goes through the
inference-time compression sweep (mla_jax/kvcompress/sweep.py: each policy at kvpress's grid of
fractions evicted, each --compress_quants quantisation) into OUT/kvcompress/: trained-in and
inference-time compression on one chart of bpb against effective bytes per token. The same as
`scripts/compress_sweep.py --runs_dir=RUNS_DIR --only=<those runs>`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The launcher run_sweep's train_fn calls: train.py in a subprocess ------------------------------


def format_flag(value) -> str:
  return repr(value) if isinstance(value, float) else str(value)


def train_command(sweep, run, workdir: str) -> list[str]:
  """train.py runs in the checkout (cwd CHECKOUT): the workdir goes absolute, so a --runs_dir
  relative to the caller's directory means the same place when the two differ."""
  from mla_jax.evaluation.sweep import experiment_path

  return ([sys.executable, os.path.join(CHECKOUT, "train.py"),
           f"--config={experiment_path(sweep)}:{run['arg']}",
           f"--workdir={os.path.abspath(workdir)}"]
          + [f"--config.{k}={format_flag(v)}" for k, v in run["overrides"].items()])


def train_env(workdir: str) -> dict:
  """train.py's environment: JAX's persistent compilation cache in the runs directory (unless the
  caller chose one), so the seeds of a variant, which compile the same programs, compile once."""
  env = dict(os.environ)
  if "JAX_COMPILATION_CACHE_DIR" not in env:
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(os.path.dirname(os.path.abspath(workdir)),
                                                    ".jax_cache")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
  return env


def train_subprocess(sweep, run, workdir: str) -> float:
  """Trains (or resumes) one run in a train.py subprocess, its output in <workdir>/train.log;
  returns wall seconds. A failure is a SweepError with the log's last lines."""
  from mla_jax.evaluation.sweep import SweepError

  os.makedirs(workdir, exist_ok=True)
  log_path = os.path.join(workdir, "train.log")
  start = time.time()
  with open(log_path, "a") as log:
    log.write(f"\n$ {' '.join(train_command(sweep, run, workdir))}\n")
    log.flush()
    proc = subprocess.run(train_command(sweep, run, workdir), cwd=CHECKOUT, stdout=log,
                          stderr=subprocess.STDOUT, env=train_env(workdir))
  if proc.returncode:
    with open(log_path, errors="replace") as f:
      tail = [l for l in f.read().replace("\r", "\n").splitlines() if l.strip()][-3:]
    raise SweepError(f"run {run['name']}: train.py exited {proc.returncode} (log {log_path}): "
                     + " | ".join(tail))
  return time.time() - start


# The command ------------------------------------------------------------------------------------


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  from mla_jax.evaluation.sweep import SweepError, expand_runs, load_sweep, param_table, run_sweep
  from mla_jax.storage.checkpoint import quiet_orbax_logs

  quiet_orbax_logs()
  try:
    if FLAGS.workdirs:
      return compare_existing()
    if not FLAGS.sweep:
      raise SweepError("--sweep (or --workdirs) is required")
    if FLAGS.params:
      sweep = load_sweep(FLAGS.sweep)
      for r in param_table(sweep, expand_runs(sweep, FLAGS.steps), match=True):
        print(f"{r['name']:<16} total {r['total']:>12,}  non-embedding {r['non_embedding']:>12,}  "
              f"{100 * r['rel']:+6.2f}%  d_ff {r['d_ff']:>5}  (d_ff matching the reference: "
              f"{r['match_d_ff']})")
      return
    if not FLAGS.out:
      raise SweepError("--out is required")
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
    policies = [p for p in FLAGS.compress.split(",") if p]
    if policies:  # checked before hours of training, not after
      from mla_jax.kvcompress.policy import POLICIES, QUANTS
      bad = [p for p in policies if p not in POLICIES[1:]]
      bad += [q for q in FLAGS.compress_quants.split(",") if q not in QUANTS]
      if bad:
        raise SweepError(f"--compress / --compress_quants: unknown {bad}; policies "
                         f"{POLICIES[1:]}, quantisations {QUANTS}")
    run_sweep(FLAGS.sweep, FLAGS.out, FLAGS.runs_dir, FLAGS.steps, FLAGS.reuse, FLAGS.only,
              jobs=FLAGS.jobs, train_fn=train_subprocess, earlier=FLAGS.earlier)
    if policies:
      compress(policies)
  except (SweepError, ValueError, FileNotFoundError, KeyError) as e:
    print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
    sys.exit(1)


def compare_existing() -> None:
  """--workdirs: the report of runs already trained (evaluation.compare_runs)."""
  from absl import logging

  from mla_jax.evaluation.compare_runs import compare_workdirs
  from mla_jax.evaluation.sweep import SweepError

  if FLAGS.sweep or FLAGS.compress or FLAGS.params:
    raise SweepError("--workdirs compares existing runs: --sweep, --params and --compress "
                     "do not apply")
  if not FLAGS.out:
    raise SweepError("--out is required")
  logging.set_verbosity(logging.WARNING)
  compare_workdirs([w for w in FLAGS.workdirs.split(",") if w], FLAGS.out, FLAGS.reference,
                   FLAGS.max_tokens, FLAGS.decode_lengths, FLAGS.decode_steps,
                   FLAGS.decode_rounds, reuse=True,
                   progress=lambda t: print(f"[compare {time.strftime('%H:%M:%S')}] {t}",
                                            flush=True))


def compress(policies: list[str]) -> None:
  """The inference-time compression sweep on the first seed of every variant's final runs."""
  import os

  from mla_jax.evaluation.sweep import expand_runs, load_sweep, seeds_of
  from mla_jax.kvcompress.sweep import run_compress_sweep

  sweep = load_sweep(FLAGS.sweep)
  first = seeds_of(sweep)[0]
  names = tuple(r["name"] for r in expand_runs(sweep, FLAGS.steps) if r["seed"] == first
                and (not FLAGS.only or r["variant"] in FLAGS.only.split(",")))
  runs_dir = FLAGS.runs_dir or os.path.join(FLAGS.out, "runs")
  out = os.path.join(FLAGS.out, "kvcompress")
  run_compress_sweep(runs_dir, out, tuple(policies), quants=tuple(FLAGS.compress_quants.split(",")),
                     only=names, progress=lambda t: print(f"[compress] {t}", flush=True))
  print(f"[compress] wrote {out}/report.md", flush=True)


def define_flags():
  flags.DEFINE_string("sweep", None, "Sweep name (configs/sweeps/<name>.py) or a path to one.")
  flags.DEFINE_string("out", None, "Output directory for report.md, results.json and plots.")
  flags.DEFINE_string("runs_dir", None, "Directory of the run workdirs (default OUT/runs).")
  flags.DEFINE_integer("steps", None,
                       "Override the sweep's train.steps (eval/ckpt cadence follow).")
  flags.DEFINE_bool("reuse", False, "Reuse each finished run's eval.json when newer than its "
                    "checkpoint instead of evaluating again.")
  flags.DEFINE_bool("params", False, "Only print parameter counts (and d_ff that would match the "
                    "reference run) and exit.")
  flags.DEFINE_integer("jobs", None, "Training processes at once (default: the sweep's jobs, "
                       "else 1); each run is evaluated as soon as it has trained.")
  flags.DEFINE_string("earlier", None, "An earlier report's results.json: its runs stand in for "
                      "final runs whose workdirs are gone (kept as measured, not retrained).")
  flags.DEFINE_string("only", None, "Comma-separated run names: train/evaluate only these.")
  flags.DEFINE_string("compress", "", "Eviction policies for the inference-time compression "
                      "sweep on each variant's first-seed final run (empty: none).")
  flags.DEFINE_string("compress_quants", "none,int8,int4", "Cache quantisations for --compress.")
  # Existing runs (no sweep file, no training).
  flags.DEFINE_string("workdirs", None, "Comma-separated trained workdirs to compare instead of "
                      "a sweep: evaluated (OUT/evals/), decode timed, one report; nothing trained.")
  flags.DEFINE_string("reference", None, "With --workdirs: the run or variant the others are "
                      "compared against (default: the first workdir's).")
  flags.DEFINE_integer("max_tokens", 0, "With --workdirs: validation tokens scored (0: whole "
                       "split).")
  flags.DEFINE_string("decode_lengths", "256,max", "With --workdirs: decode timing contexts "
                      "('' to skip).")
  flags.DEFINE_integer("decode_steps", 32, "With --workdirs: timed decode steps per context.")
  flags.DEFINE_integer("decode_rounds", 2, "With --workdirs: interleaved decode timing rounds.")


if __name__ == "__main__":
  from mla_jax.cli import parse_flags_or_exit

  define_flags()
  app.run(main, flags_parser=parse_flags_or_exit)
