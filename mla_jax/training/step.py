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

from mla_jax.core import dmc
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


def _dmc_loss_sum(params, graphdef, tokens, step, rng):
  """DMC retrofit (cfg.dmc): the language-model loss with relaxed decisions plus the compression
  loss, weighted by the tokens so that dividing by them (as for _loss_sum) leaves it once.
  -> (objective sum, (tokens, language-model loss sum, appended-slot fraction))."""
  model = nnx.merge(graphdef, params)
  logits, slots = model.dmc_forward(tokens[:, :-1], rng)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
  aux = dmc.compression_loss(model.cfg, slots, step) * losses.size
  return jnp.sum(losses) + aux, (losses.size, jnp.sum(losses), slots * losses.size)


def make_train_step(graphdef, tx: optax.GradientTransformation, microbatches: int = 1):
  """Returns step(state, batch [B, T + 1]) -> (state, metrics).

  With microbatches > 1 the batch is split along B and gradients are accumulated in a scan,
  weighted by tokens, so the update equals the one of the whole batch. An update whose loss or
  gradients are not finite is never applied: the state keeps its parameters and counts the skip,
  so a checkpoint can never hold NaNs; the host decides whether to stop (train.on_nonfinite).
  """
  grad_fn = jax.value_and_grad(_loss_sum, has_aux=True)

  def step(state: TrainState, batch: jax.Array):
    if nnx.merge(graphdef, state.params).cfg.dmc:  # static: decided while tracing
      return _dmc_step(state, batch)
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
    new_state, grad_norm = _apply(state, jax.tree.map(lambda g: g / n, grads), loss)
    return new_state, {"loss": loss, "grad_norm": grad_norm}

  def _apply(state: TrainState, grads, loss):
    """The optimizer update, dropped (and counted) unless loss, gradients and update are finite.
    -> (new state, gradient norm)."""
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Finite gradients can still give a non-finite update (e.g. optim.eps=0): check both.
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    return TrainState(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        skipped=state.skipped + (~ok).astype(jnp.int32),
        first_bad_step=jnp.where((state.first_bad_step < 0) & ~ok, state.step,
                                 state.first_bad_step)), grad_norm

  dmc_grad_fn = jax.value_and_grad(_dmc_loss_sum, has_aux=True)

  def _dmc_step(state: TrainState, batch: jax.Array):
    """As step, for a DMC retrofit: fresh decision noise per step and microbatch; metrics add the
    compression loss, the fraction of appended slots and the target's."""
    rng = jax.random.fold_in(jax.random.key(0x0D3C), state.step)
    micro = batch.reshape((microbatches, -1) + batch.shape[1:])

    def accumulate(carry, xs):
      tokens, i = xs
      (total, aux), g = dmc_grad_fn(state.params, graphdef, tokens, state.step,
                                    jax.random.fold_in(rng, i))
      return jax.tree.map(jnp.add, carry, ((total, *aux), g)), None

    zero = jnp.zeros((), jnp.float32)
    zeros = ((zero, zero, zero, zero), jax.tree.map(jnp.zeros_like, state.params))
    ((total, n, lm_sum, slots_sum), grads), _ = jax.lax.scan(
        accumulate, zeros, (micro, jnp.arange(microbatches)))
    new_state, grad_norm = _apply(state, jax.tree.map(lambda g: g / n, grads), total)
    cfg = nnx.merge(graphdef, state.params).cfg
    return new_state, {"loss": lm_sum / n, "grad_norm": grad_norm,
                       "dmc_loss": (total - lm_sum) / n, "dmc_slots": slots_sum / n,
                       "dmc_target": dmc.target_at(cfg, state.step)}

  return step
