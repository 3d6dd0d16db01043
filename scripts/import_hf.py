r"""Import a local Hugging Face checkpoint directory into a workdir (no download, no torch).

  python3 scripts/import_hf.py --hf_dir=path/to/SmolLM-135M --workdir=runs/smollm

The directory needs config.json and *.safetensors (one file or shards with an index); its
tokenizer.json comes along when present. Supported: Llama / Mistral-style MHA and GQA, and
DeepSeek-V3-style MLA with dense MLPs (docs/interop.md); anything else is refused with one line
naming the config field, and nothing is written. The workdir then works with eval.py,
scripts/generate.py, load_model, train.py (train.init_from) and scripts/convert_mha2mla.py.
"""

from __future__ import annotations

import sys

from absl import app, flags

flags.DEFINE_string("hf_dir", None, "Hugging Face checkpoint directory (config.json, safetensors).")
flags.DEFINE_string("workdir", None, "New workdir to write (must not exist).")
flags.DEFINE_bool("overwrite", False, "Replace an existing workdir.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from mla_jax.cli import quiet_and_require
  from mla_jax.interop.hf_import import import_hf

  quiet_and_require("hf_dir", "workdir")
  try:
    out = import_hf(FLAGS.hf_dir, FLAGS.workdir, overwrite=FLAGS.overwrite)
  except (ValueError, OSError) as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    sys.exit(1)
  m = out["model"]
  print(f"imported {FLAGS.hf_dir} -> {FLAGS.workdir}: {m['attention']}, {m['n_layers']} layers, "
        f"d_model {m['d_model']}, {out['params']:,} parameters, tokenizer: "
        f"{'yes' if out['tokenizer'] else 'no'}")
  for note in out["notes"]:
    print(f"note: {note}")


if __name__ == "__main__":
  from mla_jax.cli import parse_flags_or_exit

  app.run(main, flags_parser=parse_flags_or_exit)
