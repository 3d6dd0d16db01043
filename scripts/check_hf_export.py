r"""Loads an exported directory with `transformers` and compares its logits with ours (needs torch
and transformers: run it in their environment, not the project's).

  python3 scripts/export_hf.py --workdir=runs/mla --out=out/mla_hf --reference=out/mla_ref.npz
  /tmp/hfenv/bin/python scripts/check_hf_export.py --hf_dir=out/mla_hf --reference=out/mla_ref.npz

Prints the largest absolute logit difference; exits 1 when it is above --tol (relative to the
largest logit, at least 1). The torch environment, once (a venv beside the project's):

  python3 -m venv /tmp/hfenv && /tmp/hfenv/bin/pip install torch transformers safetensors numpy
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

HF_ENV = ("python3 -m venv /tmp/hfenv && /tmp/hfenv/bin/pip install torch transformers "
          "safetensors numpy")


def main():
  try:
    import torch
    import transformers
  except ImportError as e:  # the project's environment has neither, on purpose
    print(f"error: scripts/check_hf_export.py needs torch and transformers ({e.name or e} is not "
          f"installed here); make that environment once: {HF_ENV}, then run "
          "/tmp/hfenv/bin/python scripts/check_hf_export.py --hf_dir=... --reference=...",
          file=sys.stderr)
    sys.exit(1)
  ap = argparse.ArgumentParser()
  ap.add_argument("--hf_dir", required=True)
  ap.add_argument("--reference", required=True)
  ap.add_argument("--tol", type=float, default=1e-4)
  args = ap.parse_args()
  ref = np.load(args.reference)
  model = transformers.AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
  with torch.no_grad():
    logits = model.eval()(torch.from_numpy(ref["inputs"]).long()).logits.float().numpy()
  diff = float(np.abs(logits - ref["logits"]).max())
  scale = max(1.0, float(np.abs(ref["logits"]).max()))
  ok = diff <= args.tol * scale
  print(f"{args.hf_dir}: {type(model).__name__}, max |logit diff| {diff:.3g} (scale {scale:.3g}): "
        f"{'OK' if ok else 'MISMATCH'}")
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
