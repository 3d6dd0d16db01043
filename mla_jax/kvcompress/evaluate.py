"""Quality, bytes and speed of a model under a cache policy (what eval.py --cache_policy reports).

  streaming_bpb   the validation text decoded token by token over windows several times the budget
                  with the policy active (StreamingLLM's long-text protocol), teacher forced
  prefix_bpb      ordinary windows of seq_len: the first part prefilled into the budget cache
                  (compressed in chunks), the rest scored in one chunk against it; next to the same
                  protocol without compression
  passkey         filler text with "The pass key is K." at a random depth, then the question;
                  greedy decode, exact match (generated locally, no download)
  ratio_grid      kvpress's leaderboard grid: 0.25 / 0.5 / 0.75 / 0.875 of the compressed context
                  (prefix_bpb's prefix; the passkey prompt) evicted
  decode timing   ms per decode step with the cache at its budget, against no eviction and against
                  the model's own (uncompressed) decode step: the bookkeeping's overhead
Effective bytes per token = the budget cache's bytes (values, scales, rings and bookkeeping, all
layers) over the tokens of context it stands for (prefix_bpb: the prefix).
"""

from __future__ import annotations

import dataclasses
import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mla_jax.core import generate as core_generate
from mla_jax.core.model import init_cache
from mla_jax.evaluation.decode_speed import step_times
from mla_jax.kvcompress import budget as budget_lib
from mla_jax.kvcompress import decode
from mla_jax.kvcompress.policy import Policy, validate

RATIOS = (0.25, 0.5, 0.75, 0.875)  # kvpress: the fraction of the context evicted
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")
PUNCTUATION = ".,;:!?\n"


def bits_per_byte(nats: float, bytes_per_token: float) -> float:
  return nats / math.log(2) / bytes_per_token


def with_budget(policy: Policy, budget: int, context: int) -> Policy:
  return validate(dataclasses.replace(policy, budget=budget), context)


def effective_bytes_per_token(cfg, policy: Policy, context: int) -> dict:
  """Bytes the budget cache holds per token of a `context`-token sequence (all layers)."""
  cache = jax.eval_shape(lambda: budget_lib.init_cache(cfg, policy, 1, context))
  per = budget_lib.stored_bytes_per_slot(cfg, policy)
  g, slots = budget_lib.kv_groups(cfg), cache.budget
  total = budget_lib.cache_bytes(cache)
  values = per["values"] * g * slots * cfg.n_layers / context
  book = per["bookkeeping"] * g * slots * cfg.n_layers / context
  return {"total": total / context, "values": values, "bookkeeping": book,
          "ring": total / context - values - book, "slots": slots}


def _windows(val: np.ndarray, length: int, n: int) -> np.ndarray:
  """n windows of `length` tokens spread evenly over the split -> [n, length] int32."""
  starts = np.linspace(0, len(val) - length, n).astype(int)
  return np.stack([val[s:s + length] for s in starts]).astype(np.int32)


def streaming_bpb(model, val, bytes_per_token: float, policy: Policy, tokens: int,
                  windows: int = 1) -> dict:
  """Token-by-token teacher-forced decode over `windows` windows of `tokens` tokens."""
  batch = _windows(val, tokens + 1, windows)
  cache = budget_lib.init_cache(model.cfg, policy, windows, tokens + 1)
  graphdef, state = nnx.split(model)
  nats, _ = decode.stream_losses(graphdef, state, cache, jnp.asarray(batch), policy)
  nats = np.asarray(nats)
  s = cache.budget
  out = {"bpb": bits_per_byte(float(nats.mean()), bytes_per_token), "tokens": int(nats.size),
         "budget": s}
  if tokens > s:  # after the cache first fills: the part that evicts
    out["bpb_after_budget"] = bits_per_byte(float(nats[:, s:].mean()), bytes_per_token)
  return out


