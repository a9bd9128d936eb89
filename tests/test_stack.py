"""The embedded stack against its real servers: lifecycle, isolation, faults, loopback only."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import botocore.session
import pytest
import redis
from botocore.config import Config

from poller.stack import EmbeddedStack, StackInfo, StackStartError, pg_bin_dir
from poller.stack.postgres import psql
from poller.stack.process import server_env, spawn_detached, terminate
from tests.stackfix import RunningStack, fresh_database_url


def s3_client(info: StackInfo) -> Any:  # botocore's own client: typed by no stub installed
    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=info.s3_endpoint_url,
        aws_access_key_id="any",
        aws_secret_access_key="any",
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie awaiting its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def tcp_listeners(pids: set[int]) -> dict[int, list[str]]:
    """Local addresses of the TCP listening sockets owned by `pids`, from `ss`."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found: dict[int, list[str]] = {pid: [] for pid in pids}
    for line in out.splitlines():
        local = line.split()[3]
        for pid in {int(p) for p in re.findall(r"pid=(\d+)", line)} & pids:
            found[pid].append(local)
    return found


def pids_of(st: EmbeddedStack) -> dict[str, int]:
    status = st.status()
    pids = {name: s.pid for name, s in status.items()}
    assert all(pid is not None for pid in pids.values()), status
    return {name: pid for name, pid in pids.items() if pid is not None}


def test_up_reports_running_components_and_urls(stack: RunningStack) -> None:
    info = stack.info
    status = stack.stack.status()
    assert {name: s.state for name, s in status.items()} == {
        "postgres": "running",
        "valkey": "running",
        "s3": "running",
    }
    assert status["postgres"].url == info.database_url
    assert info.database_url.startswith("postgresql://") and "/poller?" in info.database_url
    assert re.fullmatch(r"redis://127\.0\.0\.1:\d+/0", info.redis_url)
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", info.s3_endpoint_url)
    saved = (info.state_dir / "stack.json").read_text()
    assert str(status["valkey"].pid) in saved and info.redis_url in saved


def test_up_is_idempotent(stack: RunningStack) -> None:
    before = pids_of(stack.stack)
    again = stack.stack.up()
    assert again == stack.info
    assert pids_of(stack.stack) == before


def test_every_listener_is_on_loopback(stack: RunningStack) -> None:
    pids = pids_of(stack.stack)
    listeners = tcp_listeners(set(pids.values()))
    # PostgreSQL has no TCP listener at all, only its Unix socket.
    assert listeners[pids["postgres"]] == []
    assert len(listeners[pids["valkey"]]) == 1
    # master, volume, filer and S3, each with HTTP and gRPC; nothing else.
    assert len(listeners[pids["s3"]]) == 8
    for addresses in listeners.values():
        for address in addresses:
            assert address.startswith("127.0.0.1:"), address


async def test_database_poller_and_fresh_databases(stack: RunningStack, fresh_db: str) -> None:
    conn = await asyncpg.connect(stack.info.database_url)
    try:
        assert await conn.fetchval("SELECT current_database()") == "poller"
    finally:
        await conn.close()
    other = fresh_database_url(stack.info)
    assert other != fresh_db
    conn = await asyncpg.connect(fresh_db)
    try:
        await conn.execute("CREATE TABLE only_here (x int)")
    finally:
        await conn.close()
    conn = await asyncpg.connect(other)
    try:
        assert await conn.fetchval("SELECT to_regclass('only_here')") is None
    finally:
        await conn.close()


