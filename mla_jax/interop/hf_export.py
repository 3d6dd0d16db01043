"""Workdir -> a Hugging Face checkpoint directory that `transformers` loads (no torch here).

    export_hf("runs/mla", "out/mla_hf")

MHA / GQA / MQA become `LlamaForCausalLM`; MLA becomes `DeepseekV3ForCausalLM` with dense MLPs
(first_k_dense_replace = num_hidden_layers, no multi-token-prediction layers) and interleaved RoPE.
The tensor names and layouts are hf_import's mapping run backwards, so export -> import gives back
the same parameters, and an imported checkpoint exports to the tensors it came from.

RoPE layouts: Llama rotates half-split pairs, DeepSeek's HF code interleaved ones. A model whose
layout differs from the target's has its rotated weight columns permuted (the same pairs, so the
attention scores are unchanged): `layers.interleaved_to_half_perm`.

Not exportable (refused in one line naming the field, nothing written): MLA with one rope key per
KV head (`mla_rope_kv_heads` > 1), per-layer rope frequencies (`mla_rope_pairs`), no latent norm
(`mla_latent_norm` false): DeepSeek-V3's layout has none of these. To serve a conversion as
DeepSeek-V3, convert with `--rope_key=shared --latent_norm --rope_strategy=high|uniform`
(approximate: fine-tune it) and export that.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np

from mla_jax.core.config import ModelConfig
from mla_jax.interop import safetensors_np, workdir_io
from mla_jax.interop.hf_import import DEEPSEEK_LATENT_EPS


class HFExportError(ValueError):
  """A model the target layout cannot hold exactly: one line naming the field."""


def _perm(dim: int) -> np.ndarray:
  """p with half_dims = interleaved_dims[p] (layers.interleaved_to_half_perm, in numpy)."""
  return np.concatenate([np.arange(0, dim, 2), np.arange(1, dim, 2)])


def _to_layout(w: np.ndarray, start: int, src: str, dst: str) -> np.ndarray:
  """w [..., X] with its last-axis columns [start:] rotated in layout src -> layout dst."""
  if src == dst:
    return w
  r = w.shape[-1] - start
  p = _perm(r) if dst == "half" else np.argsort(_perm(r))
  return np.concatenate([w[..., :start], w[..., start:][..., p]], axis=-1)


def _fail(field: str, msg: str):
  raise HFExportError(f"model.{field}: {msg}")


def _check_exportable(cfg: ModelConfig) -> None:
  fail = _fail
  if getattr(cfg, "qk_norm", False):
    fail("qk_norm", "true: neither Llama's nor DeepSeek-V3's layout has query/key norms")
  if cfg.attention != "mla":
    return
  if getattr(cfg, "mla_latent_scale", False):
    fail("mla_latent_scale", "true: DeepSeek-V3's latents are not scaled after their norms")
  if getattr(cfg, "mla_rope_kv_heads", 1) > 1:
    fail("mla_rope_kv_heads", f"{cfg.mla_rope_kv_heads}: DeepSeek-V3 has one shared rope key")
  if getattr(cfg, "mla_rope_pairs", ()):
    fail("mla_rope_pairs", "per-layer rope frequencies have no DeepSeek-V3 equivalent")
  if not getattr(cfg, "mla_latent_norm", True):
    fail("mla_latent_norm", "false: DeepSeek-V3 always normalises the latent (kv_a_layernorm)")
  if cfg.norm_eps != DEEPSEEK_LATENT_EPS:
    fail("norm_eps", f"{cfg.norm_eps}: DeepSeek-V3's latent norms use {DEEPSEEK_LATENT_EPS}")


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
  """The config.json transformers needs for cfg's model."""
  common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.n_layers,
                num_attention_heads=cfg.n_heads, max_position_embeddings=cfg.max_seq_len,
                rms_norm_eps=cfg.norm_eps, hidden_act="silu", attention_bias=False,
                tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
                rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                rope_theta=cfg.rope_theta, dtype="float32", torch_dtype="float32",
                bos_token_id=None, eos_token_id=None, pad_token_id=None)
  if cfg.attention != "mla":
    return dict(architectures=["LlamaForCausalLM"], model_type="llama",
                num_key_value_heads=cfg.kv_heads, head_dim=cfg.qk_head_dim, mlp_bias=False,
                **common)
  return dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
              num_key_value_heads=cfg.n_heads, q_lora_rank=cfg.q_lora_rank or None,
              kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.nope_dim,
              qk_rope_head_dim=cfg.qk_rope_head_dim, head_dim=cfg.qk_rope_head_dim,
              v_head_dim=cfg.v_dim, rope_interleave=True,
              first_k_dense_replace=cfg.n_layers, num_nextn_predict_layers=0,
              n_routed_experts=1, n_shared_experts=1, num_experts_per_tok=1, n_group=1,
              topk_group=1, moe_intermediate_size=cfg.mlp_dim, **common)


