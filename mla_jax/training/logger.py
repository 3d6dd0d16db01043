"""Training logs from process 0: metrics.jsonl, TensorBoard events, and one status line.

On a terminal the status is a tqdm bar whose count follows the steps the device has FINISHED
(the loop dispatches steps asynchronously and runs ahead of them), with one stable postfix:
loss, last validation bits per byte, tokens/s and MFU in percent. Elsewhere (a Slurm or TPU log
file, CI, a terminal reporting 0 columns) there is no bar: the same status is printed as a plain
line at every logged step.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import sys
import time

import tqdm

from mla_jax.storage.workdir import METRICS_FILE, read_metrics  # noqa: F401 (re-exported)


def is_interactive(stream=None) -> bool:
  """A terminal that can redraw a bar: a tty reporting a positive width."""
  stream = stream or sys.stderr
  try:
    return stream.isatty() and shutil.get_terminal_size((0, 0)).columns > 0
  except (AttributeError, ValueError, OSError):
    return False


def status_line(step: int, total: int, last: dict) -> str:
  """'loss 1.234 | val_bpb 2.215 | 5,712 tok/s | MFU 42.0%' from the last logged values."""
  parts = []
  if "loss" in last:
    parts.append(f"loss {last['loss']:.4f}")
  if "val_bpb" in last:
    parts.append(f"val_bpb {last['val_bpb']:.4f}")
  if "tokens_per_s" in last:
    parts.append(f"{last['tokens_per_s']:,.0f} tok/s")
  if "mfu" in last:
    parts.append(f"MFU {100 * last['mfu']:.1f}%")
  return " | ".join(parts)


class MetricsLogger:
  """One JSON object per logged step in workdir/metrics.jsonl, the same scalars in TensorBoard."""

  def __init__(self, workdir: str, total_steps: int, start_step: int, enabled: bool = True,
               interactive: bool | None = None, log_every: int | None = None):
    self.enabled = enabled
    if not enabled:
      return
    from tensorboardX import SummaryWriter  # heavy import: process 0 only

    self.path = os.path.join(workdir, METRICS_FILE)
    truncate_after(self.path, start_step)  # a resumed run re-logs the steps after its checkpoint
    self.file = open(self.path, "a")
    # purge_step hides events a dead run wrote after its last checkpoint, like truncate_after.
    self.tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=start_step + 1)
    self.total, self.start = total_steps, start_step
    self.interactive = is_interactive() if interactive is None else interactive
    self.bar = None  # created at the first step, after the header lines
    self.done = start_step  # steps the device has finished
    self.pending = collections.deque()  # (step, an output array of that step) not yet finished
    self.last: dict = {}
    self.started = time.perf_counter()
    # Said once the first step has run (compilation included), so a log file shows a sign of life
    # long before the first status line, which waits log_every steps.
    self.log_every = log_every

  def dispatched(self, step: int, output) -> None:
    """The loop dispatched `step`; `output` (a jax.Array it produces) is ready when it is done."""
    if not self.enabled:
      return
    self.pending.append((step, output))
    while self.pending and self.pending[0][1].is_ready():
      first = self.done == self.start
      self._completed(self.pending.popleft()[0])
      if first and self.log_every and self.log_every > 1:
        self.message(f"step {self.done}/{self.total} done after "
                     f"{time.perf_counter() - self.started:.1f} s (compilation included); the "
                     f"status line follows every {self.log_every} steps")

  def log(self, step: int, metrics: dict) -> None:
    """Records metrics of a finished step (the caller fetched them, so the step is done)."""
    if not self.enabled:
      return
    while self.pending and self.pending[0][0] <= step:
      self.pending.popleft()
    record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
    self.file.write(json.dumps(record) + "\n")
    self.file.flush()
    for k, v in record.items():
      if k != "step" and isinstance(v, (int, float)):
        self.tb.add_scalar(k, v, step)
    self.last.update({k: v for k, v in record.items() if isinstance(v, (int, float))})
    self._completed(step, force=True)
    if not self.interactive and "loss" in record:
      self._print(f"step {step}/{self.total} | {status_line(step, self.total, self.last)} | "
                  f"{self._elapsed()}")

  def message(self, text: str) -> None:
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.write(text)
    else:
      self._print(text)

  def close(self) -> None:
    if self.enabled:
      self.file.close()
      self.tb.close()
      if self.bar is not None:
        self.bar.close()

  # Internals ------------------------------------------------------------------------------------

  def _completed(self, step: int, force: bool = False) -> None:
    if step <= self.done and not force:
      return
    self.done = max(self.done, step)
    if not self.interactive:
      return
    if self.bar is None:
      self.bar = tqdm.tqdm(total=self.total, initial=self.start, unit="step", dynamic_ncols=True,
                           mininterval=0.5, file=sys.stderr)
    self.bar.set_postfix_str(status_line(step, self.total, self.last), refresh=False)
    self.bar.update(self.done - self.bar.n)

  def _elapsed(self) -> str:
    seconds = time.perf_counter() - self.started
    steps = self.done - self.start
    left = (self.total - self.done) * seconds / steps if steps else 0.0
    return f"elapsed {_clock(seconds)}, eta {_clock(left)}"

  @staticmethod
  def _print(text: str) -> None:
    print(text, flush=True)  # stdout, as tqdm.write prints messages while a bar is shown


def _clock(seconds: float) -> str:
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _plain(v):
  return v.item() if hasattr(v, "item") else v


def truncate_after(path: str, step: int) -> None:
  """Drops records with step > `step`: they belong to a run that died after its last checkpoint."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  keep = [line for line in lines if json.loads(line).get("step", 0) <= step]
  if len(keep) != len(lines):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, path)
