"""Trace-time probes: activation statistics a diagnostic pass can ask the model for.

Modules call `record(name, value)` at the places worth watching (attention logits, query / key /
latent RMS). Outside `recording()` it does nothing, so the training step's graph is unchanged;
inside, values are collected (as traced arrays of the surrounding jit) under the current
`scope(...)` prefix, e.g. 'L2/max_logit'. Used by training/health.py at logging steps only.

    with probes.recording() as found:
      model(tokens)
    stats = probes.reduce(found)          # {'L0/max_logit': [], 'L0/latent_rms': [], ...}
"""

from __future__ import annotations

import contextlib

import jax.numpy as jnp

_found: dict | None = None  # name -> [values], while recording
_prefix: list[str] = []


@contextlib.contextmanager
def recording():
  """Collects every record() made while tracing inside the block; yields the dict."""
  global _found
  outer, _found = _found, {}
  try:
    yield _found
  finally:
    _found = outer


@contextlib.contextmanager
def scope(name: str):
  """Prefixes the names recorded inside (e.g. one per layer)."""
  _prefix.append(name)
  try:
    yield
  finally:
    _prefix.pop()


def active() -> bool:
  return _found is not None


def record(name: str, value) -> None:
  """Records a scalar statistic; max_* names keep the maximum of several records (e.g. one per
  query block), others the mean."""
  if _found is not None:
    _found.setdefault("/".join([*_prefix, name]), []).append(jnp.asarray(value, jnp.float32))


def rms(x) -> jnp.ndarray:
  return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


def reduce(found: dict) -> dict:
  """{name: [values]} -> {name: scalar}: max for 'max_*' names, mean otherwise."""
  out = {}
  for name, values in found.items():
    stacked = jnp.stack(values)
    out[name] = stacked.max() if name.rsplit("/", 1)[-1].startswith("max_") else stacked.mean()
  return out
