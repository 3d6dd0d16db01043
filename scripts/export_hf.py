r"""Export a workdir as a Hugging Face checkpoint directory (transformers loads it; no torch).

  python3 scripts/export_hf.py --workdir=runs/mla --out=out/mla_hf [--which=latest|best|STEP]
      [--reference=out/mla_ref.npz]

MHA / GQA / MQA -> LlamaForCausalLM, MLA -> DeepseekV3ForCausalLM (docs/interop.md). --reference
also writes token ids and this model's logits, for scripts/check_hf_export.py to compare with what
transformers computes from the exported directory (run that one where torch is installed).
"""

from __future__ import annotations

import sys

from absl import app, flags

flags.DEFINE_string("workdir", None, "Workdir to export.")
flags.DEFINE_string("out", None, "New directory for the Hugging Face checkpoint.")
flags.DEFINE_string("which", "latest", "Checkpoint: latest, best or a step number.")
flags.DEFINE_bool("overwrite", False, "Replace an existing --out directory.")
flags.DEFINE_string("reference", None, "Also write inputs and our logits to this .npz file.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from mla_jax.cli import quiet_and_require
  from mla_jax.interop.hf_export import export_hf

  quiet_and_require("workdir", "out")
  try:
    out = export_hf(FLAGS.workdir, FLAGS.out, FLAGS.which, overwrite=FLAGS.overwrite)
    if FLAGS.reference:
      import jax.numpy as jnp
      import numpy as np

      from mla_jax.storage.workdir import load_model
      model = load_model(FLAGS.workdir, FLAGS.which)
      rng = np.random.default_rng(0)
      tokens = rng.integers(0, model.cfg.vocab_size, (2, min(16, model.cfg.max_seq_len)))
      logits = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
      np.savez(FLAGS.reference, inputs=tokens.astype(np.int32), logits=logits)
  except (ValueError, OSError) as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    sys.exit(1)
  print(f"exported {FLAGS.workdir} -> {FLAGS.out}: {out['model_type']}, {out['tensors']} tensors, "
        f"tokenizer: {'yes' if out['tokenizer'] else 'no'}")
  for note in out["notes"]:
    print(f"note: {note}")


if __name__ == "__main__":
  from mla_jax.cli import parse_flags_or_exit

  app.run(main, flags_parser=parse_flags_or_exit)
