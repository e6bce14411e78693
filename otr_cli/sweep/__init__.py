"""Hyperparameter sweeps: checks before a SLURM submission, and `otr sweep summary`."""
