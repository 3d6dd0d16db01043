"""train.init_from: fine-tuning starts from another workdir's checkpoint (an imported or converted
model), taking its model config and tokenizer; bad paths are one-line config errors."""

import numpy as np
import pytest
from flax import nnx

from configs import lm
from mla_jax.core.config import ModelConfig
from mla_jax.core.model import Transformer
from mla_jax.interop import mha2mla, workdir_io
from mla_jax.storage.workdir import Workdir
from mla_jax.training import trainer

OVERRIDES = {
    "data.seq_len": 32, "data.max_bytes": 520_000, "optim.warmup_steps": 0, "optim.lr": 1e-9,
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
