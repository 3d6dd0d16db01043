"""Building blocks: parameter helper, RMSNorm, rotary embeddings, SwiGLU MLP, token embedding.

Every parameter carries `axes`: one logical name per dimension. `sharding.py` maps those names to
mesh axes; nothing here knows about meshes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax.core.config import ModelConfig


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], std: float | None,
          dtype) -> nnx.Param:
  """A parameter with logical axis names; std=None means ones (norm scales)."""
  assert len(shape) == len(axes), (shape, axes)
  if std is None:
    value = jnp.ones(shape, dtype)
  else:
    value = std * jax.random.normal(rngs.params(), shape, dtype)
  return nnx.Param(value, axes=axes)


def dense(x: jax.Array, w: jax.Array, n_in: int = 1) -> jax.Array:
  """Projects x [..., *I] with w [*I, *O] -> [..., *O] as ONE 2-D matmul ([M, prod I] @ [prod I,
  prod O]), where I is w's first `n_in` dims.

  Same result as the einsum, but the weight gradient is then a single-contraction dot: the einsum's
  gradient contracts two or more dims (B and T), which XLA:CPU canonicalises with a transposing
  copy of the output gradient per weight, ~30% of an MLP's forward+backward time on CPU.
  """
  lead, ins, outs = x.shape[:x.ndim - n_in], w.shape[:n_in], w.shape[n_in:]
  assert x.shape[x.ndim - n_in:] == ins, (x.shape, w.shape, n_in)
  y = x.reshape(-1, math.prod(ins)) @ w.reshape(math.prod(ins), math.prod(outs))
  return y.reshape(*lead, *outs)


class RMSNorm(nnx.Module):
  """x / rms(x) * scale over the last axis, computed in float32."""

  def __init__(self, dim: int, eps: float, dtype, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = param(rngs, (dim,), ("norm",), None, dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


# Rotary embeddings -------------------------------------------------------------------------------
# Two layouts pair the dims differently: "half" (Llama/HF) rotates (i, i + R/2); "interleaved"
# (DeepSeek checkpoints) rotates (2i, 2i + 1). Both use frequency theta^(-2i/R) for pair i, so they
# agree exactly once the weights' output dims are permuted (see `interleaved_to_half_perm`).


def rope_angles(positions: jax.Array, dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """positions [B, T] int -> (cos, sin), each [B, T, dim/2] float32."""
  inv_freq = theta ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, layout: str) -> jax.Array:
  """Rotates x [B, T, ..., R] by the angles (cos/sin [B, T, R/2]); heads may sit between T and R."""
  extra = x.ndim - cos.ndim  # broadcast the tables over head axes
  cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:])
  sin = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:])
  x32 = x.astype(jnp.float32)
  if layout == "half":
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  else:
    pairs = x32.reshape(x32.shape[:-1] + (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x32.shape)
  return out.astype(x.dtype)


def interleaved_to_half_perm(dim: int) -> jax.Array:
  """Index permutation p with half_layout_dims = interleaved_dims[p]: evens first, then odds."""
  return jnp.concatenate([jnp.arange(0, dim, 2), jnp.arange(1, dim, 2)])


class MLP(nnx.Module):
  """SwiGLU: down(silu(x @ gate) * (x @ up)); [B, T, D] -> [B, T, D]."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, f, std, dt = cfg.d_model, cfg.mlp_dim, cfg.init_std, cfg.params_dtype
    self.dtype = cfg.compute_dtype
    self.gate = param(rngs, (d, f), ("embed", "mlp"), std, dt)
    self.up = param(rngs, (d, f), ("embed", "mlp"), std, dt)
    # Residual-branch outputs start smaller so deep stacks begin near identity (GPT-2 style).
    self.down = param(rngs, (f, d), ("mlp", "embed"), std / (2 * cfg.n_layers) ** 0.5, dt)

  def __call__(self, x: jax.Array) -> jax.Array:
    c = lambda p: p[...].astype(self.dtype)
    h = jax.nn.silu(dense(x, c(self.gate))) * dense(x, c(self.up))  # [B, T, F]
    return dense(h, c(self.down))


class Embed(nnx.Module):
  """Token embedding; with tied weights it is also the output head."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.dtype = cfg.compute_dtype
    self.table = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std,
                       cfg.params_dtype)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] int -> [B, T, D]."""
    return jnp.take(self.table[...], tokens, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """[B, T, D] -> logits [B, T, V] against the embedding table."""
    return dense(x, self.table[...].astype(self.dtype).T)
