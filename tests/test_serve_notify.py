"""`poller serve` under a real sd_notify socket: READY, WATCHDOG, STATUS, STOPPING in order."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.stackfix import RunningStack, fresh_database_url


def test_serve_speaks_sd_notify_in_order(stack: RunningStack, tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.5)
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(sock_path),
        "WATCHDOG_USEC": "2000000",
        "POLLER_STATE_DIR": str(tmp_path / "state"),
        "POLLER_DATABASE_URL": fresh_database_url(stack.info),
        "POLLER_REDIS_URL": stack.info.redis_url,
        "POLLER_S3_ENDPOINT_URL": stack.info.s3_endpoint_url,
        "POLLER_S3_PREFIX": "notify-test",
        "POLLER_API_PORT": "0",
    }
    env.pop("WATCHDOG_PID", None)
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "poller", "serve"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    messages: list[str] = []
    try:
        deadline = time.monotonic() + 60
        sent_term = False
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(TimeoutError):
                messages.extend(sock.recv(4096).decode().splitlines())
            if not sent_term and "WATCHDOG=1" in messages:
                # A reload in between: RELOADING=1 then READY=1 again.
                proc.send_signal(signal.SIGHUP)
                time.sleep(1.0)
                proc.send_signal(signal.SIGTERM)
                sent_term = True
        code = proc.wait(timeout=30)
        while True:
            try:
                messages.extend(sock.recv(4096).decode().splitlines())
            except (TimeoutError, BlockingIOError):
                break
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-2000:]
    kinds = [m.split("=", 1)[0] for m in messages if m.split("=", 1)[0] != "STATUS"]
    first_ready = kinds.index("READY")
    first_watchdog = kinds.index("WATCHDOG")
    assert first_ready < first_watchdog
    assert "RELOADING" in kinds and kinds.index("RELOADING") > first_ready
    assert kinds[-1] == "STOPPING"
    assert any(m.startswith("STATUS=") and "devices" in m for m in messages)
    assert any(m.startswith("MONOTONIC_USEC=") for m in messages)
