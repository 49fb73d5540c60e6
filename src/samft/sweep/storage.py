"""The study database: opened with heartbeats, and its failures (corrupt, locked, unreachable, wrong URL, missing
driver) reported as one line that names the file, or the URL without its password."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager

from optuna.storages import RDBStorage

from samft.errors import UserError
from samft.redact import redact

SETUP_ATTEMPTS = 5


def describe(url: str) -> str:
    """How a message names the storage: the file of a sqlite URL, else the URL with its password masked."""
    if url.startswith("sqlite:///"):
        return f"study database {url.removeprefix('sqlite:///') or url}"
    return f"study storage {redact(url)}"


def open_storage(url: str, *, heartbeat_interval: int, grace_period: int) -> RDBStorage:
    """An Optuna RDB storage with heartbeats (the caller records them, see samft.sweep.liveness)."""
    if heartbeat_interval < 1 or grace_period <= heartbeat_interval:
        raise UserError(f"hydra.sweeper.heartbeat_interval={heartbeat_interval} and grace_period={grace_period}: "
                        "need heartbeat_interval >= 1 and grace_period > heartbeat_interval (e.g. 30 and 120)")
    import sqlalchemy.exc

    with database_errors(url):
        for attempt in range(SETUP_ATTEMPTS):
            try:
                return RDBStorage(url, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                # Workers started together on a fresh database race to create its tables and stamp its schema
                # version (Optuna 2.10 does not guard this); the loser's transaction is rolled back, and its
                # next attempt finds the winner's tables.
                if attempt == SETUP_ATTEMPTS - 1:
                    raise
                time.sleep(0.2 + random.random() * attempt)
            except RuntimeError as err:  # a schema written by another Optuna version
                raise UserError(f"{describe(url)} cannot be used: {_first_line(err)}; upgrade it with "
                                "`optuna storage upgrade --storage URL` or start a new study elsewhere") from None
    raise AssertionError("unreachable")


@contextmanager
def database_errors(url: str) -> Iterator[None]:
    """Turn a database failure inside the block into a UserError naming the storage, with what to do."""
    import sqlalchemy.exc

    try:
        yield
    except sqlalchemy.exc.ArgumentError as err:
        raise UserError(f"the study storage {redact(url)!r} (hparams_search.storage) is not a database URL "
                        f"({_first_line(err)}); "
                        "use sqlite:////abs/path/optuna.db or postgresql://user:password@host/db") from None
    except sqlalchemy.exc.NoSuchModuleError as err:
        raise UserError(f"{describe(url)}: {_first_line(err)}; install the database driver "
                        "(PostgreSQL: pip install 'samft[postgres]')") from None
    except sqlalchemy.exc.SQLAlchemyError as err:
        raise UserError(f"{describe(url)} cannot be used: {_first_line(err)}; {_advice(url, err)}") from None
    except ImportError as err:  # the dialect exists but its driver (psycopg2, ...) is not installed
        raise UserError(f"{describe(url)}: {err.__cause__ or err}; install the database driver "
                        "(PostgreSQL: pip install 'samft[postgres]')") from None


def _first_line(err: BaseException) -> str:
    """The driver's own message (SQLAlchemy appends the SQL and a help link), password masked."""
    orig = getattr(err, "orig", None)
    text = str(orig if orig is not None else err).strip()
    return redact(text.splitlines()[0] if text else type(err).__name__)


def _advice(url: str, err: BaseException) -> str:
    text = str(getattr(err, "orig", None) or err).lower()
    if "locked" in text:
        return "another process holds a lock on it: wait for that sweep to finish or stop it, then rerun"
    if "not a database" in text or "malformed" in text or "no such table" in text or "no such column" in text:
        return "the file is damaged or not an Optuna study: move it away (a rerun then starts a new study)"
    if url.startswith("sqlite:///"):
        return "check that its folder exists and is writable"
    return "check that the server runs and accepts this user (the URL comes from hparams_search.storage)"
