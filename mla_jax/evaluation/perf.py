"""Analytic training FLOPs and a measured matmul peak, for tokens/s -> MFU."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from mla_jax.core.config import ModelConfig


def matmul_params(cfg: ModelConfig, n_params: int) -> int:
  """Parameters that take part in a matmul per token: all but norm scales and the embedding
  lookup, plus the output head (counted even when tied: the head matmul happens either way)."""
  norms = cfg.d_model * (2 * cfg.n_layers + 1)
  if cfg.attention == "mla":
    norms += cfg.n_layers * (cfg.kv_lora_rank + cfg.q_lora_rank)
  embed = cfg.vocab_size * cfg.d_model
  head = 0 if cfg.tie_embeddings else embed
  return n_params - norms - embed - head + embed


def train_flops_per_token(cfg: ModelConfig, n_params: int, seq_len: int) -> float:
  """6 * matmul params + causal attention (scores and weighted sum, forward + backward).

  Attention per token per layer, forward: 2 * H * (d_qk + d_v) * (T + 1) / 2 FLOPs: on average a
  causal query sees (T + 1) / 2 keys. MLA counts its training (naive) path: d_qk = N + R, d_v = E.
  """
  if cfg.attention == "mla":
    dqk, dv = cfg.nope_dim + cfg.qk_rope_head_dim, cfg.v_dim
  else:
    dqk = dv = cfg.qk_head_dim
  attn = 2 * cfg.n_heads * (dqk + dv) * (seq_len + 1) / 2 * cfg.n_layers
  return 6 * matmul_params(cfg, n_params) + 3 * attn


def measure_peak_flops(dtype=jnp.float32, n: int = 2048, repeats: int = 5) -> float:
  """Best FLOP/s of a jitted n^3 matmul on the default device: the MFU denominator."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best
