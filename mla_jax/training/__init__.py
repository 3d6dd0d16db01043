"""Training: the pure train step, the optimizer, the loop (trainer) and its logs."""