def hf_tensors(cfg: ModelConfig, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Our {flat name: array} -> HF {tensor name: float32 array} ([out, in] linear weights)."""
  _check_exportable(cfg)
  lin = lambda w, n_in=1: np.ascontiguousarray(
      w.reshape(int(np.prod(w.shape[:n_in])), -1).T.astype(np.float32))
  out = {"model.embed_tokens.weight": params["embed.table"], "model.norm.weight":
         params["final_norm.scale"]}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = lin(params["head"])
  for i in range(cfg.n_layers):
    hf, ours = f"model.layers.{i}.", f"blocks.{i}."
    out[hf + "input_layernorm.weight"] = params[ours + "attn_norm.scale"]
    out[hf + "post_attention_layernorm.weight"] = params[ours + "mlp_norm.scale"]
    for p in ("gate", "up", "down"):
      out[hf + f"mlp.{p}_proj.weight"] = lin(params[ours + f"mlp.{p}"])
    a, at = hf + "self_attn.", ours + "attn."
    if cfg.attention != "mla":  # Llama: half-split RoPE over the whole head
      rot = lambda w: _to_layout(w, 0, cfg.rope_layout, "half")
      out[a + "q_proj.weight"] = lin(rot(params[at + "wq"]))
      out[a + "k_proj.weight"] = lin(rot(params[at + "wk"]))
      out[a + "v_proj.weight"] = lin(params[at + "wv"])
      out[a + "o_proj.weight"] = lin(params[at + "wo"], 2)
      continue
    n, c = cfg.nope_dim, cfg.kv_lora_rank
    rot = lambda w, start: _to_layout(w, start, cfg.rope_layout, "interleaved")
    if cfg.q_lora_rank:
      out[a + "q_a_proj.weight"] = lin(params[at + "wq_a"])
      out[a + "q_a_layernorm.weight"] = params[at + "q_norm.scale"]
      out[a + "q_b_proj.weight"] = lin(rot(params[at + "wq_b"], n))
    else:
      out[a + "q_proj.weight"] = lin(rot(params[at + "wq"], n))
    out[a + "kv_a_proj_with_mqa.weight"] = lin(rot(params[at + "wkv_a"], c))
    out[a + "kv_a_layernorm.weight"] = params[at + "kv_norm.scale"]
    out[a + "kv_b_proj.weight"] = lin(params[at + "wkv_b"])
    out[a + "o_proj.weight"] = lin(params[at + "wo"], 2)
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def export_hf(workdir: str, out_dir: str, which: str | int = "latest",
              overwrite: bool = False) -> dict[str, Any]:
  """Writes out_dir (config.json, model.safetensors, tokenizer files when the workdir's tokenizer
  is a `tokenizers` one); built in a temporary directory, then renamed.

  Returns {'model_type', 'tensors', 'tokenizer': bool, 'notes': [str]}.
  """
  if os.path.exists(out_dir) and not overwrite:
    raise HFExportError(f"{out_dir}: already exists; choose a new directory (nothing written)")
  wd, cfg, params = workdir_io.read_workdir(workdir, which)
  tensors = hf_tensors(cfg, params)
  config = hf_config(cfg)
  notes = []
  tmp = f"{os.path.abspath(out_dir).rstrip('/')}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config, f, indent=2)
    safetensors_np.save(tensors, os.path.join(tmp, "model.safetensors"), {"format": "pt"})
    tok_meta = os.path.join(wd.tokenizer_dir, "tokenizer.json")
    has_tok = False
    if os.path.isfile(tok_meta):
      with open(tok_meta) as f:
        meta = json.load(f)
      if meta.get("kind") == "bpe":
        shutil.copy(os.path.join(wd.tokenizer_dir, meta.get("file", "bpe.json")),
                    os.path.join(tmp, "tokenizer.json"))
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
          json.dump({"tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=2)
        has_tok = True
      else:
        notes.append(f"the workdir's tokenizer is {meta.get('kind')!r}, which has no HF "
                     "tokenizer.json: exported weights only (feed token ids)")
    else:
      notes.append("the workdir has no tokenizer: exported weights only")
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return {"model_type": config["model_type"], "tensors": len(tensors), "tokenizer": has_tok,
          "notes": notes}
