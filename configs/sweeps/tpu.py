r"""The earlier cpu sweep's variants at ~340M params and 2.1B tokens on a TPU slice: not run.

  # once: a BPE-tokenized corpus of several GB (e.g. FineWeb-Edu or OpenWebText as text files)
  python scripts/prepare_data.py --source=text --path='data/fineweb_edu/*.txt' --tokenizer=bpe \
      --vocab_size=32768 --out=data/fineweb_edu_bpe32k
  python scripts/compare.py --sweep=tpu --out=docs/results/tpu --runs_dir=runs/sweep_tpu

Every run: D=1024, L=24, H=16 (head dim K=64), seq_len 1024, global batch 256 (262,144 tokens
per step), 8,000 steps = 2.1B tokens, bf16 compute with fp32 parameters, remat (configs/lm.py
size=350m). The mesh is data-parallel over the slice by default; on a v4-32 / v5e-32 add
`mesh=dict(fsdp=...)` to the overrides to shard parameters. Per token per layer the cache holds
(elements): MHA 2*H*K = 2048, GQA-2 4K = 256, MQA 2K = 128, MLA C + R with R = 32: C=224 -> 256
(= GQA-2), C=96 -> 128 (= MQA); query latent Q = 512 except mla_c224_noq. Parameters matched to
MHA's within 3% through d_ff (`python scripts/compare.py --sweep=tpu --params`; tests check it).
Cost: 6 * 337M params * 2.1B tokens ~ 4.2e18 FLOPs per run (+1/3 for remat): ~30 min on a v4-32
(32 chips x 275 bf16 TFLOP/s) at 40% utilisation, ~3-4 hours for the 6 runs.
"""

from ml_collections import ConfigDict

from configs.sweeps import gpu


def get_config() -> ConfigDict:
  return gpu.sweep("tpu", "350m", 1024, 16, 8000,
                   dict(mha=2752, gqa2=3352, mqa=3392, mla_c224=3112, mla_c96=3240,
                        mla_c224_noq=3032), train={})
