"""AdamW with warmup + cosine / WSD / constant schedules; decoupled weight decay on matrices."""

from __future__ import annotations

import jax
import optax

SCHEDULES = ("cosine", "wsd", "constant")


def learning_rate_schedule(lr: float, steps: int, warmup_steps: int, schedule: str,
                           min_lr_ratio: float = 0.1,
                           decay_fraction: float = 0.2) -> optax.Schedule:
  """Linear warmup to lr, then:
    cosine    cosine decay to min_lr_ratio * lr at the last step (nanoGPT);
    wsd       warmup-stable-decay: constant, then linear decay over the last decay_fraction
              of the steps;
    constant  flat.
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"optim.schedule: {schedule!r} is not one of {SCHEDULES}")
  if warmup_steps >= steps and steps > 0:
    raise ValueError(f"optim.warmup_steps: {warmup_steps} must be smaller than train.steps={steps}")
  # Starts at lr / (warmup + 1), not 0, so the first update is not wasted (as nanoGPT).
  warmup = optax.linear_schedule(lr / (warmup_steps + 1), lr, max(warmup_steps, 1))
  rest = max(steps - warmup_steps, 1)
  if schedule == "cosine":
    after = optax.cosine_decay_schedule(lr, rest, alpha=min_lr_ratio)
  elif schedule == "wsd":
    decay = max(int(round(rest * decay_fraction)), 1)
    after = optax.join_schedules([optax.constant_schedule(lr),
                                  optax.linear_schedule(lr, lr * min_lr_ratio, decay)],
                                 [rest - decay])
  else:
    after = optax.constant_schedule(lr)
  return optax.join_schedules([warmup, after], [warmup_steps])


def decay_mask(params):
  """Weight decay on matrices (ndim >= 2) only: norm scales and biases are excluded."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(*, lr: float, steps: int, warmup_steps: int, schedule: str = "cosine",
                   min_lr_ratio: float = 0.1, decay_fraction: float = 0.2,
                   weight_decay: float = 0.1,
                   b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   grad_clip: float = 1.0) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (transformation, schedule); the schedule is also used to log the learning rate."""
  sched = learning_rate_schedule(lr, steps, warmup_steps, schedule, min_lr_ratio, decay_fraction)
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
  parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts), sched
