r"""The fair comparison at GPT-2-small scale (~110M params) on one GPU: the cpu sweep's protocol
and variants (MHA, GQA-2, MQA, MLA at GQA-2's, MQA's and half of MQA's cache). Not yet run.

  # once: a BPE-tokenized corpus of several GB (e.g. FineWeb-Edu or OpenWebText as text files)
  python scripts/prepare_data.py --source=text --path='data/fineweb_edu/*.txt' --tokenizer=bpe \
      --vocab_size=32768 --out=data/fineweb_edu_bpe32k
  python scripts/compare.py --sweep=gpu --out=docs/results/gpu --runs_dir=runs/sweep_gpu
  python scripts/compare.py --sweep=gpu --params      # parameter counts and matching d_ff

Every run: D=768, L=12, H=12 (head dim K=64), seq_len 1024, global batch 256 (262,144 tokens
per step, in 4 microbatches), bf16 compute with fp32 parameters, remat (configs/lm.py
size=125m). Per token per layer the cache holds (elements): MHA 2*H*K = 1536, GQA-2 4K = 256
(16.7%), MQA 2K = 128 (8.3%), MLA C + R with R = 32: C=224 -> 256 (= GQA-2), C=96 -> 128
(= MQA), C=32 -> 64 (4.2%, below MQA). Query latent Q = 384. Parameters matched to MHA's within
3% through d_ff (tests/test_eval.py checks it).

Protocol (as the cpu sweep): every variant at lr 3e-4, 6e-4, 1.2e-3, 2.4e-3 (8x span) for 500
steps (1/8 of the final budget), seed 0, scored on 1M validation tokens; then 4,000 steps
(1.05B tokens, ~9.5 per parameter) at each variant's best rate, seeds 0, 1, 2.

Expected wall time on one H100 (989 TFLOP/s dense bf16), assuming 35% MFU (not yet measured on
a GPU): training FLOPs per token (mla_jax.evaluation.perf.train_flops_per_token at seq_len 1024)
are 7.2e8 (MHA, GQA, MQA) and 7.3e8 (MLA), x 4/3 for remat's recomputed forward = 9.7e8; one
final run is 1.05B tokens x 9.7e8 = 1.0e18 FLOPs = ~49 min; 18 final runs + 24 tuning runs of
1/8 the tokens = 21 final-run equivalents = ~17 hours, plus evaluation (~2%). At 50% MFU: ~12
hours. One seed instead of three cuts it ~3x (edit `seeds`; the report then has no spread).
"""

from ml_collections import ConfigDict


def sweep(name: str, size: str, d: int, h: int, steps: int, d_ff: dict[str, int], train: dict,
          lr_grid: list[float], tune_steps: int) -> ConfigDict:
  """The six accelerator variants at configs/lm.py `size` (width d, h heads); d_ff per run keeps
  parameters within 3% of MHA's. Shared by this file and tpu.py."""
  rope = d // h // 2
  c = ConfigDict()
  c.name = name
  c.experiment = "configs/lm.py"
  c.steps = steps
  c.evals, c.ckpts, c.warmup_fraction = 20, 10, 0.05
  c.overrides = ConfigDict(dict(
      model=dict(vocab_size=32768, qk_rope_head_dim=rope),
      data=dict(source="tokens", path="data/fineweb_edu_bpe32k", seq_len=1024),
      train=dict(global_batch=256, eval_tokens=4_194_304, **train),
  ))
  mla = lambda c_rank: {"model.kv_lora_rank": c_rank, "model.q_lora_rank": d // 2}
  k = d // h
  # MLA ranks C with C + R equal to GQA-2's cache (4K), MQA's (2K) and half of MQA's (K).
  variants = [("mha", "mha", {}), ("gqa2", "gqa", {"model.n_kv_heads": 2}), ("mqa", "mqa", {}),
              (f"mla_c{4 * k - rope}", "mla", mla(4 * k - rope)),
              (f"mla_c{2 * k - rope}", "mla", mla(2 * k - rope)),
              (f"mla_c{k - rope}", "mla", mla(k - rope))]
  c.runs = [(run, f"attn={attn},size={size}", {**extra, "model.d_ff": d_ff[attn if attn != "mla"
                                                                          else run]})
            for run, attn, extra in variants]
  c.reference = "mha"
  c.param_tolerance = 0.03
  c.lr_grid = lr_grid
  c.tune_steps = tune_steps
  c.tune_eval_tokens = 1_048_576
  c.seeds = [0, 1, 2]
  c.decode_lengths = "256,512,1024"
  c.decode_rounds = 3  # final decode timing: all runs interleaved, this many rounds
  c.decode_steps = 64
  c.eval_max_tokens = 0
  return c


def get_config() -> ConfigDict:
  # 4 microbatches of 64 x 1024 tokens: the fp32 logits of 256 x 1024 tokens over a 32k
  # vocabulary alone would take 34 GB.
  return sweep("gpu", "125m", 768, 12, 4000,
               dict(mha=2048, gqa=2472, mqa=2520, mla_c224=2264, mla_c96=2392, mla_c32=2456),
               train=dict(microbatches=4), lr_grid=[3e-4, 6e-4, 1.2e-3, 2.4e-3], tune_steps=500)
