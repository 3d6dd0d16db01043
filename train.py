r"""Train a language model: python train.py --config=configs/lm.py[:args] --workdir=DIR [--config.x=y]

Re-running the same command on a workdir resumes from its newest readable checkpoint. SIGTERM or
Ctrl-C finishes the current step, checkpoints and exits 0.
Multi-host (GPU clusters): add --coordinator_address=HOST:PORT --num_processes=N --process_id=I
on every process (TPU pods need no flags: jax.distributed finds its peers).
"""

import os
import sys

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


def main(argv):
  del argv
  import jax

  if FLAGS.platform:
    jax.config.update("jax_platforms", FLAGS.platform)
  if FLAGS.coordinator_address or os.environ.get("TPU_WORKER_HOSTNAMES"):
    if jax.default_backend() == "cpu" or FLAGS.platform == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  from mla_jax import trainer

  logging.set_verbosity(logging.WARNING)
  try:
    summary = trainer.train(FLAGS.config, FLAGS.workdir)
  except (ValueError, FileNotFoundError, trainer.NonFiniteError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  final = summary["final"] or {}
  if jax.process_index() == 0 and final:
    print(f"step {summary['step']}: val_loss {final['val_loss']:.4f}  "
          f"val_ppl {final['val_ppl']:.3f}  val_bpb {final['val_bpb']:.4f}  ({summary['workdir']})")


if __name__ == "__main__":
  app.run(main)
