"""Evaluation: validation metrics, whole-workdir evaluation (what eval.py prints), decode speed,
FLOP accounting, sweeps of runs (what scripts/compare.py runs) and their report."""
