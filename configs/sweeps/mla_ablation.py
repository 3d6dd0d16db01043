r"""What each part of MLA costs at width 96: one factor at a time from the cpu sweep's `mla_c40`.

  python3 scripts/compare.py --sweep=mla_ablation --params   # counts and matching d_ff
  python3 scripts/compare.py --sweep=mla_ablation --out=docs/results/mla_ablation \
      --runs_dir=runs/mla_ablation [--only=base_s0,rope16_s0,...]

The base is configs/sweeps/cpu.py's `mla_c40` exactly (D=96, L=4, H=4, C=40, R=8 shared, Q=48,
N=E=24, d_ff=272, its tuned lr 8e-3, 576 steps, warmup 20%, whole-split scoring): its seeds
reproduce that sweep's runs bit for bit. Every other run changes one factor and keeps the cache
at C + R = 48 elements per token-layer (25% of MHA's), parameters matched to MHA's 467,808 within
3% through d_ff, unless the factor is how parameters are matched. All runs at the base's lr, as an
ablation is read; the learning rate is still to be checked at the full budget for the finalists.

Factors (name: what changes):
  rope16 / rope24      R = 16 / 24 shared, C = 32 / 24 (the same C + R)
  rope_ph              per-head rope keys: 4 keys of R = 4, C = 32 (compare with rope16: same C,
                       same rope bytes, one key of 8 frequencies vs 4 keys of 2)
  heads48 / heads64    N = E = 48 / 64 (cache unchanged; d_ff pays for the wider heads)
  noq                  no query compression (q_lora_rank = 0)
  nonorm               the latent cached without kv_norm
  lscale               RMS-normed q / kv latents times sqrt(D / rank) (MLRA)
  qknorm               QK-norm in the absorbed form (ModelConfig.qk_norm)
  fanin                up-projections initialised at init_std * sqrt(D / fan_in)
  match_heads / match_q  parameters matched at MHA's d_ff = 256 through the head dims (N = E = 29)
                       or through the query rank (Q = 68) instead of through d_ff
"""

from ml_collections import ConfigDict

D, L, H = 96, 4, 4
MHA_D_FF = 256  # configs/sweeps/cpu.py's MHA


def get_config() -> ConfigDict:
  c = ConfigDict()
  c.name = "mla_ablation"
  c.experiment = "configs/lm.py"
  c.steps = 576
  c.evals, c.ckpts, c.warmup_fraction = 8, 2, 0.2  # as configs/sweeps/cpu.py
  c.jobs = 1
  c.overrides = ConfigDict(dict(
      model=dict(d_model=D, n_layers=L, n_heads=H, max_seq_len=1024, qk_rope_head_dim=8,
                 kv_lora_rank=40, q_lora_rank=D // 2, d_ff=272),
      data=dict(source="stdlib", tokenizer="bytes", seq_len=256, max_bytes=4_000_000),
      train=dict(global_batch=16, log_every=16, eval_tokens=32768, keep_ckpts=1),
      optim=dict(lr=8e-3),  # mla_c40's tuned rate (docs/results/cpu/report.md)
  ))
  m = lambda **kw: {f"model.{k}": v for k, v in kw.items()}
  arg = "attn=mla,size=small"
  # d_ff of each run: scripts/compare.py --sweep=mla_ablation --params (closest to MHA's total).
  c.runs = [
      ("base", arg, {}),
      ("rope16", arg, m(qk_rope_head_dim=16, kv_lora_rank=32, d_ff=272)),
      ("rope24", arg, m(qk_rope_head_dim=24, kv_lora_rank=24, d_ff=272)),
      ("rope_ph", arg, m(qk_rope_head_dim=4, kv_lora_rank=32, mla_rope_kv_heads=4, d_ff=280)),
      ("heads48", arg, m(qk_nope_head_dim=48, v_head_dim=48, d_ff=200)),
      ("heads64", arg, m(qk_nope_head_dim=64, v_head_dim=64, d_ff=144)),
      ("noq", arg, m(q_lora_rank=0, d_ff=264)),
      ("nonorm", arg, m(mla_latent_norm=False)),
      ("lscale", arg, m(mla_latent_scale=True)),
      ("qknorm", arg, m(qk_norm=True)),
      ("fanin", arg, m(mla_up_init_fan_in=True)),
      ("match_heads", arg, m(qk_nope_head_dim=29, v_head_dim=29, d_ff=MHA_D_FF)),
      ("match_q", arg, m(q_lora_rank=68, d_ff=MHA_D_FF)),
  ]
  c.reference = "base"  # "vs" columns and parameter matching are relative to the base
  c.param_tolerance = 0.03
  c.seeds = [0, 1, 2]
  c.decode_lengths = ""  # the cache is the same for every run: no decode timing
  c.decode_rounds = 0
  c.eval_max_tokens = 0  # the whole validation split
  return c
