"""The comparison protocol in miniature, for tests and smoke checks (about a minute): MHA and MLA
at D=32, one layer; a learning-rate phase over two rates, then two seeds per variant.

  python scripts/compare.py --sweep=tiny --out=/tmp/tiny_sweep
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
  c = ConfigDict()
  c.name = "tiny"
  c.experiment = "configs/lm.py"
  c.steps = 8
  c.evals, c.ckpts, c.warmup_fraction = 2, 1, 0.25
  c.jobs = 2  # two train.py processes at once (the pool is part of what the test covers)
  c.overrides = ConfigDict(dict(
      model=dict(d_model=32, n_layers=1, n_heads=4, max_seq_len=128, qk_rope_head_dim=4),
      # 640 kB: at least the first 20 sorted stdlib files on Python 3.11 and 3.12, so that one
      # (abc.py on 3.11, _weakrefset.py on 3.12) is validation.
      data=dict(source="stdlib", tokenizer="bytes", seq_len=32, max_bytes=640_000),
      train=dict(global_batch=8, log_every=4, eval_tokens=512, peak_flops=2e11),
  ))
  c.runs = [
      ("mha", "attn=mha,size=tiny", {}),
      ("mla", "attn=mla,size=tiny", {"model.kv_lora_rank": 8, "model.q_lora_rank": 16}),
  ]
  c.reference = "mha"
  c.param_tolerance = 0.5  # not parameter-matched: a plumbing test
  c.lr_grid = [1e-3, 4e-3]  # tuning phase: each variant at each rate, tune_steps steps, seed 0
  c.tune_steps = 4
  c.tune_eval_tokens = 1024
  c.seeds = [0, 1]  # final runs: every variant at its chosen rate with each seed
  c.decode_lengths = "64,128"
  c.decode_rounds = 1  # final decode timing: all runs interleaved, this many rounds
  c.decode_steps = 8
  c.eval_max_tokens = 2048
  return c
