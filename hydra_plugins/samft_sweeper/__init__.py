"""Hydra plugin: the Optuna sweeper with pruning, failure tolerance and resumable storage (see samft.sweep)."""
