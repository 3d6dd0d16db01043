r"""Fault drills: train.py, killed and damaged on purpose, must resume exactly.

The logic of scripts/fault_drill.py (which runs them by hand and prints PASS / FAIL lines) and of
tests/test_reliability.py (which runs them as tests). Every drill runs
`python train.py --config=configs/lm.py:size=tiny ...` of this checkout in subprocesses on a small
generated text corpus (TINY below), compares the outcome with one uninterrupted reference run and
returns a one-line summary of its key numbers, or raises DrillError saying what went wrong.

  crash     SIGKILL at a random step; the same command resumes from the last checkpoint and ends
            with parameters bitwise equal to the reference and the same loss at every step.
  preempt   SIGTERM (or SIGINT): the step finishes, a checkpoint is written, exit 0; resuming
            ends bitwise equal to the reference.
  corrupt   a file of the newest checkpoint truncated: a warning on stderr, the run falls back to
            the previous step, moves the damaged one aside, and ends bitwise equal.
  nonfinite optim.lr=1e6: exit 1 naming the step, the last good checkpoint and the cause; that
            checkpoint holds finite parameters. With train.on_nonfinite=skip: exit 0, skips counted.
  disk      saves fail (ENOSPC at once; "file too large" in orbax's background writer, made real
            with RLIMIT_FSIZE): logged, training goes on, the next save retries; a failed final
            save exits 1; a clean re-run resumes from the last good checkpoint, bitwise equal.

    ref = reference(base)                 # base/reference, uninterrupted
    print(drill_crash(base, ref))         # or DRILLS[name](base, ref)
"""

from __future__ import annotations

import dataclasses
import glob
import os
import random
import re
import shutil
import signal
import time

from mla_jax.training.drill_runner import (
  Proc,
  Run,
  check,
  ckpt_steps,
  fresh,
  last_logged_step,
  read_metrics,
  run,
  tmp_dirs,
)

STEPS, CKPT_EVERY = 24, 4
# Tiny and fast: ~0.1M params, 24 steps of 8 x 64 tokens, eval on 4k tokens.
TINY = ("--config=configs/lm.py:size=tiny", "--config.data.source=text",
        f"--config.train.steps={STEPS}", f"--config.train.ckpt_every={CKPT_EVERY}",
        "--config.train.log_every=1", "--config.train.eval_every=8",
        "--config.train.eval_tokens=4096", "--config.train.keep_ckpts=2",
        "--config.train.peak_flops=2e11",
        # Health records (~100 numbers a step) would outgrow the disk drill's 16 KiB file-size
        # limit in metrics.jsonl; nothing here is about them.
        "--config.train.log_health=False")
# From SIGTERM / SIGINT to exit: the step in flight, one checkpoint, process teardown.
PREEMPT_EXIT_S = 10.0

