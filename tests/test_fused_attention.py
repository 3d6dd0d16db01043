"""Fused attention (issue 11, section 5): jax.nn.dot_product_attention in place of the blocked
einsums for causal attention without a cache (training, scoring).

On CPU `attn_impl='auto'` keeps the blocked path; 'xla' forces dot_product_attention's XLA
implementation, the same function that runs cuDNN's kernel on a GPU ('cudnn'). It must give the
blocked path's outputs and gradients (inputs and parameters) for every variant, including MLA's
naive prefill, whose value dim E differs from its query / key dim N + R.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_helpers import FAST_COMPILE, random_module, tiny

from mla_jax.core import attention as attn_lib
from mla_jax.core.attention import GQAttention, MLAttention

CASES = {
    "gqa2": dict(attention="gqa", n_kv_heads=2),
    "mla_naive": dict(attention="mla", mla_prefill_impl="naive"),  # N + R = 16, E = 8
    "mla_absorbed": dict(attention="mla", mla_prefill_impl="absorbed"),  # one kv head, C + R = 24
}


def _outputs_and_grads(cfg, x, pos):
  """(out [B, T, D], d loss / d x, d loss / d params) of one attention module, jitted."""
  module = random_module(GQAttention if cfg.attention != "mla" else MLAttention, cfg, seed=3)
  graphdef, state = nnx.split(module)

  def loss(state_, x_):
    out = nnx.merge(graphdef, state_)(x_, pos)[0]
    return jnp.sum(jnp.sin(out)), out

  grads = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True), compiler_options=FAST_COMPILE)
  (g_state, g_x), out = grads(state, x)
  return out, g_x, g_state


@pytest.mark.parametrize("case", list(CASES))
def test_fused_xla_equals_blocked_forward_and_gradients(case):
  x = jax.random.normal(jax.random.key(5), (2, 11, 32))
  pos = jnp.broadcast_to(jnp.arange(11), (2, 11))
  blocked = _outputs_and_grads(tiny(**CASES[case], attn_impl="blocked", attn_block=4), x, pos)
  fused = _outputs_and_grads(tiny(**CASES[case], attn_impl="xla"), x, pos)
  for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(blocked)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)
  assert np.abs(np.asarray(blocked[0])).max() > 0.1


def test_fused_path_is_what_runs(monkeypatch):
  """attn_impl='xla' calls dot_product_attention; 'auto' on CPU does not."""
  calls = []
  real = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, "dot_product_attention",
                      lambda *a, **k: calls.append(k["implementation"]) or real(*a, **k))
  x, pos = jnp.ones((1, 4, 32)), jnp.broadcast_to(jnp.arange(4), (1, 4))
  for impl in ("xla", "auto"):
    for case in ("gqa2", "mla_naive"):
      cfg = tiny(**CASES[case], attn_impl=impl)
      module = random_module(GQAttention if cfg.attention != "mla" else MLAttention, cfg)
      jax.eval_shape(lambda m: m(x, pos)[0], module)  # traces, compiles nothing
  assert calls == ["xla", "xla"]


def test_auto_resolves_by_backend_and_shape(monkeypatch):
  assert attn_lib.resolve_attn_impl("auto", jnp.float32, (64,)) == "blocked"  # this CPU
  assert attn_lib.resolve_attn_impl("xla", jnp.float32, (64,)) == "xla"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert attn_lib.resolve_attn_impl("auto", jnp.bfloat16, (64,)) == "cudnn"
  assert attn_lib.resolve_attn_impl("auto", jnp.float32, (64,)) == "blocked"  # cuDNN: 16-bit only
  assert attn_lib.resolve_attn_impl("auto", jnp.bfloat16, (288,)) == "blocked"  # too wide
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert attn_lib.resolve_attn_impl("auto", jnp.bfloat16, (64,)) == "xla"
