"""Helpers shared by several test files: `standin` (a tiny stand-in model, data and Trainer for engine tests)
and `hardening` (a small U-Net checkpoint as a run stores it, scans, and the entry points run as a user runs them).
pytest puts `tests/` on the import path, so test files import them as `helpers.standin` and `helpers.hardening`."""
