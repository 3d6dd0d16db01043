"""The one table of Hugging Face tensor names and layouts: hf_import reads it one way, hf_export
the other, so an import exports back to the tensors it came from.

Name mapping (torch Linear weights are [out, in]; ours are [in, *out]):
  model.embed_tokens.weight [V, D]          -> embed.table [V, D]
  lm_head.weight [V, D]                     -> head [D, V] (absent when tied)
  model.norm.weight                         -> final_norm.scale
  layers.i.input_layernorm / post_attention_layernorm -> blocks.i.attn_norm / mlp_norm
  layers.i.mlp.{gate,up,down}_proj          -> blocks.i.mlp.{gate,up,down}
  Llama:    self_attn.{q,k,v}_proj [H*K, D] -> attn.{wq,wk,wv} [D, H|G, K]; o_proj -> wo [H, K, D]
  DeepSeek: q_proj | q_a_proj, q_a_layernorm, q_b_proj -> wq | wq_a, q_norm, wq_b [Q, H, N + R]
            kv_a_proj_with_mqa [C + R, D] -> wkv_a [D, C + R]; kv_a_layernorm -> kv_norm
            kv_b_proj [H*(N + E), C] -> wkv_b [C, H, N + E]; o_proj [D, H*E] -> wo [H, E, D]

RoPE layouts: Llama rotates half-split pairs, DeepSeek's HF code (as exported) interleaved ones.
An entry's `rope_from` marks the last-axis columns that rotate; export permutes them when the
model's layout is not the target's (the same pairs, so attention scores are unchanged:
`layers.interleaved_to_half_perm`). Import keeps the checkpoint's own layout (the config it
derives says which), so it copies those columns as they are.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mla_jax.core.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Tensor:
  ours: str  # our flat parameter name, 'blocks.0.attn.wq'
  hf: str  # the HF tensor name, 'model.layers.0.self_attn.q_proj.weight'
  n_in: int = 0  # 0: the same array; k >= 1: a linear weight whose first k axes (ours) are input
  rope_from: int | None = None  # last-axis columns from here rotate in RoPE pairs


def hf_rope_layout(cfg: ModelConfig) -> str:
  """The RoPE layout of the exported architecture: Llama half-split, DeepSeek-V3 interleaved."""
  return "interleaved" if cfg.attention == "mla" else "half"


def table(cfg: ModelConfig) -> list[Tensor]:
  """Every parameter of cfg's model (Llama or DeepSeek-V3 layout), in a fixed order."""
  out = [Tensor("embed.table", "model.embed_tokens.weight"),
         Tensor("final_norm.scale", "model.norm.weight")]
  if not cfg.tie_embeddings:
    out.append(Tensor("head", "lm_head.weight", 1))
  for i in range(cfg.n_layers):
    hf, ours = f"model.layers.{i}.", f"blocks.{i}."
    out += [Tensor(ours + "attn_norm.scale", hf + "input_layernorm.weight"),
            Tensor(ours + "mlp_norm.scale", hf + "post_attention_layernorm.weight")]
    out += [Tensor(ours + f"mlp.{p}", hf + f"mlp.{p}_proj.weight", 1) for p in ("gate", "up",
                                                                                 "down")]
    a, at = hf + "self_attn.", ours + "attn."
    if cfg.attention != "mla":  # Llama: RoPE over the whole head of q and k
      out += [Tensor(at + "wq", a + "q_proj.weight", 1, 0),
              Tensor(at + "wk", a + "k_proj.weight", 1, 0),
              Tensor(at + "wv", a + "v_proj.weight", 1),
              Tensor(at + "wo", a + "o_proj.weight", 2)]
      continue
    n = cfg.nope_dim
    if cfg.q_lora_rank:
      out += [Tensor(at + "wq_a", a + "q_a_proj.weight", 1),
              Tensor(at + "q_norm.scale", a + "q_a_layernorm.weight"),
              Tensor(at + "wq_b", a + "q_b_proj.weight", 1, n)]
    else:
      out.append(Tensor(at + "wq", a + "q_proj.weight", 1, n))
    out += [Tensor(at + "wkv_a", a + "kv_a_proj_with_mqa.weight", 1, cfg.kv_lora_rank),
            Tensor(at + "kv_norm.scale", a + "kv_a_layernorm.weight"),
            Tensor(at + "wkv_b", a + "kv_b_proj.weight", 1),
            Tensor(at + "wo", a + "o_proj.weight", 2)]
  return out


def _perm(dim: int) -> np.ndarray:
  """p with half_dims = interleaved_dims[p] (layers.interleaved_to_half_perm, in numpy)."""
  return np.concatenate([np.arange(0, dim, 2), np.arange(1, dim, 2)])


def to_layout(w: np.ndarray, start: int, src: str, dst: str) -> np.ndarray:
  """w [..., X] with its last-axis columns [start:] rotated in layout src -> layout dst."""
  if src == dst:
    return w
  r = w.shape[-1] - start
  p = _perm(r) if dst == "half" else np.argsort(_perm(r))
  return np.concatenate([w[..., :start], w[..., start:][..., p]], axis=-1)


def to_hf(t: Tensor, w: np.ndarray, src_layout: str, dst_layout: str) -> np.ndarray:
  """Our array -> the HF tensor (float32, contiguous), RoPE columns moved to dst_layout."""
  if t.rope_from is not None:
    w = to_layout(w, t.rope_from, src_layout, dst_layout)
  if t.n_in:
    w = w.reshape(int(np.prod(w.shape[:t.n_in])), -1).T
  return np.ascontiguousarray(w, dtype=np.float32)


def hf_shape(t: Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The HF tensor's shape for our array of `shape`: [out, in] for a linear weight."""
  if not t.n_in:
    return tuple(shape)
  return (int(np.prod(shape[t.n_in:])), int(np.prod(shape[:t.n_in])))


def from_hf(t: Tensor, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """The HF tensor (of hf_shape(t, shape)) -> our float32 array of `shape`."""
  x = np.asarray(x, dtype=np.float32)
  return x.T.reshape(shape) if t.n_in else x
