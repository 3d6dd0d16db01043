"""Generation: one jitted prefill, then a jitted decode loop (lax.while_loop, traced once).

    outputs = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=20, temperature=0.8, top_k=40)

Sampling settings are traced values, so changing them does not recompile. With `mesh=` (a mesh
from core.sharding.make_mesh) the parameters and the cache live on the mesh: the cache is created
sharded (batch over data / fsdp, kv heads over tensor, length over sequence) and a
sequence-sharded cache is attended shard by shard (core.decode_sharded, through the DecodePlan
of core.decode_plan that generate passes to model.extend).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mla_jax.core import cache as cache_lib
from mla_jax.core import sharding as shd
from mla_jax.core.decode_plan import DecodePlan, round_up_slots
from mla_jax.core.model import init_cache


def decode_step(graphdef, state, cache: cache_lib.Cache, tokens: jax.Array,
                plan: DecodePlan | None = None):
  """One token per sequence: tokens [B, 1] -> (logits [B, V] float32, updated cache). With a
  plan the cache keeps its mesh shardings (pinned, so no step gathers it)."""
  model = nnx.merge(graphdef, state)
  logits, cache = model.extend(tokens, cache, plan=plan)
  return logits[:, -1], _pin(cache, plan)


decode_step_jit = jax.jit(decode_step, static_argnums=(0, 4), donate_argnums=2)


def _pin(cache: cache_lib.Cache, plan) -> cache_lib.Cache:
  """The cache constrained to its mesh shardings (GSPMD could otherwise re-place the carry)."""
  if plan is None:
    return cache
  return jax.lax.with_sharding_constraint(cache, plan.cache_shardings(cache))


def sample_logits(logits: jax.Array, rng: jax.Array, temperature, top_k, top_p) -> jax.Array:
  """logits [B, V] -> token ids [B] int32. temperature 0 is greedy; top_k 0 and top_p 1 disable."""
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / jnp.maximum(temperature, 1e-6)
  desc = jnp.sort(scaled, axis=-1)[:, ::-1]
  # top-k: drop everything below the k-th largest logit.
  kth = jnp.take_along_axis(desc, jnp.clip(top_k - 1, 0, logits.shape[-1] - 1)[None, None]
                            .repeat(logits.shape[0], 0), axis=-1)
  scaled = jnp.where((top_k > 0) & (scaled < kth), -jnp.inf, scaled)
  # top-p: keep the smallest prefix of sorted tokens whose probability mass reaches p.
  probs = jax.nn.softmax(jnp.where((top_k > 0) & (desc < kth), -jnp.inf, desc), axis=-1)
  keep = jnp.cumsum(probs, axis=-1) - probs < top_p
  cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
  scaled = jnp.where(scaled < cutoff, -jnp.inf, scaled)
  sampled = jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)
  return jnp.where(temperature > 0, sampled, greedy)


@functools.partial(jax.jit, static_argnums=(0, 5, 11, 12))
def _generate(graphdef, state, cache, prompts, lengths, max_new_tokens, rng, eos_id, temperature,
              top_k, top_p, plan=None, keep_logits=False):
  model = nnx.merge(graphdef, state)
  logits, cache = model.extend(prompts, cache, n_valid=lengths, plan=plan)
  # Prompts are right-padded: take each one's last real logit, then rewind the fill level to it.
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
  cache = _pin(cache.replace(lengths=lengths), plan)
  b = prompts.shape[0]
  out = jnp.zeros((b, max_new_tokens), jnp.int32)
  # keep_logits: the distribution each new token was drawn from, [B, max_new_tokens, V].
  seen = jnp.zeros((b, max_new_tokens if keep_logits else 0, last.shape[-1]), jnp.float32)

  def cond(carry):
    i, _, _, _, done, _, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, logits, cache, out, done, rng, seen = carry
    rng, key = jax.random.split(rng)
    tok = sample_logits(logits, key, temperature, top_k, top_p)
    tok = jnp.where(done, jnp.maximum(eos_id, 0), tok)  # finished rows keep emitting EOS
    out = out.at[:, i].set(tok)
    if keep_logits:
      seen = seen.at[:, i].set(logits)
    done = done | (tok == eos_id)
    logits, cache = decode_step(graphdef, state, cache, tok[:, None], plan)
    return i + 1, logits, cache, out, done, rng, seen

  carry = (0, last, cache, out, jnp.zeros((b,), bool), rng, seen)
  n, _, _, out, _, _, seen = jax.lax.while_loop(cond, body, carry)
  return out, n, seen


def generate(model: nnx.Module, prompts, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None, seed: int = 0,
             max_len: int | None = None, mesh=None, rules=None, sharded_impl: str = "shard_map",
             return_logits: bool = False):
  """Continues each prompt (a list of token-id lists, lengths may differ) by up to max_new_tokens.

  Stops a sequence at eos_id (included in its output) and the batch when all have stopped.
  Returns one list of new token ids per prompt; with return_logits, (that list, logits [B, n, V]
  float32 numpy: the logits each new token was chosen from).

  mesh (core.sharding.make_mesh) places parameters (core.sharding's table, or `rules`) and the
  cache on the mesh; a `sequence` axis splits the cache length, rounded up to a multiple of it.
  sharded_impl: 'shard_map' (per-shard attention merged by log-sum-exp) or 'gspmd' (the plain
  einsums, partitioned by XLA), see core.decode_plan.
  """
  cfg = model.cfg
  prompts = [list(map(int, p)) for p in prompts]
  if not prompts or min(map(len, prompts)) == 0:
    raise ValueError("prompts: need at least one non-empty prompt")
  longest = max(map(len, prompts))
  max_len = max_len or cfg.max_seq_len
  if longest + max_new_tokens > min(max_len, cfg.max_seq_len):
    raise ValueError(f"max_seq_len: prompt of {longest} tokens + max_new_tokens={max_new_tokens} "
                     f"exceeds the model's max_seq_len={min(max_len, cfg.max_seq_len)}")
  if max(max(p) for p in prompts) >= cfg.vocab_size or min(min(p) for p in prompts) < 0:
    raise ValueError(f"prompts: token ids must lie in [0, vocab_size={cfg.vocab_size})")
  padded = np.zeros((len(prompts), longest), np.int32)
  for i, p in enumerate(prompts):
    padded[i, :len(p)] = p
  lengths = np.array([len(p) for p in prompts], np.int32)
  graphdef, state = nnx.split(model)
  slots = longest + max_new_tokens
  prompts_in, lengths_in = jnp.asarray(padded), jnp.asarray(lengths)
  plan = None
  if mesh is None:
    cache = init_cache(cfg, len(prompts), slots)
  else:
    plan = DecodePlan.make(mesh, rules, sharded_impl)
    if plan.seq_shards > slots:  # more shards than slots: one line naming the flag
      plan.check_cache_length(slots)
    state = jax.device_put(state, shd.param_shardings(state, mesh, plan.rules_dict))
    cache = init_cache(cfg, len(prompts), round_up_slots(slots, plan), plan)
    b_axes = plan.batch_spec(len(prompts))
    prompts_in = jax.device_put(prompts_in, NamedSharding(mesh, PartitionSpec(b_axes, None)))
    lengths_in = jax.device_put(lengths_in, NamedSharding(mesh, PartitionSpec(b_axes)))
  out, n, seen = _generate(graphdef, state, cache, prompts_in, lengths_in, max_new_tokens,
                           jax.random.key(seed), jnp.int32(-1 if eos_id is None else eos_id),
                           jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p), plan,
                           return_logits)
  out = np.asarray(out)[:, :int(n)]
  results = []
  for row in out.tolist():
    if eos_id is not None and eos_id in row:
      row = row[:row.index(eos_id) + 1]
    results.append(row)
  return (results, np.asarray(seen)[:, :int(n)]) if return_logits else results
