"""A faster `--help`: reuse one Hydra config repository while the help text lists the config groups.

Hydra 1.3 builds a fresh `CachingConfigRepository` (re-reading the primary config and the search path) for
every group it lists, about a hundred times for our groups (hydra issue #2907). The listing is read-only,
so one repository per (config name, overrides) gives the same text in a third of the time.
"""

from __future__ import annotations

from typing import Any

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.object_type import ObjectType

_HELP_FLAGS = frozenset({"--help", "-h", "--hydra-help"})


def wants_help(argv: list[str]) -> bool:
    """Whether the command line asks Hydra for its help text."""
    return any(arg in _HELP_FLAGS for arg in argv)


def reuse_config_repository() -> None:
    """Patch `ConfigLoaderImpl.get_group_options` to build its repository once per (config name, overrides).

    Only for help: a composed run must see files that change between calls (sweeps compose many jobs).
    """
    if getattr(ConfigLoaderImpl.get_group_options, "_samft_reuses_repository", False):
        return
    repositories: dict[tuple[int, str | None, tuple[str, ...]], Any] = {}

    def get_group_options(self: ConfigLoaderImpl, group_name: str,
                          results_filter: ObjectType | None = ObjectType.CONFIG, config_name: str | None = None,
                          overrides: list[str] | None = None) -> list[str]:
        key = (id(self), config_name, tuple(overrides or ()))
        if key not in repositories:
            repositories[key] = self._parse_overrides_and_create_caching_repo(config_name, list(overrides or ()))[1]
        return repositories[key].get_group_options(group_name, results_filter)

    get_group_options._samft_reuses_repository = True  # type: ignore[attr-defined]
    ConfigLoaderImpl.get_group_options = get_group_options  # type: ignore[method-assign]
