r"""The CPU comparison: MHA, GQA-2, MQA and MLA (two latent ranks, with/without query compression).

  python scripts/compare.py --sweep=cpu --out=docs/results/cpu --runs_dir=runs/sweep_cpu

Every run: width D=128, L=4 layers, H=4 heads (head dim K=32), seq_len 256, batch 16, 200 steps
(819,200 tokens), byte tokens on the first 4 MB of the Python standard library (stdlib corpus,
validation = every 20th file, ~0.2 M tokens, scored whole). Parameter counts are matched to
MHA's within 3% by the MLP width d_ff alone (tests/test_eval.py checks it; `--params` prints
the counts and the matching d_ff).

KV cache per token per layer (float32 elements): MHA 2*H*K = 256; GQA-2 2*2*K = 128;
MQA 2*K = 64; MLA C + R with rope dim R = K/2 = 16: C=112 -> 128 (= GQA-2), C=48 -> 64 (= MQA).
The MLA runs compress queries with q_lora_rank 64 (D/2) except mla_c112_noq (q_lora_rank 0).

Budget: the whole sweep (8 trainings + evaluations) must fit in 60 min on a 2-core CPU. Timing
runs (50 steps of mha and mla_c112, with other jobs sharing the cores) took 1.0-1.4 s per
4096-token step, ~20 s of start-up and compilation per run, and ~45 s per run for the full-split
evaluation and decode timing: 8 x (200 x 1.3 + 20 + 45) s ~ 45 min on a shared machine, ~25 min
on an idle one.
"""

from ml_collections import ConfigDict

D, L, H = 128, 4, 4
Q = D // 2  # query latent rank of the MLA runs that compress queries


def get_config() -> ConfigDict:
  c = ConfigDict()
  c.name = "cpu"
  c.experiment = "configs/lm.py"  # each run's arg below is this file's get_config argument
  c.steps = 200
  c.evals, c.ckpts, c.warmup_fraction = 10, 2, 0.05  # eval/ckpt cadence and warmup follow steps
  c.overrides = ConfigDict(dict(
      model=dict(d_model=D, n_layers=L, n_heads=H, max_seq_len=1024, qk_rope_head_dim=D // H // 2),
      data=dict(source="stdlib", tokenizer="bytes", seq_len=256, max_bytes=4_000_000),
      optim=dict(lr=3e-3),
      train=dict(global_batch=16, log_every=10, eval_tokens=32768, keep_ckpts=2, seed=0),
  ))
  # (name, configs/lm.py argument, overrides). d_ff matches MHA's total parameters (within 3%).
  c.runs = [
      ("mha", "attn=mha,size=small", {"model.d_ff": 384}),
      ("gqa2", "attn=gqa,size=small", {"model.n_kv_heads": 2, "model.d_ff": 424}),
      ("mqa", "attn=mqa,size=small", {"model.d_ff": 448}),
      ("mla_c112", "attn=mla,size=small",
       {"model.kv_lora_rank": 112, "model.q_lora_rank": Q, "model.d_ff": 344}),
      ("mla_c48", "attn=mla,size=small",
       {"model.kv_lora_rank": 48, "model.q_lora_rank": Q, "model.d_ff": 408}),
      ("mla_c112_noq", "attn=mla,size=small",
       {"model.kv_lora_rank": 112, "model.q_lora_rank": 0, "model.d_ff": 328}),
  ]
  c.reference = "mha"  # parameter matching and "cache as % of" are relative to this run
  c.param_tolerance = 0.03
  # The two variants with the same cache (GQA-2 and MLA C+R = 4K) get a second seed each.
  c.seeds = {"gqa2": [1], "mla_c112": [1]}
  c.decode_lengths = "128,256,512,1024"
  c.decode_rounds = 3  # final decode timing: all runs interleaved, this many rounds
  c.decode_steps = 32
  c.eval_max_tokens = 0  # the whole validation split
  return c
