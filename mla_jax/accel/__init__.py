"""The accelerator check: what one GPU must show about this framework, in one command.

    python3 scripts/accel_check.py --out=DIR [--dry_run] [--steps=env,decode] [--budget_s=480]
        [--limits=train=240] [--wheels=DIR]

Five steps, in this order, each in its own subprocess under its own time limit (STEPS), so a
failure or a hang in one still leaves the others' results:

  env      devices, memory, versions; the measured bf16 matmul peak and HBM copy bandwidth
  kernels  the compiled-kernel tests (tests/test_kernels.py -k gpu), whole-model decode
           equality of mla_decode_impl=pallas vs absorbed in bf16, and the compiled kernel
           lowered to its Triton call for an H200 (also on a CPU, where nothing runs it)
  decode   MQA, MLA absorbed (einsums) and MLA pallas at batch 1 / 8 / 64, context 4k / 16k /
           32k, bf16 cache: ms per step, GB/s and the fraction of the measured copy bandwidth;
           targets: the kernel >= 85% of it at batch >= 64, context >= 4k, and pallas / MQA time
           within 1.1x of their cache-bytes ratio
  train    size=125m bf16, MHA and MLA, attn_impl auto (cuDNN) and blocked: tokens/s and MFU of
           the compiled step (training/throughput.py); target >= 45% MFU
  quality  with the time left (at least QUALITY_MIN_S): MHA vs MLA at 25% of MHA's cache, ~26M
           parameters (configs/lm.py size=base, bf16), the same tokens, val bpb of each

DIR/accel_check.json is rewritten after every step, and each step rewrites its own part as it
measures, so a step stopped at its limit keeps what it had; DIR/accel_check.md has the same as
tables and DIR/accel_check.log every step's output. The limits add up to at most BUDGET_S.

--dry_run runs every step on the CPU at tiny shapes (the kernel in Pallas interpret mode, two or
three timed steps): its numbers check the script, not the hardware. It is a test in the suite
(tests/test_accel_check.py), so the GPU run cannot rot. docs/accelerator.md: how to run it on a
GPU machine.
"""

from mla_jax.accel.runner import run, run_child
from mla_jax.accel.spec import (
                                BANDWIDTH_TARGET,
                                BUDGET_S,
                                DRY_DECODE,
                                EQUALITY_RTOL,
                                JSON_NAME,
                                LOG_NAME,
                                MD_NAME,
                                MFU_TARGET,
                                QUALITY_CACHE_FRACTION,
                                QUALITY_MIN_S,
                                STEP_NAMES,
                                STEPS,
                                TRAIN_RUNS,
                                Step,
)
from mla_jax.accel.tables import markdown

__all__ = ["BANDWIDTH_TARGET", "BUDGET_S", "DRY_DECODE", "EQUALITY_RTOL", "JSON_NAME", "LOG_NAME",
           "MD_NAME", "MFU_TARGET", "QUALITY_CACHE_FRACTION", "QUALITY_MIN_S", "STEP_NAMES",
           "STEPS", "TRAIN_RUNS", "Step", "markdown", "run", "run_child"]
