"""Cache-compression settings: which slots to keep (eviction policy), how to store them (quant).

A `Policy` is static (hashable): it is a jit static argument, so every policy traces its own
decode step once. Vocabulary: a layer's budget cache holds S = `budget` slots per KV group
(GQA/MQA: G groups, each with its own kept set; MHA: G = H; MLA: G = 1, one set of latent slots
per layer). Scores are per slot and group, [B, G, S]; larger keeps.

Eviction rule shared by every policy: the first `n_sink` tokens (attention sinks) and the `window`
most recent tokens are never evicted; among the rest the slot with the lowest keep score goes.
"""

from __future__ import annotations

import dataclasses

POLICIES = ("none", "streaming", "h2o", "tova", "snapkv", "l2norm", "vatp", "fastgen")
QUANTS = ("none", "int8", "int4")
POSITIONS = ("original", "cache")
# Published defaults (docs/kvcompress.md, REFERENCE.md section 5): StreamingLLM keeps 4 sinks;
# H2O splits its budget half heavy hitters, half recent window; SnapKV observes the last 32 queries
# and pools their votes with a kernel of 7; KIVI quantises in groups of 32 and keeps the most
# recent tokens in full precision. Byte-level models have no BOS: FastGen's special token is the
# first one.
DEFAULT_SINKS = {"streaming": 4, "none": 0, "fastgen": 1}  # FastGen: the first token is "special"
KIVI_GROUP = 32


class PolicyError(ValueError):
  """A bad compression setting: one line naming the flag."""


@dataclasses.dataclass(frozen=True)
class Policy:
  """How a budget cache keeps and stores its slots.

  name       eviction policy (POLICIES)
  budget     slots kept per layer and KV group; 0 -> no eviction (the whole context fits)
  n_sink     first tokens never evicted (-1: the policy's default, DEFAULT_SINKS or 0)
  window     most recent tokens never evicted (-1: the policy's default, `default_window`)
  positions  'original': every token keeps its true position (keys cached after RoPE);
             'cache': StreamingLLM's re-assignment, a token's position is its rank in the cache
             (keys re-rotated to it when read; queries at the rank after the last kept slot)
  quant      'none' | 'int8' | 'int4' storage of the main slots (quant.py)
  group      quantisation group (channels per scale for per-token scales, tokens per scale for
             KIVI's per-channel key scales)
  n_recent   most recent tokens also kept in full precision when quantised (-1: `group`)
  obs_window SnapKV's observation window (the last queries of a prefill chunk that vote)
  pool       SnapKV's 1-D pooling kernel over the votes (odd)
  recovery   FastGen's attention-recovery threshold T
  punct_ids  FastGen's punctuation token ids (from the tokenizer)
  """
  name: str = "none"
  budget: int = 0
  n_sink: int = -1
  window: int = -1
  positions: str = "original"
  quant: str = "none"
  group: int = KIVI_GROUP
  n_recent: int = -1
  obs_window: int = 32
  pool: int = 7
  recovery: float = 0.95
  punct_ids: tuple = ()

  @property
  def sinks(self) -> int:
    return DEFAULT_SINKS.get(self.name, 0) if self.n_sink < 0 else self.n_sink

  @property
  def recent(self) -> int:
    """Tokens never evicted at the end of the sequence (>= 1: the newest token always stays)."""
    return default_window(self) if self.window < 0 else self.window

  @property
  def fp_recent(self) -> int:
    """Most recent tokens read in full precision from the ring buffer (0 without quantisation)."""
    if self.quant == "none":
      return 0
    wanted = self.group if self.n_recent < 0 else self.n_recent
    # With eviction the ring may only hold tokens the window protects (they are still cached).
    return min(wanted, self.recent) if self.budget else wanted

  @property
  def bits(self) -> int:
    return {"int8": 8, "int4": 4}.get(self.quant, 0)


def default_window(p: Policy) -> int:
  """Recent window when --window is not given: H2O / VATP half the budget (H2O's 50/50 split),
  SnapKV its observation window, StreamingLLM everything after the sinks, others the newest one."""
  if p.name in ("h2o", "vatp"):
    return max(1, p.budget // 2 - p.sinks // 2)
  if p.name == "snapkv":
    return max(1, min(p.obs_window, p.budget - p.sinks))
  if p.name in ("streaming", "none"):
    return max(1, p.budget - p.sinks)
  return 1


def validate(p: Policy, context: int | None = None) -> Policy:
  """Raises PolicyError (one line naming the flag) for a setting that cannot work."""
  if p.name not in POLICIES:
    raise PolicyError(f"--cache_policy: unknown policy {p.name!r}; choose one of "
                      f"{', '.join(POLICIES)}")
  if p.quant not in QUANTS:
    raise PolicyError(f"--cache_quant: unknown quantisation {p.quant!r}; choose one of "
                      f"{', '.join(QUANTS)}")
  if p.positions not in POSITIONS:
    raise PolicyError(f"--cache_positions: {p.positions!r} is not one of {POSITIONS}")
  if p.budget < 0:
    raise PolicyError(f"--cache_budget: must be >= 0, got {p.budget}")
  if p.budget and p.budget < p.sinks + p.recent:
    raise PolicyError(f"--cache_budget: {p.budget} is below sinks + window = {p.sinks} + "
                      f"{p.recent}; the cache could not keep them")
  if p.window == 0:
    raise PolicyError("--cache_window: must be >= 1 (the newest token is always kept)")
  if p.quant != "none":
    if p.group <= 0:
      raise PolicyError(f"--cache_group: must be positive, got {p.group}")
    if p.quant == "int4" and p.group % 2:
      raise PolicyError(f"--cache_group: int4 packs two codes per byte, so the group must be "
                        f"even, got {p.group}")
  if p.name == "snapkv" and (p.pool < 1 or p.pool % 2 == 0):
    raise PolicyError(f"--cache_pool: SnapKV's pooling kernel must be odd and positive, got "
                      f"{p.pool}")
  if p.name == "fastgen" and not 0 < p.recovery <= 1:
    raise PolicyError(f"--cache_recovery: must lie in (0, 1], got {p.recovery}")
  if context is not None and p.budget > context:
    return dataclasses.replace(p, budget=context)
  return p


def parse_budget(text: str, context: int) -> int:
  """'256' -> 256 slots; '0.25' -> a quarter of the context (at least 1); '0' -> no eviction."""
  try:
    value = float(text)
  except ValueError:
    raise PolicyError(f"--cache_budget: {text!r} is neither a token count nor a fraction") from None
  if value < 0 or (value >= 1 and value != int(value)):
    raise PolicyError(f"--cache_budget: {text!r} must be a whole number of tokens or a fraction "
                      "in (0, 1)")
  return int(value) if value >= 1 or value == 0 else max(1, round(value * context))


def make(name: str = "none", budget: int = 0, quant: str = "none", context: int | None = None,
         **kw) -> Policy:
  """A validated Policy; unknown keywords are programming errors (TypeError)."""
  return validate(Policy(name=name, budget=budget, quant=quant, **kw), context)
