"""Shared by the model, attention and sharding tests: tiny configs and fast test-side compiles."""

from mla_jax.config import ModelConfig

# Test-side jits skip LLVM's optimisation passes: CPU compiles take ~2-3x less time and neither
# numbers nor shardings depend on them (the library's own jits keep theirs).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def tiny(**kw) -> ModelConfig:
  """D 32, H 4, head dim 8, L 1, V 64; MLA: C 16, R 8 (N = E = 8). Keywords override."""
  base = dict(vocab_size=64, d_model=32, n_layers=1, n_heads=4, max_seq_len=16, init_std=0.2)
  if kw.get("attention", "mla") == "mla":
    base.update(kv_lora_rank=16, qk_rope_head_dim=8)
  base.update(kw)
  return ModelConfig(**base)
