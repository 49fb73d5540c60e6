"""Helpers shared by several test files: `standin` (a tiny stand-in model, data and Trainer for engine tests),
`hardening` (a small U-Net checkpoint as a run stores it, scans, and the entry points run as a user runs them),
`wandb_records` (a wandb run file read back) and `patience` (waiting limits stretched for the pytest-xdist workers
beside a test). pytest puts `tests/` on the import path, so test files import them as `helpers.standin`,
`helpers.hardening`, `helpers.wandb_records` and `helpers.patience`."""
