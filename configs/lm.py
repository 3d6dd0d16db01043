r"""Decoder-only LMs with MHA / GQA / MQA / MLA attention: the main experiment family.

`arg` picks the attention variant and the size, e.g. `attn=mla,size=small`:

  # Default experiment: small MLA on the Python standard library (bytes).
  python train.py --config=configs/lm.py --workdir=runs/mla_small
  # Another variant / size, any field overridden on the command line:
  python train.py --config=configs/lm.py:attn=gqa,size=tiny --workdir=runs/gqa_tiny \
      --config.train.steps=100 --config.model.n_kv_heads=2
  # A text file instead of the default corpus (a path means data.source=text):
  python train.py --config=configs/lm.py --workdir=runs/shakespeare \
      --config.data.path=data/tinyshakespeare.txt

Every field starts from its dataclass default (mla_jax.core.config.ModelConfig and the groups in
mla_jax.experiment, where each field's meaning and check live); a size sets only what it changes.
MLA latent C = D/2 and rope R = head_dim/2 unless overridden. Wall times: README.
"""

import dataclasses

from ml_collections import ConfigDict

from mla_jax.experiment import defaults


@dataclasses.dataclass(frozen=True)
class Size:
  d_model: int
  n_layers: int
  n_heads: int
  seq_len: int
  global_batch: int
  steps: int
  lr: float
  accelerator: bool = False  # bf16 compute and remat: sizes meant for GPU / TPU


SIZES = {
    "tiny": Size(d_model=64, n_layers=2, n_heads=4, seq_len=64, global_batch=8, steps=50, lr=3e-3),
    "small": Size(d_model=256, n_layers=4, n_heads=4, seq_len=256, global_batch=16, steps=480,
                  lr=2e-3),  # the CPU default
    "base": Size(d_model=512, n_layers=8, n_heads=8, seq_len=512, global_batch=16, steps=2000,
                 lr=1e-3),  # CPU MFU runs, ~26M params
    "125m": Size(d_model=768, n_layers=12, n_heads=12, seq_len=1024, global_batch=256,
                 steps=20000, lr=6e-4, accelerator=True),  # GPT-2-small-sized
    "350m": Size(d_model=1024, n_layers=24, n_heads=16, seq_len=1024, global_batch=256,
                 steps=40000, lr=3e-4, accelerator=True),
    # Pod-scale shapes to plan with (scripts/plan.py; MLA: 1.18B and 6.59B parameters, 32k vocab):
    # TinyLlama / Llama-2-7B widths and depths, head dim 128.
    "1b": Size(d_model=2048, n_layers=22, n_heads=16, seq_len=2048, global_batch=512,
               steps=50000, lr=3e-4, accelerator=True),
    "7b": Size(d_model=4096, n_layers=32, n_heads=32, seq_len=4096, global_batch=1024,
               steps=100000, lr=1.5e-4, accelerator=True),
}
ATTENTION = ("mha", "gqa", "mqa", "mla", "yoco")  # yoco: core/yoco.py, docs/trained_in.md


def parse_arg(arg: str) -> dict[str, str]:
  out = {"attn": "mla", "size": "small"}
  for item in filter(None, arg.split(",")):
    key, _, value = item.partition("=")
    if key not in out:
      raise ValueError(f"configs/lm.py: unknown argument {key!r} (use attn=..., size=...)")
    out[key] = value
  if out["attn"] not in ATTENTION:
    raise ValueError(f"configs/lm.py: attn={out['attn']!r} is not one of {ATTENTION}")
  if out["size"] not in SIZES:
    raise ValueError(f"configs/lm.py: size={out['size']!r} is not one of {tuple(SIZES)}")
  return out


def get_config(arg: str = "") -> ConfigDict:
  a = parse_arg(arg)
  s = SIZES[a["size"]]
  head_dim = s.d_model // s.n_heads
  c = ConfigDict({group: defaults(group) for group in ("model", "data", "optim", "train", "mesh")})
  c.model.update(
      vocab_size=0,  # 0: the tokenizer's
      d_model=s.d_model, n_layers=s.n_layers, n_heads=s.n_heads, attention=a["attn"],
      max_seq_len=max(s.seq_len, 1024),
      n_kv_heads={"gqa": max(s.n_heads // 4, 1)}.get(a["attn"], 0),
      kv_lora_rank=s.d_model // 2, qk_rope_head_dim=head_dim // 2,
      dtype="bfloat16" if s.accelerator else "float32", remat=s.accelerator)
  c.data.update(seq_len=s.seq_len)
  c.optim.update(lr=s.lr)  # warmup: the default rule (10% of steps, 40..2000, <= half the run)
  c.train.update(
      steps=s.steps, global_batch=s.global_batch,
      log_every=10 if a["size"] == "tiny" else 50, eval_every=max(s.steps // 10, 10),
      eval_tokens=0 if a["size"] == "tiny" else 65536,  # periodic evals; the last: whole split
      ckpt_every=max(s.steps // 5, 10))
  return c