def test_bundled_pg_dump_dumps_the_server(stack: RunningStack) -> None:
    out = subprocess.run(
        [str(pg_bin_dir() / "pg_dump"), "--schema-only", "-d", stack.info.database_url],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert "PostgreSQL database dump" in out.stdout


@pytest.fixture
def valkey_client(stack: RunningStack) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(stack.info.redis_url, socket_timeout=2)
    yield client
    client.close()


def test_stop_start_postgres_keeps_rows(stack: RunningStack) -> None:
    url = stack.info.database_url
    psql(url, "CREATE TABLE IF NOT EXISTS survives (v text); INSERT INTO survives VALUES ('pg')")
    old_pid = stack.stack.status()["postgres"].pid
    stack.stack.stop_component("postgres")
    try:  # the session's stack: up again for the tests after this one, whatever happens
        assert stack.stack.status()["postgres"].state == "stopped"
        assert old_pid is not None and gone(old_pid)
        with pytest.raises(RuntimeError):
            psql(url, "SELECT 1")
    finally:
        stack.stack.start_component("postgres")
    assert stack.stack.status()["postgres"].url == url
    assert "pg" in psql(url, "SELECT v FROM survives").split()


def test_stop_start_valkey_keeps_keys_and_port(
    stack: RunningStack, valkey_client: redis.Redis
) -> None:
    valkey_client.set("survives", b"vk")
    stack.stack.stop_component("valkey")
    try:
        with pytest.raises(redis.ConnectionError):
            valkey_client.ping()
    finally:
        stack.stack.start_component("valkey")
    assert stack.stack.status()["valkey"].url == stack.info.redis_url
    # The same client object reconnects: same port.
    assert valkey_client.get("survives") == b"vk"


def test_stop_start_s3_keeps_objects_and_port(stack: RunningStack) -> None:
    client = s3_client(stack.info)
    client.put_object(Bucket=stack.info.bucket, Key="dir/survives.gz", Body=b"s3 data")
    stack.stack.stop_component("s3")
    try:
        assert stack.stack.status()["s3"].state == "stopped"
    finally:
        stack.stack.start_component("s3")
    assert stack.stack.status()["s3"].url == stack.info.s3_endpoint_url
    body = client.get_object(Bucket=stack.info.bucket, Key="dir/survives.gz")["Body"].read()
    assert body == b"s3 data"
    client.close()


def test_start_component_refuses_a_taken_port(stack: RunningStack) -> None:
    port = int(stack.info.redis_url.rsplit(":", 1)[1].split("/")[0])
    stack.stack.stop_component("valkey")
    squatter = socket.socket()
    try:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with pytest.raises(StackStartError, match="valkey") as err:
            stack.stack.start_component("valkey")
        assert err.value.component == "valkey"
    finally:
        squatter.close()
        stack.stack.start_component("valkey")
    assert stack.stack.status()["valkey"].url == stack.info.redis_url


def test_external_urls_start_nothing(stack: RunningStack, tmp_path: Path) -> None:
    info = stack.info
    ext = EmbeddedStack(
        tmp_path / "ext",
        database_url=info.database_url,
        redis_url=info.redis_url,
        s3_endpoint_url=info.s3_endpoint_url,
        bucket=info.bucket,
    )
    got = ext.up()
    assert (got.database_url, got.redis_url, got.s3_endpoint_url) == (
        info.database_url,
        info.redis_url,
        info.s3_endpoint_url,
    )
    assert {s.state for s in ext.status().values()} == {"external"}
    assert not (tmp_path / "ext" / "postgres").exists()
    with pytest.raises(ValueError, match="external"):
        ext.stop_component("valkey")
    ext.down()
    assert stack.stack.status()["valkey"].state == "running"


def test_second_stack_beside_first_outlives_its_cli_and_stops_cleanly(
    stack: RunningStack, tmp_path: Path
) -> None:
    state_dir = tmp_path / "second"
    # `up` from a separate process that exits, as the CLI does, with the
    # secrets `serve` would hold in its environment.
    code = (
        f"from pathlib import Path; from poller.stack import EmbeddedStack; "
        f"EmbeddedStack(Path({str(state_dir)!r})).up()"
    )
    cli = subprocess.run([sys.executable, "-c", code], timeout=120, capture_output=True,
                         text=True, env={**os.environ, **SECRETS})
    second = EmbeddedStack(state_dir)
    try:
        assert cli.returncode == 0, cli.stderr
        # Valkey writes its process title over the memory /proc shows as its
        # environment; spawn_detached, which starts it, is checked on its own below.
        for name, pid in pids_of(second).items():
            if name != "valkey":
                assert_scrubbed(name, pid)
        check_second_stack(stack, second, state_dir)
    finally:
        second.down()


SECRETS = {
    "POLLER_SECRET_KEY": "sealing-key-" + uuid.uuid4().hex,
    "POLLER_API_ADMIN_TOKEN": "admin-token-" + uuid.uuid4().hex,
    "POLLER_S3_SECRET_ACCESS_KEY": "s3-secret-" + uuid.uuid4().hex,
    "AWS_SECRET_ACCESS_KEY": "aws-secret-" + uuid.uuid4().hex,
    "POLLER_DEVICE_PASSWORD": "device-pw-" + uuid.uuid4().hex,
}


def _environ_after_exec(pid: int) -> list[bytes]:
    """The process's environment once its exec has finished.

    Popen returns when the close-on-exec pipe closes, which the kernel does
    before it lays out the new image's environment: a read in that window finds
    nothing, so wait (on the real process, briefly) until it is there.
    """
    deadline = time.monotonic() + 10.0
    while True:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
        if raw or time.monotonic() >= deadline:
            return raw.split(b"\0")
        time.sleep(0.01)


def assert_scrubbed(name: str, pid: int) -> None:
    """The server's own environment holds no POLLER_ variable and no secret."""
    environ = _environ_after_exec(pid)
    names = {entry.partition(b"=")[0].decode() for entry in environ if entry}
    assert "PATH" in names, (name, names)
    assert not {n for n in names if n.startswith("POLLER_") or n.startswith("AWS_")}, \
        (name, names)
    blob = b"\0".join(environ)
    for value in SECRETS.values():
        assert value.encode() not in blob, name


def test_detached_servers_start_without_our_secrets(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    pid, ticks = spawn_detached(["sleep", "60"], log_path=tmp_path / "log", cwd=tmp_path)
    try:
        assert_scrubbed("sleep", pid)
    finally:
        terminate(pid, ticks, grace_s=5.0, name="sleep")


def test_server_env_keeps_only_locale_and_paths() -> None:
    env = server_env({**SECRETS, "PATH": "/usr/bin", "LC_ALL": "C.UTF-8", "HOME": "/root",
                      "XDG_RUNTIME_DIR": "/run/user/0", "PGPASSWORD": "x", "OTHER": "y"})
    assert env == {"PATH": "/usr/bin", "LC_ALL": "C.UTF-8", "HOME": "/root",
                   "XDG_RUNTIME_DIR": "/run/user/0"}
    assert server_env({})["PATH"]


def check_second_stack(stack: RunningStack, second: EmbeddedStack, state_dir: Path) -> None:
    info = second.up()  # reuses what the CLI started
    pids = pids_of(second)
    assert set(pids.values()).isdisjoint(pids_of(stack.stack).values())
    assert info.database_url != stack.info.database_url
    assert info.redis_url != stack.info.redis_url
    assert info.s3_endpoint_url != stack.info.s3_endpoint_url

    key = f"only-second-{uuid.uuid4().hex}"
    with (
        redis.Redis.from_url(info.redis_url) as mine,
        redis.Redis.from_url(stack.info.redis_url) as theirs,
    ):
        mine.set(key, b"1")
        assert theirs.get(key) is None

    second.down()
    for pid in pids.values():
        assert gone(pid), pid
    assert {s.state for s in second.status().values()} == {"stopped"}
    assert not any(tcp_listeners(set(pids.values())).values())
    assert no_process_mentions(state_dir)
    assert stack.stack.status()["s3"].state == "running"
    second.down()  # idempotent


def no_process_mentions(path: Path) -> bool:
    """No live process has `path` in its command line (PostgreSQL backends included)."""
    needle = str(path).encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "cmdline").read_bytes():
                    return False
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
    return True


def test_readiness_timeout_names_component_and_kills_it(tmp_path: Path) -> None:
    broken = EmbeddedStack(
        tmp_path / "slow",
        database_url="postgresql://unused",
        redis_url="redis://unused",
        start_timeout_s=1.0,
    )
    try:
        with pytest.raises(StackStartError, match="s3: not ready") as err:
            broken.up()
        assert err.value.component == "s3"
        assert "last lines of the s3 log" in str(err.value) and err.value.log_tail.strip()
        assert broken.status()["s3"].state == "stopped"
        assert no_process_mentions(tmp_path / "slow")
    finally:
        broken.down()
