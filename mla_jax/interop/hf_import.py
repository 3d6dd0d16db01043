"""Hugging Face checkpoint directory -> workdir (no torch, no download).

    import_hf("path/to/SmolLM-135M", "runs/smollm")   # config.json + *.safetensors (+ tokenizer)

Supported: Llama-family MHA / GQA (`llama`, `mistral` without a sliding window) and
DeepSeek-V2/V3-style MLA (`deepseek_v2`, `deepseek_v3`) with dense MLPs. Anything the model here
cannot reproduce exactly (MoE layers, rope scaling, biases, another activation) is refused with one
line naming the config field, before anything is written. Layout facts: docs/interop.md.

The tensor names and layouts: mla_jax.interop.hf_names (one table, shared with hf_export).
DeepSeek's RoPE is interleaved: imported MLA models use rope_layout='interleaved', so the weights
are copied as they are.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np

from mla_jax.core.config import ModelConfig
from mla_jax.interop import hf_names, safetensors_np, workdir_io

LLAMA_TYPES = ("llama", "mistral")
MLA_TYPES = ("deepseek_v3", "deepseek_v2")  # the same tensors; V2's RoPE is always interleaved
SUPPORTED = LLAMA_TYPES + MLA_TYPES
# DeepSeek-V3's latent norms (q_a_layernorm, kv_a_layernorm) use this eps whatever rms_norm_eps is.
DEEPSEEK_LATENT_EPS = 1e-6


class HFImportError(ValueError):
  """A checkpoint this importer cannot reproduce exactly: one line naming the config field."""


def _fail(field: str, msg: str):
  raise HFImportError(f"config.json {field}: {msg}")


def read_hf_config(hf_dir: str) -> dict[str, Any]:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isdir(hf_dir):
    raise HFImportError(f"{hf_dir}: no such directory")
  if not os.path.isfile(path):
    raise HFImportError(f"{hf_dir}: no config.json (a Hugging Face checkpoint directory has one)")
  with open(path) as f:
    return json.load(f)


def _rope_theta(hf: dict) -> float:
  """rope theta from transformers 5.x `rope_parameters` or the older `rope_theta` /
  `rope_scaling`; any scaling type other than the plain one is refused."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  for field, p in (("rope_parameters", params), ("rope_scaling", scaling)):
    kind = p.get("rope_type", p.get("type", "default"))
    if kind not in ("default", None):
      _fail(f"{field}.rope_type", f"{kind!r} is not implemented here (only plain RoPE)")
  return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_config_from_hf(hf: dict) -> ModelConfig:
  """HF config.json dict -> our ModelConfig (float32 params), or HFImportError naming the field."""
  kind = hf.get("model_type")
  if kind not in SUPPORTED:
    _fail("model_type", f"{kind!r} is not supported (supported: {', '.join(SUPPORTED)})")
  if hf.get("hidden_act", "silu") != "silu":
    _fail("hidden_act", f"{hf['hidden_act']!r}: only silu (SwiGLU) MLPs are implemented")
  for field in ("attention_bias", "mlp_bias"):
    if hf.get(field):
      _fail(field, "true: projections with biases are not implemented")
  if kind == "mistral" and hf.get("sliding_window"):
    _fail("sliding_window", f"{hf['sliding_window']}: sliding-window attention is not implemented")
  d, h, n_layers = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
  common = dict(vocab_size=hf["vocab_size"], d_model=d, n_layers=n_layers, n_heads=h,
                d_ff=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
                rope_theta=_rope_theta(hf), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                init_std=float(hf.get("initializer_range", 0.02)), attn_block=0)
  if kind in LLAMA_TYPES:
    g = hf.get("num_key_value_heads") or h
    head_dim = hf.get("head_dim") or d // h
    attention = "mha" if g == h else "mqa" if g == 1 else "gqa"
    return ModelConfig(attention=attention, n_kv_heads=g if attention == "gqa" else 0,
                       head_dim=head_dim, rope_layout="half", **common)
  # DeepSeek-V2 / V3: every layer from first_k_dense_replace on is MoE.
  dense = hf.get("first_k_dense_replace")
  if dense is None or dense < n_layers:
    _fail("first_k_dense_replace", f"{dense}: layers {dense or 0}..{n_layers - 1} are MoE, which "
          f"is not implemented (only dense MLPs: first_k_dense_replace >= num_hidden_layers)")
  if common["norm_eps"] != DEEPSEEK_LATENT_EPS:
    _fail("rms_norm_eps", f"{common['norm_eps']}: DeepSeek's latent norms use "
          f"{DEEPSEEK_LATENT_EPS} and one eps serves every norm here")
  return ModelConfig(attention="mla", q_lora_rank=hf.get("q_lora_rank") or 0,
                     kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
                     qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
                     rope_layout="interleaved" if kind == "deepseek_v2" or
                     hf.get("rope_interleave", True) else "half",
                     **common)


