r"""Convert an MHA / GQA / MQA workdir into an MLA workdir (MHA2MLA: partial RoPE + low-rank SVD).

  python3 scripts/convert_mha2mla.py --src=runs/mha --dst=runs/mha2mla --rope_dims=16 \
      --kv_rank=64 --rope_strategy=2norm [--svd=joint|split] [--calib_batches=4]

Keeps R = --rope_dims of each KV head's dims rotated (pairs chosen by --rope_strategy: high, low,
uniform, or 2norm, ranked on --calib_batches batches of the source's training data), one rope key
per KV head, and factors the rest of the keys and the values into a --kv_rank latent. Prints the
cache bytes per token before and after. The result is a workdir like any other: eval.py, generate,
and train.py --config.train.init_from=DST to fine-tune it (docs/interop.md).
"""

from __future__ import annotations

import sys

from absl import app, flags

flags.DEFINE_string("src", None, "Source workdir (MHA, GQA or MQA).")
flags.DEFINE_string("dst", None, "New MLA workdir to write (must not exist).")
flags.DEFINE_integer("rope_dims", None, "R: rotated dims kept per head (even, <= head_dim).")
flags.DEFINE_integer("kv_rank", None, "C: latent rank.")
flags.DEFINE_enum("rope_strategy", "2norm", ["high", "low", "uniform", "2norm"],
                  "Which frequency pairs keep RoPE.")
flags.DEFINE_enum("svd", "joint", ["joint", "split", "joint_act"], "One latent for keys and "
                  "values, two, or one weighted by the calibration inputs (joint_act).")
flags.DEFINE_integer("calib_batches", 4, "Calibration batches (8 sequences each) for 2norm.")
flags.DEFINE_enum("rope_key", "group", ["group", "shared"], "One rope key per KV head (MHA2MLA, "
                  "exact) or one shared by all heads (DeepSeek-V3 exportable, approximate).")
flags.DEFINE_bool("latent_norm", False, "Normalise the cached latent (DeepSeek-V3 exportable, "
                  "approximate: fine-tune after).")
flags.DEFINE_string("which", "latest", "Source checkpoint: latest, best or a step number.")
flags.DEFINE_bool("overwrite", False, "Replace an existing --dst.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from mla_jax.cli import quiet_and_require
  from mla_jax.interop.mha2mla import convert

  quiet_and_require("src", "dst", "rope_dims", "kv_rank")
  try:
    out = convert(FLAGS.src, FLAGS.dst, FLAGS.rope_dims, FLAGS.kv_rank, FLAGS.rope_strategy,
                  FLAGS.svd, FLAGS.calib_batches, FLAGS.which, overwrite=FLAGS.overwrite,
                  rope_key=FLAGS.rope_key, latent_norm=FLAGS.latent_norm)
  except (ValueError, OSError) as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    sys.exit(1)
  print(f"converted {FLAGS.src} ({out['src_attention']}, {out['src_kv_heads']} kv heads) -> "
        f"{FLAGS.dst}: MLA C={out['kv_rank']} R={out['rope_dims']} x "
        f"{out['src_kv_heads'] if out['rope_key'] == 'group' else 1} rope keys, "
        f"{out['rope_strategy']}, svd {out['svd']} (exact at C >= {out['exact_rank']}); "
        f"KV cache {out['src_cache_bytes']} -> {out['dst_cache_bytes']} bytes/token "
        f"({100 * out['cache_fraction']:.1f}%), {out['seconds']:.1f} s")


if __name__ == "__main__":
  from mla_jax.cli import parse_flags_or_exit

  app.run(main, flags_parser=parse_flags_or_exit)
