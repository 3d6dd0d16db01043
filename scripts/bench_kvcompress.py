r"""Decode ms/token under each cache policy: does the bookkeeping eat the savings? (issue 13)

  python scripts/bench_kvcompress.py --json=docs/results/cpu/bench_kvcompress.json
  python scripts/bench_kvcompress.py --context=4096 --budget=512 --variants=mla,mqa --steps=32

Random-weight models of the CPU comparison sweep's shape (width 128, 4 layers, 4 heads, byte
vocabulary; MLA C=48, R=16; GQA 2 kv heads). For each variant: the model's own decode step
(core.generate.decode_step_jit) with a cache of `context` tokens and of `budget` tokens (what a
cache of the budget's size costs without any bookkeeping), then the budget cache of
mla_jax/kvcompress with each policy after `context` tokens went in (the cache at its budget,
evicting every step). Timed by mla_jax.evaluation.decode_speed.step_times (each step alone, after
one warm-up step): the fastest of `rounds` median step times of `steps` steps each (robust to a
shared machine), batch 1.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS

POLICIES = ("none", "streaming", "h2o", "tova", "snapkv", "l2norm", "vatp", "fastgen",
            "h2o+int8", "h2o+int4")


def _time(step, cache, tokens, steps, rounds):
  """The fastest of `rounds` median step times (ms) of `steps` steps each (the least disturbed
  round: the machine may be shared), by decode_speed.step_times."""
  import statistics

  from mla_jax.evaluation.decode_speed import step_times

  medians = []
  for r in range(rounds):
    times, _, cache = step_times(step, cache, tokens, steps, warmup=1 if r == 0 else 0)
    medians.append(1e3 * statistics.median(times))
  return min(medians)


def bench_variant(variant: str, context: int, budget: int, steps: int, rounds: int,
                  policies) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from mla_jax.core.config import ModelConfig
  from mla_jax.core.generate import decode_step_jit
  from mla_jax.core.model import Transformer, init_cache
  from mla_jax.kvcompress import budget as budget_lib
  from mla_jax.kvcompress import decode, make

  kw = dict(vocab_size=256, d_model=128, n_layers=4, n_heads=4, max_seq_len=context + steps + 8,
            attention=variant if variant != "gqa" else "gqa")
  if variant == "gqa":
    kw["n_kv_heads"] = 2
  if variant == "mla":
    kw.update(kv_lora_rank=48, qk_rope_head_dim=16)
  cfg = ModelConfig(**kw)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(0)
  prompt = jnp.asarray(rng.integers(0, 256, (1, context)), jnp.int32)
  tokens = jnp.asarray(rng.integers(0, 256, (1, steps + 1)), jnp.int32)
  out = {"variant": variant, "context": context, "budget": budget}
  fill = jax.jit(lambda s, c, t: nnx.merge(graphdef, s).extend(t, c))
  for name, n in (("model_at_context", context), ("model_at_budget", budget)):
    cache = init_cache(cfg, 1, n + steps + 2)
    _, cache = fill(state, cache, prompt[:, :n])
    out[name] = _time(lambda c, t: decode_step_jit(graphdef, state, c, t), cache, tokens, steps,
                      rounds)
  out["policies"] = {}
  for label in policies:
    name, _, quant = label.partition("+")
    p = make(name, 0 if name == "none" else budget, quant=quant or "none")
    cache = budget_lib.init_cache(cfg, p, 1, context + steps + 2)
    _, cache = decode.prefill(model, cache, prompt, p, chunk=min(budget, context))
    out["policies"][label] = _time(lambda c, t, p=p: decode.decode_step(graphdef, state, c, t, p),
                                   cache, tokens, steps, rounds)
    print(f"{variant} {label}: {out['policies'][label]:.2f} ms/token", file=sys.stderr,
          flush=True)
  return out


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  variants = [v for v in FLAGS.variants.split(",") if v]
  policies = [p for p in FLAGS.policies.split(",") if p]
  bad = [v for v in variants if v not in ("mha", "gqa", "mqa", "mla")]
  if bad or not 0 < FLAGS.budget <= FLAGS.context:
    print("error: " + (f"--variants: unknown {bad[0]!r}" if bad else
                       f"--budget: must lie in (0, --context={FLAGS.context}]"), file=sys.stderr)
    sys.exit(1)
  unknown = [p for p in policies if p not in POLICIES]
  if unknown:
    print(f"error: --policies: unknown {unknown[0]!r}; choose from {POLICIES}", file=sys.stderr)
    sys.exit(1)
  import jax

  results = {"device": str(jax.devices()[0].device_kind), "steps": FLAGS.steps,
             "rounds": FLAGS.rounds, "runs": []}
  for v in variants:
    results["runs"].append(bench_variant(v, FLAGS.context, FLAGS.budget, FLAGS.steps,
                                         FLAGS.rounds, policies))
  print(f"ms per decode step, batch 1, context {FLAGS.context}, budget {FLAGS.budget}")
  print("| variant | model @ context | model @ budget | " + " | ".join(policies) + " |")
  print("|---|---|---|" + "---|" * len(policies))
  for r in results["runs"]:
    print(f"| {r['variant']} | {r['model_at_context']:.2f} | {r['model_at_budget']:.2f} | "
          + " | ".join(f"{r['policies'][p]:.2f}" for p in policies) + " |")
  if FLAGS.json:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
    with open(FLAGS.json, "w") as f:
      json.dump(results, f, indent=1)
    print(f"wrote {FLAGS.json}")


def define_flags():
  flags.DEFINE_string("variants", "mla,gqa,mqa", "Attention variants.")
  flags.DEFINE_string("policies", ",".join(POLICIES), "Policies ('h2o+int8': with quantisation).")
  flags.DEFINE_integer("context", 2048, "Tokens before timing.")
  flags.DEFINE_integer("budget", 256, "Cache slots per layer and KV group.")
  flags.DEFINE_integer("steps", 16, "Timed decode steps per round.")
  flags.DEFINE_integer("rounds", 5, "Rounds (the fastest is reported).")
  flags.DEFINE_string("json", None, "Also write the results here.")


if __name__ == "__main__":
  from mla_jax import host_memory
  from mla_jax.cli import parse_flags_or_exit

  host_memory.configure_entry_point()
  define_flags()
  app.run(main, flags_parser=parse_flags_or_exit)
