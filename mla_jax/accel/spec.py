"""The accelerator check's plan: its steps in order, their time limits, the targets and
the dry run's shapes (read by the runner, the steps and the tables)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
JSON_NAME, MD_NAME, LOG_NAME = "accel_check.json", "accel_check.md", "accel_check.log"
BUDGET_S = 480.0  # the whole check on a GPU: 8 minutes
QUALITY_MIN_S = 60.0  # less than this left: the quality step is skipped
QUALITY_EACH_S = 120.0  # at most this per quality model
BANDWIDTH_TARGET = 0.85  # of the measured copy bandwidth (FlashMLA: ~90% of an H800's)
MFU_TARGET = 0.45  # nanoGPT-class PyTorch: ~40-50% on Hopper at this size
EQUALITY_RTOL = 2e-2  # max |logit diff| / max |logit|, bf16 pallas vs absorbed
DECODE_ROWS = ("mla-pallas", "mqa", "mla-absorbed")  # measured in this order (the kernel first)
TRAIN_RUNS = (("mla", "auto"), ("mha", "auto"), ("mla", "blocked"), ("mha", "blocked"))
QUALITY_CACHE_FRACTION = 0.25  # MLA's cache / MHA's in the quality step
VERSIONS = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin",
            "jax-cuda12-pjrt", "flax", "optax", "orbax-checkpoint", "numpy", "grain",
            "ml_collections", "tensorboardX", "tokenizers", "matplotlib", "absl-py", "pytest")


@dataclasses.dataclass(frozen=True)
class Step:
  name: str
  title: str
  limit_s: float | None  # on an accelerator (None: whatever the budget has left)
  dry_limit_s: float  # --dry_run on a 2-core CPU, generous: other work may share it


STEPS = (
    Step("env", "Environment", 40, 90),
    Step("kernels", "Compiled kernel", 80, 150),
    Step("decode", "Decode (bf16 cache)", 120, 150),
    Step("train", "Training throughput (bf16)", 180, 150),
    Step("quality", "Quality: MHA vs MLA at 25% of the cache", None, 150),
)
STEP_NAMES = tuple(s.name for s in STEPS)

# --dry_run shapes: the decode benchmark's model shrunk (MLA C = 2 * head dim, R = head dim / 2).
DRY_DECODE = dict(d_model=64, n_heads=4, head_dim=16, d_ff=128, kv_lora_rank=32,
                  qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)
DRY_TRAIN = {"model.dtype": "bfloat16", "model.remat": True, "model.n_layers": 1,
             "train.global_batch": 4, "data.seq_len": 32}


def _plain(v):
  """JSON for numpy scalars and the like."""
  if hasattr(v, "item"):
    return v.item()
  return str(v)
