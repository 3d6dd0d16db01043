"""Loading experiment configs by file path, for scripts that launch runs without absl flags.

`load_config("configs/lm.py:attn=mla,size=tiny", {"train.steps": 10})` does what
`train.py --config=configs/lm.py:attn=mla,size=tiny --config.train.steps=10` does.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Mapping

from ml_collections import ConfigDict


def load_config(spec: str, overrides: Mapping[str, Any] | None = None) -> ConfigDict:
  """spec 'path/to/file.py[:arg]' -> the file's get_config(arg) with dotted-key overrides."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config: no such file {path!r}")
  module_spec = importlib.util.spec_from_file_location(
      f"_config_{os.path.splitext(os.path.basename(path))[0]}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  for key, value in (overrides or {}).items():
    apply_override(config, key, value)
  config.lock()
  return config


def apply_override(config: ConfigDict, dotted: str, value: Any) -> None:
  """Sets config.a.b = value, refusing keys the config does not have (like config_flags)."""
  *parents, leaf = dotted.split(".")
  node = config
  for name in parents:
    if name not in node:
      raise KeyError(f"config.{dotted}: no field {name!r}")
    node = node[name]
  if leaf not in node:
    raise KeyError(f"config.{dotted}: no field {leaf!r}")
  node[leaf] = value
