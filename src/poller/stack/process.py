"""Detached server processes: spawn, identify, stop, and pick free ports."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from poller.stack.errors import StackStartError, StackStopError

_POLL_S = 0.05
_KILL_WAIT_S = 5.0
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
# What a server may see of our environment. An allow-list, not a deny-list:
# the sealing key, API tokens and S3 credentials of whoever ran `serve` or
# `stack up` must not sit in /proc/PID/environ of a server for its lifetime,
# whatever they are called. XDG_RUNTIME_DIR stays: the Postgres wheel derives
# its lock file and socket directory from it, and those must not move.
_ENV_KEPT = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR", "XDG_RUNTIME_DIR")


def server_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment embedded servers start with: locale, paths, nothing else.

    >>> server_env({"PATH": "/bin", "POLLER_SECRET_KEY": "k", "LC_ALL": "C"})
    {'PATH': '/bin', 'LC_ALL': 'C'}
    """
    source = os.environ if environ is None else environ
    env = {k: v for k, v in source.items() if k in _ENV_KEPT or k.startswith("LC_")}
    env.setdefault("PATH", os.defpath)
    return env


def start_ticks(pid: int) -> int | None:
    """Kernel start time of `pid` (clock ticks since boot), or None if it is not alive.

    Recorded next to the pid so that a recycled pid is never mistaken for ours.
    """
    _reap(pid)
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may hold spaces or parentheses: fields start after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def is_alive(pid: int | None, ticks: int | None) -> bool:
    """True while the very process recorded as (pid, ticks) exists."""
    if pid is None or ticks is None:
        return False
    return start_ticks(pid) == ticks


def spawn_detached(argv: Sequence[str], *, log_path: Path, cwd: Path) -> tuple[int, int]:
    """Start `argv` in its own session in `cwd`, output appended to `log_path`.

    Returns (pid, start ticks). The process outlives the caller: it is not in the
    caller's process group, so a Ctrl-C on the CLI does not reach it.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=server_env(),
        )
    # Held so the child can be reaped (no zombie) when this process stops it.
    _CHILDREN[proc.pid] = proc
    ticks = start_ticks(proc.pid)
    if ticks is None:
        raise StackStartError(Path(argv[0]).name, "exited at once", tail(log_path))
    return proc.pid, ticks


def terminate(pid: int | None, ticks: int | None, *, grace_s: float, name: str) -> None:
    """SIGTERM the recorded process, SIGKILL it after `grace_s`; returns once it is gone."""
    if pid is None or not is_alive(pid, ticks):
        return
    _signal(pid, signal.SIGTERM)
    if _wait_gone(pid, ticks, grace_s):
        return
    _signal(pid, signal.SIGKILL)
    if not _wait_gone(pid, ticks, _KILL_WAIT_S):
        raise StackStopError(name, f"pid {pid} survived SIGKILL")


def wait_ready(
    name: str,
    probe: Callable[[], bool],
    *,
    timeout_s: float,
    log_path: Path,
    pid: int | None = None,
    ticks: int | None = None,
) -> None:
    """Poll `probe` until it is true; raise StackStartError with the log tail otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        if probe():
            return
        if pid is not None and not is_alive(pid, ticks):
            raise StackStartError(name, f"pid {pid} exited during startup", tail(log_path))
        if time.monotonic() >= deadline:
            raise StackStartError(name, f"not ready after {timeout_s:g} s", tail(log_path))
        time.sleep(_POLL_S * 2)


def free_ports(count: int, *, keep: Sequence[int] = ()) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1, preferring those in `keep`.

    All sockets stay bound until every port is chosen, so the kernel cannot hand out
    the same port twice within one call.
    """
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        for wanted in list(keep)[:count]:
            if wanted not in ports and port_is_free(wanted):
                ports.append(wanted)
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(sock)
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
            if port not in ports:
                ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return ports


def port_is_free(port: int) -> bool:
    """True if nothing listens on 127.0.0.1:`port` and it can be bound now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers themselves do: connections of a stopped server lingering
        # in TIME_WAIT must not make its port look taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_ports_free(ports: Sequence[int], *, timeout_s: float = 5.0) -> list[int]:
    """Wait until every port can be bound; return those still taken after `timeout_s`.

    Right after a server is killed the kernel may need a moment to release its
    sockets, so a restart on the same ports waits instead of failing at once.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        taken = [port for port in ports if not port_is_free(port)]
        if not taken or time.monotonic() >= deadline:
            return taken
        time.sleep(_POLL_S * 2)


def tcp_answers(port: int, request: bytes, expect: bytes, *, timeout_s: float = 1.0) -> bool:
    """True if 127.0.0.1:`port` replies to `request` with bytes starting with `expect`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.sendall(request)
            return sock.recv(len(expect)).startswith(expect)
    except OSError:
        return False


def tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a log file, or a note that there is none."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            text = fh.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait_gone(pid: int, ticks: int | None, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while is_alive(pid, ticks):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)
    return True


def _reap(pid: int) -> None:
    # A server spawned by this very process stays a zombie until it is waited for.
    proc = _CHILDREN.get(pid)
    if proc is not None and proc.poll() is not None:
        del _CHILDREN[pid]
