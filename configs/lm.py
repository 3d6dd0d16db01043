r"""Decoder-only LMs with MHA / GQA / MQA / MLA attention: the main experiment family.

`arg` picks the attention variant and the size, e.g. `attn=mla,size=small`:

  # Default experiment: small MLA on the Python standard library (bytes), ~10 min on 2 CPU cores.
  python train.py --config=configs/lm.py --workdir=runs/mla_small
  # Another variant / size, any field overridden on the command line:
  python train.py --config=configs/lm.py:attn=gqa,size=tiny --workdir=runs/gqa_tiny \
      --config.train.steps=100 --config.model.n_kv_heads=2
  # A text file instead of the default corpus:
  python train.py --config=configs/lm.py --workdir=runs/shakespeare \
      --config.data.source=text --config.data.path=../shared/data/tinyshakespeare.txt

Sizes (width D, layers L, heads H; MLA latent C = D/2, rope R = head_dim/2 unless overridden):
  tiny   D=64  L=2  H=4   tests and smoke runs (seconds)
  small  D=256 L=4  H=4   CPU default: 480 steps x 4096 tokens, ~10 min on 2 cores
  base   D=512 L=8  H=8   CPU MFU runs, ~26M params
  125m   D=768 L=12 H=12  GPU/TPU, GPT-2-small-sized
  350m   D=1024 L=24 H=16 GPU/TPU
"""

from ml_collections import ConfigDict

# size: (d_model, n_layers, n_heads, seq_len, global_batch, steps, lr)
SIZES = {
    "tiny": (64, 2, 4, 64, 8, 50, 3e-3),
    "small": (256, 4, 4, 256, 16, 480, 2e-3),
    "base": (512, 8, 8, 512, 16, 2000, 1e-3),
    "125m": (768, 12, 12, 1024, 256, 20000, 6e-4),
    "350m": (1024, 24, 16, 1024, 256, 40000, 3e-4),
}
ATTENTION = ("mha", "gqa", "mqa", "mla")


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
  d, layers, heads, seq_len, batch, steps, lr = SIZES[a["size"]]
  accelerator = a["size"] in ("125m", "350m")
  c = ConfigDict()

  c.model = ConfigDict(dict(
      vocab_size=0,  # 0: the tokenizer's vocabulary
      d_model=d, n_layers=layers, n_heads=heads, d_ff=0, attention=a["attn"],
      max_seq_len=max(seq_len, 1024),
      n_kv_heads={"gqa": max(heads // 4, 1)}.get(a["attn"], 0), head_dim=0,
      q_lora_rank=0, kv_lora_rank=d // 2, qk_nope_head_dim=0, qk_rope_head_dim=d // heads // 2,
      v_head_dim=0, mla_prefill_impl="naive", mla_decode_impl="absorbed", attn_block=128,
      rope_theta=10000.0, rope_layout="half", norm_eps=1e-6, tie_embeddings=True, init_std=0.02,
      dtype="bfloat16" if accelerator else "float32", param_dtype="float32", cache_dtype="",
      remat=accelerator))

  c.data = ConfigDict(dict(
      source="stdlib",  # stdlib | text | tokens
      path="", tokenizer="bytes",  # bytes | char | bpe
      vocab_size=0,  # BPE vocabulary size (tokenizer=bpe)
      seq_len=seq_len, val_fraction=0.1, max_bytes=0, worker_count=0))

  c.optim = ConfigDict(dict(
      lr=lr, warmup_steps=max(steps // 20, 10), schedule="cosine", min_lr_ratio=0.1,
      decay_fraction=0.2, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, grad_clip=1.0))

  c.train = ConfigDict(dict(
      steps=steps, global_batch=batch, microbatches=1, seed=0,
      log_every=10 if a["size"] == "tiny" else 50, eval_every=max(steps // 10, 10),
      eval_tokens=0 if a["size"] == "tiny" else 65536,  # 0: the whole validation split
      ckpt_every=max(steps // 5, 10), keep_ckpts=2, on_nonfinite="stop",
      allow_config_change=False, peak_flops=0.0))  # peak 0: measure a matmul at start

  # Mesh over all devices; -1 fills. rules: overrides of sharding.DEFAULT_RULES,
  # e.g. "embed=None,mlp=tensor" or "batch=data+fsdp".
  c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, sequence=1, rules=""))
  return c