def make_corpus(path: str, n_words: int = 40000) -> str:
  """A deterministic ~150 KB text file (random common words): no download, any Python."""
  words = ("the of and to in is that for it as with was on be by this are from at or an have "
           "not they which one you were all her his had but what there can out other").split()
  rng = random.Random(0)
  lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(n_words // 12)]
  with open(path, "w") as f:
    f.write(".\n".join(lines) + ".\n")
  return path


def params(workdir: str, which="latest") -> list:
  """The checkpoint's parameter arrays, via the library's own loader."""
  import jax
  import numpy as np
  from flax import nnx

  from mla_jax import Workdir

  return [np.asarray(x) for x in
          jax.tree.leaves(nnx.state(Workdir.open(workdir).load_model(which)))]


def resumed_at(run_: Run) -> int | None:
  m = re.search(r"resumed at step (\d+)", run_.out)
  return int(m.group(1)) if m else None


# The reference ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Reference:
  workdir: str
  corpus: str
  params: list
  losses: dict  # step -> (loss, grad_norm)
  seconds: float

  def args(self, *extra) -> list:
    return list(TINY) + [f"--config.data.path={self.corpus}", *extra]


def reference(base: str) -> Reference:
  """One uninterrupted run of TINY on the generated corpus, in base/reference."""
  corpus = make_corpus(os.path.join(base, "corpus.txt"))
  wd = os.path.join(base, "reference")
  r = run(wd, list(TINY) + [f"--config.data.path={corpus}"])
  check(r.rc == 0, f"reference run failed: {r.describe()}")
  return Reference(wd, corpus, params(wd), _losses(wd), r.seconds)


def _losses(workdir: str) -> dict:
  return {m["step"]: (m["loss"], m["grad_norm"]) for m in read_metrics(workdir) if "loss" in m}


def check_matches_reference(workdir: str, ref: Reference) -> str:
  """Bitwise-equal final parameters and the reference's loss at every step, each logged once."""
  got = params(workdir)
  check(len(got) == len(ref.params), f"{len(got)} arrays vs the reference's {len(ref.params)}")
  import numpy as np
  differ = [i for i, (a, b) in enumerate(zip(got, ref.params)) if not np.array_equal(a, b)]
  check(not differ, f"{len(differ)}/{len(got)} parameter arrays differ from the reference "
        f"(max |diff| {max(float(np.abs(got[i] - ref.params[i]).max()) for i in differ):.3g})"
        if differ else "")
  steps = [m["step"] for m in read_metrics(workdir)]
  check(steps == list(range(1, STEPS + 1)),
        f"metrics.jsonl steps are not 1..{STEPS} once each: {steps}")
  losses = _losses(workdir)
  bad = [s for s in ref.losses if losses.get(s) != ref.losses[s]]
  check(not bad, f"loss / grad_norm differ from the reference at steps {bad}")
  return f"params bitwise equal ({len(got)} arrays), loss equal at all {len(losses)} steps"


# Drills -----------------------------------------------------------------------------------------


def drill_crash(base: str, ref: Reference, kill_at: int | None = None) -> str:
  """SIGKILL once metrics.jsonl shows step >= kill_at; the same command resumes exactly."""
  kill_at = kill_at or random.randint(CKPT_EVERY + 1, STEPS - 3)
  wd = fresh(base, "crash")
  proc = Proc(wd, ref.args())
  seen = proc.wait_for_step(kill_at, need_checkpoint=True)  # the first save may take a while
  proc.p.send_signal(signal.SIGKILL)
  killed = proc.wait()
  check(killed.rc == -signal.SIGKILL, f"expected death by SIGKILL, got {killed.describe()}")
  logged, saved, tmp = last_logged_step(wd), ckpt_steps(wd), tmp_dirs(wd)
  check(saved, f"no checkpoint before the kill at step {logged}")
  stale = sum(1 for m in read_metrics(wd) if m["step"] > saved[-1])
  again = run(wd, ref.args())
  check(again.rc == 0, f"the resumed run failed: {again.describe()}")
  check(resumed_at(again) == saved[-1],
        f"resumed at {resumed_at(again)}, expected the last checkpoint {saved[-1]}")
  same = check_matches_reference(wd, ref)
  return (f"SIGKILL at step {logged} (asked >= {kill_at}, saw {seen}; checkpoints {saved}, "
          f"{len(tmp)} orbax tmp dir(s) left), resumed at {saved[-1]}, {stale} stale metrics "
          f"record(s) dropped, {same}")


def drill_preempt(base: str, ref: Reference, sig=signal.SIGTERM, at: int = 10,
                  resume: bool = True) -> str:
  """`sig` at step >= at: exit 0 with a checkpoint of the last logged step; then resume."""
  name = signal.Signals(sig).name
  wd = fresh(base, f"preempt_{name.lower()}")
  proc = Proc(wd, ref.args())
  proc.wait_for_step(at)
  signalled = time.perf_counter()
  proc.p.send_signal(sig)
  stopped = proc.wait()
  exit_s = time.perf_counter() - signalled
  check(stopped.rc == 0, f"{name}: expected exit 0, got {stopped.describe()}")
  check(exit_s < PREEMPT_EXIT_S, f"{name}: exit took {exit_s:.1f} s (bound {PREEMPT_EXIT_S} s)")
  logged, saved = last_logged_step(wd), ckpt_steps(wd)
  check(saved and saved[-1] == logged,
        f"{name}: last checkpoint {saved[-1:]} is not the last logged step {logged}")
  check(logged < STEPS, f"{name}: the run finished ({logged} steps) before the signal landed")
  said = f"{name}: checkpointing step {logged}" in stopped.out or logged % CKPT_EVERY == 0
  check(said, f"{name}: no 'checkpointing step {logged}' message in stdout:\n{stopped.out}")
  summary = (f"{name} at step {logged}: exit 0 after {exit_s:.1f} s, checkpoint {logged} = last "
             "logged step")
  if resume:
    again = run(wd, ref.args())
    check(again.rc == 0, f"the resumed run failed: {again.describe()}")
    check(resumed_at(again) == logged, f"resumed at {resumed_at(again)}, not {logged}")
    summary += f", resumed: {check_matches_reference(wd, ref)}"
  return summary


def damage(workdir: str, step: int, how: str = "truncate") -> str:
  """Truncates (to half) or deletes the largest file under checkpoints/<step>/params/."""
  files = [p for p in glob.glob(os.path.join(workdir, "checkpoints", str(step), "params", "**"),
                                recursive=True) if os.path.isfile(p)]
  path = max(files, key=os.path.getsize)
  if how == "truncate":
    os.truncate(path, os.path.getsize(path) // 2)
  else:
    os.remove(path)
  return os.path.relpath(path, workdir)


def drill_corrupt(base: str, ref: Reference, how: str = "truncate") -> str:
  """The newest checkpoint half-written: warn on stderr, fall back, move it aside, end equal."""
  wd = fresh(base, f"corrupt_{how}")
  shutil.copytree(ref.workdir, wd)
  saved = ckpt_steps(wd)
  check(len(saved) >= 2, f"reference kept checkpoints {saved}; need two")
  newest, previous = saved[-1], saved[-2]
  damaged = damage(wd, newest, how)
  r = run(wd, ref.args())
  check(r.rc == 0, f"the run on a damaged checkpoint failed: {r.describe()}")
  check(re.search(rf"checkpoint step {newest} in \S+ is unreadable", r.err),
        f"no 'checkpoint step {newest} ... is unreadable' warning on stderr:\n{r.err[-3000:]}")
  check(resumed_at(r) == previous, f"resumed at {resumed_at(r)}, expected {previous}")
  aside = glob.glob(os.path.join(wd, "checkpoints", f"{newest}.corrupt-*"))
  check(aside, f"the damaged step {newest} was not moved aside to {newest}.corrupt-*")
  after = ckpt_steps(wd)
  check(previous in after and newest in after,
        f"checkpoints after the run: {after}; expected {previous} kept and {newest} re-saved")
  same = check_matches_reference(wd, ref)
  return (f"{how} {damaged}: warned, resumed at {previous}, damaged step moved to "
          f"{os.path.basename(aside[0])}, re-saved {newest}, {same}")


def drill_nonfinite(base: str, ref: Reference) -> str:
  """optim.lr=1e6: exit 1 naming the step, the last good checkpoint and the cause; that checkpoint
  is finite. Logged every 4 steps, so checkpoints are written after the first skipped update: a
  re-run counts afresh (it stops on its own first bad step, not at once on the old one). Then
  train.on_nonfinite=skip on the same settings: exit 0 with the skips counted."""
  import numpy as np
  blowup = ["--config.optim.lr=1e6", "--config.optim.grad_clip=0", "--config.train.ckpt_every=1",
            "--config.train.log_every=4"]
  wd = fresh(base, "nonfinite_stop")
  pattern = (r"^error: non-finite loss or gradients at step (\d+); the update was not applied\. "
             r"Last good checkpoint: step (\d+) .*optim\.lr")
  r = run(wd, ref.args(*blowup))
  m = re.search(pattern, r.last_line)
  check(r.rc == 1 and m and "Traceback" not in r.err,
        f"expected exit 1 and one line naming step, checkpoint and cause: {r.describe()}")
  bad, good = int(m.group(1)), int(m.group(2))
  check(ckpt_steps(wd)[-1] == good >= bad, f"checkpoints {ckpt_steps(wd)}: message says {good}")
  check(all(np.isfinite(p).all() for p in params(wd, good)),
        f"checkpoint {good} holds non-finite parameters")
  again = run(wd, ref.args(*blowup))
  m2 = re.search(pattern, again.last_line)
  check(again.rc == 1 and m2 and resumed_at(again) == good,
        f"the re-run should resume at {good} and stop again: {again.describe()}")
  check(int(m2.group(1)) == good + 1 and "skipped non-finite update(s)" in again.err,
        f"the re-run stopped on step {m2.group(1)}, not its own first step {good + 1}")
  wd = fresh(base, "nonfinite_skip")
  s = run(wd, ref.args(*blowup, "--config.train.on_nonfinite=skip"))
  check(s.rc == 0, f"on_nonfinite=skip: expected exit 0, got {s.describe()}")
  skipped = read_metrics(wd)[-1].get("skipped_updates", 0)
  check(skipped > 0, "on_nonfinite=skip: no skipped_updates counted in metrics.jsonl")
  check(all(np.isfinite(p).all() for p in params(wd)), "skip: the checkpoint is not finite")
  return (f"lr=1e6: stopped at step {bad}, exit 1, last good checkpoint {good} is finite; "
          f"re-run from it stopped on its own step {good + 1}; "
          f"on_nonfinite=skip: exit 0, {skipped}/{STEPS} updates skipped")


def drill_disk(base: str, ref: Reference) -> str:
  """Saves fail: at step 8 at once (ENOSPC), at step 16 in orbax's background writer ("File too
  large") and at the last step. Each is logged, training goes on, the next save retries and
  succeeds; the failed final save exits 1 naming the last good checkpoint, and a clean re-run
  resumes from it and ends bitwise equal to the reference."""
  wd = fresh(base, "disk")
  sync, background = 2 * CKPT_EVERY, 4 * CKPT_EVERY
  r = run(wd, ref.args(), enospc=(sync,), efbig=(background, STEPS))
  check(r.rc == 1, f"expected exit 1 when the final save fails, got {r.describe()}")
  for step, why in ((sync, "No space left"), (background, "File too large"), (STEPS, "")):
    check(re.search(rf"checkpoint step {step} could not be saved \(.*{why}.*next checkpoint "
                    "retries", r.err), f"no error logged for the failed save of step {step}")
  check(r.last_line.startswith(f"error: the final checkpoint (step {STEPS}) could not be saved")
        and f"last saved one is step {STEPS - CKPT_EVERY}" in r.last_line,
        f"unexpected last stderr line: {r.last_line!r}")
  saved = ckpt_steps(wd)
  check(saved == [STEPS - 3 * CKPT_EVERY, STEPS - CKPT_EVERY],
        f"checkpoints after the failed saves: {saved}")  # the retries after each failure
  again = run(wd, ref.args())
  check(again.rc == 0 and resumed_at(again) == saved[-1],
        f"the clean re-run did not resume from {saved[-1]}: {again.describe()}")
  same = check_matches_reference(wd, ref)
  return (f"saves of steps {sync} (ENOSPC), {background} and {STEPS} (EFBIG, async) failed: "
          f"logged, training went on, retries kept {saved}, exit 1 naming step {saved[-1]}; "
          f"re-run resumed at {saved[-1]}, {same}")


DRILLS = {
    "crash": drill_crash,
    "preempt": drill_preempt,
    "corrupt": drill_corrupt,
    "nonfinite": drill_nonfinite,
    "disk": drill_disk,
}
