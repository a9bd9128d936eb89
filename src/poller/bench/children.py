"""The processes a bench starts: ``poller simulate`` and ``poller serve``.

Each child runs in a session of its own, so the terminal's Ctrl-C reaches
only the bench, which then stops its children itself (SIGTERM, a bounded
wait, SIGKILL) in its ``finally``. Output goes to a log file per child; the
bench reads it for the bound port and shows its tail when a child fails.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from poller.errors import PollerError

_API_LINE = re.compile(r"API on http://([0-9.]+):(\d+)")


class BenchError(PollerError):
    """The bench could not set up or measure (a child died, a timeout)."""


class Child:
    """One started ``poller`` sub-command, logged to ``log_path``."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str],
                 log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "poller", *argv], env=dict(env), stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def check_alive(self) -> None:
        if not self.alive():
            raise BenchError(f"{self.name} exited with {self.proc.returncode}; "
                             f"log {self.log_path}:\n{self.tail()}")

    def api_port(self, timeout_s: float) -> int:
        """The port ``serve`` logs as "API on http://HOST:PORT"."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            match = _API_LINE.search(self.log_path.read_text(errors="replace"))
            if match:
                return int(match.group(2))
            time.sleep(0.2)
        raise BenchError(f"{self.name} did not log its API port within {timeout_s:.0f} s; "
                         f"log {self.log_path}:\n{self.tail()}")

    def wait_file(self, path: Path, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            if path.exists() and path.read_text().strip():
                return path.read_text().strip()
            time.sleep(0.2)
        raise BenchError(f"{self.name} did not write {path} within {timeout_s:.0f} s; "
                         f"log {self.log_path}:\n{self.tail()}")

    def stop(self, grace_s: float) -> None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL. Idempotent."""
        if not self.alive():
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def http_json(url: str, *, method: str = "GET", body: Any = None,
              timeout_s: float = 30.0) -> Any:
    data = orjson.dumps(body) if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return orjson.loads(resp.read())


def http_text(url: str, *, timeout_s: float = 30.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return bytes(resp.read()).decode()


def wait_http(url: str, child: Child, timeout_s: float) -> Any:
    """GET ``url`` as JSON once it answers (the child must stay alive)."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        child.check_alive()
        try:
            return http_json(url, timeout_s=10.0)
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.3)
    raise BenchError(f"{url} did not answer within {timeout_s:.0f} s ({last})")

