"""sd_notify against a real AF_UNIX datagram socket, as systemd listens."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from poller.sdnotify import Notifier, watchdog_interval_s, watchdog_loop


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    try:
        yield path, sock
    finally:
        sock.close()


def received(sock: socket.socket) -> list[str]:
    """Every datagram waiting on ``sock``."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(2.0)
    return out


def test_messages_arrive_in_order(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready(status="polling 3 devices")
    assert n.status("polling\n4 devices")
    assert n.watchdog()
    assert n.reloading()
    assert n.stopping()
    n.close()
    msgs = [sock.recv(4096).decode() for _ in range(5)]
    assert msgs[0] == "READY=1\nSTATUS=polling 3 devices"
    assert msgs[1] == "STATUS=polling 4 devices"
    assert msgs[2] == "WATCHDOG=1"
    reload_lines = msgs[3].split("\n")
    assert reload_lines[0] == "RELOADING=1"
    key, _, usec = reload_lines[1].partition("=")
    assert key == "MONOTONIC_USEC" and abs(int(usec) / 1e6 - _monotonic()) < 5
    assert msgs[4] == "STOPPING=1"


def _monotonic() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def test_abstract_socket() -> None:
    name = f"poller-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        assert Notifier.from_env({"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_no_socket_is_a_no_op() -> None:
    n = Notifier.from_env({})
    assert not n.enabled
    assert not n.ready() and not n.watchdog() and not n.stopping()
    assert not Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1"}).enabled


def test_vanished_socket_does_not_raise(tmp_path: Path) -> None:
    assert not Notifier(str(tmp_path / "gone.sock")).ready()


def test_watchdog_interval_from_env() -> None:
    assert watchdog_interval_s({}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000",
                                "WATCHDOG_PID": str(os.getpid())}) == 30.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "soon"}) is None


async def test_watchdog_pings_only_while_responsive(
        listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    n = Notifier(path)
    healthy = True
    task = asyncio.create_task(watchdog_loop(n, lambda: healthy, interval_s=0.1,
                                             status=lambda: "3 devices",
                                             status_every_s=0.15))
    try:
        await asyncio.sleep(0.35)
        before = received(sock)
        assert before.count("WATCHDOG=1") >= 2  # every 0.05 s: ~7, slack for a busy machine
        assert "STATUS=3 devices" in before
        healthy = False
        await asyncio.sleep(0.08)  # a ping decided before the flip may still land
        received(sock)
        await asyncio.sleep(0.3)
        after = received(sock)
        assert "WATCHDOG=1" not in after
        assert "STATUS=3 devices" in after  # status goes on: the process is alive
        healthy = True
        await asyncio.sleep(0.15)
        assert "WATCHDOG=1" in received(sock)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        n.close()


async def test_watchdog_loop_refuses_bad_interval() -> None:
    with pytest.raises(ValueError, match="positive"):
        await watchdog_loop(Notifier(None), lambda: True, 0)
