r"""Evaluate a trained workdir: quality, size, KV cache and decode speed, from the workdir alone.

  python eval.py --workdir=runs/default [--json=out.json] [--which=latest|best|STEP]
  python eval.py --workdir=runs/default --data=text:path/to/other.txt
  python eval.py --workdir=runs/default --max_tokens=65536 --decode_lengths=256,1024
  python eval.py --workdir=runs/default --cache_policy=h2o --cache_budget=0.25 --cache_quant=int8
  python eval.py --workdir=runs/default --mesh.sequence=4   # params and decode cache on a mesh

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
  # A device mesh, as train.py's --config.mesh.*: none given = one device (docs/sharding.md).
  for axis, what in (("data", "batch split (-1 fills; the default when another axis is given)"),
                     ("fsdp", "batch split, parameters sharded along 'embed'"),
                     ("tensor", "heads, kv heads, MLP and vocab split"),
                     ("sequence", "decode cache length split (flash-decoding merge)")):
    flags.DEFINE_integer(f"mesh.{axis}", None, f"Mesh axis size: {what}.")
  flags.DEFINE_enum("sharded_impl", "shard_map", ["shard_map", "gspmd"], "Attention over a "
                    "sequence-split cache: per-shard partials merged by log-sum-exp, or the plain "
                    "einsums partitioned by XLA.")
  # Inference-time cache compression (mla_jax/kvcompress, docs/kvcompress.md).
  flags.DEFINE_string("cache_policy", "none", "Eviction policy: none, streaming, h2o, tova, "
                      "snapkv, l2norm, vatp, fastgen.")
  flags.DEFINE_string("cache_budget", "0", "Cache slots per layer and KV group: a token count or "
                      "a fraction of the compressed context, the first half of a training "
                      "window (0: no eviction).")
  flags.DEFINE_string("cache_quant", "none", "Cache storage: none, int8, int4 (KIVI-style).")
  flags.DEFINE_string("cache_positions", "auto", "original, cache (StreamingLLM's re-assignment) "
                      "or auto (cache for streaming).")
  flags.DEFINE_integer("cache_window", -1, "Recent tokens never evicted (-1: policy default).")
  flags.DEFINE_integer("cache_sinks", -1, "First tokens never evicted (-1: policy default).")
  flags.DEFINE_integer("cache_group", 32, "Quantisation group size.")
  flags.DEFINE_integer("cache_stream_tokens", -1, "Streaming bpb: tokens decoded one by one "
                       "(-1: four budgets, 0: skip).")
  flags.DEFINE_string("passkey_lengths", "", "Passkey retrieval at these prompt lengths "
                      "(comma-separated tokens; empty: skip).")
  flags.DEFINE_integer("passkey_trials", 8, "Passkey prompts per length.")
  flags.DEFINE_bool("cache_grid", True, "Also the 0.25/0.5/0.75/0.875 eviction-ratio grid.")
  flags.DEFINE_bool("cache_only", False, "With --cache_policy/--cache_quant: skip the ordinary "
                    "evaluation.")


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
  compress = FLAGS.cache_policy != "none" or FLAGS.cache_quant != "none"
  if compress:  # bad compression flags: one line before anything loads or compiles
    from mla_jax.kvcompress.evaluate import policy_from_flags
    try:
      policy_from_flags(FLAGS.cache_policy, FLAGS.cache_budget, FLAGS.cache_quant,
                        positions=FLAGS.cache_positions, window=FLAGS.cache_window,
                        sinks=FLAGS.cache_sinks, group=FLAGS.cache_group)
      lengths = [int(x) for x in FLAGS.passkey_lengths.split(",") if x.strip()]
    except ValueError as e:
      msg = str(e) if str(e).startswith("--") else f"--passkey_lengths: {e}"
      print(f"error: {msg.splitlines()[0]}", file=sys.stderr)
      sys.exit(1)

  def progress(text: str) -> None:
    print(f"[eval {time.perf_counter() - started:5.1f}s] {text}", file=sys.stderr, flush=True)

  try:
    from mla_jax.evaluation.workdir_eval import eval_mesh

    plan = eval_mesh({a: FLAGS[f"mesh.{a}"].value for a in ("data", "fsdp", "tensor", "sequence")},
                     FLAGS.sharded_impl)  # a bad mesh: one line before anything loads
    result = {}
    if not (compress and FLAGS.cache_only):
      result = evaluate_workdir(FLAGS.workdir, FLAGS.data, FLAGS.max_tokens, FLAGS.which,
                                FLAGS.decode_lengths, FLAGS.decode_steps, FLAGS.buckets,
                                progress=progress, plan=plan)
    if compress:
      from mla_jax.kvcompress.evaluate import evaluate_workdir_policy, format_rows
      result["kv_compression"] = evaluate_workdir_policy(
          FLAGS.workdir, dict(name=FLAGS.cache_policy, budget=FLAGS.cache_budget,
                              quant=FLAGS.cache_quant, positions=FLAGS.cache_positions,
                              window=FLAGS.cache_window, sinks=FLAGS.cache_sinks,
                              group=FLAGS.cache_group, stream_tokens=FLAGS.cache_stream_tokens,
                              passkey_lengths=lengths, passkey_trials=FLAGS.passkey_trials,
                              grid=FLAGS.cache_grid),
          which=FLAGS.which, data=FLAGS.data, progress=progress)
  except (EvalError, ValueError, FileNotFoundError) as e:
    print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
    sys.exit(1)
  if "val_bpb" in result:
    print(format_table(result))
  if compress:
    rows = format_rows(result["kv_compression"])
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
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
