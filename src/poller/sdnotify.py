"""A small sd_notify(3) client: readiness, status and watchdog for systemd.

Messages are datagrams of ``KEY=VALUE`` lines sent to ``$NOTIFY_SOCKET`` (a
path, or an abstract socket written with a leading ``@``). Without that
variable (not started by systemd, or ``NotifyAccess=none``) every call is a
no-op, so the service calls these unconditionally.

    >>> n = Notifier.from_env({})
    >>> n.enabled, n.ready()
    (False, False)
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("poller.sdnotify")

STATUS_EVERY_S = 5.0


class Notifier:
    """Sends notifications to systemd; every method returns whether it sent."""

    __slots__ = ("_address", "_sock")

    def __init__(self, address: str | None) -> None:
        if address is not None and not address.startswith(("/", "@")):
            raise ValueError(f"NOTIFY_SOCKET must be a path or @abstract, got {address!r}")
        self._address = address
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET") or None
        if address is not None and not address.startswith(("/", "@")):
            # vsock and other forms systemd may hand out: not supported here.
            log.warning("NOTIFY_SOCKET %r is not a unix socket; not notifying", address)
            address = None
        return cls(address)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *lines: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; errors are logged, not raised."""
        if self._address is None:
            return False
        address = "\0" + self._address[1:] if self._address.startswith("@") else self._address
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode("utf-8"), address)
        except OSError as exc:
            # systemd gone or the socket removed: the service must go on.
            log.warning("sd_notify to %s failed: %s", self._address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        lines = ["READY=1"] + ([f"STATUS={_one_line(status)}"] if status else [])
        return self.notify(*lines)

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def reloading(self) -> bool:
        # systemd (since 253) wants the monotonic time with RELOADING=1 to tell
        # this reload from an earlier one; READY=1 ends it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def watchdog_interval_s(env: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout systemd set for this process, or None.

    ``$WATCHDOG_PID``, when set, names the process meant; another process
    (a child that inherited the environment) must not ping."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000


async def watchdog_loop(notifier: Notifier, responsive: Callable[[], bool],
                        interval_s: float, status: Callable[[], str] | None = None,
                        status_every_s: float = STATUS_EVERY_S) -> None:
    """Ping ``WATCHDOG=1`` every ``interval_s / 2`` while ``responsive()`` holds.

    ``interval_s`` is the watchdog timeout (:func:`watchdog_interval_s`). When
    ``responsive()`` is false no ping is sent, so systemd kills and restarts a
    service whose loop is wedged. ``status()``, if given, is sent as
    ``STATUS=`` every ``status_every_s``. Runs until cancelled.
    """
    if interval_s <= 0:
        raise ValueError("interval_s must be positive")
    next_ping = next_status = 0.0
    loop = asyncio.get_running_loop()
    while True:
        now = loop.time()
        if now >= next_ping:
            if responsive():
                notifier.watchdog()
            next_ping = now + interval_s / 2
        if status is not None and now >= next_status:
            notifier.status(status())
            next_status = now + status_every_s
        wake = next_ping if status is None else min(next_ping, next_status)
        await asyncio.sleep(max(0.0, wake - loop.time()))
