"""Turn user mistakes into one line on stderr and exit code 2, for every entry point.

Hydra's own error printer is bypassed (HYDRA_FULL_ERROR=1) so that its exceptions reach us; anything
that is not a user mistake still propagates with its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import NoReturn

from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from samft.config import schema_keys
from samft.errors import EXIT_USER_ERROR, UserError
from samft.hydra_help import reuse_config_repository, wants_help


def in_multirun() -> bool:
    """Whether the current Hydra job is one of a sweep (its errors must fail the trial, not the sweep)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def exit_on_user_error(task: Callable[[], float]) -> float:
    """Run a Hydra job's body; outside sweeps a UserError ends the process with one line and exit 2.

    Inside a job Hydra would print its own 'Error executing job' line first, so single runs exit here.
    """
    try:
        return task()
    except UserError as err:
        if in_multirun():
            raise
        _exit(str(err))


def run_entry(entry: Callable[[], object]) -> None:
    """Call a Hydra-decorated `entry`, reporting user errors as one line with exit code 2."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    if wants_help(sys.argv[1:]):
        reuse_config_repository()
    try:
        entry()
    except UserError as err:
        _exit(str(err))
    except MissingConfigException as err:
        _exit(_missing_option(err))
    except OverrideParseException as err:
        _exit(f"cannot parse the override '{err.override}': {_one_line(err.message)}")
    except (HydraException, OmegaConfBaseException) as err:
        _exit(_composition_error(err))


def _exit(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _missing_option(err: MissingConfigException) -> str:
    if err.missing_cfg_file and err.options is not None:
        group, _, option = err.missing_cfg_file.rpartition("/")
        if group:
            return f"unknown option '{option}' for config group '{group}'; available: {', '.join(err.options)}"
    return _one_line(err)


def _composition_error(err: Exception) -> str:
    cause = err.__cause__ if err.__cause__ is not None else err
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and getattr(cause, "full_key", None):
        key = cause.full_key
        parent = key.rpartition(".")[0]
        try:
            known = ", ".join(schema_keys(parent))
        except (KeyError, TypeError):
            known = "see `--cfg job`"
        return f"unknown config key '{key}'; keys under '{parent or '<top level>'}': {known}"
    return _one_line(err)
