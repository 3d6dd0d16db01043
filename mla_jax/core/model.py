"""Decoder-only Transformer: pre-norm blocks, attention variant chosen by ModelConfig.attention.

    model = Transformer(cfg, rngs=nnx.Rngs(0))
    logits = model(tokens)                       # [B, T] int32 -> [B, T, V] float32
    cache = init_cache(cfg, batch=2)             # or model.init_cache(2)
    logits, cache = model.extend(tokens, cache)  # prefill or decode against an explicit cache

`Transformer(cfg)` builds the class of cfg's variant (`model_class`): the plain stack, where every
block has its own layer cache (MHA / GQA / MQA / MLA), or a variant that owns its forward:
`YOCOTransformer` (attention='yoco', its layers from core/yoco.py: a window self-decoder, one
global cache, a cross-decoder) and `DMCTransformer` (cfg.dmc: core/dmc.py's attention, per-layer
decision noise, the relaxed training pass). A Block is the same for all: norm, attention, norm, MLP.
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
from mla_jax.core.ties import write_after


class Block(nnx.Module):
  """x + attn(norm(x)), then + mlp(norm(x)); attn an instance of attention(cfg, rngs, ...)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, attention, **attn_kw):
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.params_dtype, rngs)
    self.attn = attention(cfg, rngs, **attn_kw)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.params_dtype, rngs)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, positions, layer_cache=None, lengths=None, **attn_kw):
    """-> (x, the attention's new layer cache). attn_kw: its own keywords (plan, n_valid, rng,
    YOCO's global pair)."""
    h, layer_cache = self.attn(self.attn_norm(x), positions, layer_cache, lengths, **attn_kw)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), layer_cache


def _run_block(block: Block, x, positions, layer_cache, lengths, attn_kw):
  return block(x, positions, layer_cache, lengths, **attn_kw)


# Recompute each block's activations in the backward pass instead of storing them (cfg.remat).
_run_block_remat = nnx.remat(_run_block)


def model_class(cfg: ModelConfig) -> type["Transformer"]:
  """The Transformer subclass that builds and runs cfg's variant."""
  if cfg.attention == "yoco":
    return YOCOTransformer
  return DMCTransformer if cfg.dmc else Transformer


class Transformer(nnx.Module):
  """Token embedding, L blocks, final RMSNorm, output head (tied to the embedding by default).

  Subclasses change what the blocks attend with (`attention`), the layer stack (`_layers`) and
  its caches (`cache_layers`); `Transformer(cfg)` builds model_class(cfg).
  """

  def __new__(cls, cfg: ModelConfig | None = None, *args, **kw):
    return super().__new__(model_class(cfg) if cls is Transformer and cfg is not None else cls)

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = Embed(cfg, rngs)
    self._build_layers(cfg, rngs)
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.params_dtype, rngs)
    if not cfg.tie_embeddings:
      self.head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std,
                        cfg.params_dtype)

  @staticmethod
  def attention(cfg: ModelConfig, layer: int):
    """(attention class, its extra constructor keywords) of block `layer`."""
    if cfg.attention == "mla":
      return MLAttention, {"layer": layer}  # layer: its kept rope frequencies
    return GQAttention, {}

  def _build_layers(self, cfg: ModelConfig, rngs: nnx.Rngs) -> None:
    blocks = []
    for i in range(cfg.n_layers):
      attention, kw = self.attention(cfg, i)
      blocks.append(Block(cfg, rngs, attention, **kw))
    self.blocks = nnx.List(blocks)

  @classmethod
  def cache_layers(cls, cfg: ModelConfig, batch: int, slots: int) -> tuple:
    """The layer caches of `batch` sequences of `slots` tokens, zeros."""
    return tuple(cls.attention(cfg, i)[0].init_cache(cfg, batch, slots)
                 for i in range(cfg.n_layers))

  def init_cache(self, batch: int, max_len: int | None = None, plan=None) -> cache_lib.Cache:
    """init_cache(self.cfg, ...)."""
    return init_cache(self.cfg, batch, max_len, plan)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Full causal forward pass: tokens [B, T] int32 -> logits [B, T, V] float32."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return self._forward(tokens, positions, None)[0]

  def extend(self, tokens: jax.Array, cache: cache_lib.Cache, n_valid: jax.Array | None = None,
             plan=None):
    """Appends tokens [B, T] to the cache (sequence b at slots cache.lengths[b] ...).

    Returns (logits [B, T, V] float32, cache with lengths advanced by T). Used for prefill (T > 1)
    and decode (T = 1); right-padded prompts are fine: reset `lengths` to the true lengths after.
    YOCO's window rings and DMC's merges cannot be rewound that way (padding would overwrite
    or merge into real slots): for them pass n_valid [B], the real tokens of each row, and the
    padding is not written (the other caches ignore it). plan: a DecodePlan
    (core/decode_plan.py) whose mesh holds the cache, or None.
    """
    positions = cache.lengths[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)
    logits, layers = self._forward(tokens, positions, cache, n_valid=n_valid, plan=plan)
    return logits, cache_lib.Cache(layers=layers, lengths=cache.lengths + tokens.shape[1])

  def _forward(self, tokens, positions, cache, **kw):
    """-> (logits, per-layer results): the new layer caches with a cache; without, None per layer
    (DMC: each layer's fraction of appended slots)."""
    x, layers = self._layers(self.embed(tokens), positions, cache, **kw)
    x = self.final_norm(x)
    if self.cfg.tie_embeddings:
      logits = self.embed.attend(x)
    else:
      logits = dense(x, self.head[...].astype(self.cfg.compute_dtype))  # [B, T, V]
    return logits.astype(jnp.float32), tuple(layers)

  def _run(self, cache):
    """How a block runs: rematerialised in the backward pass with cfg.remat (training, no cache)."""
    return _run_block_remat if self.cfg.remat and cache is None else _run_block

  def _layers(self, x, positions, cache, n_valid=None, plan=None):
    """x [B, T, D] embedded -> (x after the last block, [new layer cache or None per block])."""
    del n_valid  # the GQA family's and MLA's caches ignore padding (extend)
    kw = {} if plan is None else {"plan": plan}
    return self._blocks(x, positions, cache, lambda i: kw)

  def _blocks(self, x, positions, cache, layer_kw):
    """Every block in order, block i with attention keywords layer_kw(i) -> (x, [layer out])."""
    run, out = self._run(cache), []
    for i, block in enumerate(self.blocks):
      with probes.scope(f"L{i}"):
        x, layer = run(block, x, positions, None if cache is None else cache.layers[i],
                       None if cache is None else cache.lengths, layer_kw(i))
      out.append(layer)
    return x, out


