"""What a run records about where it came from: git commit, dirty flag, package versions, seed."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

TRACKED_PACKAGES = (
    "samft", "torch", "monai", "numpy", "nibabel", "hydra-core", "omegaconf", "optuna",
    "hydra-optuna-sweeper", "sqlalchemy", "wandb", "pandas",
)


def git_state(repo: Path | None = None) -> dict[str, str | bool | None]:
    """The commit and dirty flag of the checkout holding samft (None where it is not a git checkout)."""
    where = repo or Path(__file__).resolve().parent
    try:
        commit = _git(where, "rev-parse", "HEAD")
        dirty = bool(_git(where, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = sys.version.split()[0]
    return versions


def provenance(seed: int) -> dict[str, object]:
    """Everything `samft.reproduce` compares besides the metrics."""
    return {
        "git": git_state(),
        "packages": package_versions(),
        "seed": seed,
        "platform": platform.platform(),
    }


def _git(where: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", *args], cwd=where, check=True, capture_output=True, text=True, timeout=10
    )
    return out.stdout.strip()
