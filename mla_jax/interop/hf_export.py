"""Workdir -> a Hugging Face checkpoint directory that `transformers` loads (no torch here).

    export_hf("runs/mla", "out/mla_hf")

MHA / GQA / MQA become `LlamaForCausalLM`; MLA becomes `DeepseekV3ForCausalLM` with dense MLPs
(first_k_dense_replace = num_hidden_layers, no multi-token-prediction layers) and interleaved RoPE.
The tensor names and layouts are hf_import's table (interop.hf_names) run backwards, so export ->
import gives back the same parameters, and an imported checkpoint exports to the tensors it came
from.

RoPE layouts: Llama rotates half-split pairs, DeepSeek's HF code interleaved ones. A model whose
layout differs from the target's has its rotated weight columns permuted (the same pairs, so the
attention scores are unchanged): `hf_names.to_layout`.

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
from mla_jax.interop import hf_names, safetensors_np, workdir_io
from mla_jax.interop.hf_import import DEEPSEEK_LATENT_EPS


class HFExportError(ValueError):
  """A model the target layout cannot hold exactly: one line naming the field."""


def _fail(field: str, msg: str):
  raise HFExportError(f"model.{field}: {msg}")


# What makes an MHA -> MLA conversion exportable (each refusal of its fields names it).
EXPORTABLE_CONVERSION = ("convert with scripts/convert_mha2mla.py --rope_key=shared --latent_norm "
                         "--rope_strategy=high (or uniform) to export as DeepSeek-V3 "
                         "(approximate: fine-tune it, train.py --config.train.init_from=DST)")


def _check_exportable(cfg: ModelConfig) -> None:
  fail = _fail
  convert = lambda field, msg: _fail(field, f"{msg}; {EXPORTABLE_CONVERSION}")
  if getattr(cfg, "qk_norm", False):
    fail("qk_norm", "true: neither Llama's nor DeepSeek-V3's layout has query/key norms")
  if cfg.attention != "mla":
    return
  if getattr(cfg, "mla_latent_scale", False):
    fail("mla_latent_scale", "true: DeepSeek-V3's latents are not scaled after their norms")
  if getattr(cfg, "mla_rope_kv_heads", 1) > 1:
    convert("mla_rope_kv_heads", f"{cfg.mla_rope_kv_heads}: DeepSeek-V3 has one shared rope key")
  if getattr(cfg, "mla_rope_pairs", ()):
    convert("mla_rope_pairs", "per-layer rope frequencies have no DeepSeek-V3 equivalent")
  if not getattr(cfg, "mla_latent_norm", True):
    convert("mla_latent_norm", "false: DeepSeek-V3 always normalises the latent (kv_a_layernorm)")
  if cfg.norm_eps != DEEPSEEK_LATENT_EPS:
    fail("norm_eps", f"{cfg.norm_eps}: DeepSeek-V3's latent norms use {DEEPSEEK_LATENT_EPS}")


SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")


def special_token_ids(config: dict[str, Any], depth: int = 0) -> dict[str, Any]:
  """bos / eos / pad token ids of the Hugging Face checkpoint a workdir descends from ({} when
  none): its `origin` (an import's HF ids, kept in origin or read from origin.hf_dir's
  config.json while it exists; a conversion's source workdir) or the workdir it was fine-tuned
  from (train.init_from)."""
  origin = config.get("origin") or {}
  if any(k in origin for k in SPECIAL_TOKENS):
    return {k: origin.get(k) for k in SPECIAL_TOKENS}
  parent = None
  if origin.get("kind") == "hf_import" and origin.get("hf_dir"):
    path = os.path.join(origin["hf_dir"], "config.json")
    if os.path.isfile(path):
      with open(path) as f:
        hf = json.load(f)
      return {k: hf.get(k) for k in SPECIAL_TOKENS}
  elif origin.get("kind") == "mha2mla":
    parent = origin.get("src")
  elif (config.get("train") or {}).get("init_from"):
    parent = config["train"]["init_from"]
  path = os.path.join(parent, "config.json") if parent else None
  if depth > 8 or not path or not os.path.isfile(path):
    return {}
  with open(path) as f:
    return special_token_ids(json.load(f), depth + 1)


def hf_config(cfg: ModelConfig, special: dict[str, Any] | None = None) -> dict[str, Any]:
  """The config.json transformers needs for cfg's model; special: its bos / eos / pad token ids
  (special_token_ids; None where not given)."""
  common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.n_layers,
                num_attention_heads=cfg.n_heads, max_position_embeddings=cfg.max_seq_len,
                rms_norm_eps=cfg.norm_eps, hidden_act="silu", attention_bias=False,
                tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
                rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                rope_theta=cfg.rope_theta, dtype="float32", torch_dtype="float32",
                **{k: (special or {}).get(k) for k in SPECIAL_TOKENS})
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
  """Our {flat name: array} -> HF {tensor name: float32 array} ([out, in] linear weights), by
  hf_names.table: hf_import's mapping run backwards."""
  _check_exportable(cfg)
  dst = hf_names.hf_rope_layout(cfg)
  return {t.hf: hf_names.to_hf(t, params[t.ours], cfg.rope_layout, dst)
          for t in hf_names.table(cfg)}


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
  config = hf_config(cfg, special_token_ids(wd.config))
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
