r"""Inference-time KV-cache compression over a comparison sweep's trained models (issue 13).

  python scripts/compress_sweep.py --runs_dir=runs/sweep_cpu --out=docs/results/kvcompress
  python scripts/compress_sweep.py --runs_dir=runs/sweep_cpu --out=/tmp/kv --policies=h2o \
      --ratios=0.5,0.875 --quants=none,int4 --compose --passkey_lengths=256

For each trained workdir (variant) x policy x budget (kvpress's fractions of the context evicted)
x quantisation: bpb with the compressed prefix, effective bytes per token and, optionally, passkey
accuracy; then OUT/results.json, OUT/report.md and Pareto plots of bpb (and passkey accuracy)
against bytes per token, trained-in and inference-time compression together
(mla_jax/kvcompress/sweep.py). Bad flags: one line, exit 1.
"""

from __future__ import annotations

import sys

from absl import app, flags

FLAGS = flags.FLAGS


def _list(text: str, kind=str) -> tuple:
  return tuple(kind(x.strip()) for x in text.split(",") if x.strip())


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  from mla_jax.kvcompress.policy import POLICIES, QUANTS, PolicyError
  try:
    if not FLAGS.runs_dir or not FLAGS.out:
      raise PolicyError("--runs_dir and --out are required")
    policies, quants = _list(FLAGS.policies), _list(FLAGS.quants)
    for p in policies:
      if p not in POLICIES or p == "none":
        raise PolicyError(f"--policies: unknown policy {p!r}; choose from {POLICIES[1:]}")
    for q in quants:
      if q not in QUANTS:
        raise PolicyError(f"--quants: unknown quantisation {q!r}; choose from {QUANTS}")
    try:
      ratios = _list(FLAGS.ratios, float)
      lengths = _list(FLAGS.passkey_lengths, int)
    except ValueError as e:
      raise PolicyError(f"--ratios / --passkey_lengths: {e}") from None
    if any(not 0 < r < 1 for r in ratios):
      raise PolicyError(f"--ratios: fractions evicted must lie in (0, 1), got {ratios}")
    from absl import logging

    from mla_jax.kvcompress.sweep import run_compress_sweep
    from mla_jax.storage.checkpoint import quiet_orbax_logs

    logging.set_verbosity(logging.WARNING)
    quiet_orbax_logs()
    result = run_compress_sweep(FLAGS.runs_dir, FLAGS.out, policies, ratios, quants,
                                FLAGS.compose, FLAGS.windows, lengths, FLAGS.passkey_trials,
                                _list(FLAGS.only),
                                progress=lambda t: print(t, file=sys.stderr, flush=True))
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
    sys.exit(1)
  print(f"{len(result['rows'])} points -> {FLAGS.out}/report.md")


def define_flags():
  flags.DEFINE_string("runs_dir", None, "Directory of trained workdirs (a comparison sweep's).")
  flags.DEFINE_string("out", None, "Where results.json, report.md and the plots go.")
  flags.DEFINE_string("policies", "streaming,h2o,tova,snapkv", "Eviction policies.")
  flags.DEFINE_string("ratios", "0.25,0.5,0.75,0.875", "Fractions of the context evicted.")
  flags.DEFINE_string("quants", "none,int8,int4", "Quantisations (alone, and with --compose "
                      "under every policy and ratio).")
  flags.DEFINE_bool("compose", False, "Every policy x ratio x quantisation.")
  flags.DEFINE_integer("windows", 8, "Validation windows per point.")
  flags.DEFINE_string("passkey_lengths", "", "Passkey prompt lengths (empty: skip).")
  flags.DEFINE_integer("passkey_trials", 8, "Passkey prompts per length.")
  flags.DEFINE_string("only", "", "Only these run names (comma-separated).")


if __name__ == "__main__":
  from mla_jax import host_memory
  from mla_jax.cli import parse_flags_or_exit

  host_memory.configure_entry_point()
  define_flags()
  app.run(main, flags_parser=parse_flags_or_exit)
