r"""DMC retrofit of a trained MHA / GQA / MQA workdir, and the compression a DMC run achieved.

  # 1. A copy of the source run whose model has DMC on (no new parameters: its checkpoint fits),
  #    and the train.py command that continues training it (printed, with the source's data):
  python3 scripts/dmc_retrofit.py --source=runs/sweep_cpu/mha_s0 --out=runs/dmc/mha_2x_src \
      --target=2 --steps=144 --lr=1e-3
  # 2. Run the printed command (train.py --config.train.init_from=runs/dmc/mha_2x_src ...), then
  #    evaluate as any run (eval.py: bpb, allocated cache bytes, decode speed) and measure the
  #    compression its hard decisions reach on validation windows:
  python3 scripts/dmc_retrofit.py --report=runs/dmc/mha_2x

The target compression ramps linearly from 1 to --target over --ramp_fraction of the steps
(model.dmc_ramp_steps), as the DMC paper ramps it. train.init_from takes every model field from
the workdir it starts from, which is why step 1 writes a copy with the DMC fields set instead of
passing --config.model.dmc on the command line. Details: docs/trained_in.md.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

from absl import app, flags

flags.DEFINE_string("source", "", "trained MHA / GQA / MQA workdir to retrofit")
flags.DEFINE_string("out", "", "where to write the DMC copy of --source (train.init_from)")
flags.DEFINE_float("target", 2.0, "target compression (tokens per cache slot), model.dmc_target")
flags.DEFINE_integer("steps", 144, "continued-training steps (for the printed command)")
flags.DEFINE_float("ramp_fraction", 0.8, "fraction of --steps over which the target ramps up")
flags.DEFINE_float("lr", 1e-3, "learning rate of the continued training (printed command)")
flags.DEFINE_string("report", "", "a trained DMC workdir: measure its achieved compression")
flags.DEFINE_integer("windows", 8, "--report: validation windows (of the run's seq_len) to fill")
FLAGS = flags.FLAGS


def prepare() -> None:
  from mla_jax.core.config import ModelConfig
  from mla_jax.storage.workdir import Workdir

  src = Workdir.open(FLAGS.source)
  src.resolve_step("latest")  # a checkpoint to start from
  if os.path.exists(FLAGS.out):
    raise ValueError(f"--out: {FLAGS.out} exists; choose a new directory")
  model = dict(src.config["model"], dmc=True, dmc_target=FLAGS.target,
               dmc_ramp_steps=int(FLAGS.ramp_fraction * FLAGS.steps))
  ModelConfig.from_mapping(model)  # refuses MLA / YOCO sources and bad targets, naming the field
  # Only the latest checkpoint is needed; logs and plots stay behind.
  latest = str(src.resolve_step("latest"))
  shutil.copytree(src.path, FLAGS.out, ignore=lambda d, names: [
      n for n in names if n in ("tb", "metrics.jsonl", "curves.png", "eval.json", "train.log")
      or (os.path.basename(d) == "checkpoints" and n != latest)])
  Workdir.write_config(FLAGS.out, dict(src.config, model=model))
  d, t = src.config["data"], src.config["train"]
  data = " ".join(f"--config.data.{k}={d[k]}" for k in ("source", "path", "seq_len", "max_bytes",
                                                           "val_fraction") if d.get(k) not in
                  ("", None))
  print(f"wrote {FLAGS.out} (model.dmc_target={FLAGS.target}, ramp over "
        f"{model['dmc_ramp_steps']} steps); continue training with:\n"
        f"python3 train.py --config=configs/lm.py --workdir=<new run dir> "
        f"--config.train.init_from={FLAGS.out} {data} --config.train.global_batch="
        f"{t['global_batch']} --config.train.steps={FLAGS.steps} --config.optim.lr={FLAGS.lr}")


def report() -> None:
  import numpy as np

  from mla_jax.core import dmc
  from mla_jax.evaluation.workdir_eval import load_val, parse_data
  from mla_jax.storage.workdir import Workdir

  wd = Workdir.open(FLAGS.report)
  model = wd.load_model("latest")
  if not model.cfg.dmc:
    raise ValueError(f"--report: {FLAGS.report} is not a DMC run (model.dmc is False)")
  val, _, _ = load_val(wd, parse_data(None, wd.config))
  seq = wd.config["data"]["seq_len"]
  n = min(FLAGS.windows, len(val) // seq)
  stats = dmc.measure(model, np.asarray(val[:n * seq]).reshape(n, seq))
  per_token = stats["bytes_allocated"] / stats["tokens"]
  print(json.dumps(stats))
  print(f"{stats['tokens']:,} tokens ({n} windows of {seq}): compression "
        f"{stats['compression']:.2f}x (target {model.cfg.dmc_target}); cache bytes used "
        f"{stats['bytes_used']:,} of {stats['bytes_allocated']:,} allocated "
        f"({per_token:,.0f} bytes per token allocated, "
        f"{stats['bytes_used'] / stats['tokens']:,.0f} used)")


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  from mla_jax.storage.checkpoint import quiet_orbax_logs

  quiet_orbax_logs()
  try:
    if FLAGS.report:
      report()
    elif FLAGS.source and FLAGS.out:
      prepare()
    else:
      raise ValueError("--source and --out (prepare a retrofit) or --report are required")
  except ValueError as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
