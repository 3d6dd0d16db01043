"""The model run against a budget cache: prefill in chunks, one jitted decode step, a streaming
scorer and greedy generation, all with fixed shapes (each traces once per policy and shape).

    policy = kvcompress.make("h2o", budget=128)
    cache = budget.init_cache(cfg, policy, batch=1, context=4096)
    logits, cache = prefill(model, cache, prompt, policy)        # prompt [B, P], chunks <= budget
    logits, cache = decode_step(graphdef, state, cache, tok, policy)   # tok [B, 1]

Attention is the model's own (its parameters, RoPE, absorbed MLA) and core/ops.py's math, over
the slots the budget layout [B, G, S, W] holds, so that it also returns the attention each slot
drew: the policies' scores. The new tokens attend over the slots in use and themselves with one
softmax (ops.cached_probs), then are inserted (evict.py). MLA is absorbed (ops.absorb_query, then
this budget cache as its latent backend, then W_UV): one head-averaged score per latent slot.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax.core import ops
from mla_jax.core.layers import apply_rope, dense, rope_angles
from mla_jax.kvcompress import budget as budget_lib
from mla_jax.kvcompress import evict
from mla_jax.kvcompress.policy import Policy

TRACES: dict = {}  # (function, policy, shape) -> times traced: tests check the step traces once


def _rerotate(x, layer, cfg):
  """'cache' positions: keys x [B, G, S, W] stored rotated at `rot`, turned to their rank `pos`."""
  cos, sin = rope_angles(layer["pos"] - layer["rot"], x.shape[-1], cfg.rope_theta)
  return apply_rope(x, cos, sin, cfg.rope_layout)


def _gqa(attn, x, qpos, layer, cache, policy, specs, flags):
  """MHA / GQA / MQA over the budget cache: x [B, T, D] -> (out [B, T, D], layer)."""
  cfg, dt = attn.cfg, attn.cfg.compute_dtype
  c = lambda p: p[...].astype(dt)
  q, k, v = attn._project(x, qpos)  # [B, T, H|G, K]
  k, v = k.astype(cfg.kv_cache_dtype).astype(dt), v.astype(cfg.kv_cache_dtype).astype(dt)
  read = lambda spec: budget_lib.read(layer, spec, policy, cache.n_seen, cache.n_valid, dt)
  k_old, v_old = read(specs[0]), read(specs[1])  # [B, G, S, K]
  if policy.positions == "cache":
    k_old = _rerotate(k_old, layer, cfg)
  b, t, h, kd = q.shape
  g = k.shape[2]
  qg = q.reshape(b, t, g, h // g, kd)
  scale = kd ** -0.5
  slots_first = lambda x: x.transpose(0, 2, 1, 3)  # the budget's [B, G, S, K] -> [B, S, G, K]
  s_old = ops.gqa_scores(qg, slots_first(k_old), scale)
  p_old, p_new = ops.cached_probs(s_old, ops.gqa_scores(qg, k, scale), cache.n_valid)
  o = ops.gqa_attend(slots_first(v_old), p_old, dt) + ops.gqa_attend(v, p_new, dt)
  out = dense(o.reshape(b, t, h, kd), c(attn.wo), n_in=2)
  aux = jnp.zeros((b, g, t), jnp.float32)
  if policy.name == "l2norm":
    aux = jnp.linalg.norm(k.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
  elif policy.name == "vatp":
    aux = jnp.abs(v.astype(jnp.float32)).sum(-1).transpose(0, 2, 1)
  elif policy.name == "fastgen":  # FastGen: is the token punctuation
    aux = jnp.broadcast_to(flags[:, None], aux.shape)
  new = {"k": k.transpose(0, 2, 1, 3), "v": v.transpose(0, 2, 1, 3)}
  return out, evict.update_layer(layer, specs, policy, new, p_old.mean(2), p_new.mean(2), aux,
                                 qpos, cache.n_seen, cache.n_valid, cfg.kv_cache_dtype)


def _mla(attn, x, qpos, layer, cache, policy, specs, flags):
  """MLA over the budget cache, absorbed path (scores per latent slot, averaged over heads)."""
  cfg, dt = attn.cfg, attn.cfg.compute_dtype
  q_nope, q_rope, latent, k_rope, wkv_b = attn._project(x, qpos)
  latent = latent.astype(cfg.kv_cache_dtype).astype(dt)
  k_rope = k_rope.astype(cfg.kv_cache_dtype).astype(dt)
  read = lambda spec: budget_lib.read(layer, spec, policy, cache.n_seen, cache.n_valid, dt)
  c_old, kr_old = read(specs[0]), read(specs[1])  # [B, 1, S, C], [B, 1, S, R]
  if policy.positions == "cache":
    kr_old = _rerotate(kr_old, layer, cfg)
  c_old, kr_old = c_old[:, 0], kr_old[:, 0]
  n = cfg.nope_dim
  wo = attn.wo[...].astype(dt)
  w_uk, w_uv = wkv_b[..., :n], wkv_b[..., n:]  # [C, H, N], [C, H, E]
  scale = (n + cfg.qk_rope_head_dim) ** -0.5
  q_c = ops.absorb_query(q_nope, w_uk)
  s_new = ops.latent_scores(q_c, q_rope, latent, k_rope, scale)
  p_old, p_new = ops.cached_probs(ops.latent_scores(q_c, q_rope, c_old, kr_old, scale), s_new,
                                  cache.n_valid)
  o = ops.latent_attend(c_old, p_old, dt) + ops.latent_attend(latent, p_new, dt)
  out = dense(ops.expand_values(o, w_uv), wo, n_in=2)
  b, t = x.shape[:2]
  aux = jnp.zeros((b, 1, t), jnp.float32)
  if policy.name == "l2norm":  # the absorbed path's key is [c; k_R]
    aux = jnp.linalg.norm(jnp.concatenate([latent, k_rope], -1).astype(jnp.float32), axis=-1)
    aux = aux[:, None]
  elif policy.name == "vatp":  # per-head values W_UV,h c: L1 norm averaged over heads
    values = jnp.einsum("BTC,CHE->BTHE", latent.astype(jnp.float32), w_uv.astype(jnp.float32))
    aux = jnp.abs(values).sum(-1).mean(-1)[:, None]
  elif policy.name == "fastgen":
    aux = flags[:, None]
  new = {"c": latent[:, None], "kr": k_rope[:, None]}
  return out, evict.update_layer(layer, specs, policy, new, p_old.mean(1)[:, None],
                                 p_new.mean(1)[:, None], aux, qpos, cache.n_seen, cache.n_valid,
                                 cfg.kv_cache_dtype)


def extend(model, cache: budget_lib.BudgetCache, tokens: jax.Array, policy: Policy):
  """tokens [B, T] appended to the budget cache -> (logits [B, T, V] float32, cache)."""
  cfg = model.cfg
  t = tokens.shape[1]
  specs = budget_lib.array_specs(cfg, policy)
  base = cache.n_seen if policy.positions == "original" else cache.n_valid
  qpos = base[:, None] + jnp.arange(t, dtype=jnp.int32)
  run = _mla if cfg.attention == "mla" else _gqa
  flags = jnp.zeros(tokens.shape, jnp.float32)
  if policy.punct_ids:
    flags = jnp.isin(tokens, jnp.asarray(policy.punct_ids)).astype(jnp.float32)
  x = model.embed(tokens)
  layers = []
  for block, layer in zip(model.blocks, cache.layers):
    h, layer = run(block.attn, block.attn_norm(x), qpos, layer, cache, policy, specs, flags)
    x = x + h
    x = x + block.mlp(block.mlp_norm(x))
    layers.append(layer)
  x = model.final_norm(x)
  if cfg.tie_embeddings:
    logits = model.embed.attend(x)
  else:
    logits = dense(x, model.head[...].astype(cfg.compute_dtype))
  return logits.astype(jnp.float32), budget_lib.BudgetCache(
      layers=tuple(layers), n_seen=cache.n_seen + t,
      n_valid=jnp.minimum(cache.n_valid + t, cache.budget))


def _count(name, policy, shape):
  key = (name, policy, shape)
  TRACES[key] = TRACES.get(key, 0) + 1


@functools.partial(jax.jit, static_argnums=(0, 4), donate_argnums=2)
def extend_jit(graphdef, state, cache, tokens, policy: Policy):
  """extend under jit: a prefill chunk (T > 1) or a decode step (T = 1)."""
  _count("extend", policy, tokens.shape)
  return extend(nnx.merge(graphdef, state), cache, tokens, policy)


def decode_step(graphdef, state, cache, tokens, policy: Policy):
  """tokens [B, 1] -> (logits [B, V], cache). Traces once per policy and batch."""
  logits, cache = extend_jit(graphdef, state, cache, tokens, policy)
  return logits[:, -1], cache


def prefill(model, cache, tokens, policy: Policy, chunk: int = 0):
  """tokens [B, P] in chunks of `chunk` (default: the budget) so that no chunk holds more than
  budget + chunk slots at once -> (logits [B, P, V], cache)."""
  graphdef, state = nnx.split(model)
  chunk = chunk or cache.budget
  outs = []
  for start in range(0, tokens.shape[1], chunk):
    logits, cache = extend_jit(graphdef, state, cache, jnp.asarray(tokens[:, start:start + chunk],
                                                                   jnp.int32), policy)
    outs.append(logits)
  return jnp.concatenate(outs, axis=1), cache


@functools.partial(jax.jit, static_argnums=(0, 4), donate_argnums=2)
def stream_losses(graphdef, state, cache, tokens, policy: Policy):
  """Teacher-forced token-by-token decode: tokens [B, N + 1] -> (nats [B, N] of tokens[:, 1:],
  cache). One lax.scan of decode steps: the step traces once, whatever N."""
  _count("stream", policy, tokens.shape)
  model = nnx.merge(graphdef, state)

  def step(cache, pair):
    logits, cache = extend(model, cache, pair[0][:, None], policy)
    logp = jax.nn.log_softmax(logits[:, -1])
    return cache, -jnp.take_along_axis(logp, pair[1][:, None], axis=-1)[:, 0]

  cache, nats = jax.lax.scan(step, cache, (tokens[:, :-1].T, tokens[:, 1:].T))
  return nats.T, cache


@functools.partial(jax.jit, static_argnums=(0, 4, 5), donate_argnums=2)
def greedy(graphdef, state, cache, first, policy: Policy, steps: int):
  """Greedy continuation: first [B] token ids (argmax after the prompt) -> [B, steps] tokens."""
  _count("greedy", policy, (first.shape, steps))
  model = nnx.merge(graphdef, state)

  def step(carry, _):
    cache, tok = carry
    logits, cache = extend(model, cache, tok[:, None], policy)
    nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    return (cache, nxt), tok

  (cache, _), toks = jax.lax.scan(step, (cache, first), None, length=steps)
  return toks.T, cache
