"""Training health at logging steps: what shows a run going wrong before its loss does.

`make_health_fn(graphdef, tx)` returns a pure function of (TrainState, batch) -> {name: scalar},
jitted by the trainer and called only at logging steps (one extra forward + backward on one
microbatch; the train step's graph is untouched):

  grad_norm/<group>       gradient norm of each parameter array ('L0/attn.wkv_b', 'embed.table')
  update_ratio/<group>    |update| / |parameter| of the optimizer step the gradients would make
  L<i>/max_logit          largest attention logit (scaled, before softmax) in layer i
  L<i>/q_rms, L<i>/k_rms  RMS of the rotated queries / keys (MHA / GQA / MQA)
  L<i>/latent_rms         RMS of MLA's latent after kv_norm; L<i>/k_rope_rms its shared rope key

Logged with a 'health/' prefix to metrics.jsonl and TensorBoard.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mla_jax.core import probes
from mla_jax.core.model import path_names, token_losses


def group_name(path) -> str:
  """A parameter's tree path -> 'L<i>/<module>.<param>' inside blocks, else its dotted path."""
  keys = path_names(path)
  if len(keys) > 2 and keys[0] == "blocks":
    return f"L{keys[1]}/{'.'.join(keys[2:])}"
  return ".".join(keys)


def make_health_fn(graphdef, tx: optax.GradientTransformation, microbatches: int = 1):
  """health(state, batch [B, T + 1]) -> {name: float32 scalar}; see the module docstring."""

  def loss_and_probes(params, tokens):
    with probes.recording() as found:
      losses = token_losses(graphdef, params, tokens)
    return losses.mean(), probes.reduce(found)

  def health(state, batch):
    tokens = batch[: batch.shape[0] // microbatches]  # one microbatch: the memory of one step
    (_, acts), grads = jax.value_and_grad(loss_and_probes, has_aux=True)(state.params, tokens)
    updates, _ = tx.update(grads, state.opt_state, state.params)
    out = {name: value for name, value in acts.items()}
    flat = lambda tree: jax.tree_util.tree_flatten_with_path(tree)[0]
    for (path, g), (_, u), (_, p) in zip(flat(grads), flat(updates), flat(state.params)):
      name = group_name(path)
      out[f"grad_norm/{name}"] = optax.tree.norm(g)
      out[f"update_ratio/{name}"] = optax.tree.norm(u) / (optax.tree.norm(p) + 1e-12)
    return {k: jnp.asarray(v, jnp.float32) for k, v in out.items()}

  return health
