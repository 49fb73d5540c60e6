"""Hydra entry point: `python -m samft.train [overrides]`.

Only Hydra and the schema are imported here, so `--help` and `--cfg job` answer without torch.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from samft.cli import exit_on_user_error, run_entry


@hydra.main(config_path="../../conf", config_name="train", version_base="1.3")
def _hydra_train(cfg: DictConfig) -> float:
    from samft.runner import train

    return exit_on_user_error(lambda: train(cfg))


def main() -> None:
    run_entry(_hydra_train)


if __name__ == "__main__":
    main()
