r"""Writes the tiny Hugging Face fixtures under tests/fixtures/hf/ (needs torch + transformers;
the tests that read them need neither).

  python3 -m venv /tmp/hfenv && /tmp/hfenv/bin/pip install torch transformers safetensors numpy
  /tmp/hfenv/bin/python scripts/make_hf_fixtures.py [--out=tests/fixtures/hf]

Each fixture directory holds what `save_pretrained` writes (config.json, model.safetensors), plus
inputs.npy (int32 token ids [B, T]) and logits.npy (transformers' float32 logits [B, T, V]).
Weights are N(0, 1/fan_in) and norm weights 1 + N(0, 0.3^2), not HF's default init (std 0.02,
norms 1): with those, attention is nearly uniform and a wrong RoPE layout moves logits by ~2e-4
only (REFERENCE.md). `llama_gqa` also carries a tiny character-level tokenizer.json.

  llama_gqa      Llama, 4 heads / 2 kv heads, untied head, with a tokenizer
  llama_mha_tied Llama, MHA, tied embeddings, head_dim != hidden / heads, rope_theta 500000
  deepseek_q     DeepSeek-V3 MLA, low-rank query (q_lora_rank), interleaved RoPE, dense MLPs
  deepseek_noq   DeepSeek-V3 MLA, full-rank query (q_lora_rank None)
  deepseek_v2    DeepSeek-V2 MLA (complex-number interleaved RoPE), low-rank query
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
import transformers

VOCAB, HIDDEN, LAYERS = 61, 32, 2
CHARS = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?'\n"


def configs():
  common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48,
                num_hidden_layers=LAYERS, max_position_embeddings=64, rms_norm_eps=1e-6,
                bos_token_id=0, eos_token_id=1, pad_token_id=None)
  return {
      "llama_gqa": transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=2,
                                            tie_word_embeddings=False, **common),
      "llama_mha_tied": transformers.LlamaConfig(
          num_attention_heads=2, num_key_value_heads=2, head_dim=12, tie_word_embeddings=True,
          rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, **common),
      "deepseek_q": transformers.DeepseekV3Config(
          num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16,
          qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, first_k_dense_replace=LAYERS,
          n_routed_experts=4, num_mtp_layers=0, tie_word_embeddings=False, **common),
      "deepseek_noq": transformers.DeepseekV3Config(
          num_attention_heads=2, num_key_value_heads=2, q_lora_rank=None, kv_lora_rank=12,
          qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, first_k_dense_replace=LAYERS,
          n_routed_experts=4, num_mtp_layers=0, tie_word_embeddings=True, **common),
      "deepseek_v2": transformers.DeepseekV2Config(
          num_attention_heads=4, num_key_value_heads=4, q_lora_rank=20, kv_lora_rank=10,
          qk_nope_head_dim=6, qk_rope_head_dim=6, v_head_dim=4, first_k_dense_replace=LAYERS,
          n_routed_experts=4, tie_word_embeddings=False,
          rope_parameters={"rope_type": "default", "rope_theta": 1000.0}, **common),
  }


def randomize(model: torch.nn.Module, seed: int) -> None:
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:  # norm weights, away from 1
        p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
      elif "embed_tokens" in name:
        p.copy_(torch.randn(p.shape, generator=g))
      else:  # [out, in]
        p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def write_tokenizer(path: str) -> None:
  """A character-level tokenizer.json: one id per character of CHARS, no merges."""
  from tokenizers import Tokenizer, decoders, models
  vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(CHARS[:VOCAB - 2])}}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
  tok.decoder = decoders.Fuse()
  tok.save(path)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="tests/fixtures/hf")
  args = ap.parse_args()
  torch.manual_seed(0)
  inputs = np.random.default_rng(0).integers(0, VOCAB, size=(2, 12)).astype(np.int32)
  for seed, (name, cfg) in enumerate(configs().items()):
    out = os.path.join(args.out, name)
    os.makedirs(out, exist_ok=True)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    randomize(model, seed)
    with torch.no_grad():
      logits = model(torch.from_numpy(inputs).long()).logits.float().numpy()
    model.save_pretrained(out, safe_serialization=True)
    for extra in ("generation_config.json",):
      if os.path.exists(os.path.join(out, extra)):
        os.remove(os.path.join(out, extra))
    np.save(os.path.join(out, "inputs.npy"), inputs)
    np.save(os.path.join(out, "logits.npy"), logits.astype(np.float32))
    if name == "llama_gqa":
      write_tokenizer(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "config.json")) as f:
      kind = json.load(f)["model_type"]
    print(f"{out}: {kind}, logits {logits.shape}, |logits| max {np.abs(logits).max():.2f}")


if __name__ == "__main__":
  main()
