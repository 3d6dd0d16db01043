r"""The earlier cpu sweep's variants at GPT-2-small scale (~110M params, 1.05B tokens): not run.

  # once: a BPE-tokenized corpus of several GB (e.g. FineWeb-Edu or OpenWebText as text files)
  python scripts/prepare_data.py --source=text --path='data/fineweb_edu/*.txt' --tokenizer=bpe \
      --vocab_size=32768 --out=data/fineweb_edu_bpe32k
  python scripts/compare.py --sweep=gpu --out=docs/results/gpu --runs_dir=runs/sweep_gpu

Every run: D=768, L=12, H=12 (head dim K=64), seq_len 1024, global batch 256 (262,144 tokens
per step, in 4 microbatches), 4,000 steps = 1.05B tokens, bf16 compute with fp32 parameters,
remat (configs/lm.py size=125m). Per token per layer the cache holds (elements): MHA 2*H*K =
1536, GQA-2 4K = 256, MQA 2K = 128, MLA C + R with R = 32: C=224 -> 256 (= GQA-2), C=96 -> 128
(= MQA); query latent Q = 384 except mla_c224_noq. Parameters matched to MHA's within 3% through
d_ff (`python scripts/compare.py --sweep=gpu --params`; tests/test_eval.py checks it).
Cost: 6 * 110M params * 1.05B tokens ~ 7e17 FLOPs per run (+1/3 for remat): about 40-60 min on
one H100 at 30-40% of its bf16 peak, so ~4-6 hours for the 6 runs.
"""

from ml_collections import ConfigDict


def sweep(name: str, size: str, d: int, h: int, steps: int, d_ff: dict[str, int],
          train: dict) -> ConfigDict:
  """The six accelerator variants at configs/lm.py `size` (width d, h heads); d_ff per run keeps
  parameters within 3% of MHA's. Shared by this file and tpu.py."""
  q = d // 2  # query latent rank of the MLA runs that compress queries
  c = ConfigDict()
  c.name = name
  c.experiment = "configs/lm.py"
  c.steps = steps
  c.evals, c.ckpts, c.warmup_fraction = 20, 10, 0.05
  c.overrides = ConfigDict(dict(
      model=dict(vocab_size=32768, qk_rope_head_dim=d // h // 2),
      data=dict(source="tokens", path="data/fineweb_edu_bpe32k", seq_len=1024),
      train=dict(global_batch=256, eval_tokens=4_194_304, seed=0, **train),
  ))
  mla = lambda c_rank, q_rank: {"model.kv_lora_rank": c_rank, "model.q_lora_rank": q_rank}
  variants = [("mha", "mha", {}), ("gqa2", "gqa", {"model.n_kv_heads": 2}), ("mqa", "mqa", {}),
              ("mla_c224", "mla", mla(224, q)), ("mla_c96", "mla", mla(96, q)),
              ("mla_c224_noq", "mla", mla(224, 0))]
  c.runs = [(run, f"attn={attn},size={size}", {**extra, "model.d_ff": d_ff[run]})
            for run, attn, extra in variants]
  c.reference = "mha"
  c.param_tolerance = 0.03
  c.seeds = [0]  # the fair protocol's seeds and learning-rate phase are not applied here yet
  c.decode_lengths = "256,512,1024"
  c.decode_rounds = 3  # final decode timing: all runs interleaved, this many rounds
  c.decode_steps = 64
  c.eval_max_tokens = 0
  return c


def get_config() -> ConfigDict:
  # 4 microbatches of 64 x 1024 tokens: the fp32 logits of 256 x 1024 tokens over a 32k
  # vocabulary alone would take 34 GB.
  return sweep("gpu", "125m", 768, 12, 4000,
               dict(mha=2048, gqa2=2472, mqa=2520, mla_c224=2264, mla_c96=2392, mla_c224_noq=2200),
               train=dict(microbatches=4))
