"""Decoder-only Transformer: pre-norm blocks, attention variant chosen by ModelConfig.attention.

    model = Transformer(cfg, rngs=nnx.Rngs(0))
    logits = model(tokens)                       # [B, T] int32 -> [B, T, V] float32
    logits, cache = model.extend(tokens, cache)  # prefill or decode against an explicit cache

YOCO (attention='yoco', core/yoco.py) and DMC (cfg.dmc, core/dmc.py) plug in here: their blocks
take one extra argument (`extra`) and YOCO's layers run through yoco.forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mla_jax.core import cache as cache_lib
from mla_jax.core import dmc as dmc_lib
from mla_jax.core import probes
from mla_jax.core import yoco as yoco_lib
from mla_jax.core.attention import GQAttention, MLAttention
from mla_jax.core.config import ModelConfig
from mla_jax.core.layers import MLP, Embed, RMSNorm, dense, param


class Block(nnx.Module):
  """x + attn(norm(x)), then + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layer: int = 0):
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.params_dtype, rngs)
    self.cross = cfg.attention == "yoco" and layer >= cfg.n_layers // 2  # static
    if cfg.attention == "mla":
      self.attn = MLAttention(cfg, rngs, layer=layer)  # layer: its kept rope frequencies
    elif cfg.attention == "yoco":
      self.attn = (yoco_lib.CrossAttention if self.cross else yoco_lib.WindowAttention)(cfg, rngs)
    elif cfg.dmc:
      self.attn = dmc_lib.DMCAttention(cfg, rngs)
    else:
      self.attn = GQAttention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.params_dtype, rngs)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, positions, layer_cache=None, lengths=None, extra=None):
    """extra: YOCO's window layers and DMC: n_valid [B] (DMC: with its rng); YOCO's cross layers:
    the global pair of the new tokens (layer_cache is then the global cache, read only)."""
    if self.cross:
      h = self.attn(self.attn_norm(x), positions, extra, layer_cache, lengths)
    elif extra is None:
      h, layer_cache = self.attn(self.attn_norm(x), positions, layer_cache, lengths)
    else:
      h, layer_cache = self.attn(self.attn_norm(x), positions, layer_cache, lengths, extra)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), layer_cache


def _run_block(block: Block, x, positions, layer_cache, lengths, extra=None):
  return block(x, positions, layer_cache, lengths, extra)


# Recompute each block's activations in the backward pass instead of storing them (cfg.remat).
_run_block_remat = nnx.remat(_run_block)


class Transformer(nnx.Module):
  """Token embedding, L blocks, final RMSNorm, output head (tied to the embedding by default)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = Embed(cfg, rngs)
    self.blocks = nnx.List([Block(cfg, rngs, i) for i in range(cfg.n_layers)])
    if cfg.attention == "yoco":  # the global K/V (or latent) between the two halves
      self.yoco_kv = yoco_lib.GlobalKV(cfg, rngs)
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.params_dtype, rngs)
    if not cfg.tie_embeddings:
      self.head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std,
                        cfg.params_dtype)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Full causal forward pass: tokens [B, T] int32 -> logits [B, T, V] float32."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return self._forward(tokens, positions, None)[0]

  def extend(self, tokens: jax.Array, cache: cache_lib.Cache, n_valid: jax.Array | None = None):
    """Appends tokens [B, T] to the cache (sequence b at slots cache.lengths[b] ...).

    Returns (logits [B, T, V] float32, cache with lengths advanced by T). Used for prefill (T > 1)
    and decode (T = 1); right-padded prompts are fine: reset `lengths` to the true lengths after.
    YOCO's window rings and DMC's merges cannot be rewound that way (padding would overwrite
    or merge into real slots): for them pass n_valid [B], the real tokens of each row, and the
    padding is not written (the other caches ignore it).
    """
    positions = cache.lengths[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)
    logits, layers = self._forward(tokens, positions, cache, n_valid=n_valid)
    return logits, cache_lib.Cache(layers=layers, lengths=cache.lengths + tokens.shape[1])

  def dmc_forward(self, tokens: jax.Array, rng: jax.Array | None = None):
    """DMC's training pass: tokens [B, T] -> (logits [B, T, V] float32, slots [] float32, the
    fraction of (token, layer, kv head) decisions that open a new slot: 1 / compression).
    With rng, decisions are Gumbel-sigmoid relaxed (core/dmc.py); without, hard as in decode."""
    if not self.cfg.dmc:
      raise ValueError("model.dmc: dmc_forward needs a DMC model (model.dmc=True)")
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, per_layer = self._forward(tokens, positions, None, rng=rng)
    return logits, jnp.mean(jnp.stack(per_layer))

  def _forward(self, tokens, positions, cache, n_valid=None, rng=None):
    """-> (logits, per-layer results): the new layer caches with a cache; without, None per layer
    (DMC: each layer's fraction of appended slots)."""
    x = self.embed(tokens)
    run = _run_block_remat if self.cfg.remat else _run_block
    if self.cfg.attention == "yoco":
      x, new_layers = yoco_lib.forward(self, x, positions, cache, n_valid, run)
    else:
      new_layers = []
      for i, block in enumerate(self.blocks):
        layer_cache = None if cache is None else cache.layers[i]
        lengths = None if cache is None else cache.lengths
        extra = None
        if self.cfg.dmc:  # independent decision noise per layer
          extra = dmc_lib.DMCExtra(n_valid=n_valid,
                                   rng=None if rng is None else jax.random.fold_in(rng, i))
        with probes.scope(f"L{i}"):
          x, layer_cache = run(block, x, positions, layer_cache, lengths, extra)
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
