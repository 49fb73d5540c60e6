"""Registers `hydra/sweeper=samft_optuna`. Hydra imports every plugin module at start-up, so this one
stays light: Optuna and the sweep loop are imported only when a sweep runs."""

import logging
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from omegaconf import DictConfig

# Optuna imports alembic, which logs seven "setup plugin" lines (and, on a fresh study, its schema set-up) at INFO
# on import; whoever imports it first (the sweep, MONAI in a plain run), none of that is news to a user.
logging.getLogger("alembic").setLevel(logging.WARNING)


@dataclass
class SamftOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "hydra_plugins.samft_sweeper.samft_optuna_sweeper.SamftOptunaSweeper"
    # median | hyperband | none: jobs report validation Dice every epoch and stop when told to
    pruner: str = "none"
    # no validation in a trial's first N epochs prunes it (median and hyperband); Any, so that a bad value reaches
    # samft.sweep.pruning.check_pruner_settings and its one-line error instead of a schema traceback
    pruner_warmup_epochs: Any = 0
    # median only: no pruning until this many trials have completed
    pruner_startup_trials: Any = 2
    # a failed or non-finite trial is recorded as FAIL and the sweep goes on (1.0 = never abort)
    max_failure_rate: float = 1.0
    n_jobs: int = 1
    # each trial's worker records a heartbeat in the study every heartbeat_interval seconds; a RUNNING trial
    # without one for grace_period seconds (its worker was killed) is marked FAIL by any worker of the study
    heartbeat_interval: int = 30
    grace_period: int = 120


class SamftOptunaSweeper(Sweeper):
    """The stock Optuna sweeper's search space, with samft's sweep loop (samft.sweep.sweeper)."""

    def __init__(self, *, pruner: str, pruner_warmup_epochs: Any, pruner_startup_trials: Any, heartbeat_interval: int,
                 grace_period: int, **kwargs: Any) -> None:
        from samft.sweep.sweeper import PruningSweeperImpl

        self.sweeper = PruningSweeperImpl(pruner=pruner, pruner_warmup_epochs=pruner_warmup_epochs,
                                          pruner_startup_trials=pruner_startup_trials,
                                          heartbeat_interval=heartbeat_interval, grace_period=grace_period, **kwargs)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        return self.sweeper.sweep(arguments)


ConfigStore.instance().store(
    group="hydra/sweeper", name="samft_optuna", node=SamftOptunaSweeperConf, provider="samft"
)
