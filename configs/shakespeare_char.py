r"""nanoGPT's CPU recipe on tiny Shakespeare, characters: the quality and speed reference run.

4 layers, 4 heads, width 128, context 64, batch 12, 2000 steps, no dropout, lr 1e-3 with 100
warmup steps and cosine decay to 1e-4, AdamW (0.9, 0.99), weight decay 0.1, MHA. nanoGPT reaches
a validation loss of ~1.88 with it. The text file is given on the command
line:

  python train.py --config=configs/shakespeare_char.py --workdir=runs/shakespeare_char \
      --config.data.path=data/tinyshakespeare.txt   # scripts/download_data.py

`arg` may name another attention variant: configs/shakespeare_char.py:mla
"""

from ml_collections import ConfigDict

from configs import lm


def get_config(arg: str = "mha") -> ConfigDict:
  c = lm.get_config(f"attn={arg or 'mha'},size=tiny")
  c.model.update(d_model=128, n_layers=4, n_heads=4, max_seq_len=64, kv_lora_rank=64,
                 qk_rope_head_dim=16)
  c.data.update(source="text", path="", tokenizer="char", seq_len=64, val_fraction=0.1)
  c.optim.update(lr=1e-3, warmup_steps=100, schedule="cosine", min_lr_ratio=0.1, b2=0.99,
                 weight_decay=0.1, grad_clip=1.0)
  c.train.update(steps=2000, global_batch=12, log_every=100, eval_every=250, eval_tokens=0,
                 ckpt_every=500)
  return c
