"""Validation loss, perplexity and bits per byte over a token split (deterministic full windows)."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mla_jax.core import sharding as shd
from mla_jax.core.model import token_losses
from mla_jax.data import pipeline


def _eval_step(graphdef, params, tokens, weights):
  """tokens [B, T + 1], weights [B] (0 for padding rows) -> summed losses."""
  losses = token_losses(graphdef, params, tokens) * weights[:, None]
  return {"loss_sum": losses.sum(), "count": weights.sum() * losses.shape[1],
          "loss_by_position": losses.sum(axis=0)}


class EvalInterrupted(Exception):
  """Evaluation stopped between batches because stop() said so (a SIGTERM / Ctrl-C)."""

  def __init__(self, tokens_done: int, tokens_total: int):
    super().__init__(f"evaluation interrupted after {tokens_done:,} of {tokens_total:,} tokens")
    self.tokens_done, self.tokens_total = tokens_done, tokens_total


class Evaluator:
  """Jits one eval step for a model and batch layout, then scores any split with it."""

  def __init__(self, graphdef, param_shardings, mesh, batch_size: int, seq_len: int,
               rules=shd.DEFAULT_RULES):
    self.batch_size, self.seq_len, self.mesh = batch_size, seq_len, mesh
    self.tokens_sharding = shd.batch_sharding(mesh, rules)
    self.weights_sharding = shd.batch_sharding(mesh, rules, ndim=1)
    replicated = NamedSharding(mesh, PartitionSpec())
    self.step = jax.jit(lambda p, t, w: _eval_step(graphdef, p, t, w),
                        in_shardings=(param_shardings, self.tokens_sharding, self.weights_sharding),
                        out_shardings=replicated)

  def _global(self, array: np.ndarray, sharding) -> jax.Array:
    # Every process holds the same eval batch; each device takes its slice of it.
    return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])

  def __call__(self, params, tokens: np.ndarray, bytes_per_token: float,
               max_tokens: int = 0, progress=None, stop=None) -> dict:
    """Returns val_loss (nats/token), val_ppl, val_bpb, val_tokens, loss_by_position [T].
    progress(tokens scored, tokens to score), when given, is called about every 10%.
    stop(), when given, is asked before every batch after the first; True raises EvalInterrupted
    (a stop signal is honoured within one batch, not after the whole split)."""
    total, count, by_pos = 0.0, 0.0, np.zeros(self.seq_len)
    windows_total = pipeline.num_eval_windows(len(tokens), self.seq_len, max_tokens)
    n_batches = -(-windows_total // self.batch_size)
    for i, batch in enumerate(
        pipeline.eval_batches(tokens, self.seq_len, self.batch_size, max_tokens)):
      if stop is not None and i and stop():
        raise EvalInterrupted(int(count), windows_total * self.seq_len)
      if progress and i % max(1, n_batches // 10) == 0:
        progress(i * self.batch_size * self.seq_len, windows_total * self.seq_len)
      n = batch.shape[0]
      weights = np.zeros(self.batch_size, np.float32)
      weights[:n] = 1.0
      if n < self.batch_size:  # pad the last batch so every step has one shape (one compile)
        batch = np.concatenate([batch, np.zeros((self.batch_size - n,) + batch.shape[1:],
                                                batch.dtype)])
      out = self.step(params, self._global(batch.astype(np.int32), self.tokens_sharding),
                      self._global(weights, self.weights_sharding))
      total += float(out["loss_sum"])
      count += float(out["count"])
      by_pos += np.asarray(out["loss_by_position"])
    loss = total / count
    windows = count / self.seq_len
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)),
            "val_bpb": bits_per_byte(loss, bytes_per_token), "val_tokens": int(count),
            "loss_by_position": (by_pos / windows).tolist()}


def bits_per_byte(loss_nats_per_token: float, bytes_per_token: float) -> float:
  """bpb = loss / ln 2 * tokens / bytes: tokenizer-independent, so runs with any vocab compare."""
  return loss_nats_per_token / math.log(2) / bytes_per_token


def evaluate_model(model, tokens: np.ndarray, bytes_per_token: float, seq_len: int,
                   batch_size: int, max_tokens: int = 0, progress=None) -> dict:
  """Evaluator over all local devices for a model that lives anywhere (e.g. a restored one).

  Parameters are replicated and the batch is split over every device ('data' axis); batch_size
  is rounded up to a multiple of the device count. Same results as the trainer's evaluation.
  """
  from flax import nnx  # local: the trainer imports this module and needs nothing more

  mesh = shd.make_mesh({"data": -1})
  n = mesh.devices.size
  batch_size = -(-batch_size // n) * n
  graphdef, params = nnx.split(model)
  replicated = NamedSharding(mesh, PartitionSpec())
  param_sh = jax.tree.map(lambda v: v.replace(replicated), params,
                          is_leaf=lambda x: isinstance(x, nnx.Variable))
  params = jax.device_put(params, param_sh)
  evaluator = Evaluator(graphdef, param_sh, mesh, batch_size, seq_len)
  return evaluator(params, tokens, bytes_per_token, max_tokens, progress)


def position_buckets(loss_by_position, n_buckets: int = 8) -> list[dict]:
  """Mean loss over n_buckets equal slices of the window: [{'start', 'end', 'loss'}], 0-based
  positions of the predicted token's input, end exclusive."""
  losses = np.asarray(loss_by_position, np.float64)
  edges = np.linspace(0, len(losses), min(n_buckets, len(losses)) + 1).round().astype(int)
  return [{"start": int(a), "end": int(b), "loss": float(losses[a:b].mean())}
          for a, b in zip(edges[:-1], edges[1:])]
