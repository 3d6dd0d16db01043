"""python -m mla_jax.accel --step=NAME ...: one step of the check (mla_jax/accel/steps.py)."""

from mla_jax.accel.steps import step_main

step_main()
