"""One instance id is one process, across hosts and state directories; two
instance ids may share a state directory without touching each other's files.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from poller.archive.s3 import ArchiveStore
from poller.archive.uploader import Uploader
from poller.db import instance_lock_key
from poller.ingest.spool import Spool, SpoolError
from poller.reading import Reading
from poller.service import Service
from poller.simulator.main import Simulator, SimulatorConfig
from tests.servicefix import (
    archived,
    diff,
    loaded,
    register,
    served,
    service_env,
    settings_of,
    wait_for,
)
from tests.stackfix import RunningStack, fresh_database_url

SEED = 7
_HOLDER_PID_SQL = """
SELECT l.pid FROM pg_locks l
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.classid = $1 AND l.objid = $2"""


def _lock_parts(instance_id: str) -> tuple[int, int]:
    unsigned = instance_lock_key(instance_id) & 0xFFFF_FFFF_FFFF_FFFF
    return unsigned >> 32, unsigned & 0xFFFF_FFFF


def _serve(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "poller", "serve"],
                            env={**os.environ, **env}, stdout=log_path.open("wb"),
                            stderr=subprocess.STDOUT)


def _reading(tick_at: float) -> Reading:
    return Reading(1, tick_at, tick_at, tick_at, 100.0, None, None, None, "000001")


async def test_a_second_serve_with_the_same_instance_id_is_refused_naming_the_holder(
        stack: RunningStack, tmp_path: Path) -> None:
    sim = Simulator(SimulatorConfig(devices=3, seed=SEED))
    await sim.start()
    db_url = fresh_database_url(stack.info)
    first_env = service_env(stack.info, db_url, tmp_path / "host-a", "shared-id")
    await register(settings_of(first_env), sim, SEED, 0.5)
    first = Service(settings_of(first_env))
    await first.start()
    try:
        # Another host, as far as poller can tell: its own state directory
        # (with the same sealing key, as a second host of one fleet has).
        second_env = service_env(stack.info, db_url, tmp_path / "host-b", "shared-id")
        (tmp_path / "host-b").mkdir()
        shutil.copy(tmp_path / "host-a" / "secret.key", tmp_path / "host-b" / "secret.key")
        proc = _serve(second_env, tmp_path / "second.log")
        try:
            code = await asyncio.to_thread(proc.wait, 60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        out = (tmp_path / "second.log").read_text()
        assert code == 1, out[-3000:]
        assert (f"instance id 'shared-id' is in use by host {socket.gethostname()} "
                f"pid {os.getpid()}") in out
        assert "Traceback" not in out
        # The refused one touched nothing of the running one's.
        assert first.view is not None and first.view.fleet().postgres_up
        assert not (tmp_path / "host-b" / "spool").exists() or not any(
            p.name.endswith(".ndjson.gz") for p in (tmp_path / "host-b" / "spool").iterdir())
    finally:
        await first.stop()
        await sim.stop()


async def test_serve_exits_non_zero_when_another_process_takes_its_instance_id(
        stack: RunningStack, tmp_path: Path) -> None:
    sim = Simulator(SimulatorConfig(devices=3, seed=SEED, record_served=True))
    await sim.start()
    db_url = fresh_database_url(stack.info)
    env = service_env(stack.info, db_url, tmp_path / "state", "stolen-id")
    await register(settings_of(env), sim, SEED, 0.5)
    proc = _serve(env, tmp_path / "serve.log")
    thief = await asyncpg.connect(db_url, server_settings={"application_name": "lock-thief"})
    admin = await asyncpg.connect(db_url)
    stealing = None
    try:
        classid, objid = _lock_parts("stolen-id")
        holder = None
        deadline = time.monotonic() + 60
        while holder is None:
            assert proc.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "serve.log").read_text()[-3000:]
            holder = await admin.fetchval(_HOLDER_PID_SQL, classid, objid)
            await asyncio.sleep(0.1)
        await wait_for(lambda: len(sim.served()) > 3, 30, "serve polls")
        # Another process queues for the id's lock; then serve's lock
        # connection drops (as in a network cut). Postgres hands the lock to
        # the process waiting for it before serve can ask again.
        stealing = asyncio.ensure_future(thief.execute(
            "SELECT pg_advisory_lock($1::bigint)", instance_lock_key("stolen-id")))
        waiting = 0
        for _ in range(100):
            waiting = await admin.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                "AND classid = $1 AND objid = $2", classid, objid)
            if waiting:
                break
            await asyncio.sleep(0.05)
        assert waiting == 1
        await admin.execute("SELECT pg_terminate_backend($1, 5000)", holder)
        await asyncio.wait_for(stealing, 30)
        code = await asyncio.to_thread(proc.wait, 60)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        if stealing is not None and not stealing.done():
            stealing.cancel()
        thief.terminate()
        await admin.close()
        await sim.stop()
    out = (tmp_path / "serve.log").read_text()
    assert code == 1, out[-3000:]
    assert "instance id 'stolen-id' is in use by 'lock-thief'" in out
    assert "stopping: instance id" in out and "stopped" in out


async def test_instances_sharing_a_state_directory_keep_to_their_own_files(
        stack: RunningStack, tmp_path: Path) -> None:
    sim = Simulator(SimulatorConfig(devices=12, seed=SEED, record_served=True))
    await sim.start()
    db_url = fresh_database_url(stack.info)
    state = tmp_path / "state"
    envs = [service_env(stack.info, db_url, state, name, POLLER_POLLING_SHARD=shard)
            for name, shard in (("left", "0/2"), ("right", "1/2"))]
    envs[1]["POLLER_S3_PREFIX"] = envs[0]["POLLER_S3_PREFIX"]
    await register(settings_of(envs[0]), sim, SEED, 0.25)
    services = [Service(settings_of(env)) for env in envs]
    try:
        for service in services:
            await service.start()
        await wait_for(lambda: len(sim.served()) > 12 * 6, 30, "both poll")
        spool_dir = state / "spool"
        assert {p.name for p in spool_dir.glob("*.seq")} == {"left.seq", "right.seq"}
        assert not (spool_dir / "seq").exists()
    finally:
        for service in services:
            await service.stop()
        await sim.stop()
    # Each loaded and archived its own segments, and only those: everything
    # served is in Postgres and in the archive, once.
    want = served(sim)
    got = await loaded(db_url)
    assert got == want, diff(want, got)
    archive = await archived(settings_of(envs[0]), stack.info)
    assert archive == want, diff(want, archive)


async def test_an_uploader_and_a_spool_leave_another_instances_segments_alone(
        stack: RunningStack, tmp_path: Path) -> None:
    now = time.time()
    hour_ago = now - 7200
    theirs = Spool(tmp_path, "theirs", lambda: now)
    await theirs.open()
    await theirs.append([_reading(hour_ago)])
    [their_segment] = await theirs.close_all()
    await theirs.close()
    marker_tmp = tmp_path / f"{their_segment.name}.uploaded.tmp"
    marker_tmp.write_text("{}")  # as if their uploader were writing its marker now

    ours = Spool(tmp_path, "ours", lambda: now)
    await ours.open()
    try:
        await ours.append([_reading(hour_ago)])
        [our_segment] = await ours.close_all()
        with pytest.raises(SpoolError, match="not a segment of instance 'ours'"):
            await ours.delete(their_segment.name)
        prefix = f"lock{os.getpid()}"
        async with ArchiveStore(stack.info.s3_endpoint_url, stack.info.bucket, "us-east-1",
                                "", "") as store:
            uploader = Uploader(store, tmp_path, prefix, lambda name: True,
                                delete=ours.delete, instance="ours")
            assert await uploader.upload_pending() == 1
            keys = [key for key, _ in await store.list_keys(f"{prefix}/readings/")]
    finally:
        await ours.close()
    assert len(keys) == 1 and keys[0].endswith("/ours-000001.ndjson.gz")
    assert not (tmp_path / our_segment.name).exists()  # uploaded, loaded: deleted
    assert (tmp_path / their_segment.name).exists() and marker_tmp.exists()
    assert (tmp_path / "ours.seq").read_text() == "2\n"
    assert (tmp_path / "theirs.seq").read_text() == "2\n"


def test_the_lock_key_doctests() -> None:
    import doctest

    from poller import db, tasks

    for module in (db, tasks):
        result = doctest.testmod(module)
        assert result.failed == 0 and (module is tasks or result.attempted >= 2)
