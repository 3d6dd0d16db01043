"""Training logs from process 0: a tqdm progress bar, TensorBoard events, metrics.jsonl."""

from __future__ import annotations

import json
import os

import tqdm

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
  """One JSON object per logged step in workdir/metrics.jsonl, the same scalars in TensorBoard."""

  def __init__(self, workdir: str, total_steps: int, start_step: int, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    from tensorboardX import SummaryWriter  # heavy import: process 0 only

    self.path = os.path.join(workdir, METRICS_FILE)
    truncate_after(self.path, start_step)  # a resumed run re-logs the steps after its checkpoint
    self.file = open(self.path, "a")
    # purge_step hides events a dead run wrote after its last checkpoint, like truncate_after.
    self.tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=start_step + 1)
    self.bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                         mininterval=1.0)

  def log(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
    self.file.write(json.dumps(record) + "\n")
    self.file.flush()
    for k, v in record.items():
      if k != "step" and isinstance(v, (int, float)):
        self.tb.add_scalar(k, v, step)
    shown = {k: record[k] for k in ("loss", "val_loss", "tokens_per_s", "mfu") if k in record}
    self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

  def advance(self, step: int) -> None:
    if self.enabled:
      self.bar.update(step - self.bar.n)

  def message(self, text: str) -> None:
    if self.enabled:
      self.bar.write(text)

  def close(self) -> None:
    if self.enabled:
      self.file.close()
      self.tb.close()
      self.bar.close()


def _plain(v):
  return v.item() if hasattr(v, "item") else v


def truncate_after(path: str, step: int) -> None:
  """Drops records with step > `step`: they belong to a run that died after its last checkpoint."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [l for l in f if l.strip()]
  keep = [l for l in lines if json.loads(l).get("step", 0) <= step]
  if len(keep) != len(lines):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, path)


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, METRICS_FILE)
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]
