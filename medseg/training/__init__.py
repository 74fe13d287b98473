"""Training: data, loop, losses, metrics, baselines."""