def params_from_hf(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """HF tensors -> {our flat parameter name: float32 array} (hf_names.table); every one of our
  parameters must come from a tensor of its shape (missing ones are an error), and HF tensors
  left over are an error too (except rotary tables and DeepSeek's multi-token-prediction layers,
  which inference skips)."""
  shapes = workdir_io.flat_names(cfg)
  out, names = {}, hf_names.table(cfg)
  for t in names:
    if t.hf not in tensors:
      raise HFImportError(f"safetensors: no tensor {t.hf!r} (the config.json model has it)")
    want = hf_names.hf_shape(t, shapes[t.ours])
    if tuple(tensors[t.hf].shape) != want:
      raise HFImportError(f"safetensors: tensor {t.hf!r} is {tuple(tensors[t.hf].shape)}, the "
                          f"config.json model needs {want}")
    out[t.ours] = hf_names.from_hf(t, tensors[t.hf], shapes[t.ours])
  used = {t.hf for t in names}
  extra = [n for n in tensors if n not in used and not _skippable(n, cfg.n_layers)]
  if extra:
    raise HFImportError(f"safetensors: tensor {extra[0]!r} (and {len(extra) - 1} more) has no "
                       "place in the model config.json describes; nothing was imported")
  return out


def _skippable(name: str, n_layers: int) -> bool:
  """Tensors inference never reads: rotary caches, DeepSeek's MTP layers (index >= L)."""
  if name.endswith("rotary_emb.inv_freq"):
    return True
  parts = name.split(".")
  return (len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit()
          and int(parts[2]) >= n_layers)


def import_hf(hf_dir: str, workdir: str, overwrite: bool = False) -> dict[str, Any]:
  """Reads hf_dir into a new workdir (written to a temporary directory, then renamed).

  Returns {'model': ModelConfig dict, 'tokenizer': bool, 'params': count, 'notes': [str]}.
  """
  hf = read_hf_config(hf_dir)
  cfg = model_config_from_hf(hf)
  tensors = safetensors_np.load_dir(hf_dir)
  params = params_from_hf(cfg, tensors)
  notes = []
  tok_file = os.path.join(hf_dir, "tokenizer.json")
  tokenizer = None
  if os.path.isfile(tok_file):
    tokenizer = tok_file
  else:
    notes.append(f"{hf_dir} has no tokenizer.json: the workdir has no tokenizer and is for use "
                 "on token ids")
  workdir_io.write_workdir(workdir, cfg, params, tokenizer_json=tokenizer, overwrite=overwrite,
                           origin={"kind": "hf_import", "hf_dir": os.path.abspath(hf_dir),
                                   "model_type": hf["model_type"]})
  return {"model": cfg.to_dict(), "tokenizer": tokenizer is not None,
          "params": int(sum(v.size for v in params.values())), "notes": notes}


def copy_tokenizer_files(hf_dir: str, out_dir: str) -> list[str]:
  """The tokenizer files a HF directory ships, copied as they are (for export round trips)."""
  names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
  copied = []
  for n in names:
    if os.path.isfile(os.path.join(hf_dir, n)):
      shutil.copy(os.path.join(hf_dir, n), os.path.join(out_dir, n))
      copied.append(n)
  return copied
