"""Writing a workdir from plain arrays, and reading one back as arrays: what import, export and
conversion share.

A written workdir is what train.py leaves: config.json (all five groups, plus an `origin` section
saying where the weights came from), checkpoints/0/ (params, an empty optimizer item, meta) and,
when there is one, tokenizer/ (a HF tokenizer.json is stored as our 'bpe' kind, which wraps the
`tokenizers` library). It is built in `<workdir>.tmp-<pid>` and renamed into place at the end, so
a failure never leaves half a workdir.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mla_jax.core.config import ModelConfig
from mla_jax.core.model import abstract_model
from mla_jax.experiment import defaults
from mla_jax.storage.workdir import TOKENIZER_DIR, Workdir, WorkdirError


def flat_names(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """{'blocks.0.attn.wq': shape} for every parameter of cfg's model (no allocation)."""
  _, state = nnx.split(abstract_model(cfg))
  return {".".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(state)}


def build_model(cfg: ModelConfig, params: dict[str, np.ndarray]) -> nnx.Module:
  """The Transformer of cfg with every parameter taken from params ({flat name: array}); a
  missing, extra or wrongly shaped array is a ValueError naming it."""
  graphdef, state = nnx.split(abstract_model(cfg))
  flat = nnx.to_flat_state(state)
  names = {".".join(map(str, p)) for p, _ in flat}
  extra = sorted(set(params) - names)
  if extra:
    raise ValueError(f"params: {extra[0]} is not a parameter of the model config describes")
  leaves = []
  for path, var in flat:
    name = ".".join(map(str, path))
    if name not in params:
      raise ValueError(f"params: no value for {name} {tuple(var.shape)}")
    value = np.asarray(params[name])
    if value.shape != tuple(var.shape):
      raise ValueError(f"params: {name} is {value.shape}, the model needs {tuple(var.shape)}")
    leaves.append((path, var.replace(jnp.asarray(value, var.dtype))))
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def model_params(model: nnx.Module) -> dict[str, np.ndarray]:
  """{flat name: numpy array} of a model's parameters."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {".".join(map(str, p)): np.asarray(jax.device_get(v[...])) for p, v in flat}


def experiment_dict(cfg: ModelConfig, tokenizer_vocab: int = 0) -> dict[str, Any]:
  """A complete config.json for a model that was not trained here: defaults everywhere, the
  model as given, data on the default corpus (read with the model's tokenizer when it has one)."""
  config = {g: defaults(g) for g in ("data", "optim", "train", "mesh")}
  config["model"] = cfg.to_dict()
  config["data"]["source"] = "stdlib"
  config["data"]["seq_len"] = min(config["data"]["seq_len"], cfg.max_seq_len)
  if tokenizer_vocab:
    config["data"].update(tokenizer="bpe", vocab_size=tokenizer_vocab)
  config["train"]["steps"] = 1  # nominal: checkpoint 0 is the imported model, not a finished run
  return config


def write_workdir(workdir: str, cfg: ModelConfig, params: dict[str, np.ndarray], *,
                  tokenizer_json: str | None = None, tokenizer_dir: str | None = None,
                  origin: dict[str, Any] | None = None, config: dict[str, Any] | None = None,
                  overwrite: bool = False) -> None:
  """Writes a new workdir holding `params` as checkpoint 0 (built aside, then renamed).

  tokenizer_json: a HF tokenizer.json to store as our 'bpe' tokenizer; tokenizer_dir: one of our
  tokenizer directories to copy (conversions keep the source's). config: a config.json to start
  from (its model section is replaced by cfg); default experiment_dict(cfg).
  """
  from mla_jax.data import tokenizer as tok_lib
  from mla_jax.storage.checkpoint import Checkpointer

  if os.path.exists(workdir) and not overwrite:
    raise WorkdirError(f"{workdir}: already exists; choose a new directory (nothing written)")
  model = build_model(cfg, params)  # every shape checked before anything is written
  vocab = 0
  hf_tok = None
  if tokenizer_json:
    from tokenizers import Tokenizer as HFTokenizer
    hf_tok = HFTokenizer.from_file(tokenizer_json)
    vocab = hf_tok.get_vocab_size()
    if vocab > cfg.vocab_size:
      raise ValueError(f"{tokenizer_json}: {vocab} tokens, more than the model's vocab_size "
                       f"{cfg.vocab_size}")
  if config is None:
    config = experiment_dict(cfg, vocab)
  else:
    config = json.loads(json.dumps(config))
    config["model"] = cfg.to_dict()
  if origin:
    config["origin"] = origin
  tmp = f"{os.path.abspath(workdir).rstrip('/')}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    Workdir.write_config(tmp, config)
    if hf_tok is not None:
      tok_lib.BpeTokenizer(hf_tok).save(os.path.join(tmp, TOKENIZER_DIR))
    elif tokenizer_dir and os.path.isdir(tokenizer_dir):
      shutil.copytree(tokenizer_dir, os.path.join(tmp, TOKENIZER_DIR))
    with Checkpointer(tmp, async_save=False) as ckpt:
      ckpt.save(0, nnx.state(model, nnx.Param), {"step": jnp.zeros((), jnp.int32)}, None,
                {"step": 0, "tokens": 0, "val_loss": None})
    if os.path.exists(workdir):
      shutil.rmtree(workdir)
    os.replace(tmp, workdir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def read_workdir(workdir: str, which: str | int = "latest"):
  """(Workdir, ModelConfig, {flat name: numpy array}) of a workdir's checkpoint `which`."""
  wd = Workdir.open(workdir)
  model = wd.load_model(which)
  return wd, wd.model_config, model_params(model)
