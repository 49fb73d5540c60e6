"""Optuna sweeps: the sweep loop behind `hydra/sweeper=samft_optuna`, pruning, and the results report."""
