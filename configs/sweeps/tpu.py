r"""The fair comparison at ~340M params on a TPU slice: the cpu sweep's protocol and the gpu
sweep's variants (MHA, GQA-2, MQA, MLA at GQA-2's, MQA's and half of MQA's cache). Not yet run.

  # once: a BPE-tokenized corpus of several GB (e.g. FineWeb-Edu or OpenWebText as text files)
  python scripts/prepare_data.py --source=text --path='data/fineweb_edu/*.txt' --tokenizer=bpe \
      --vocab_size=32768 --out=data/fineweb_edu_bpe32k
  python scripts/compare.py --sweep=tpu --out=docs/results/tpu --runs_dir=runs/sweep_tpu

Every run: D=1024, L=24, H=16 (head dim K=64), seq_len 1024, global batch 256 (262,144 tokens
per step), 8,000 steps = 2.1B tokens (~6 per parameter), bf16 compute with fp32 parameters, remat
(configs/lm.py size=350m). The mesh is data-parallel over the slice by default; add
`mesh=dict(fsdp=...)` to the overrides to shard parameters. Per token per layer the cache holds
(elements): MHA 2*H*K = 2048, GQA-2 4K = 256, MQA 2K = 128, MLA C + R with R = 32: C=224 -> 256
(= GQA-2), C=96 -> 128 (= MQA), C=32 -> 64 (below MQA); query latent Q = 512. Parameters
matched to MHA's within 3% through d_ff (`python scripts/compare.py --sweep=tpu --params`).

Protocol: lr 1.5e-4, 3e-4, 6e-4, 1.2e-3 (8x) for 1,000 steps (1/8 of the final budget), seed 0;
then the final runs at each variant's best rate, seeds 0, 1, 2.

Expected wall time on a v5e-8 (8 chips x 197 TFLOP/s bf16 = 1.58 PFLOP/s), assuming 40% MFU
(not yet measured on a TPU): training FLOPs per token (perf.train_flops_per_token) are 2.2e9,
x 4/3 for remat = 2.9e9; one final run is 2.1B tokens x 2.9e9 = 6.2e18 FLOPs = ~2.7 hours; 18
final runs + 24 tuning runs of 1/8 the tokens = 21 final-run equivalents = ~57 hours. A v5e-32
or v4-32 at the same MFU cuts that ~4x; one seed instead of three cuts it ~3x.
"""

from ml_collections import ConfigDict

from configs.sweeps import gpu


def get_config() -> ConfigDict:
  return gpu.sweep("tpu", "350m", 1024, 16, 8000,
                   dict(mha=2752, gqa=3352, mqa=3392, mla_c224=3112, mla_c96=3240, mla_c32=3304),
                   train={}, lr_grid=[1.5e-4, 3e-4, 6e-4, 1.2e-3], tune_steps=1000)
