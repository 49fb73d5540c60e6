"""A throw-away PostgreSQL server for tests: initdb + pg_ctl in a temporary folder, TCP on 127.0.0.1 with a
password (scram-sha-256), stopped and deleted afterwards.

PostgreSQL refuses to run as root, so under root the server alone runs as an unprivileged user (`nobody` by
default, `SAMFT_PG_USER` to choose); the tests themselves keep running as root. Binaries are looked up on PATH,
then in Debian's versioned folders (/usr/lib/postgresql/<version>/bin), or in `SAMFT_PG_BIN`.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SUPERUSER = "samft"
PORT_ATTEMPTS = 3


def find_bin() -> Path | None:
    """The folder holding initdb and pg_ctl, or None."""
    candidates = [os.environ.get("SAMFT_PG_BIN", "")]
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: _version(p.parent.name), reverse=True)
    candidates += [str(p) for p in debian]
    for folder in filter(None, candidates):
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    return None


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    password: str

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL with the password in it (what SAMFT_OPTUNA_STORAGE holds)."""
        return f"postgresql://{SUPERUSER}:{self.password}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL."""
        import psycopg2

        connection = psycopg2.connect(self.url())
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return self.url(name)


@contextmanager
def running_server(bin_dir: Path) -> Iterator[Server]:
    """Start a server in a fresh temporary folder; stop it and remove the folder on exit."""
    # Not under pytest's tmp_path: its folders are private to the test user, which the server user cannot enter.
    root = Path(tempfile.mkdtemp(prefix="samft-pg-"))
    password = "pg-" + secrets.token_hex(8)  # a marker: no file the tests write may contain it
    run_as: dict = {}
    if os.geteuid() == 0:
        account = pwd.getpwnam(os.environ.get("SAMFT_PG_USER", "nobody"))
        os.chown(root, account.pw_uid, account.pw_gid)
        run_as = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    env = {**os.environ, "HOME": str(root), "LC_ALL": "C", "TZ": "UTC"}

    def run(*args: str) -> None:
        proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=root, timeout=300, **run_as)
        if proc.returncode != 0:
            log = root / "server.log"
            raise RuntimeError(f"{' '.join(args[:2])} failed: {proc.stdout}{proc.stderr}"
                               f"{log.read_text() if log.exists() else ''}")

    pwfile = root / "pwfile"
    started = False
    try:
        with open(os.open(pwfile, os.O_WRONLY | os.O_CREAT, 0o600), "w") as handle:
            handle.write(password + "\n")
        if run_as:
            os.chown(pwfile, run_as["user"], run_as["group"])
        run(str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", SUPERUSER, f"--pwfile={pwfile}",
            "--auth=scram-sha-256", "-E", "UTF8", "--no-instructions")
        pwfile.unlink()
        # The port is free when chosen but not reserved: another process (a second pytest worker's server or
        # process group) can take it before the server binds it, so a bind failure is retried on a new port.
        for attempt in range(PORT_ATTEMPTS):
            port = _free_port()
            options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60"
            (root / "server.log").unlink(missing_ok=True)  # pg_ctl appends: the error below is this attempt's
            try:
                run(str(bin_dir / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "server.log"), "-w",
                    "-t", "120", "-o", options, "start")
            except RuntimeError as err:
                if "could not bind" not in str(err) or attempt == PORT_ATTEMPTS - 1:
                    raise
                continue
            break
        started = True
        yield Server(host="127.0.0.1", port=port, password=password)
    finally:
        if started:
            run(str(bin_dir / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
