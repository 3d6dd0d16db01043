r"""Sample text from a trained workdir.

  python3 scripts/generate.py --workdir=runs/default --prompt='def main(' [--max_new_tokens=200]
      [--temperature=0.8] [--top_k=40] [--top_p=1.0] [--seed=0] [--which=latest|best|STEP]
      [--mesh.data=N --mesh.fsdp=N --mesh.tensor=N --mesh.sequence=N]   # on a device mesh
"""

from __future__ import annotations

import sys

from absl import app, flags

flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
flags.DEFINE_string("prompt", "\n", "Text to continue.")
flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate (>= 1; the prompt plus these "
                     "must fit in model.max_seq_len).")
flags.DEFINE_float("temperature", 0.8, "0 = greedy.")
flags.DEFINE_integer("top_k", 40, "Sample among the k most likely tokens (0: all).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: off).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("which", "latest", "Checkpoint: latest, best or a step number.")
for _axis in ("data", "fsdp", "tensor", "sequence"):
  flags.DEFINE_integer(f"mesh.{_axis}", None, f"Mesh axis size ({_axis}); none given: one device.")
flags.DEFINE_enum("sharded_impl", "shard_map", ["shard_map", "gspmd"],
                  "Attention over a sequence-split cache (docs/sharding.md).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from absl import logging

  from mla_jax import Workdir, generate
  from mla_jax.storage.checkpoint import quiet_orbax_logs
  from mla_jax.storage.workdir import WorkdirError

  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  quiet_orbax_logs()
  from mla_jax.evaluation.workdir_eval import EvalError, eval_mesh

  try:
    plan = eval_mesh({a: FLAGS[f"mesh.{a}"].value for a in ("data", "fsdp", "tensor", "sequence")},
                     FLAGS.sharded_impl)
    if FLAGS.max_new_tokens < 1:
      raise ValueError(f"--max_new_tokens: must be >= 1, got {FLAGS.max_new_tokens}")
    wd = Workdir.open(FLAGS.workdir)
    tok = wd.tokenizer()
    if tok is None:
      raise WorkdirError(f"{wd.path}: no tokenizer/ to encode a text prompt (trained on ids)")
    prompt = tok.encode(FLAGS.prompt).tolist()
    # Checked before loading anything: the cache holds max_seq_len tokens, prompt included.
    room = wd.model_config.max_seq_len - len(prompt)
    if room < 1:
      raise ValueError(f"--prompt: {len(prompt)} tokens fill the model's whole context "
                       f"(model.max_seq_len={wd.model_config.max_seq_len})")
    if FLAGS.max_new_tokens > room:
      raise ValueError(f"--max_new_tokens: {FLAGS.max_new_tokens} does not fit: the "
                       f"{len(prompt)}-token prompt leaves {room} of the model's "
                       f"{wd.model_config.max_seq_len} positions (model.max_seq_len); use "
                       f"--max_new_tokens={room} or less")
    mesh = None if plan is None else plan.mesh
    model = wd.load_model(FLAGS.which, mesh=mesh)
    out = generate(model, [prompt], FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                   top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed, mesh=mesh,
                   sharded_impl=FLAGS.sharded_impl)[0]
  except (WorkdirError, EvalError, ValueError) as e:
    msg = str(e).splitlines()[0]
    if msg.startswith("mesh."):  # generate's check names the flag
      msg = "--" + msg
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)
  print(FLAGS.prompt + tok.decode(out))


if __name__ == "__main__":
  from mla_jax.cli import parse_flags_or_exit

  app.run(main, flags_parser=parse_flags_or_exit)
