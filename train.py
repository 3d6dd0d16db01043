r"""Train a language model: python train.py --config=configs/lm.py[:args] --workdir=DIR [--config.x=y]

Re-running the same command on a workdir resumes from its newest readable checkpoint. SIGTERM or
Ctrl-C finishes the current step, checkpoints and exits 0.
Multi-host (GPU clusters): add --coordinator_address=HOST:PORT --num_processes=N --process_id=I
on every process (TPU pods need no flags: jax.distributed finds its peers).
"""

import logging as pylogging
import os
import sys
import warnings

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/lm.py", "Experiment config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.", required=True)
flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.DEFINE_string("platform", None, "Force a JAX platform (cpu, gpu, tpu).")


def _parse_flags(argv):
  """absl's parser, but a bad flag is one line naming it on stderr and exit 1: no traceback (an
  unknown --config.x key, or an error inside the config file) and no usage hint after it."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    message = lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')}: {lines[-1]}"
  except (AttributeError, KeyError) as e:  # ml_collections: --config.<unknown key>
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    text = str(e.args[0] if e.args else e)
    key = text.splitlines()[0].strip("'\"") if text else "?"
    bad = [a.split("=", 1)[0] for a in argv[1:]
           if a.startswith("--config.") and key in a.split("=", 1)[0].split(".")]
    message = (f"flag {bad[0] if bad else '--config'}: unknown config field {key!r}"
               + "".join(f"; {l.strip()}" for l in text.splitlines()[1:] if l.strip()))
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


def main(argv):
  del argv
  import jax

  if FLAGS.platform:
    jax.config.update("jax_platforms", FLAGS.platform)
  if FLAGS.coordinator_address or os.environ.get("TPU_WORKER_HOSTNAMES"):
    if jax.default_backend() == "cpu" or FLAGS.platform == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  from mla_jax.training import trainer

  logging.set_verbosity(logging.WARNING)
  try:
    summary = trainer.train(FLAGS.config, FLAGS.workdir)
  except (ValueError, OSError, trainer.NonFiniteError, trainer.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    # A failed async save leaves asyncio futures ('exception never retrieved') and orbax read
    # coroutines ('never awaited') whose reports would come after this line at exit; the failure
    # is reported above, and the error must stay the last line.
    pylogging.getLogger("asyncio").disabled = True
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited")
    sys.exit(1)
  final = summary["final"] or {}
  if jax.process_index() == 0 and final:
    print(f"step {summary['step']}: val_loss {final['val_loss']:.4f}  "
          f"val_ppl {final['val_ppl']:.3f}  val_bpb {final['val_bpb']:.4f}  ({summary['workdir']})")


if __name__ == "__main__":
  from mla_jax import host_memory
  host_memory.configure_entry_point()  # malloc settings for fast XLA:CPU steps; see its docstring
  app.run(main, flags_parser=_parse_flags)
