"""A faster `--help`: reuse one Hydra config repository while the help text lists the config groups.

Hydra 1.3 builds a fresh `CachingConfigRepository` (re-reading the primary config and the search path) for
every group it lists, about a hundred times for our groups (hydra issue #2907). The listing is read-only,
so one repository per (config name, overrides) gives the same text in a third of the time.

Hydra has no public hook for this: the patch replaces `ConfigLoaderImpl.get_group_options` and calls the
private `_parse_overrides_and_create_caching_repo`. Both are looked up defensively; a Hydra without them (a
release that moved its internals) keeps its stock, slower listing, which prints the same text.
"""

from __future__ import annotations

import logging
from typing import Any

from hydra.core.object_type import ObjectType

log = logging.getLogger(__name__)

_HELP_FLAGS = frozenset({"--help", "-h", "--hydra-help"})
_BUILD_REPOSITORY = "_parse_overrides_and_create_caching_repo"  # private in Hydra 1.3: (overrides, repository)


def wants_help(argv: list[str]) -> bool:
    """Whether the command line asks Hydra for its help text."""
    return any(arg in _HELP_FLAGS for arg in argv)


def reuse_config_repository() -> bool:
    """Patch `ConfigLoaderImpl.get_group_options` to build its repository once per (config name, overrides).

    Only for help: a composed run must see files that change between calls (sweeps compose many jobs).
    Returns whether the patch is in place; False leaves Hydra's stock listing (same text, slower).
    """
    try:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
    except ImportError:  # Hydra moved its internals: the stock listing stays
        return False
    stock = getattr(ConfigLoaderImpl, "get_group_options", None)
    if getattr(stock, "_samft_reuses_repository", False):
        return True
    if stock is None or not callable(getattr(ConfigLoaderImpl, _BUILD_REPOSITORY, None)):
        log.debug("Hydra's ConfigLoaderImpl has no %s; --help lists the config groups the stock way", _BUILD_REPOSITORY)
        return False
    repositories: dict[tuple[int, str | None, tuple[str, ...]], Any] = {}

    def get_group_options(self: Any, group_name: str, results_filter: ObjectType | None = ObjectType.CONFIG,
                          config_name: str | None = None, overrides: list[str] | None = None) -> list[str]:
        key = (id(self), config_name, tuple(overrides or ()))
        if key not in repositories:
            built = getattr(self, _BUILD_REPOSITORY)(config_name, list(overrides or ()))
            repositories[key] = built[1]
        return repositories[key].get_group_options(group_name, results_filter)

    get_group_options._samft_reuses_repository = True  # type: ignore[attr-defined]
    ConfigLoaderImpl.get_group_options = get_group_options  # type: ignore[method-assign]
    return True
