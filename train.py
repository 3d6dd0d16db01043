r"""Train a language model.

  python train.py --config=configs/lm.py[:ARGS] --workdir=DIR [--config.GROUP.FIELD=VALUE ...]

  python train.py --workdir=runs/default                       # the default experiment
  python train.py --workdir=runs/smoke --config.train.steps=1  # a smoke run
  python train.py --config=configs/lm.py:attn=gqa,size=tiny --workdir=runs/gqa \
      --config.model.n_kv_heads=2 --config.data.path=my_text.txt

Re-running the same command on a workdir resumes from its newest readable checkpoint; on a
finished workdir it prints the final metrics and changes nothing. SIGTERM or Ctrl-C finishes the
current step, checkpoints and exits 0 (a second Ctrl-C stops at once).
Multi-host: add --coordinator_address=HOST:PORT --num_processes=N --process_id=I on every process
(or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID); TPU pods and Slurm need none.
Locally: python scripts/launch_local.py --num_processes=2 -- <these flags>. docs/multihost.md.
"""

import os
import sys

from absl import app, flags, logging

from mla_jax.cli import check_args

FLAGS = flags.FLAGS
CHECKOUT = os.path.dirname(os.path.abspath(__file__))


def define_flags():
  from mla_jax.cli import define_config_flag

  # Absolute: the default resolves wherever the user stands; a relative --config=configs/... is
  # also found in this checkout.
  define_config_flag(os.path.join(CHECKOUT, "configs", "lm.py"), root=CHECKOUT)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics (required).")
  flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator (multi-host).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
  flags.DEFINE_integer("distributed_timeout", 300,
                       "Seconds to wait for the coordinator and every process (multi-host).")
  flags.DEFINE_string("platform", None, "Force a JAX platform (cpu, gpu, tpu).")
  flags.DEFINE_bool("check_config", False, "Only check the flags and the config (no data, "
                    "devices or workdir are touched), print nothing and exit 0, or 1 with the "
                    "error; scripts/launch_tpu.py runs this locally before launching.")


def main(argv):
  if FLAGS.check_config:
    if len(argv) > 1:
      check_args(argv, "-", "")
    from mla_jax.experiment import ExperimentConfig

    try:
      ExperimentConfig.from_config(FLAGS.config)
    except (ValueError, TypeError) as e:
      print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
      sys.exit(1)
    return
  check_args(argv, FLAGS.workdir, "a directory for this run's checkpoints and logs")
  import jax

  if FLAGS.platform:
    jax.config.update("jax_platforms", FLAGS.platform)
  from mla_jax import distributed

  logging.set_verbosity(logging.WARNING)  # before jax.distributed, whose INFO lines are noise
  try:  # before anything touches a device; a no-op for a single process
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                           FLAGS.distributed_timeout)
  except distributed.DistributedError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)  # a half-joined distributed client would wait for its peers at exit
  from mla_jax.storage.checkpoint import quiet_orbax_logs
  from mla_jax.training import trainer

  logging.set_verbosity(logging.WARNING)
  quiet_orbax_logs()
  try:
    summary = trainer.train(FLAGS.config, FLAGS.workdir)
  except (ValueError, OSError, trainer.NonFiniteError, trainer.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    # The error must stay the last line. After a failed async save, orbax's threads and pending
    # futures print tracebacks ('Event loop is closed', never-awaited coroutines) at interpreter
    # teardown; the trainer has already closed its checkpointer and logs, so skip the teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
  if jax.process_index() == 0:
    print(trainer.summary_text(summary))


if __name__ == "__main__":
  from mla_jax import host_memory
  from mla_jax.cli import parse_flags_or_exit

  host_memory.configure_entry_point()  # malloc settings for fast XLA:CPU steps; see its docstring
  define_flags()
  app.run(main, flags_parser=parse_flags_or_exit)
