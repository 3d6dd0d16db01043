"""Shared by the model, attention and sharding tests: tiny configs and fast test-side compiles."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mla_jax.core.config import ModelConfig
from mla_jax.core.model import init_cache

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


def random_module(cls, cfg: ModelConfig, seed: int = 0):
  """cls(cfg) with N(0, 0.2^2) weights and norm scales 1 + N(0, 0.2^2), drawn with numpy in a
  fixed parameter order (so configs with the same parameter shapes get the same weights). Skips
  the eager per-shape compiles of jax.random in the real constructor, which dominate test time;
  tests of the constructor itself build with `cls(cfg, rngs=...)`."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def fill(v):
    shape = v.get_value().shape
    base = 1.0 if v.get_metadata()["axes"] == ("norm",) else 0.0
    return v.replace(jnp.asarray(base + 0.2 * rng.standard_normal(shape), cfg.params_dtype))

  is_var = lambda x: isinstance(x, nnx.Variable)
  return nnx.merge(graphdef, jax.tree.map(fill, state, is_leaf=is_var))


@functools.partial(jax.jit, static_argnums=(0, 3), compiler_options=FAST_COMPILE)
def _full_and_incremental(graphdef, state, tokens, n_prefill):
  model = nnx.merge(graphdef, state)
  cache = init_cache(model.cfg, tokens.shape[0])
  prefill, cache = model.extend(tokens[:, :n_prefill], cache)

  def step(cache, tok):  # one `extend` per remaining token
    logits, cache = model.extend(tok[:, None], cache)
    return cache, logits[:, 0]

  cache, steps = jax.lax.scan(step, cache, tokens[:, n_prefill:].T)
  return model(tokens), jnp.concatenate([prefill, steps.transpose(1, 0, 2)], axis=1), cache


def full_and_incremental(model, tokens, n_prefill):
  """(full forward logits [B, T, V], logits from a prefill of n_prefill tokens then token-by-token
  decode with `model.extend` into `init_cache` [B, T, V], the final cache); one compile per
  config."""
  return _full_and_incremental(*nnx.split(model), tokens, n_prefill)
