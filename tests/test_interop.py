"""Hugging Face import / export (mla_jax.interop) against committed transformers fixtures.

The fixtures (tests/fixtures/hf/, written by scripts/make_hf_fixtures.py with torch and
transformers) hold tiny random checkpoints, token ids and transformers' logits: no torch here.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax.interop import hf_import, safetensors_np, workdir_io
from mla_jax.storage.workdir import Workdir

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "hf"
NAMES = ("llama_gqa", "llama_mha_tied", "deepseek_q", "deepseek_noq", "deepseek_v2")


def _logits(model, tokens):
  return np.asarray(model(jnp.asarray(tokens)))


def _close(ours, ref):
  """Within 1e-4 of transformers' float32 logits, relative to their scale."""
  return np.abs(ours - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("name", NAMES)
def test_import_matches_transformers_logits(name):
  d = FIXTURES / name
  cfg = hf_import.model_config_from_hf(hf_import.read_hf_config(str(d)))
  model = workdir_io.build_model(cfg, hf_import.params_from_hf(cfg, safetensors_np.load_dir(d)))
  assert _close(_logits(model, np.load(d / "inputs.npy")), np.load(d / "logits.npy"))
  assert cfg.attention == {"llama_gqa": "gqa", "llama_mha_tied": "mha"}.get(name, "mla")


def test_import_writes_a_workdir_that_loads(tmp_path):
  d = FIXTURES / "llama_gqa"
  out = hf_import.import_hf(str(d), str(tmp_path / "wd"))
  assert out["tokenizer"] and not out["notes"]
  wd = Workdir.open(str(tmp_path / "wd"))
  assert wd.steps == [0] and wd.config["origin"]["model_type"] == "llama"
  assert _close(_logits(wd.load_model(), np.load(d / "inputs.npy")), np.load(d / "logits.npy"))
  tok = wd.tokenizer()
  assert tok.decode(tok.encode("hello world")) == "hello world"
  assert [p for p in os.listdir(tmp_path) if "tmp" in p] == []
  with pytest.raises(ValueError, match="already exists"):
    hf_import.import_hf(str(d), str(tmp_path / "wd"))


def test_weights_only_directory_imports_and_says_so(tmp_path):
  src = tmp_path / "hf"
  shutil.copytree(FIXTURES / "deepseek_q", src)
  out = hf_import.import_hf(str(src), str(tmp_path / "wd"))
  assert not out["tokenizer"] and "no tokenizer.json" in out["notes"][0]
  assert Workdir.open(str(tmp_path / "wd")).tokenizer() is None


@pytest.mark.parametrize("change, field", [
    ({"model_type": "gpt2"}, "model_type"),
    ({"first_k_dense_replace": 1}, "first_k_dense_replace"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters.rope_type"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_configs_are_refused_before_writing(tmp_path, change, field):
  src = tmp_path / "hf"
  shutil.copytree(FIXTURES / "deepseek_q", src)
  cfg = json.loads((src / "config.json").read_text())
  cfg.update(change)
  (src / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=f"config.json {field}:") as e:
    hf_import.import_hf(str(src), str(tmp_path / "wd"))
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "wd")


def test_missing_and_extra_tensors_are_refused(tmp_path):
  d = FIXTURES / "llama_gqa"
  cfg = hf_import.model_config_from_hf(hf_import.read_hf_config(str(d)))
  tensors = dict(safetensors_np.load_dir(d))
  with pytest.raises(ValueError, match="no place"):
    hf_import.params_from_hf(cfg, {**tensors, "model.extra.weight": np.zeros(2, np.float32)})
  del tensors["model.layers.1.self_attn.k_proj.weight"]
  with pytest.raises(ValueError, match="no tensor 'model.layers.1.self_attn.k_proj.weight'"):
    hf_import.params_from_hf(cfg, tensors)


def test_safetensors_round_trip(tmp_path):
  import ml_dtypes
  arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
            "b": np.ones((3,), ml_dtypes.bfloat16), "c": np.array([1, 2], np.int64)}
  safetensors_np.save(arrays, str(tmp_path / "x.safetensors"), {"format": "pt"})
  back = safetensors_np.load(str(tmp_path / "x.safetensors"))
  for k, v in arrays.items():
    assert back[k].dtype == v.dtype and np.array_equal(back[k], v)


def test_import_script_one_line_error(tmp_path):
  p = subprocess.run([sys.executable, "scripts/import_hf.py", f"--hf_dir={tmp_path}/none",
                      f"--workdir={tmp_path}/wd"], cwd=REPO, capture_output=True, text=True)
  assert p.returncode == 1 and p.stderr.strip().count("\n") == 0
  assert "no such directory" in p.stderr


# Export ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_export_of_an_import_gives_back_the_checkpoint(tmp_path, name):
  """import -> export reproduces every tensor of the original checkpoint bit for bit, and the
  exported directory imports to the same parameters (a full round trip)."""
  from mla_jax.interop import hf_export
  d = FIXTURES / name
  hf_import.import_hf(str(d), str(tmp_path / "wd"))
  hf_export.export_hf(str(tmp_path / "wd"), str(tmp_path / "hf"))
  original, exported = safetensors_np.load_dir(d), safetensors_np.load_dir(tmp_path / "hf")
  assert set(exported) == set(original)
  for k, v in original.items():
    assert np.array_equal(exported[k], v), k
  cfg = hf_import.model_config_from_hf(hf_import.read_hf_config(str(tmp_path / "hf")))
  assert cfg == Workdir.open(str(tmp_path / "wd")).model_config
  if name == "llama_gqa":
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


@pytest.mark.parametrize("attention, layout", [("gqa", "interleaved"), ("mla", "half")])
def test_export_permutes_rope_columns_for_the_target_layout(attention, layout):
  """A model in the other RoPE layout than the target's exports with permuted columns; importing
  that (in the target's layout) gives the same logits. In memory: the files are tested above."""
  from flax import nnx

  from mla_jax.core.config import ModelConfig
  from mla_jax.core.model import Transformer
  from mla_jax.interop import hf_export
  cfg = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, attention=attention,
                    n_kv_heads=2 if attention == "gqa" else 0, kv_lora_rank=16,
                    qk_rope_head_dim=4, rope_layout=layout, max_seq_len=32, init_std=0.3)
  model = Transformer(cfg, rngs=nnx.Rngs(3))
  tensors = hf_export.hf_tensors(cfg, workdir_io.model_params(model))
  back_cfg = hf_import.model_config_from_hf(json.loads(json.dumps(hf_export.hf_config(cfg))))
  assert back_cfg.rope_layout != layout
  back = workdir_io.build_model(back_cfg, hf_import.params_from_hf(back_cfg, tensors))
  tokens = np.random.default_rng(0).integers(0, 40, (2, 10))
  np.testing.assert_allclose(_logits(back, tokens), _logits(model, tokens), atol=2e-5, rtol=1e-5)


@pytest.mark.skipif(not __import__("importlib").util.find_spec("transformers"),
                    reason="transformers is not installed (live check; scripts/check_hf_export.py)")
def test_exported_directory_loads_in_transformers(tmp_path):  # pragma: no cover - needs torch
  import torch
  import transformers

  from mla_jax.interop import hf_export
  for name in NAMES:
    hf_import.import_hf(str(FIXTURES / name), str(tmp_path / name))
    hf_export.export_hf(str(tmp_path / name), str(tmp_path / f"{name}_hf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / f"{name}_hf"))
    with torch.no_grad():
      logits = model(torch.from_numpy(np.load(FIXTURES / name / "inputs.npy")).long()).logits
    assert _close(logits.float().numpy(), np.load(FIXTURES / name / "logits.npy"))


def test_bfloat16_checkpoints_import_as_float32(tmp_path):
  import ml_dtypes
  d = FIXTURES / "llama_gqa"
  tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in safetensors_np.load_dir(d).items()}
  safetensors_np.save(tensors, str(tmp_path / "model.safetensors"))
  cfg = hf_import.model_config_from_hf(hf_import.read_hf_config(str(d)))
  params = hf_import.params_from_hf(cfg, safetensors_np.load_dir(tmp_path))
  assert all(v.dtype == np.float32 for v in params.values())
  logits = _logits(workdir_io.build_model(cfg, params), np.load(d / "inputs.npy"))
  assert np.abs(logits - np.load(d / "logits.npy")).max() < 0.1  # bf16 weights: ~3 digits
