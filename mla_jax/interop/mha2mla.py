"""MHA / GQA -> MLA conversion (MHA2MLA, arXiv 2502.14837; TransMLA for GQA sources).

    convert("runs/mha", "runs/mha2mla", rope_dims=16, kv_rank=64, strategy="2norm")

Two steps per layer, on a source with H query heads, G KV heads, head dim K (G = H for MHA):

1. Partial RoPE. Each KV head keeps R of its K dims rotated: R/2 frequency pairs (half layout: pair
   i = dims (i, i + K/2); interleaved: (2i, 2i + 1)), each at its ORIGINAL frequency
   theta^(-2i/K) (ModelConfig.mla_rope_pairs / mla_rope_base_dim). The rest (N = K - R dims) are no
   longer rotated. Pair choice (`strategy`): high (the R/2 fastest-rotating pairs, i < R/2), low
   (the slowest), uniform (every K/R-th), 2norm (per layer and KV head, the pairs with the largest
   mean ||q_pair|| * ||k_pair|| over calibration tokens, query norms averaged over the group's
   heads). The rotated key parts become MLA rope keys, one per KV head (mla_rope_kv_heads = G),
   columns of wkv_a after the latent; query heads read their group's key, as in GQA.
2. Low rank. The no-rope key and the value projections of all KV heads, stacked
   W = [W_k,nope | W_v] ([D, G * (N + K)]), are factored by SVD: W ~= U_C (S_C V_C^T), so the latent
   is c = x U_C ([D, C], orthonormal columns) and the up-projections are S_C V_C^T, split per head
   into wkv_b's W_UK and W_UV (a query head uses its KV head's) ("joint"). "split" factors W_k,nope
   and W_v separately with C/2 each: the latent is [c_k ; c_v] and wkv_b is block-diagonal.
   "joint_act" (not in the paper) weighs the SVD by the calibration inputs' covariance, so it
   keeps what the layer's actual inputs use (minimises E ||x W - x W_down W_up||^2).

The latent is cached without RMSNorm (mla_latent_norm = False): with it the conversion would not be
exact. With all pairs kept (R = K) at full rank (C = min(D, G * (N + K))) the converted model
computes the source's function (logits equal to float rounding); with R < K at full rank it computes
the partial-RoPE model exactly. Softmax scale: MLA's (N + R)^-1/2 = K^-1/2, the source's; with R = K
there are no no-rope dims, and two zero ones keep qk_nope_head_dim non-zero (the queries are scaled
by ((K + 2) / K)^1/2 to keep the softmax scale).

Cache per token and layer: C + G * R elements, against the source's 2 * G * K
(config.kv_cache_bytes_per_token counts the per-group rope keys).

For serving as a DeepSeek-V3 checkpoint (hf_export), `rope_key="shared"` keeps one rope key (the
KV heads' mean: exact only for MQA sources) and `latent_norm=True` normalises the latent (its
scale calibrated to start near identity): both approximate, to be fine-tuned. With 'high' or
'uniform' pairs the kept frequencies are standard RoPE over R dims with another rope_theta, so
the result is a plain DeepSeek MLA.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from mla_jax.core.config import ModelConfig

STRATEGIES = ("high", "low", "uniform", "2norm")
SVD_MODES = ("joint", "split", "joint_act")


class ConversionError(ValueError):
  """A conversion that cannot be done as asked: one line naming the argument."""


def _fail(arg: str, msg: str):
  raise ConversionError(f"{arg}: {msg}")


def check_args(cfg: ModelConfig, rope_dims: int, kv_rank: int, strategy: str, svd: str) -> None:
  if cfg.attention == "mla":
    _fail("--src", "is already an MLA model (convert MHA / GQA / MQA workdirs)")
  k = cfg.qk_head_dim
  if strategy not in STRATEGIES:
    _fail("--rope_strategy", f"{strategy!r} is not one of {STRATEGIES}")
  if svd not in SVD_MODES:
    _fail("--svd", f"{svd!r} is not one of {SVD_MODES}")
  if rope_dims <= 0 or rope_dims % 2 or rope_dims > k:
    _fail("--rope_dims", f"must be an even number in [2, head_dim={k}], got {rope_dims}")
  if kv_rank <= 0:
    _fail("--kv_rank", f"must be positive, got {kv_rank}")
  if svd == "split" and kv_rank < 2:
    _fail("--kv_rank", "svd=split needs at least 2 (half for keys, half for values)")


# Partial RoPE ------------------------------------------------------------------------------------


def pair_dims(pairs: np.ndarray, k: int, layout: str) -> np.ndarray:
  """Kept pair indices [R/2] (ascending) -> their head dims in our R-wide rope layout [R]."""
  if layout == "half":
    return np.concatenate([pairs, pairs + k // 2])
  return np.stack([2 * pairs, 2 * pairs + 1], axis=-1).reshape(-1)


def select_pairs(strategy: str, k: int, rope_dims: int, n_layers: int, kv_heads: int,
                 scores: np.ndarray | None = None) -> np.ndarray:
  """Kept frequency pairs [L, G, R/2] (ascending per head). scores [L, G, K/2]: 2norm's ranking."""
  half, keep = k // 2, rope_dims // 2
  if strategy == "2norm":
    if scores is None:
      _fail("--rope_strategy", "2norm needs calibration scores (--calib_batches > 0)")
    top = np.argsort(-scores, axis=-1, kind="stable")[..., :keep]
    return np.sort(top, axis=-1)
  if strategy == "high":
    chosen = np.arange(keep)
  elif strategy == "low":
    chosen = np.arange(half - keep, half)
  else:  # uniform: every (K/2)/(R/2)-th pair from the fastest on
    chosen = (np.arange(keep) * half) // keep
  return np.broadcast_to(chosen, (n_layers, kv_heads, keep)).copy()


