r"""Evaluate a trained workdir: quality, size, KV cache and decode speed, from the workdir alone.

  python eval.py --workdir=runs/default [--json=out.json] [--which=latest|best|STEP]
  python eval.py --workdir=runs/default --data=text:path/to/other.txt
  python eval.py --workdir=runs/default --max_tokens=65536 --decode_lengths=256,1024

What it reports is documented in mla_jax/evaluation/workdir_eval.py; progress goes to stderr, the
table to stdout.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

from mla_jax.cli import check_args

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
  flags.DEFINE_string("json", None, "Also write the results to this JSON file.")
  flags.DEFINE_string("data", None, "Corpus to score instead of the training one: stdlib, "
                      "text:PATH or tokens:DIR (its validation split, the workdir's tokenizer).")
  flags.DEFINE_integer("max_tokens", 0, "Cap on validation tokens scored (0: the whole split).")
  flags.DEFINE_string("which", "latest", "Checkpoint: latest, best or a step number.")
  flags.DEFINE_string("decode_lengths", "256,max", "Context lengths for decode timing "
                      "('max' = model.max_seq_len); empty to skip decode timing.")
  flags.DEFINE_integer("decode_steps", 32, "Timed decode steps per context length.")
  flags.DEFINE_integer("buckets", 8, "Position buckets for the loss-by-position summary.")
  flags.DEFINE_string("platform", None, "Force a JAX platform (cpu, gpu, tpu).")


def main(argv):
  check_args(argv, FLAGS.workdir, "the directory train.py wrote")
  import jax
  from absl import logging

  from mla_jax.evaluation.workdir_eval import EvalError, evaluate_workdir, format_table
  from mla_jax.storage.checkpoint import quiet_orbax_logs

  logging.set_verbosity(logging.WARNING)
  quiet_orbax_logs()
  if FLAGS.platform:
    jax.config.update("jax_platforms", FLAGS.platform)
  started = time.perf_counter()

  def progress(text: str) -> None:
    print(f"[eval {time.perf_counter() - started:5.1f}s] {text}", file=sys.stderr, flush=True)

  try:
    result = evaluate_workdir(FLAGS.workdir, FLAGS.data, FLAGS.max_tokens, FLAGS.which,
                              FLAGS.decode_lengths, FLAGS.decode_steps, FLAGS.buckets,
                              progress=progress)
  except (EvalError, ValueError, FileNotFoundError) as e:
    print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
    sys.exit(1)
  print(format_table(result))
  if FLAGS.json:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
    with open(FLAGS.json, "w") as f:
      json.dump(result, f, indent=1)
    print(f"wrote {FLAGS.json}")


if __name__ == "__main__":
  from mla_jax import host_memory
  from mla_jax.cli import parse_flags_or_exit

  host_memory.configure_entry_point()  # malloc settings for fast XLA:CPU runs; see its docstring
  define_flags()
  app.run(main, flags_parser=parse_flags_or_exit)
