r"""The MHA2MLA experiment: convert trained MHA / GQA workdirs to MLA at ~25% and ~12.5% of MHA's
KV cache, fine-tune on <= 5% of their pretraining tokens, and score every stage (docs/interop.md).

  python3 scripts/mha2mla_experiment.py --src=mha=runs/sweep_cpu/mha,gqa2=runs/sweep_cpu/gqa2 \
      --scratch=mla_c40=runs/sweep_cpu/mla_c40,mla_c16=runs/sweep_cpu/mla_c16 \
      --runs_dir=runs/mha2mla --out=docs/results/cpu/mha2mla

Writes OUT.json (every row), OUT.md (the table) and OUT.png (bpb against cache bytes: sources,
converted before / after fine-tuning, MLA from scratch). Reruns reuse finished stages.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

flags.DEFINE_string("src", None, "NAME=WORKDIR,... source MHA / GQA workdirs.")
flags.DEFINE_string("scratch", "", "NAME=WORKDIR,... MLA runs from scratch, to compare.")
flags.DEFINE_string("runs_dir", "runs/mha2mla", "Where converted and fine-tuned workdirs go.")
flags.DEFINE_string("out", "out/mha2mla", "Output prefix: .json, .md, .png.")
flags.DEFINE_float("finetune_fraction", 0.05, "Fine-tuning tokens / source pretraining tokens.")
flags.DEFINE_float("finetune_lr", 1e-3, "Fine-tuning peak learning rate.")
flags.DEFINE_integer("eval_tokens", 0, "Validation tokens per evaluation (0: the whole split).")
flags.DEFINE_string("decode_lengths", "256", "Contexts for decode timing.")
FLAGS = flags.FLAGS


def _pairs(text: str) -> dict[str, str]:
  out = {}
  for item in filter(None, text.split(",")):
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
      raise ValueError(f"{item!r} is not NAME=WORKDIR")
    out[name] = path
  return out


def main(argv):
  del argv
  from absl import logging

  from mla_jax.interop import mha2mla_experiment as exp
  from mla_jax.storage.checkpoint import quiet_orbax_logs

  logging.set_verbosity(logging.WARNING)
  quiet_orbax_logs()
  try:
    sources, scratch = _pairs(FLAGS.src or ""), _pairs(FLAGS.scratch)
    if not sources:
      raise ValueError("--src is required (NAME=WORKDIR,...)")
    result = exp.run(sources, FLAGS.runs_dir, finetune_fraction=FLAGS.finetune_fraction,
                     finetune_lr=FLAGS.finetune_lr, eval_tokens=FLAGS.eval_tokens,
                     decode_lengths=FLAGS.decode_lengths, scratch=scratch,
                     say=lambda s: print(s, file=sys.stderr, flush=True))
  except (ValueError, OSError) as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    sys.exit(1)
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out + ".json", "w") as f:
    json.dump(result, f, indent=1)
  with open(FLAGS.out + ".md", "w") as f:
    f.write(exp.table(result) + "\n")
  exp.plot(result, FLAGS.out + ".png")
  print(exp.table(result))
  print(f"wrote {FLAGS.out}.json, .md, .png")


if __name__ == "__main__":
  from mla_jax.cli import parse_flags_or_exit

  app.run(main, flags_parser=parse_flags_or_exit)
