"""The pure, jittable training step over (graphdef, state).

The hot loop jits plain functions of (graphdef, TrainState, batch) rather than `nnx.jit` on the
module: less Python per call (docs/performance.md), and the state is a pytree orbax can save
directly.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mla_jax.core.model import token_losses


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 [], updates attempted so far
  params: nnx.State
  opt_state: Any
  skipped: jax.Array  # int32 [], updates dropped because loss or gradients were not finite
  first_bad_step: jax.Array  # int32 [], the first such step, or -1


def _loss_sum(params, graphdef, tokens):
  losses = token_losses(graphdef, params, tokens)
  return jnp.sum(losses), losses.size


def make_train_step(graphdef, tx: optax.GradientTransformation, microbatches: int = 1):
  """Returns step(state, batch [B, T + 1]) -> (state, metrics).

  With microbatches > 1 the batch is split along B and gradients are accumulated in a scan,
  weighted by tokens, so the update equals the one of the whole batch. An update whose loss or
  gradients are not finite is never applied: the state keeps its parameters and counts the skip,
  so a checkpoint can never hold NaNs; the host decides whether to stop (train.on_nonfinite).
  """
  grad_fn = jax.value_and_grad(_loss_sum, has_aux=True)

  def step(state: TrainState, batch: jax.Array):
    if microbatches == 1:
      (loss_sum, n), grads = grad_fn(state.params, graphdef, batch)
    else:
      micro = batch.reshape((microbatches, -1) + batch.shape[1:])

      def accumulate(carry, tokens):
        (l, n), g = grad_fn(state.params, graphdef, tokens)
        return jax.tree.map(jnp.add, carry, (l, g)), n

      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
      (loss_sum, grads), ns = jax.lax.scan(accumulate, zeros, micro)
      n = ns.sum()
    loss = loss_sum / n
    grads = jax.tree.map(lambda g: g / n, grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Finite gradients can still give a non-finite update (e.g. optim.eps=0): check both.
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = TrainState(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        skipped=state.skipped + (~ok).astype(jnp.int32),
        first_bad_step=jnp.where((state.first_bad_step < 0) & ~ok, state.step,
                                 state.first_bad_step))
    return new_state, {"loss": loss, "grad_norm": grad_norm}

  return step