def scored_bpb(logits, batch, prefix: int, bytes_per_token: float) -> float:
  """Bits per byte of logits [B, N, V] predicting batch[:, prefix + 1:] (windows of N + prefix
  + 1 tokens): the scored part of prefix_bpb / own_cache_bpb."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  nats = -jnp.take_along_axis(logp, batch[:, prefix + 1:, None], axis=-1)[..., 0]
  return bits_per_byte(float(nats.mean()), bytes_per_token)


def prefix_bpb(model, val, bytes_per_token: float, policy: Policy, seq_len: int, windows: int,
               scored: int) -> dict:
  """Windows of seq_len + 1: the first seq_len - scored tokens prefilled into the budget cache,
  the last `scored` predicted in one chunk against it -> bpb of those predictions."""
  batch = jnp.asarray(_windows(val, seq_len + 1, windows))
  prefix = seq_len - scored
  cache = budget_lib.init_cache(model.cfg, policy, windows, seq_len)
  _, cache = decode.prefill(model, cache, batch[:, :prefix], policy)
  logits, _ = decode.prefill(model, cache, batch[:, prefix:seq_len], policy, chunk=scored)
  return {"bpb": scored_bpb(logits, batch, prefix, bytes_per_token), "prefix": prefix,
          "scored": scored, "windows": windows}


def own_cache_bpb(model, val, bytes_per_token: float, seq_len: int, windows: int,
                  scored: int) -> dict:
  """prefix_bpb for a model whose cache is compressed by design (YOCO, DMC), which the budget
  caches do not cover: the same windows, prefix and scored tokens, through the model's own
  cache (model.extend). -> bpb and the bytes per prefix token that cache holds after the
  prefix: YOCO its global cache and window rings (config.kv_cache_bytes at the prefix length);
  DMC the slots its hard decisions used ("bytes_per_token") and, as allocated by the
  fixed-shape buffers, "allocated_bytes_per_token"."""
  from mla_jax.core import dmc as dmc_lib
  from mla_jax.core.config import kv_cache_bytes

  cfg = model.cfg
  batch = jnp.asarray(_windows(val, seq_len + 1, windows))
  prefix = seq_len - scored
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, tokens):
    m = nnx.merge(graphdef, state)
    _, cache = m.extend(tokens[:, :prefix], init_cache(cfg, windows, seq_len))
    logits, _ = m.extend(tokens[:, prefix:seq_len], cache)
    return logits, cache

  logits, cache = run(state, batch)
  out = {"bpb": scored_bpb(logits, batch, prefix, bytes_per_token), "prefix": prefix,
         "scored": scored, "windows": windows}
  if cfg.dmc:
    stats = dmc_lib.compression_stats(cache, cfg)
    out.update(bytes_per_token=stats["bytes_used"] / stats["tokens"],
               allocated_bytes_per_token=kv_cache_bytes(cfg, prefix) / prefix,
               compression=stats["compression"])
  else:
    out["bytes_per_token"] = kv_cache_bytes(cfg, prefix) / prefix
  return out


def passkey_prompts(tokenizer, length: int, n: int, seed: int = 0):
  """n prompts of exactly `length` tokens -> (tokens [n, length] int32, keys: list of str)."""
  rng = np.random.default_rng(seed)
  enc = lambda text: np.asarray(tokenizer.encode(text), np.int32)
  question = enc("What is the pass key? The pass key is")
  filler = enc(FILLER * (length // 8 + 2))
  prompts, keys = [], []
  for _ in range(n):
    key = str(rng.integers(10000, 100000))
    line = enc(f"The pass key is {key}. Remember it. {key} is the pass key. ")
    room = length - len(line) - len(question)
    if room < 0:
      raise ValueError(f"--passkey_lengths: {length} tokens cannot hold the key and the question")
    before = int(rng.integers(0, room + 1))  # the key's depth
    prompts.append(np.concatenate([filler[:before], line, filler[before:room], question]))
    keys.append(key)
  return np.stack(prompts), keys


def passkey(model, tokenizer, policy: Policy, length: int, trials: int = 8, seed: int = 0) -> dict:
  """Accuracy of greedy retrieval: the decoded continuation, stripped, starts with the key."""
  prompts, keys = passkey_prompts(tokenizer, length, trials, seed)
  steps = len(tokenizer.encode(" " + keys[0])) + 1
  cache = budget_lib.init_cache(model.cfg, policy, trials, length + steps)
  logits, cache = decode.prefill(model, cache, jnp.asarray(prompts), policy)
  first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
  out, _ = decode.greedy(*nnx.split(model), cache, first, policy, steps)
  texts = [tokenizer.decode(row.tolist()) for row in np.asarray(out)]
  hits = [t.strip().startswith(k) for t, k in zip(texts, keys)]
  return {"length": length, "accuracy": float(np.mean(hits)), "trials": trials,
          "budget": cache.budget, "sample": texts[0]}


def decode_ms(model, policy: Policy, context: int, steps: int = 16) -> dict:
  """Median ms per decode step at batch 1 once `context` tokens went in (decode_speed.step_times):
  this policy, no eviction (the same code, budget = context), and the model's own cache
  (core.generate.decode_step)."""
  cfg = model.cfg
  graphdef, state = nnx.split(model)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, context + steps)),
                       jnp.int32)

  def timed(step, cache):  # one warm-up step (the compile) at position context
    times, _, _ = step_times(step, cache, tokens[:, context - 1:], steps)
    return 1e3 * statistics.median(times)

  out = {}
  for name, p in (("policy", policy), ("no_eviction", dataclasses.replace(policy, name="none",
                                                                          budget=0, quant="none"))):
    cache = budget_lib.init_cache(cfg, p, 1, context + steps + 1)
    _, cache = decode.prefill(model, cache, tokens[:, :context], p, chunk=min(context, 256))
    out[name] = timed(lambda c, t, p=p: decode.decode_step(graphdef, state, c, t, p), cache)
  cache = init_cache(cfg, 1, context + steps + 1)
  _, cache = jax.jit(lambda s, c, t: nnx.merge(graphdef, s).extend(t, c))(state, cache,
                                                                          tokens[:, :context])
  out["model"] = timed(lambda c, t: core_generate.decode_step_jit(graphdef, state, c, t), cache)
  out["overhead_vs_model"] = out["policy"] / out["model"] - 1
  return out


def punct_ids(tokenizer) -> tuple:
  """Token ids of single punctuation characters (FastGen's punctuation set)."""
  ids = set()
  for ch in PUNCTUATION:
    enc = tokenizer.encode(ch)
    if len(enc) == 1:
      ids.add(int(enc[0]))
  return tuple(sorted(ids))


def evaluate_policy(model, tokenizer, val, bytes_per_token: float, policy: Policy, seq_len: int,
                    *, stream_tokens: int = 0, windows: int = 4, passkey_lengths=(),
                    passkey_trials: int = 8, grid: bool = True, time_decode: bool = True,
                    progress=None) -> dict:
  """Everything for one policy (budget already resolved in tokens); JSON-able."""
  say = progress or (lambda text: None)
  cfg = model.cfg
  if policy.name == "fastgen" and not policy.punct_ids and tokenizer is not None:
    policy = dataclasses.replace(policy, punct_ids=punct_ids(tokenizer))
  full = dataclasses.replace(policy, name="none", budget=0, quant="none")
  scored = seq_len // 2
  out = {"policy": {k: v for k, v in dataclasses.asdict(policy).items() if k != "punct_ids"},
         "window": policy.recent, "sinks": policy.sinks}
  out["bytes_per_token"] = effective_bytes_per_token(cfg, policy, seq_len - scored)
  out["bytes_per_token_uncompressed"] = effective_bytes_per_token(cfg, full, seq_len)["values"]
  say(f"prefix bpb ({policy.name}, budget {policy.budget}, {policy.quant})")
  out["prefix_bpb"] = prefix_bpb(model, val, bytes_per_token, policy, seq_len, windows, scored)
  out["prefix_bpb_uncompressed"] = prefix_bpb(model, val, bytes_per_token, full, seq_len, windows,
                                              scored)
  if stream_tokens:
    say(f"streaming bpb over {stream_tokens} tokens")
    out["streaming"] = streaming_bpb(model, val, bytes_per_token, policy, stream_tokens)
  out["passkey"] = []
  for length in passkey_lengths:
    say(f"passkey at {length} tokens")
    p = with_budget(policy, policy.budget, length)
    out["passkey"].append(passkey(model, tokenizer, p, length, passkey_trials))
  if grid:
    out["ratio_grid"] = []
    for ratio in RATIOS:
      prefix = seq_len - scored  # the compressed context
      b = max(policy.sinks + policy.recent, round((1 - ratio) * prefix))
      p = with_budget(policy, b, seq_len)
      say(f"ratio {ratio}: budget {b}")
      row = {"ratio": ratio, "budget": b,
             "bpb": prefix_bpb(model, val, bytes_per_token, p, seq_len, windows, scored)["bpb"],
             "bytes_per_token": effective_bytes_per_token(cfg, p, prefix)["total"]}
      if passkey_lengths:
        length = max(passkey_lengths)
        pb = max(p.sinks + p.recent, round((1 - ratio) * length))
        row["passkey"] = passkey(model, tokenizer, with_budget(p, pb, length), length,
                                 passkey_trials)["accuracy"]
      out["ratio_grid"].append(row)
  if time_decode:
    say("timing decode")
    out["decode_ms"] = decode_ms(model, policy, max(policy.budget, 16) * 2)
  return out


def format_rows(r: dict) -> list[tuple[str, str]]:
  """(label, text) rows for eval.py's table."""
  p = r["policy"]
  b = r["bytes_per_token"]
  context = r["prefix_bpb"]["prefix"]
  rows = [("cache_policy", f"{p['name']} budget {p['budget']} (sinks {r['sinks']}, window "
                           f"{r['window']}), quant {p['quant']}, positions {p['positions']}"),
          ("cache_bytes/token", f"{b['total']:.1f} effective at context {context} "
                                f"({b['values']:.1f} values + {b['bookkeeping']:.1f} "
                                f"bookkeeping + {b['ring']:.1f} full-precision ring; uncompressed "
                                f"{r['bytes_per_token_uncompressed']:.0f})"),
          ("prefix_bpb", f"{r['prefix_bpb']['bpb']:.4f} compressed vs "
                         f"{r['prefix_bpb_uncompressed']['bpb']:.4f} uncompressed")]
  if "streaming" in r:
    s = r["streaming"]
    rows.append(("streaming_bpb", f"{s['bpb']:.4f} over {s['tokens']} tokens"
                 + (f" ({s['bpb_after_budget']:.4f} after the cache filled)"
                    if "bpb_after_budget" in s else "")))
  for pk in r["passkey"]:
    rows.append((f"passkey@{pk['length']}", f"{pk['accuracy']:.2f} ({pk['trials']} trials, "
                                            f"budget {pk['budget']})"))
  for g in r.get("ratio_grid", []):
    rows.append((f"evict {g['ratio']}", f"budget {g['budget']}: bpb {g['bpb']:.4f}, "
                                        f"{g['bytes_per_token']:.1f} B/token"
                 + (f", passkey {g['passkey']:.2f}" if "passkey" in g else "")))
  if "decode_ms" in r:
    d = r["decode_ms"]
    rows.append(("decode_ms/token", f"{d['policy']:.2f} policy, {d['no_eviction']:.2f} no "
                                    f"eviction, {d['model']:.2f} model's own cache "
                                    f"({d['overhead_vs_model']:+.0%})"))
  return rows


def policy_from_flags(name: str, budget: str, quant: str, *, positions: str = "auto",
                      window: int = -1, sinks: int = -1, group: int = 32,
                      context: int | None = None) -> Policy:
  """Flags -> a validated Policy. Without `context` (before the workdir is read) a fractional
  budget is checked for form only. positions 'auto': 'cache' for streaming (StreamingLLM's
  re-assignment, so long streams stay inside the trained positions), else 'original'."""
  from mla_jax.kvcompress.policy import parse_budget

  if positions == "auto":
    positions = "cache" if name == "streaming" else "original"
  tokens = parse_budget(budget, context or 1 << 30)
  if context is None and 0 < float(budget) < 1:
    tokens = 0  # a fraction: its size is known once the context is
  return validate(Policy(name=name, budget=tokens, quant=quant, positions=positions,
                         window=window, n_sink=sinks, group=group), context)


def evaluate_workdir_policy(workdir: str, flags: dict, *, which: str = "latest",
                            data: str | None = None, progress=None) -> dict:
  """eval.py --cache_policy: loads the workdir's model, tokenizer and validation split, then
  evaluate_policy at the training seq_len (budget fractions: of the first half of a window).
  flags: name, budget, quant, positions, window, sinks, group (policy_from_flags), stream_tokens,
  windows, passkey_lengths, passkey_trials, grid."""
  from mla_jax.evaluation.workdir_eval import load_val, parse_data
  from mla_jax.storage.workdir import Workdir

  wd = Workdir.open(workdir)
  seq_len = wd.config["data"]["seq_len"]
  # The compressed context: prefix_bpb's prefix, the first half of a training window. A budget
  # fraction is of it (as in the ratio grid); a token budget is capped at it.
  policy = policy_from_flags(flags["name"], flags["budget"], flags["quant"],
                             positions=flags.get("positions", "auto"),
                             window=flags.get("window", -1), sinks=flags.get("sinks", -1),
                             group=flags.get("group", 32), context=seq_len - seq_len // 2)
  model = wd.load_model(which)
  budget_lib.check_model(model.cfg)
  val, bytes_per_token, _ = load_val(wd, parse_data(data, wd.config))
  lengths = tuple(min(n, model.cfg.max_seq_len) for n in flags.get("passkey_lengths", ()))
  stream = flags.get("stream_tokens", 0)
  if stream < 0:  # default: four budgets (StreamingLLM's protocol: several times the cache)
    stream = 4 * (policy.budget or seq_len)
  result = evaluate_policy(model, wd.tokenizer(), val, bytes_per_token, policy, seq_len,
                           stream_tokens=stream, windows=flags.get("windows", 4),
                           passkey_lengths=lengths, passkey_trials=flags.get("passkey_trials", 8),
                           grid=flags.get("grid", True), time_decode=flags.get("time", True),
                           progress=progress)
  return {"workdir": workdir, "variant": model.cfg.attention, "seq_len": seq_len, **result}
