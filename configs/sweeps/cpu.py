r"""The CPU comparison under the fair protocol: MHA, GQA-2, MQA, MLA at three cache sizes, each at
its own tuned learning rate, three seeds, parameters and tokens matched. The trained-in
alternatives (YOCO) are a sweep of their own on the same runs (configs/sweeps/cpu_trained_in.py).

  python3 scripts/compare.py --sweep=cpu --out=docs/results/cpu --runs_dir=runs/sweep_cpu
  python3 scripts/compare.py --sweep=cpu --params        # parameter counts and matching d_ff

Every run: width D=96, L=4 layers, H=4 heads (head dim K=24), seq_len 256, batch 16 (4,096
tokens per step), byte tokens of the first 4 MB of the Python standard library (validation =
every 20th file, scored whole). Parameters (~0.47M) are matched to MHA's within 3% by d_ff alone.

KV cache per token per layer (elements): MHA 2HK = 192; GQA-2 2*2*K = 96 (50%); MQA 2K = 48
(25%); MLA C + R with one shared rope key of R = 8: C=88 -> 96 (= GQA-2), C=40 -> 48 (= MQA),
C=16 -> 24 (12.5% of MHA, below MQA). MLA compresses queries to Q = 48 (D/2).

Protocol:
  1. learning rate: every variant at lr 1e-3, 2e-3, 4e-3, 8e-3 (8x span) for 144 steps (0.59M
     tokens, a quarter of the final budget), seed 0, scored on 65,536 validation tokens; each
     variant's final runs use its best rate; warmup is 20% of the steps in both phases;
  2. final runs: 576 steps = 2.36M tokens per run (5.0 tokens per parameter), seeds 0, 1, 2;
  3. every final run evaluated on the whole validation split, decode timed interleaved.

Budget: two runs train at once (jobs = 2: at least 1.28x the throughput of one on 2 cores, see
evaluation.sweep.train_in_order); each report records the wall time of the command that wrote
it, per phase (docs/results/cpu/report.md, Setup). Measured on the 2-core CPU: 20.4 min for the 24
tuning runs + 55.4 min for the 18 final runs with evaluation and decode timing = 75.8 min (one
job at a time: ~100 min).
"""

from ml_collections import ConfigDict

D, L, H = 96, 4, 4
R = 8  # rope dims of every MLA variant
Q = D // 2  # query latent rank


def get_config() -> ConfigDict:
  c = ConfigDict()
  c.name = "cpu"
  c.experiment = "configs/lm.py"  # each run's arg below is this file's get_config argument
  c.steps = 576
  # Eval/checkpoint cadence and warmup follow steps. Warmup is 20% (29 steps in tuning, 115 in the
  # final runs): with 5% (7 tuning steps) MLA's layer-0 attention collapsed at lr 8e-3 and the
  # grid would have ruled out rates it trains best at (docs/results/cpu/stability.md).
  c.evals, c.ckpts, c.warmup_fraction = 8, 2, 0.2
  c.jobs = 2  # train.py processes at once
  c.overrides = ConfigDict(dict(
      model=dict(d_model=D, n_layers=L, n_heads=H, max_seq_len=1024, qk_rope_head_dim=R),
      data=dict(source="stdlib", tokenizer="bytes", seq_len=256, max_bytes=4_000_000),
      train=dict(global_batch=16, log_every=16, eval_tokens=32768, keep_ckpts=1),
  ))
  mla = lambda rank, d_ff: {"model.kv_lora_rank": rank, "model.q_lora_rank": Q, "model.d_ff": d_ff}
  # (name, configs/lm.py argument, overrides). d_ff matches MHA's total parameters (within 3%).
  c.runs = [
      ("mha", "attn=mha,size=small", {"model.d_ff": 256}),
      ("gqa2", "attn=gqa,size=small", {"model.n_kv_heads": 2, "model.d_ff": 288}),
      ("mqa", "attn=mqa,size=small", {"model.d_ff": 304}),
      ("mla_c88", "attn=mla,size=small", mla(88, 224)),
      ("mla_c40", "attn=mla,size=small", mla(40, 272)),
      ("mla_c16", "attn=mla,size=small", mla(16, 296)),
  ]
  c.reference = "mha"  # parameter matching and "cache as % of" are relative to this run
  c.param_tolerance = 0.03
  c.lr_grid = [1e-3, 2e-3, 4e-3, 8e-3]
  c.tune_steps = 144
  c.tune_eval_tokens = 65536
  c.seeds = [0, 1, 2]
  c.decode_lengths = "128,256,512,1024"
  c.decode_rounds = 3  # final decode timing: all runs interleaved, this many rounds
  c.decode_steps = 32
  c.eval_max_tokens = 0  # the whole validation split
  return c
