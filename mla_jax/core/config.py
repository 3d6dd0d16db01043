"""ModelConfig: the one frozen, validated description of a model.

Experiments are ml-collections ConfigDicts (see `configs/`); `ModelConfig.from_mapping` is the one
place where such a config becomes a `ModelConfig`. Modules only ever see a `ModelConfig`.

Axis letters used across the package (einsums, shape comments, names):
  B batch, T query length, S key/cache length, D model width, H query heads, G kv heads,
  K qk head dim (MHA/GQA), N no-position qk dim (MLA), R rope dim, E value head dim (MLA),
  C kv latent rank, Q query latent rank, F MLP hidden width, V vocabulary, W window (YOCO).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

ATTENTION_TYPES = ("mha", "gqa", "mqa", "mla", "yoco")
DMC_DECISIONS = ("learned", "append", "merge")  # dmc_decisions: learned, or forced (tests)
ROPE_LAYOUTS = ("half", "interleaved")
MLA_IMPLS = ("naive", "absorbed")  # mla_prefill_impl
# mla_decode_impl: also the fused Pallas kernel (kernels/mla_decode.py; interpret mode on CPU) and
# "auto" (the kernel on one GPU, else the absorbed einsums: attention.resolve_mla_impl).
MLA_DECODE_IMPLS = MLA_IMPLS + ("pallas", "auto")
# How the model runs, not what it computes: each choice gives the same function of the same
# parameters (to rounding), so a workdir switches them freely (training/preflight.check_workdir),
# and so do DMC's training-loss settings, which shape no parameter and no inference.
EXECUTION_FIELDS = ("mla_prefill_impl", "mla_decode_impl", "attn_block", "attn_impl", "remat")
TRAINING_LOSS_FIELDS = ("dmc_target", "dmc_ramp_steps", "dmc_temperature", "dmc_loss_weight")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Every architectural choice of a decoder-only LM. Notation: docs/model.md."""

  vocab_size: int = 256
  d_model: int = 256  # D
  n_layers: int = 4  # L
  n_heads: int = 4  # H
  d_ff: int = 0  # F, SwiGLU hidden width; 0 -> round(8/3 * D) up to a multiple of 64
  attention: str = "mla"  # mha | gqa | mqa | mla | yoco
  max_seq_len: int = 1024  # longest sequence the cache and RoPE tables are built for
  # MHA / GQA / MQA.
  n_kv_heads: int = 0  # G; 0 -> H for mha, 1 for mqa (required for gqa)
  head_dim: int = 0  # K; 0 -> D // H
  # MLA (DeepSeek-V2 section 2.1).
  q_lora_rank: int = 0  # Q; 0 -> a single full-rank query projection
  kv_lora_rank: int = 64  # C
  qk_nope_head_dim: int = 0  # N; 0 -> D // H
  qk_rope_head_dim: int = 16  # R
  v_head_dim: int = 0  # E; 0 -> D // H
  # MHA2MLA conversions (interop/mha2mla.py, docs/interop.md); the defaults are DeepSeek's MLA.
  mla_rope_kv_heads: int = 1  # rope keys per token: 1 = one shared key; G = one per KV group
  # Kept RoPE frequencies: () -> pair i turns at theta^(-2i/R); else per layer, per rope key, the
  # R/2 indices p of the frequencies theta^(-2p/mla_rope_base_dim) (partial RoPE keeps originals).
  mla_rope_pairs: tuple = ()
  mla_rope_base_dim: int = 0  # 0 -> R
  mla_latent_norm: bool = True  # False: the latent is cached without kv_norm (exact conversions)
  # Init std of the up-projections wq_b and wkv_b, whose inputs are RMS-normalised latents;
  # 0 -> init_std. An experiment knob for MLA's training stability (see training/health.py).
  mla_up_init_std: float = 0.0
  # Small-width MLA ablation knobs (configs/sweeps/mla_ablation.py); the defaults are DeepSeek's.
  # mla_latent_scale: the RMS-normed query and kv latents are multiplied by sqrt(D / rank), as MLRA
  # does (arXiv 2603.02188), so a narrow latent enters its up-projection at a D-wide scale.
  mla_latent_scale: bool = False
  # mla_up_init_fan_in: wq_b / wkv_b start at std init_std * sqrt(D / fan_in) (fan_in = Q or C):
  # up-projected queries, keys and values start at a D-wide projection's variance whatever the
  # rank, where a fixed std makes them grow with it (~5.5x larger at C=88 than at C=16).
  mla_up_init_fan_in: bool = False
  mla_prefill_impl: str = "naive"  # path for multi-token queries (training, prefill)
  mla_decode_impl: str = "absorbed"  # path for one-token decode steps (MLA_DECODE_IMPLS)
  # Training / prefill without a cache runs causal attention in query blocks of this many tokens,
  # each scoring only the keys it can see (about half the T x T work skipped); 0 = one block.
  attn_block: int = 128
  # Causal attention without a cache: blocked (the einsums above) | xla | cudnn
  # (jax.nn.dot_product_attention) | auto (cudnn on a GPU where it applies, else blocked).
  attn_impl: str = "auto"
  # YOCO (arXiv 2405.05254; core/yoco.py): the first L/2 layers attend over a sliding window of
  # yoco_window tokens (n_kv_heads kv heads, 0 -> H) and cache it in a ring buffer; their output
  # gives ONE global cache read by the last L/2 layers: yoco_kv_heads key/value heads (0 -> the
  # self-decoder's), or with yoco_latent an MLA latent (kv_lora_rank C + qk_rope_head_dim R).
  yoco_window: int = 64  # W
  yoco_kv_heads: int = 0
  yoco_latent: bool = False
  # DMC (arXiv 2403.09636; core/dmc.py): MHA / GQA / MQA whose cache appends or merges each
  # token per kv head. Training drives the slots/tokens fraction to 1 / dmc_target, the target
  # ramped linearly from 1 over dmc_ramp_steps (0: no ramp), with a Gumbel-sigmoid decision at
  # dmc_temperature and an L1 loss weighted by dmc_loss_weight; inference decides hard.
  dmc: bool = False
  dmc_target: float = 2.0
  dmc_ramp_steps: int = 0
  dmc_temperature: float = 0.1
  dmc_loss_weight: float = 1.0
  dmc_decisions: str = "learned"  # DMC_DECISIONS; append / merge force every decision
  # Shared.
  rope_theta: float = 10000.0
  rope_layout: str = "half"  # half (Llama/HF) | interleaved (DeepSeek checkpoints)
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  init_std: float = 0.02
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  cache_dtype: str = ""  # "" -> same as dtype
  remat: bool = False  # rematerialise each block in the backward pass
  # QK-norm: queries and keys RMS-normalised (learned scales) before the scores, so attention
  # logits cannot grow with the projections' norms. GQA family: per head over K, before RoPE.
  # MLA, in a form the absorbed path keeps (attention.MLAttention._project): the absorbed query
  # W_UK^T q_N per head over C (its keys, the latents, are normalised already by kv_norm), and
  # the rope query and key over R.
  qk_norm: bool = False

  def __post_init__(self):
    # config.json and ConfigDicts hold lists; a tuple keeps the config hashable (jit static).
    object.__setattr__(self, "mla_rope_pairs", tuple(int(p) for p in self.mla_rope_pairs))
    _validate(self)

  # Derived sizes: resolved once here so modules never repeat the defaulting rules.
  @property
  def kv_heads(self) -> int:
    """G: kv heads of the GQA family's layers and of YOCO's self-decoder (0 -> H there)."""
    if self.attention == "yoco":
      return self.n_kv_heads or self.n_heads
    return {"mha": self.n_heads, "mqa": 1}.get(self.attention, self.n_kv_heads)

  @property
  def yoco_global_kv_heads(self) -> int:
    """Key/value heads of YOCO's one global cache (GQA form)."""
    return self.yoco_kv_heads or self.kv_heads

  @property
  def qk_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def nope_dim(self) -> int:
    return self.qk_nope_head_dim or self.d_model // self.n_heads

  @property
  def v_dim(self) -> int:
    return self.v_head_dim or self.d_model // self.n_heads

  @property
  def mlp_dim(self) -> int:
    return self.d_ff or -(-(8 * self.d_model // 3) // 64) * 64

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def params_dtype(self):
    return DTYPES[self.param_dtype]

  @property
  def kv_cache_dtype(self):
    return DTYPES[self.cache_dtype or self.dtype]

  @classmethod
  def from_mapping(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
    """Builds a ModelConfig from a ConfigDict / dict, refusing keys it does not know."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = dict(cfg.items())
    unknown = sorted(set(values) - fields)
    if unknown:
      raise ValueError(f"model.{unknown[0]}: unknown model field "
                       f"(known: {', '.join(sorted(fields))})")
    return cls(**values)

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["mla_rope_pairs"] = list(self.mla_rope_pairs)  # as config.json stores it
    return out

  def mla_layer_rope_pairs(self, layer: int) -> tuple[tuple[int, ...], ...] | None:
    """Layer `layer`'s kept frequency indices, one R/2 tuple per rope key, or None for the
    standard pairs (pair i turns at theta^(-2i/R) in every layer: layers.rope_angles)."""
    if not self.mla_rope_pairs:
      return None
    g, half = self.mla_rope_kv_heads, self.qk_rope_head_dim // 2
    per_layer = g * half
    flat = self.mla_rope_pairs[layer * per_layer:(layer + 1) * per_layer]
    return tuple(flat[i * half:(i + 1) * half] for i in range(g))

  def diff(self, other: "ModelConfig") -> dict[str, tuple[Any, Any]]:
    """Fields whose values differ: {name: (self's, other's)}."""
    a, b = self.to_dict(), other.to_dict()
    return {k: (a[k], b[k]) for k in a if a[k] != b[k]}

  def architecture_diff(self, other: "ModelConfig") -> dict[str, tuple[Any, Any]]:
    """diff() without the execution and training-loss fields: what makes another model."""
    free = EXECUTION_FIELDS + TRAINING_LOSS_FIELDS
    return {k: v for k, v in self.diff(other).items() if k not in free}


def _fail(field: str, msg: str):
  raise ValueError(f"model.{field}: {msg}")


def _validate(c: ModelConfig) -> None:
  for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
    if not isinstance(getattr(c, name), int) or getattr(c, name) <= 0:
      _fail(name, f"must be a positive integer, got {getattr(c, name)!r}")
  for name in ("d_ff", "n_kv_heads", "head_dim", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
               "qk_rope_head_dim", "v_head_dim"):
    if not isinstance(getattr(c, name), int) or getattr(c, name) < 0:
      _fail(name, f"must be a non-negative integer, got {getattr(c, name)!r}")
  if c.attention not in ATTENTION_TYPES:
    _fail("attention", f"unknown attention type {c.attention!r}; choose one of {ATTENTION_TYPES}")
  if c.rope_layout not in ROPE_LAYOUTS:
    _fail("rope_layout", f"{c.rope_layout!r} is not one of {ROPE_LAYOUTS}")
  for name in ("dtype", "param_dtype"):
    if getattr(c, name) not in DTYPES:
      _fail(name, f"{getattr(c, name)!r} is not one of {tuple(DTYPES)}")
  if c.cache_dtype and c.cache_dtype not in DTYPES:
    _fail("cache_dtype", f"{c.cache_dtype!r} is not one of {tuple(DTYPES)} (or '' for dtype)")
  if c.attn_impl not in ("auto", "blocked", "xla", "cudnn"):
    _fail("attn_impl", f"{c.attn_impl!r} is not one of auto, blocked, xla, cudnn")
  if c.mla_up_init_std < 0:
    _fail("mla_up_init_std", f"must be >= 0 (0: init_std), got {c.mla_up_init_std}")
  if c.mla_up_init_std and c.mla_up_init_fan_in:
    _fail("mla_up_init_fan_in", "and mla_up_init_std both set the up-projections' init; pick one")
  if c.attention == "yoco" or c.dmc:
    knob = next((k for k in ("qk_norm", "mla_latent_scale", "mla_up_init_fan_in")
                 if getattr(c, k)), None)
    if knob:
      _fail(knob, f"is not implemented for {'yoco' if c.attention == 'yoco' else 'dmc'} "
            "(it has attention code of its own)")
  if c.norm_eps <= 0 or c.rope_theta <= 0 or c.init_std <= 0:
    _fail("norm_eps" if c.norm_eps <= 0 else "rope_theta" if c.rope_theta <= 0 else "init_std",
          "must be positive")
  if c.attention == "mla":
    _validate_mla(c)
  else:
    _validate_gqa(c)
  if c.attention == "yoco":
    _validate_yoco(c)
  _validate_dmc(c)


def _validate_gqa(c: ModelConfig) -> None:
  if c.attention == "gqa" and c.n_kv_heads == 0:
    _fail("n_kv_heads", "must be set (> 0) for attention='gqa'")
  if c.attention == "mha" and c.n_kv_heads not in (0, c.n_heads):
    _fail("n_kv_heads", f"is {c.n_kv_heads} but attention='mha' uses n_heads={c.n_heads} kv heads")
  if c.attention == "mqa" and c.n_kv_heads not in (0, 1):
    _fail("n_kv_heads", f"is {c.n_kv_heads} but attention='mqa' uses 1 kv head")
  if c.n_heads % c.kv_heads:
    _fail("n_kv_heads", f"n_heads={c.n_heads} is not divisible by n_kv_heads={c.kv_heads}")
  if not c.head_dim and c.d_model % c.n_heads:
    _fail("head_dim", f"d_model={c.d_model} is not divisible by n_heads={c.n_heads}; set head_dim")
  if c.qk_head_dim % 2:
    _fail("head_dim", f"RoPE needs an even head dim, got {c.qk_head_dim}")


def _validate_yoco(c: ModelConfig) -> None:
  if c.n_layers < 2 or c.n_layers % 2:
    _fail("n_layers", f"attention='yoco' splits the layers into a self-decoder and a cross-decoder "
          f"half: needs an even number >= 2, got {c.n_layers}")
  if not isinstance(c.yoco_window, int) or c.yoco_window < 1:
    _fail("yoco_window", f"must be a positive integer (the self-decoder's window), got "
          f"{c.yoco_window!r}")
  if not isinstance(c.yoco_kv_heads, int) or c.yoco_kv_heads < 0 or (
      c.yoco_kv_heads and c.n_heads % c.yoco_kv_heads):
    _fail("yoco_kv_heads", f"must be 0 (the self-decoder's) or a divisor of n_heads={c.n_heads}, "
          f"got {c.yoco_kv_heads!r}")
  if c.yoco_latent:
    if c.yoco_kv_heads:
      _fail("yoco_kv_heads", "is for the key/value global cache; yoco_latent caches one latent "
            "(set yoco_kv_heads=0)")
    if c.mla_rope_kv_heads != 1 or c.mla_rope_pairs:
      _fail("mla_rope_kv_heads", "yoco_latent caches one shared rope key with the standard "
            "frequencies (mla_rope_kv_heads=1, no mla_rope_pairs)")
    _validate_mla(c)


def _validate_dmc(c: ModelConfig) -> None:
  if c.dmc_decisions not in DMC_DECISIONS:
    _fail("dmc_decisions", f"{c.dmc_decisions!r} is not one of {DMC_DECISIONS}")
  if not c.dmc:
    return
  if c.attention not in ("mha", "gqa", "mqa"):
    _fail("dmc", f"retrofits the GQA family's caches (attention mha, gqa or mqa), not "
          f"attention={c.attention!r}")
  if not c.dmc_target >= 1:
    _fail("dmc_target", f"is a compression rate (tokens per slot): must be >= 1, got "
          f"{c.dmc_target}")
  if not isinstance(c.dmc_ramp_steps, int) or c.dmc_ramp_steps < 0:
    _fail("dmc_ramp_steps", f"must be a non-negative integer (0: no ramp), got "
          f"{c.dmc_ramp_steps!r}")
  if not c.dmc_temperature > 0:
    _fail("dmc_temperature", f"must be positive, got {c.dmc_temperature}")
  if not c.dmc_loss_weight >= 0:
    _fail("dmc_loss_weight", f"must be >= 0, got {c.dmc_loss_weight}")


def _validate_mla(c: ModelConfig) -> None:
  if c.kv_lora_rank == 0:
    _fail("kv_lora_rank", "must be > 0 for attention='mla' (the latent is what MLA caches)")
  if c.qk_rope_head_dim == 0 or c.qk_rope_head_dim % 2:
    _fail("qk_rope_head_dim", f"must be a positive even number, got {c.qk_rope_head_dim}")
  if not (c.qk_nope_head_dim and c.v_head_dim) and c.d_model % c.n_heads:
    _fail("qk_nope_head_dim", f"d_model={c.d_model} is not divisible by n_heads={c.n_heads}; "
          "set qk_nope_head_dim and v_head_dim")
  g = c.mla_rope_kv_heads
  if not isinstance(g, int) or g < 1 or c.n_heads % g:
    _fail("mla_rope_kv_heads", f"must be a positive divisor of n_heads={c.n_heads}, got {g!r}")
  if c.mla_rope_base_dim < 0 or c.mla_rope_base_dim % 2:
    _fail("mla_rope_base_dim", f"must be a non-negative even number, got {c.mla_rope_base_dim}")
  if c.mla_rope_pairs:
    want = c.n_layers * g * (c.qk_rope_head_dim // 2)
    base = c.mla_rope_base_dim or c.qk_rope_head_dim
    if len(c.mla_rope_pairs) != want:
      _fail("mla_rope_pairs", f"has {len(c.mla_rope_pairs)} entries; n_layers x mla_rope_kv_heads "
            f"x qk_rope_head_dim/2 = {want}")
    if min(c.mla_rope_pairs) < 0 or max(c.mla_rope_pairs) >= base // 2:
      _fail("mla_rope_pairs", f"indices must lie in [0, {base // 2}) (mla_rope_base_dim / 2)")
  if g > 1 and c.mla_decode_impl == "pallas":
    _fail("mla_decode_impl", "'pallas' reads one shared rope key; mla_rope_kv_heads > 1 needs "
          "'absorbed' or 'naive'")
  # The rope part is the positional half of each head (DeepSeek: R=64 against N=128); a rope part
  # wider than a defaulted per-head content part is almost always a typo for the head dim. With N
  # set explicitly (conversions keep more of a head rotated than not) it is meant.
  if c.qk_rope_head_dim > c.nope_dim and not c.qk_nope_head_dim:
    _fail("qk_rope_head_dim", f"{c.qk_rope_head_dim} is larger than the head dim "
          f"qk_nope_head_dim={c.nope_dim}")
  if c.attn_block < 0:
    _fail("attn_block", f"must be >= 0 (0 = one block), got {c.attn_block}")
  for name, choices in (("mla_prefill_impl", MLA_IMPLS), ("mla_decode_impl", MLA_DECODE_IMPLS)):
    if getattr(c, name) not in choices:
      _fail(name, f"{getattr(c, name)!r} is not one of {choices}")


def kv_cache_bytes_per_token(c: ModelConfig) -> int:
  """Analytic KV-cache bytes per token, all layers (docs/model.md): what the cache grows by per
  token (per allocated slot).

  GQA family: 2 * G * K * L elements (K and V per kv head); MLA: (C + R_keys * R) * L elements
  (the normalised latent plus the already-rotated rope keys: one shared key in DeepSeek's MLA,
  one per KV group, R_keys = mla_rope_kv_heads, in MHA2MLA conversions). YOCO: the ONE global
  cache, 2 * G_x * K (or C + R with yoco_latent) for all layers; its window caches are a constant
  per sequence (kv_cache_bytes). DMC: the slots allocated, as its source model (fixed-shape
  buffers; the achieved compression is measured from a filled cache: dmc.compression_stats).
  """
  if c.attention == "yoco":
    if c.yoco_latent:
      elements = c.kv_lora_rank + c.qk_rope_head_dim
    else:
      elements = 2 * c.yoco_global_kv_heads * c.qk_head_dim
  elif c.attention == "mla":
    elements = (c.kv_lora_rank + c.mla_rope_kv_heads * c.qk_rope_head_dim) * c.n_layers
  else:
    elements = 2 * c.kv_heads * c.qk_head_dim * c.n_layers
  return elements * jnp.dtype(c.kv_cache_dtype).itemsize


def kv_cache_bytes(c: ModelConfig, context: int, batch: int = 1) -> int:
  """Analytic bytes of init_cache(c, batch, context), every array of every layer: context slots
  at kv_cache_bytes_per_token, plus what does not grow with the context. YOCO: L/2 window ring
  buffers of min(W, context) slots, 2 * G * K elements each. DMC: per layer and kv head a fill
  count (int32) and the last slot's importance sum (float32)."""
  item = jnp.dtype(c.kv_cache_dtype).itemsize
  total = kv_cache_bytes_per_token(c) * context
  if c.attention == "yoco":
    total += (c.n_layers // 2) * min(c.yoco_window, context) * 2 * c.kv_heads * c.qk_head_dim * item
  if c.dmc:
    total += c.n_layers * c.kv_heads * (4 + 4)
  return total * batch
