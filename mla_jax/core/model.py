"""Decoder-only Transformer: pre-norm blocks, attention variant chosen by ModelConfig.attention.

    model = Transformer(cfg, rngs=nnx.Rngs(0))
    logits = model(tokens)                       # [B, T] int32 -> [B, T, V] float32
    logits, cache = model.extend(tokens, cache)  # prefill or decode against an explicit cache
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mla_jax.core import cache as cache_lib
from mla_jax.core import probes
from mla_jax.core.attention import GQAttention, MLAttention
from mla_jax.core.config import ModelConfig
from mla_jax.core.layers import MLP, Embed, RMSNorm, dense, param


class Block(nnx.Module):
  """x + attn(norm(x)), then + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layer: int = 0):
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.params_dtype, rngs)
    if cfg.attention == "mla":
      self.attn = MLAttention(cfg, rngs, layer=layer)  # layer: its kept rope frequencies
    else:
      self.attn = GQAttention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.params_dtype, rngs)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, positions, layer_cache=None, lengths=None):
    h, layer_cache = self.attn(self.attn_norm(x), positions, layer_cache, lengths)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), layer_cache


def _run_block(block: Block, x, positions, layer_cache, lengths):
  return block(x, positions, layer_cache, lengths)


# Recompute each block's activations in the backward pass instead of storing them (cfg.remat).
_run_block_remat = nnx.remat(_run_block)


class Transformer(nnx.Module):
  """Token embedding, L blocks, final RMSNorm, output head (tied to the embedding by default)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = Embed(cfg, rngs)
    self.blocks = nnx.List([Block(cfg, rngs, i) for i in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.params_dtype, rngs)
    if not cfg.tie_embeddings:
      self.head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std,
                        cfg.params_dtype)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Full causal forward pass: tokens [B, T] int32 -> logits [B, T, V] float32."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return self._forward(tokens, positions, None)[0]

  def extend(self, tokens: jax.Array, cache: cache_lib.Cache):
    """Appends tokens [B, T] to the cache (sequence b at slots cache.lengths[b] ...).

    Returns (logits [B, T, V] float32, cache with lengths advanced by T). Used for prefill (T > 1)
    and decode (T = 1); right-padded prompts are fine: reset `lengths` to the true lengths after.
    """
    positions = cache.lengths[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)
    logits, layers = self._forward(tokens, positions, cache)
    return logits, cache_lib.Cache(layers=layers, lengths=cache.lengths + tokens.shape[1])

  def _forward(self, tokens, positions, cache):
    x = self.embed(tokens)
    run = _run_block_remat if self.cfg.remat else _run_block
    new_layers = []
    for i, block in enumerate(self.blocks):
      layer_cache = None if cache is None else cache.layers[i]
      lengths = None if cache is None else cache.lengths
      with probes.scope(f"L{i}"):
        x, layer_cache = run(block, x, positions, layer_cache, lengths)
      new_layers.append(layer_cache)
    x = self.final_norm(x)
    if self.cfg.tie_embeddings:
      logits = self.embed.attend(x)
    else:
      logits = dense(x, self.head[...].astype(self.cfg.compute_dtype))  # [B, T, V]
    return logits.astype(jnp.float32), tuple(new_layers)


def token_losses(graphdef, params, tokens: jax.Array) -> jax.Array:
  """tokens [B, T + 1] int -> next-token cross-entropy [B, T] float32 (nats)."""
  model = nnx.merge(graphdef, params)
  logits = model(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])


def abstract_model(cfg: ModelConfig) -> Transformer:
  """The Transformer of cfg with ShapeDtypeStructs for arrays: shapes, no memory, any size."""
  return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def path_names(path) -> list[str]:
  """A jax tree path -> its key names ('blocks', '0', 'attn', 'wq'), without nnx's trailing
  'value' (orbax metadata trees carry it)."""
  keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
  return keys[:-1] if keys and keys[-1] == "value" else keys


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """{'blocks.0.attn.wq': shape, ...} for every parameter array of cfg's model (no allocation)."""
  state = nnx.state(abstract_model(cfg))
  return {".".join(map(str, path)): tuple(v.shape) for path, v in nnx.to_flat_state(state)}


def diff_param_shapes(a: dict[str, tuple], b: dict[str, tuple]) -> list[tuple[str, tuple, tuple]]:
  """[(name, shape in a or None, shape in b or None)] for every parameter whose shape differs."""
  return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def count_params(model: nnx.Module) -> dict[str, int]:
  """{'total': all parameters, 'non_embedding': without the embedding table and output head}."""
  cfg = model.cfg
  total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))  # works on eval_shape
  embed = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
  return {"total": total, "non_embedding": total - embed}
