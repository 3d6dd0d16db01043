"""Inference-time KV-cache compression for every attention variant, MLA's latent included.

policy.py   the settings (eviction policy, budget, sinks / window, quantisation) and their checks
budget.py   the fixed-budget cache: [B, G, S, W] arrays, bookkeeping, quantised storage
quant.py    group-wise int8 / int4 quantisation (KIVI-style) and its bytes per token
evict.py    scores and eviction inside the jitted step
decode.py   the model run against a budget cache: chunked prefill, decode step, streaming scorer
Documentation: docs/kvcompress.md.
"""

from mla_jax.kvcompress.budget import BudgetCache, init_cache
from mla_jax.kvcompress.policy import POLICIES, QUANTS, Policy, PolicyError, make

__all__ = ["BudgetCache", "init_cache", "POLICIES", "QUANTS", "Policy", "PolicyError", "make"]
