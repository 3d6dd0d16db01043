r"""The cpu sweep plus the trained-in cache designs beyond MLA (docs/trained_in.md): YOCO with a
key/value global cache and with an MLA latent global cache, under the same protocol (learning-rate
grid, three seeds, parameters and tokens matched to MHA). Its runs directory is the cpu sweep's,
so the six cpu variants are reused finished and only YOCO trains (53.6 min with two jobs while
DMC retrofits and the test suite shared the 2 cores; less on an idle machine):

  python3 scripts/compare.py --sweep=cpu_trained_in --out=docs/results/cpu_trained_in \
      --runs_dir=runs/sweep_cpu

YOCO here: 2 sliding-window layers (W = 64, MHA heads), then 2 layers cross-attending to ONE global
cache shared by both: 4 kv heads (2HK = 192 elements per token for all layers: 25% of MHA's
4 x 192) or an MLA latent C=40 + R=8 (48 elements: 6.25%); plus the two constant 64-slot window
rings per sequence (2 * 64 * 192 elements, counted in the cache bytes at max length). The cross
layers have no K/V projections of their own, so d_ff grows to match MHA's parameters.
DMC retrofits of mha_s0 (2x, 4x) are made by scripts/dmc_retrofit.py, not by this sweep.
"""

import importlib.util
import os

D_FF = {False: 272, True: 264}  # d_ff matching MHA's parameters: yoco, yoco_latent


def _cpu_sweep():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu.py")
  spec = importlib.util.spec_from_file_location("_sweep_cpu_base", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config():
  cpu = _cpu_sweep()
  c = cpu.get_config()
  c.name = "cpu_trained_in"

  def yoco(latent: bool) -> dict:
    out = {"model.yoco_window": 64, "model.d_ff": D_FF[latent]}
    if latent:
      out |= {"model.yoco_latent": True, "model.kv_lora_rank": 40, "model.q_lora_rank": cpu.Q}
    return out

  c.runs = list(c.runs) + [("yoco", "attn=yoco,size=small", yoco(False)),
                           ("yoco_latent", "attn=yoco,size=small", yoco(True))]
  return c
