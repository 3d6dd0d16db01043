r"""The PyTorch yardstick for the Shakespeare speed target, measured on THIS machine.

  python -m pip install torch    # CPU wheel; not a project requirement
  python scripts/bench_torch_reference.py --json=out/bench_torch.json [--steps=2000]

A plain PyTorch model with nanoGPT's architecture and CPU recipe (learned positions, LayerNorm
without bias, GELU MLP, tied head, init std 0.02; 4 layers, 4 heads, width 128, context 64,
batch 12, AdamW lr 1e-3 with 100 warmup steps and cosine decay to 1e-4, betas (0.9, 0.99), weight
decay 0.1 on matrices, grad clip 1, no dropout, no torch.compile), timed like
scripts/bench_train.py: whole loop (random-window batches from the uint16 token array), median
tokens/s over 100-step intervals after the first. The issue's figure (16.7k tokens/s) was taken
on another machine; CPUs differ, so compare both scripts' numbers from the same machine.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np

DEFAULT_TEXT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                            "shared", "data", "tinyshakespeare.txt")
LAYERS, HEADS, WIDTH, CONTEXT, BATCH = 4, 4, 128, 64, 12
LR, MIN_LR, WARMUP = 1e-3, 1e-4, 100
INTERVAL = 100


def build(torch, vocab: int):
  nn, F = torch.nn, torch.nn.functional

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.ln1, self.ln2 = nn.LayerNorm(WIDTH, bias=False), nn.LayerNorm(WIDTH, bias=False)
      self.qkv = nn.Linear(WIDTH, 3 * WIDTH, bias=False)
      self.proj = nn.Linear(WIDTH, WIDTH, bias=False)
      self.up = nn.Linear(WIDTH, 4 * WIDTH, bias=False)
      self.down = nn.Linear(4 * WIDTH, WIDTH, bias=False)

    def forward(self, x):  # [B, T, D]
      b, t, d = x.shape
      q, k, v = (z.view(b, t, HEADS, d // HEADS).transpose(1, 2)
                 for z in self.qkv(self.ln1(x)).split(d, dim=2))
      y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
      x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
      return x + self.down(F.gelu(self.up(self.ln2(x))))

  class GPT(nn.Module):
    def __init__(self):
      super().__init__()
      self.tok, self.pos = nn.Embedding(vocab, WIDTH), nn.Embedding(CONTEXT, WIDTH)
      self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
      self.norm = nn.LayerNorm(WIDTH, bias=False)
      self.head = nn.Linear(WIDTH, vocab, bias=False)
      self.head.weight = self.tok.weight
      for name, p in self.named_parameters():
        if p.dim() == 2:  # nanoGPT's init; residual outputs scaled by depth
          residual = name.endswith(("proj.weight", "down.weight"))
          std = 0.02 / math.sqrt(2 * LAYERS) if residual else 0.02
          nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):  # [B, T] int64 -> scalar loss
      x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
      for block in self.blocks:
        x = block(x)
      logits = self.head(self.norm(x))
      return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))

  return GPT()


def lr_at(step: int, steps: int) -> float:
  if step < WARMUP:
    return LR * (step + 1) / WARMUP
  progress = (step - WARMUP) / max(1, steps - WARMUP)
  return MIN_LR + 0.5 * (1 + math.cos(math.pi * progress)) * (LR - MIN_LR)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", required=True, help="where to write the JSON record")
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--text", default=DEFAULT_TEXT, help="tiny Shakespeare text file")
  args = parser.parse_args()
  try:
    import torch
  except ImportError:
    sys.exit("error: this benchmark needs PyTorch: python -m pip install torch")
  if not os.path.exists(args.text):
    sys.exit(f"error: --text: no such file {args.text}")
  if args.steps < 3 * INTERVAL:
    sys.exit(f"error: --steps must be at least {3 * INTERVAL} (timed in {INTERVAL}-step intervals)")

  torch.manual_seed(0)
  with open(args.text) as f:
    text = f.read()
  chars = sorted(set(text))
  lookup = {c: i for i, c in enumerate(chars)}
  ids = np.array([lookup[c] for c in text], np.uint16)
  split = int(0.9 * len(ids))
  train, val = torch.from_numpy(ids[:split].astype(np.int64)), ids[split:]
  model = build(torch, len(chars))
  matrices = [p for p in model.parameters() if p.dim() >= 2]
  others = [p for p in model.parameters() if p.dim() < 2]
  opt = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1},
                           {"params": others, "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.99))
  offsets = torch.arange(CONTEXT)
  rates, start = [], time.perf_counter()
  for step in range(args.steps):
    for group in opt.param_groups:
      group["lr"] = lr_at(step, args.steps)
    rows = torch.randint(len(train) - CONTEXT, (BATCH, 1)) + offsets
    loss = model(train[rows], train[rows + 1])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if (step + 1) % INTERVAL == 0:
      train_loss = loss.item()
      now = time.perf_counter()
      rates.append(INTERVAL * BATCH * CONTEXT / (now - start))
      print(f"step {step + 1}: loss {train_loss:.4f}  {rates[-1]:.0f} tokens/s", flush=True)
      start = now
  with torch.no_grad():  # the whole validation split in full windows, like the JAX evaluator
    n = (len(val) - 1) // CONTEXT
    x = torch.from_numpy(val[:n * CONTEXT].astype(np.int64)).view(n, CONTEXT)
    y = torch.from_numpy(val[1:n * CONTEXT + 1].astype(np.int64)).view(n, CONTEXT)
    val_loss = model(x, y).item()
  record = {"name": "torch_shakespeare_char", "steps": args.steps,
            "params": sum(p.numel() for p in model.parameters()),
            "tokens_per_s": statistics.median(rates[1:]), "val_loss": val_loss,
            "torch": torch.__version__, "threads": torch.get_num_threads()}
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  with open(args.json, "w") as f:
    json.dump(record, f, indent=2)
  print(f"PyTorch {torch.__version__} ({record['threads']} threads): "
        f"{record['tokens_per_s']:.0f} tokens/s, val loss {val_loss:.4f} after {args.steps} steps")


if __name__ == "__main__":
  main()
