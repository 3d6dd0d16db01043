r"""The CPU comparison under the fair protocol: MHA, GQA-2, MQA, MLA at three cache sizes and YOCO
(key/value and latent global cache), each at its own tuned learning rate, three seeds, parameters
and tokens matched.

  python3 scripts/compare.py --sweep=cpu --out=docs/results/cpu --runs_dir=runs/sweep_cpu
  python3 scripts/compare.py --sweep=cpu --params        # parameter counts and matching d_ff

Every run: width D=96, L=4 layers, H=4 heads (head dim K=24), seq_len 256, batch 16 (4,096
tokens per step), byte tokens of the first 4 MB of the Python standard library (validation =
every 20th file, scored whole). Parameters (~0.47M) are matched to MHA's within 3% by d_ff alone.

KV cache per token per layer (elements): MHA 2HK = 192; GQA-2 2*2*K = 96 (50%); MQA 2K = 48
(25%); MLA C + R with one shared rope key of R = 8: C=88 -> 96 (= GQA-2), C=40 -> 48 (= MQA),
C=16 -> 24 (12.5% of MHA, below MQA). MLA compresses queries to Q = 48 (D/2). YOCO caches ONE
global entry per token for all 4 layers together: 2HK = 192 elements (yoco: 25% of MHA's 4 x 192)
or C + R = 48 (yoco_latent: 6.25%), plus two 64-slot window rings per sequence (constant, 37.5% /
18.8% of MHA's bytes at context 256 with them; docs/trained_in.md).

Protocol:
  1. learning rate: every variant at lr 1e-3, 2e-3, 4e-3, 8e-3 (8x span) for 144 steps (0.59M
     tokens, a quarter of the final budget), seed 0, scored on 65,536 validation tokens; each
     variant's final runs use its best rate; warmup is 20% of the steps in both phases;
  2. final runs: 576 steps = 2.36M tokens per run (5.0 tokens per parameter), seeds 0, 1, 2;
  3. every final run evaluated on the whole validation split, decode timed interleaved.

Budget (measured for the six MHA/GQA/MQA/MLA variants, docs/results/cpu/report.md): 24 tuning
runs of 65-90 s and 18 final runs of 200-230 s training + 6-40 s evaluation on the idle 2-core CPU,
~28 + 71 min ~ 100 min (10% over the 90-minute target: per-run start-up and compile, ~20 s, is a
third of a tuning run); the two YOCO variants add 8 tuning and 6 final runs, ~30 min (not yet run).
"""

from ml_collections import ConfigDict

D, L, H = 96, 4, 4
R = 8  # rope dims of every MLA variant
Q = D // 2  # query latent rank
YOCO_D_FF = {False: 272, True: 264}  # d_ff matching MHA's parameters: yoco, yoco_latent


def get_config() -> ConfigDict:
  c = ConfigDict()
  c.name = "cpu"
  c.experiment = "configs/lm.py"  # each run's arg below is this file's get_config argument
  c.steps = 576
  # Eval/checkpoint cadence and warmup follow steps. Warmup is 20% (29 steps in tuning, 115 in the
  # final runs): with 5% (7 tuning steps) MLA's layer-0 attention collapsed at lr 8e-3 and the
  # grid would have ruled out rates it trains best at (docs/results/cpu/stability.md).
  c.evals, c.ckpts, c.warmup_fraction = 8, 2, 0.2
  c.overrides = ConfigDict(dict(
      model=dict(d_model=D, n_layers=L, n_heads=H, max_seq_len=1024, qk_rope_head_dim=R),
      data=dict(source="stdlib", tokenizer="bytes", seq_len=256, max_bytes=4_000_000),
      train=dict(global_batch=16, log_every=16, eval_tokens=32768, keep_ckpts=1),
  ))
  mla = lambda rank, d_ff: {"model.kv_lora_rank": rank, "model.q_lora_rank": Q, "model.d_ff": d_ff}
  yoco = lambda latent=False: ({"model.yoco_window": 64, "model.d_ff": YOCO_D_FF[latent]}
                               | ({"model.yoco_latent": True, "model.kv_lora_rank": 40,
                                   "model.q_lora_rank": Q} if latent else {}))
  # (name, configs/lm.py argument, overrides). d_ff matches MHA's total parameters (within 3%).
  c.runs = [
      ("mha", "attn=mha,size=small", {"model.d_ff": 256}),
      ("gqa2", "attn=gqa,size=small", {"model.n_kv_heads": 2, "model.d_ff": 288}),
      ("mqa", "attn=mqa,size=small", {"model.d_ff": 304}),
      ("mla_c88", "attn=mla,size=small", mla(88, 224)),
      ("mla_c40", "attn=mla,size=small", mla(40, 272)),
      ("mla_c16", "attn=mla,size=small", mla(16, 296)),
      # YOCO (docs/trained_in.md): 2 sliding-window layers (W = 64, MHA heads), then 2 layers
      # cross-attending to ONE global cache: 4 kv heads (2HK = 192 elements per token for all
      # layers, 25% of MHA) or an MLA latent C=40 + R=8 (48, 6.25%); plus the constant window
      # rings, 2 * 64 * 192 elements per sequence. The cross layers have no K/V projections,
      # so d_ff grows to match.
      ("yoco", "attn=yoco,size=small", yoco()),
      ("yoco_latent", "attn=yoco,size=small", yoco(latent=True)),
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