def pair_scores(model, tokens: np.ndarray) -> np.ndarray:
  """Mean ||q_pair|| * ||k_pair|| per layer, KV head and frequency pair [L, G, K/2] over calibration
  tokens [B, T], query norms averaged over the group's heads (the 2norm strategy). Norms of a pair
  do not depend on RoPE (a rotation), so they are taken before it."""
  import jax
  import jax.numpy as jnp

  from mla_jax.core.layers import dense

  cfg = model.cfg
  k, g, h = cfg.qk_head_dim, cfg.kv_heads, cfg.n_heads

  def pair_norm(x):  # [B, T, heads, K] -> [B, T, heads, K/2]
    if cfg.rope_layout == "half":
      a, b = x[..., :k // 2], x[..., k // 2:]
    else:
      a, b = x[..., 0::2], x[..., 1::2]
    return jnp.sqrt(a * a + b * b)

  @jax.jit
  def run(tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = model.embed(tokens)
    out = []
    for block in model.blocks:
      hidden = block.attn_norm(x)
      q = pair_norm(dense(hidden, block.attn.wq[...]))  # [B, T, H, K/2]
      kk = pair_norm(dense(hidden, block.attn.wk[...]))  # [B, T, G, K/2]
      q = q.reshape(q.shape[:2] + (g, h // g, k // 2)).mean(axis=3)
      out.append((q * kk).mean(axis=(0, 1)))  # [G, K/2]
      x, _ = block(x, positions)
    return jnp.stack(out)

  return np.asarray(run(jnp.asarray(tokens, jnp.int32)))


def attn_inputs(model, tokens: np.ndarray) -> np.ndarray:
  """Every layer's attention input (after attn_norm) on calibration tokens [B, T] -> [L, B*T, D]:
  what --latent_norm uses to set the latent norm's scale."""
  import jax
  import jax.numpy as jnp

  @jax.jit
  def run(tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x, out = model.embed(tokens), []
    for block in model.blocks:
      out.append(block.attn_norm(x).reshape(-1, x.shape[-1]))
      x, _ = block(x, positions)
    return jnp.stack(out)

  return np.asarray(run(jnp.asarray(tokens, jnp.int32)))


# Low rank ----------------------------------------------------------------------------------------


def _svd(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
  """w [D, X] -> (down [D, rank] orthonormal columns, up [rank, X]) with down @ up the best rank
  approximation (padded with zero columns when w has lower rank)."""
  u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
  r = min(rank, s.size)
  down = np.zeros((w.shape[0], rank))
  up = np.zeros((rank, w.shape[1]))
  down[:, :r], up[:r] = u[:, :r], s[:r, None] * vt[:r]
  return down, up


def _svd_act(w: np.ndarray, x: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
  """Activation-aware rank-`rank` factors of w [D, X] for inputs x [tokens, D]: minimises
  E ||x w - x down up||^2 rather than ||w - down up||. With S = x^T x / n (damped),
  S^1/2 w = U s V^T, down = S^-1/2 U_C, up = s_C V_C^T; exact at full rank like _svd."""
  x = x.astype(np.float64)
  cov = x.T @ x / len(x)
  cov += np.eye(len(cov)) * 1e-6 * np.trace(cov) / len(cov)  # damping: rank-deficient inputs
  evals, evecs = np.linalg.eigh(cov)
  root = (evecs * np.sqrt(evals)) @ evecs.T
  inv_root = (evecs / np.sqrt(evals)) @ evecs.T
  down, up = _svd(root @ w, rank)
  return inv_root @ down, up


def full_rank(cfg: ModelConfig, rope_dims: int) -> int:
  """The kv_rank at which joint SVD is exact: min(D, G * (N + K)) (N = K - R, padded to 2)."""
  n = max(cfg.qk_head_dim - rope_dims, 0) or 2
  return min(cfg.d_model, cfg.kv_heads * (n + cfg.qk_head_dim))


def _standard_theta(pairs: np.ndarray, k: int, rope_dims: int, theta: float) -> float | None:
  """When every layer keeps pairs p_i = a * i (a > 0: 'high' a = 1, 'uniform' a = K/R), their
  frequencies theta^(-2ai/K) are standard RoPE over R dims with theta' = theta^(aR/K): the rope
  theta that makes a shared-key conversion a plain DeepSeek MLA (exportable). Else None."""
  first = pairs.reshape(-1, pairs.shape[-1])
  step = first[0, 1] - first[0, 0] if first.shape[1] > 1 else 1
  want = np.arange(first.shape[1]) * step
  if step <= 0 or not (first == want).all():
    return None
  return float(theta ** (step * rope_dims / k))


def target_config(cfg: ModelConfig, rope_dims: int, kv_rank: int, pairs: np.ndarray,
                  rope_key: str = "group", latent_norm: bool = False) -> ModelConfig:
  """The MLA ModelConfig a conversion writes; pairs [L, G, R/2]. rope_key 'group': one rope key
  per KV head (MHA2MLA); 'shared': one for all heads (DeepSeek), with the standard frequency table
  and a changed rope_theta when the kept pairs allow it (_standard_theta)."""
  k = cfg.qk_head_dim
  n = (k - rope_dims) or 2
  fields = cfg.to_dict()
  for name in ("n_kv_heads", "head_dim"):
    fields[name] = 0
  keys = cfg.kv_heads if rope_key == "group" else 1
  kept = pairs if rope_key == "group" else pairs[:, :1]
  rope = dict(mla_rope_pairs=[int(p) for p in kept.reshape(-1)], mla_rope_base_dim=k)
  theta = _standard_theta(kept, k, rope_dims, cfg.rope_theta) if rope_key == "shared" else None
  if theta is not None:
    rope = dict(mla_rope_pairs=[], mla_rope_base_dim=0, rope_theta=theta)
  fields.update(attention="mla", q_lora_rank=0, kv_lora_rank=kv_rank, qk_nope_head_dim=n,
                qk_rope_head_dim=rope_dims, v_head_dim=k, mla_rope_kv_heads=keys,
                mla_latent_norm=latent_norm, mla_decode_impl="absorbed", **rope)
  return ModelConfig.from_mapping(fields)


def convert_params(cfg: ModelConfig, params: dict[str, np.ndarray], rope_dims: int, kv_rank: int,
                   pairs: np.ndarray, svd: str = "joint", rope_key: str = "group",
                   inputs: np.ndarray | None = None,
                   latent_norm: bool = False) -> tuple[ModelConfig, dict]:
  """Source {flat name: array} -> (MLA ModelConfig, MLA {flat name: array}); pairs [L, G, R/2].

  rope_key 'shared' (pairs equal across a layer's KV heads): one rope key, the mean of the KV
  heads' rotated key projections (exact for MQA sources, else an approximation to fine-tune).
  latent_norm: cache the latent through kv_norm, its scale set to the mean RMS of the latent over
  `inputs` [L, tokens, D] (attn_inputs) so that the norm starts near identity (approximate).
  """
  h, g, k, d = cfg.n_heads, cfg.kv_heads, cfg.qk_head_dim, cfg.d_model
  m = h // g
  if rope_key == "shared" and not (pairs == pairs[:, :1]).all():
    _fail("--rope_key", "shared needs the same kept pairs for every KV head of a layer")
  new_cfg = target_config(cfg, rope_dims, kv_rank, pairs, rope_key, latent_norm)
  n = new_cfg.nope_dim
  pad = n != k - rope_dims  # R = K: two zero no-rope dims
  q_scale = ((n + rope_dims) / k) ** 0.5 if pad else 1.0  # keeps the softmax scale K^-1/2
  out = {name: v for name, v in params.items() if ".attn." not in name}
  for i in range(cfg.n_layers):
    a = f"blocks.{i}.attn."
    wq, wk, wv, wo = (np.asarray(params[a + w], np.float64) for w in ("wq", "wk", "wv", "wo"))
    rope_idx = [pair_dims(pairs[i, j], k, cfg.rope_layout) for j in range(g)]
    nope_idx = [np.setdiff1d(np.arange(k), r) for r in rope_idx]
    q_new = np.zeros((d, h, n + rope_dims))
    k_nope = np.zeros((d, g, n))
    for head in range(h):
      j = head // m
      if not pad:
        q_new[:, head, :n] = wq[:, head, nope_idx[j]]
      q_new[:, head, n:] = wq[:, head, rope_idx[j]]
    for j in range(g):
      if not pad:
        k_nope[:, j] = wk[:, j, nope_idx[j]]
    k_rope = np.concatenate([wk[:, j, rope_idx[j]] for j in range(g)], axis=-1)  # [D, G * R]
    if rope_key == "shared":  # one key for all heads: the KV heads' mean
      k_rope = k_rope.reshape(d, g, rope_dims).mean(axis=1)
    flat_k, flat_v = k_nope.reshape(d, g * n), wv.reshape(d, g * k)
    if svd in ("joint", "joint_act"):
      stacked = np.concatenate([flat_k, flat_v], axis=1)
      down, up = (_svd(stacked, kv_rank) if svd == "joint" else
                  _svd_act(stacked, inputs[i], kv_rank))
      up_k, up_v = up[:, :g * n], up[:, g * n:]
    else:
      ck = kv_rank // 2
      down_k, upk = _svd(flat_k, ck)
      down_v, upv = _svd(flat_v, kv_rank - ck)
      down = np.concatenate([down_k, down_v], axis=1)
      up_k = np.concatenate([upk, np.zeros((kv_rank - ck, g * n))], axis=0)
      up_v = np.concatenate([np.zeros((ck, g * k)), upv], axis=0)
    up_k, up_v = up_k.reshape(kv_rank, g, n), up_v.reshape(kv_rank, g, k)
    group = np.arange(h) // m  # query head -> its KV head
    wkv_b = np.concatenate([up_k[:, group], up_v[:, group]], axis=-1)  # [C, H, N + K]
    out[a + "wq"] = (q_new * q_scale).astype(np.float32)
    out[a + "wkv_a"] = np.concatenate([down, k_rope], axis=1).astype(np.float32)
    scale = 1.0  # unused unless latent_norm
    if latent_norm and inputs is not None:
      latent = inputs[i].astype(np.float64) @ down  # [tokens, C]
      scale = float(np.sqrt((latent ** 2).mean(axis=-1)).mean())
    out[a + "kv_norm.scale"] = np.full((kv_rank,), scale, np.float32)
    out[a + "wkv_b"] = wkv_b.astype(np.float32)
    out[a + "wo"] = wo.astype(np.float32)
  return new_cfg, out


def calibration_tokens(wd, batches: int, batch: int = 8) -> np.ndarray:
  """[batches * batch, seq_len] windows of the source workdir's training split (fixed seed)."""
  from mla_jax.data import corpus as data_lib
  exp = wd.experiment
  d = exp.data
  corpus = data_lib.load_corpus(d.resolved_source, d.path, d.tokenizer, d.vocab_size,
                                tokenizer_dir=wd.tokenizer_dir, val_fraction=d.val_fraction,
                                max_bytes=d.max_bytes)
  seq = min(d.seq_len, wd.model_config.max_seq_len)
  starts = np.random.default_rng(0).integers(0, len(corpus.train) - seq, batches * batch)
  return np.stack([np.asarray(corpus.train[s:s + seq], np.int32) for s in starts])


def convert(src: str, dst: str, rope_dims: int, kv_rank: int, strategy: str,
            svd: str = "joint", calib_batches: int = 4, which: str | int = "latest",
            calib_tokens: np.ndarray | None = None, overwrite: bool = False,
            rope_key: str = "group", latent_norm: bool = False) -> dict[str, Any]:
  """Converts workdir src into a new MLA workdir dst (same data, tokenizer and training config;
  built aside, then renamed). Returns a summary with the cache sizes before and after."""
  from mla_jax.core.config import kv_cache_bytes_per_token
  from mla_jax.interop import workdir_io

  started = time.perf_counter()
  wd, cfg, params = workdir_io.read_workdir(src, which)
  check_args(cfg, rope_dims, kv_rank, strategy, svd)
  if rope_key not in ("group", "shared"):
    _fail("--rope_key", f"{rope_key!r} is not one of ('group', 'shared')")
  scores = inputs = None
  if strategy == "2norm" or latent_norm or svd == "joint_act":
    if calib_tokens is None:
      if calib_batches <= 0:
        _fail("--calib_batches", "must be > 0 for rope_strategy=2norm, --latent_norm or "
              "--svd=joint_act")
      calib_tokens = calibration_tokens(wd, calib_batches)
    model = workdir_io.build_model(cfg, params)
    if strategy == "2norm":
      scores = pair_scores(model, calib_tokens)
      if rope_key == "shared":  # one key for all heads: rank the pairs over all of them
        scores = np.broadcast_to(scores.sum(axis=1, keepdims=True), scores.shape)
    if latent_norm or svd == "joint_act":
      inputs = attn_inputs(model, calib_tokens)
  pairs = select_pairs(strategy, cfg.qk_head_dim, rope_dims, cfg.n_layers, cfg.kv_heads, scores)
  new_cfg, new_params = convert_params(cfg, params, rope_dims, kv_rank, pairs, svd, rope_key,
                                       inputs, latent_norm)
  origin = {"kind": "mha2mla", "src": src, "rope_dims": rope_dims, "kv_rank": kv_rank,
            "rope_strategy": strategy, "svd": svd, "calib_batches": calib_batches,
            "rope_key": rope_key, "latent_norm": latent_norm,
            "src_attention": cfg.attention, "src_kv_heads": cfg.kv_heads,
            "exact_rank": full_rank(cfg, rope_dims)}
  workdir_io.write_workdir(dst, new_cfg, new_params, tokenizer_dir=wd.tokenizer_dir,
                           config=wd.config, origin=origin, overwrite=overwrite)
  src_bytes, dst_bytes = kv_cache_bytes_per_token(cfg), kv_cache_bytes_per_token(new_cfg)
  return {**origin, "src_cache_bytes": src_bytes, "dst_cache_bytes": dst_bytes,
          "cache_fraction": dst_bytes / src_bytes, "pairs": pairs.tolist(),
          "seconds": time.perf_counter() - started, "model": dataclasses.asdict(new_cfg)}
