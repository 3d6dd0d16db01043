"""train.init_from: fine-tuning starts from another workdir's checkpoint (an imported or converted
model), taking its model config and tokenizer; bad paths are one-line config errors."""

import numpy as np
import pytest
from flax import nnx

from configs import lm
from mla_jax.core.config import ModelConfig
from mla_jax.core.model import Transformer
from mla_jax.data.tokenizer import ByteTokenizer
from mla_jax.interop import mha2mla, workdir_io
from mla_jax.storage.workdir import Workdir
from mla_jax.training import trainer

OVERRIDES = {
    "data.seq_len": 32, "data.max_bytes": 640_000, "optim.warmup_steps": 0, "optim.lr": 1e-9,
    "optim.weight_decay": 0.0, "train.steps": 1, "train.global_batch": 8, "train.log_every": 1,
    "train.eval_every": 1, "train.ckpt_every": 1, "train.eval_tokens": 256,
    "train.final_eval_tokens": 256, "train.peak_flops": 2e11, "train.log_health": False,
}


def _config(init_from):
  config = lm.get_config("attn=gqa,size=tiny")  # its model section is replaced by init_from's
  for key, value in {**OVERRIDES, "train.init_from": init_from}.items():
    group, field = key.split(".")
    config[group][field] = value
  return config


def test_fine_tune_starts_from_a_converted_workdir(tmp_path):
  cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=4, attention="mha",
                    max_seq_len=64, tie_embeddings=True)
  src = workdir_io.model_params(Transformer(cfg, rngs=nnx.Rngs(0)))
  workdir_io.write_workdir(str(tmp_path / "src"), cfg, src)
  mha2mla.convert(str(tmp_path / "src"), str(tmp_path / "conv"), rope_dims=4, kv_rank=16,
                  strategy="uniform")
  converted = Workdir.open(str(tmp_path / "conv"))
  trainer.train(_config(str(tmp_path / "conv")), str(tmp_path / "ft"))
  ft = Workdir.open(str(tmp_path / "ft"))
  assert ft.model_config == converted.model_config and ft.config["train"]["init_from"]
  before = workdir_io.model_params(converted.load_model())
  after = workdir_io.model_params(ft.load_model())
  assert set(before) == set(after)
  # lr 1e-9: one step moves nothing measurably, so the run started from the converted weights.
  assert max(np.abs(before[k] - after[k]).max() for k in before) < 1e-6


def test_init_from_a_missing_workdir_is_a_config_error(tmp_path):
  with pytest.raises(ValueError, match="^train.init_from: .*no such directory"):
    trainer.train(_config(str(tmp_path / "none")), str(tmp_path / "ft"))
  assert not (tmp_path / "ft").exists()


def test_experiment_plan_and_a_tiny_end_to_end_run(tmp_path):
  from mla_jax.interop import mha2mla_experiment as exp
  sweep_mha = ModelConfig(d_model=96, n_layers=4, n_heads=4, attention="mha")  # the CPU sweep's
  plan = exp.default_plan(sweep_mha, 192)
  assert [(p["rope_dims"], p["kv_rank"], p["share"]) for p in plan] == [(6, 24, 0.25)] * 4 + [
      (2, 16, 0.125)]
  gqa = ModelConfig(d_model=96, n_layers=4, n_heads=4, attention="gqa", n_kv_heads=2)
  assert {(p["rope_dims"], p["kv_rank"]) for p in exp.default_plan(gqa, 192)} == {(12, 24), (6, 12)}

  cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=4, attention="gqa",
                    n_kv_heads=2, max_seq_len=64)
  config = workdir_io.experiment_dict(cfg)
  config["data"].update(seq_len=32, max_bytes=640_000)
  config["train"].update(steps=20, global_batch=8, peak_flops=2e11)
  ByteTokenizer().save(str(tmp_path / "tok"))  # as train.py leaves it
  workdir_io.write_workdir(str(tmp_path / "gqa"), cfg,
                           workdir_io.model_params(Transformer(cfg, rngs=nnx.Rngs(0))),
                           config=config, tokenizer_dir=str(tmp_path / "tok"))
  plan = lambda c, m: [{"share": 0.25, "rope_dims": 4, "kv_rank": 8, "strategy": "high"}]
  result = exp.run({"gqa": str(tmp_path / "gqa")}, str(tmp_path / "runs"), eval_tokens=64,
                   decode_lengths="", plan_fn=plan, say=lambda s: None)  # decode: eval's tests
  (row,) = result["rows"]
  assert row["kv_bytes"] == (8 + 2 * 4) * 4 and row["finetune_tokens"] == 256  # 5% of 20 steps
  assert all(np.isfinite(row[k]) for k in ("bpb_source", "bpb_converted", "bpb_finetuned"))
  assert "| gqa | 4 x 2 | 8 | high |" in exp.table(result)
  exp.plot(result, str(tmp_path / "chart.png"))
  assert (tmp_path / "chart.png").stat().st_size > 0