class DMCTransformer(Transformer):
  """DMC (core/dmc.py): DMCAttention in every block, with independent decision noise per layer
  in the relaxed training pass (`dmc_forward`)."""

  @staticmethod
  def attention(cfg: ModelConfig, layer: int):
    return dmc_lib.DMCAttention, {}

  def dmc_forward(self, tokens: jax.Array, rng: jax.Array | None = None):
    """DMC's training pass: tokens [B, T] -> (logits [B, T, V] float32, slots [] float32, the
    fraction of (token, layer, kv head) decisions that open a new slot: 1 / compression).
    With rng, decisions are Gumbel-sigmoid relaxed (core/dmc.py); without, hard as in decode."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, per_layer = self._forward(tokens, positions, None, rng=rng)
    return logits, jnp.mean(jnp.stack(per_layer))

  def _layers(self, x, positions, cache, n_valid=None, plan=None, rng=None):
    del plan  # DMC's per-head caches are not sequence-sharded
    return self._blocks(x, positions, cache, lambda i: {
        "n_valid": n_valid, "rng": None if rng is None else jax.random.fold_in(rng, i)})


class YOCOTransformer(Transformer):
  """YOCO (core/yoco.py): blocks [0, L/2) window self-attention with ring caches, then GlobalKV
  (`yoco_kv`) makes each token's one global entry, read by the cross-attention blocks [L/2, L).
  Cache layers: (RingCache per window block) + (the global cache,)."""

  @staticmethod
  def attention(cfg: ModelConfig, layer: int):
    cross = layer >= cfg.n_layers // 2
    return (yoco_lib.CrossAttention if cross else yoco_lib.WindowAttention), {}

  def _build_layers(self, cfg: ModelConfig, rngs: nnx.Rngs) -> None:
    super()._build_layers(cfg, rngs)
    self.yoco_kv = yoco_lib.GlobalKV(cfg, rngs)  # the global K/V (or latent) between the halves

  @classmethod
  def cache_layers(cls, cfg: ModelConfig, batch: int, slots: int) -> tuple:
    half = cfg.n_layers // 2
    return (tuple(yoco_lib.WindowAttention.init_cache(cfg, batch, slots) for _ in range(half))
            + (yoco_lib.GlobalKV.init_cache(cfg, batch, slots),))

  def _layers(self, x, positions, cache, n_valid=None, plan=None):
    del plan  # window rings and the global cache are not sequence-sharded
    half, run = self.cfg.n_layers // 2, self._run(cache)
    lengths = None if cache is None else cache.lengths
    windows = []
    for i in range(half):
      x, ring = run(self.blocks[i], x, positions, None if cache is None else cache.layers[i],
                    lengths, {} if n_valid is None else {"n_valid": n_valid})
      windows.append(ring)
    new = self.yoco_kv(x, positions)  # the global entries of these T tokens, computed once
    past = None if cache is None else cache.layers[half]
    if past is not None:  # attend to what later tokens will read back
      new = tuple(cache_lib.as_stored(a, buf) for a, buf in zip(new, jax.tree.leaves(past)))
    for i in range(half, self.cfg.n_layers):
      x, _ = run(self.blocks[i], x, positions, past, lengths, {"new": new})
    if cache is None:
      return x, (None,) * (half + 1)
    # Written once, after every cross layer has read the old cache (in place when donated).
    flat = [a.reshape(a.shape[:2] + buf.shape[2:]) for a, buf in zip(new, jax.tree.leaves(past))]
    written = jax.tree.unflatten(jax.tree.structure(past),
                                 [write_after(buf, a, lengths, x)
                                  for a, buf in zip(flat, jax.tree.leaves(past))])
    return x, windows + [written]


def init_cache(cfg: ModelConfig, batch: int, max_len: int | None = None,
               plan=None) -> cache_lib.Cache:
  """Zeros for `batch` sequences of up to `max_len` (default cfg.max_seq_len) tokens. With a
  DecodePlan (core/decode_plan.py) the cache is born sharded on its mesh: each device makes only
  its own shard of the zeros."""
  s = max_len or cfg.max_seq_len
  make = lambda: cache_lib.Cache(layers=model_class(cfg).cache_layers(cfg, batch, s),
                                 lengths=jnp.zeros((batch,), jnp.int32))
  if plan is None:
    return make()
  return jax.jit(make, out_shardings=plan.cache_shardings(jax.eval_shape(make)))()


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
