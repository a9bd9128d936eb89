"""The embedded stack: PostgreSQL, Valkey and SeaweedFS S3 under one state directory."""

from __future__ import annotations

import fcntl
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from poller.stack.component import Component
from poller.stack.errors import StackError
from poller.stack.postgres import PostgresComponent
from poller.stack.seaweed import SeaweedComponent
from poller.stack.state import StackState, load_state, save_state
from poller.stack.valkey import ValkeyComponent

_log = logging.getLogger("poller.stack")

# Started in this order, stopped in reverse; none depends on another today, but
# the database first keeps the order stable for progress output.
COMPONENTS: tuple[str, ...] = ("postgres", "valkey", "s3")
_LOCK_FILE = ".stack.lock"


@dataclass(frozen=True)
class StackInfo:
    """Where clients find the servers (embedded or external)."""

    database_url: str
    redis_url: str
    s3_endpoint_url: str
    bucket: str
    state_dir: Path


@dataclass(frozen=True)
class ComponentStatus:
    """One component as `status()` sees it."""

    name: str
    state: Literal["running", "stopped", "external"]
    url: str | None
    pid: int | None

    @property
    def running(self) -> bool:
        return self.state != "stopped"


class EmbeddedStack:
    """Real servers on loopback, started detached under `state_dir`.

    The servers outlive the process that calls `up()`; `stack.json` in the state
    directory records their pids, ports and URLs, and `down()` stops exactly
    those pids. A component given an external URL is never started.

        stack = EmbeddedStack(Path("var/stack"))
        info = stack.up()            # idempotent
        ...connect to info.database_url, info.redis_url, info.s3_endpoint_url...
        stack.down()                 # idempotent
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        database_url: str | None = None,
        redis_url: str | None = None,
        s3_endpoint_url: str | None = None,
        bucket: str = "poller-archive",
        database: str = "poller",
        progress: Callable[[str], None] | None = None,
        start_timeout_s: float = 60.0,
    ) -> None:
        if start_timeout_s <= 0:
            raise ValueError("start_timeout_s must be positive")
        self.state_dir = Path(state_dir).resolve()
        self._external: dict[str, str | None] = {
            "postgres": database_url,
            "valkey": redis_url,
            "s3": s3_endpoint_url,
        }
        self._bucket = bucket
        self._database = database
        self._progress = progress or _log.info
        self._timeout_s = start_timeout_s

    def up(self) -> StackInfo:
        """Start every non-external component that is not running; return the URLs.

        Components already running are reused after a readiness check. Raises
        StackStartError naming the component, with the tail of its log.
        """
        with self._locked() as state:
            for name in COMPONENTS:
                external = self._external[name]
                if external is not None:
                    self._progress(f"{name}: external at {external}")
                    continue
                comp = self._component(name, state)
                self._ensure_up(comp, state, same_ports=False)
            return self._info(state)

    def down(self) -> None:
        """Stop every component this state directory started, in reverse order."""
        with self._locked() as state:
            for name in reversed(COMPONENTS):
                if self._external[name] is not None:
                    continue
                comp = self._component(name, state)
                pid = comp.pid()
                comp.stop()
                save_state(self.state_dir, state)
                if pid is not None:
                    self._progress(f"{name}: stopped pid {pid}")

    def status(self) -> dict[str, ComponentStatus]:
        """Per component: running, stopped or external, with its URL and pid."""
        # No lock: stack.json is replaced atomically, and status must answer even
        # while another process is in the middle of a slow `up`.
        state = load_state(self.state_dir)
        result: dict[str, ComponentStatus] = {}
        for name in COMPONENTS:
            external = self._external[name]
            if external is not None:
                result[name] = ComponentStatus(name, "external", external, None)
                continue
            comp = self._component(name, state)
            pid = comp.pid()
            result[name] = ComponentStatus(
                name, "running" if pid is not None else "stopped", comp.url(), pid
            )
        return result

    def stop_component(self, name: str) -> None:
        """Stop one embedded server, keeping its data, ports and socket (fault injection)."""
        with self._locked() as state:
            comp = self._embedded(name, state)
            comp.stop()
            save_state(self.state_dir, state)
            self._progress(f"{name}: stopped")

    def start_component(self, name: str) -> None:
        """Start one embedded server again on the same port, so clients can reconnect."""
        with self._locked() as state:
            self._ensure_up(self._embedded(name, state), state, same_ports=True)

    def _ensure_up(self, comp: Component, state: StackState, *, same_ports: bool) -> None:
        pid = comp.pid()
        if pid is not None:
            if not comp.ready():
                raise StackError(f"{comp.name}: pid {pid} is running but does not answer")
            self._progress(f"{comp.name}: already running, pid {pid}, {comp.url()}")
            return
        t0 = time.monotonic()
        self._progress(f"{comp.name}: starting")
        try:
            comp.start(same_ports=same_ports)
        finally:
            # Record whatever was started, even on failure, so down() can find it.
            save_state(self.state_dir, state)
        took = time.monotonic() - t0
        self._progress(f"{comp.name}: ready in {took:.1f} s, pid {comp.pid()}, {comp.url()}")

    def _embedded(self, name: str, state: StackState) -> Component:
        if name not in COMPONENTS:
            raise ValueError(f"unknown component {name!r}; expected one of {COMPONENTS}")
        if self._external[name] is not None:
            raise ValueError(f"{name} is external ({self._external[name]}), not ours to drive")
        return self._component(name, state)

    def _component(self, name: str, state: StackState) -> Component:
        record = state.record(name)
        root, timeout_s = self.state_dir, self._timeout_s
        if name == "postgres":
            return PostgresComponent(root, record, database=self._database, timeout_s=timeout_s)
        if name == "valkey":
            return ValkeyComponent(root, record, timeout_s=timeout_s)
        return SeaweedComponent(root, record, bucket=self._bucket, timeout_s=timeout_s)

    def _info(self, state: StackState) -> StackInfo:
        urls: dict[str, str] = {}
        for name in COMPONENTS:
            url = self._external[name] or state.record(name).url
            if url is None:
                raise StackError(f"{name}: no URL recorded")
            urls[name] = url
        return StackInfo(
            database_url=urls["postgres"],
            redis_url=urls["valkey"],
            s3_endpoint_url=urls["s3"],
            bucket=self._bucket,
            state_dir=self.state_dir,
        )

    @contextmanager
    def _locked(self) -> Iterator[StackState]:
        # One stack command at a time per state directory, across processes.
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with (self.state_dir / _LOCK_FILE).open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield load_state(self.state_dir)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
