r"""Memory plan of a run before renting hardware: per-device bytes on N devices, nothing allocated.

  python3 scripts/plan.py --config=configs/lm.py:attn=mla,size=7b --devices=256 --mesh.fsdp=64 \
      [--decode_batch=8] [--decode_context=4096] [--config.model.vocab_size=32000] [--json=PATH]

Makes N fake CPU devices, builds the mesh as train.py would (--mesh.X is --config.mesh.X) and
compiles the train and decode steps ahead of time from abstract arrays (mla_jax/planning.py says
what each figure is). Bad flags or a mesh the devices cannot take: one line, exit 1.
"""

from __future__ import annotations

import json
import os
import sys

DEVICES_FLAG = "--devices"
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _preparse_devices(argv: list[str]) -> int:
  """--devices must set XLA_FLAGS before jax is imported."""
  for i, a in enumerate(argv):
    if a.startswith(DEVICES_FLAG + "="):
      value = a.split("=", 1)[1]
    elif a == DEVICES_FLAG and i + 1 < len(argv):
      value = argv[i + 1]
    else:
      continue
    if not value.isdigit() or int(value) < 1:
      print(f"error: --devices: must be a positive integer, got {value!r}", file=sys.stderr)
      sys.exit(1)
    return int(value)
  return 1


def main(argv):
  from absl import flags

  from mla_jax import planning
  from mla_jax.experiment import ExperimentConfig

  del argv
  FLAGS = flags.FLAGS
  try:
    exp = ExperimentConfig.from_config(FLAGS.config)
    p = planning.plan_experiment(exp, FLAGS.decode_batch, FLAGS.decode_context)
  except (ValueError, TypeError) as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    sys.exit(1)
  print(planning.report(p, exp))
  if FLAGS.json:
    import jax

    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
    with open(FLAGS.json, "w") as f:
      json.dump({**p, "peak_train_bytes": planning.peak_train_bytes(p), "jax": jax.__version__},
                f, indent=1)


if __name__ == "__main__":
  # --mesh.X is --config.mesh.X (config_flags reads its overrides from sys.argv itself).
  sys.argv = [("--config." + a[2:]) if a.startswith("--mesh.") else a for a in sys.argv]
  n = _preparse_devices(sys.argv[1:])
  # Nothing compiled here runs: skip LLVM's costly optimisations (buffer assignment, where the
  # memory figures come from, happens before them; minutes saved on 1B+ models).
  os.environ["XLA_FLAGS"] = (
      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
      + os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}")
  os.environ["JAX_PLATFORMS"] = "cpu"
  from absl import app, flags

  from mla_jax.cli import define_config_flag, parse_flags_or_exit

  define_config_flag(os.path.join(CHECKOUT, "configs", "lm.py"), root=CHECKOUT)
  flags.DEFINE_integer("devices", 1, "Fake CPU devices to plan for (the pod's device count).")
  flags.DEFINE_integer("decode_batch", 1, "Sequences decoded at once.")
  flags.DEFINE_integer("decode_context", 0, "Cache slots per sequence (0: model.max_seq_len).")
  flags.DEFINE_string("json", None, "Also write the numbers here.")
  app.run(main, flags_parser=parse_flags_or_exit)
