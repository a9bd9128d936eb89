"""End to end: simulator -> poller -> Postgres, S3 archive and Redis, with faults.

After each run the readings the simulator served are compared with the rows
in Postgres and with the archive on S3: nothing lost, nothing twice. Faults
are real: the embedded servers are stopped and started again.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from poller import config, keys, sealing
from poller.api.view import FleetSnapshot
from poller.config import Settings
from poller.netpolicy import NetPolicy
from poller.registry import Registry
from poller.service import Service
from poller.simulator.fleet import credentials_for
from poller.simulator.main import Simulator, SimulatorConfig
from tests import servicefix
from tests.rollupcheck import assert_rollups_match
from tests.stackfix import RunningStack, fresh_database_url

INTERVAL_S = 0.5
DEVICES = 40
_redis_db = itertools.count(1)

Key = servicefix.Key  # cloud id, device time, demand


@dataclass
class Run:
    settings: Settings
    sim: Simulator
    base_url: str
    stack: RunningStack
    env: dict[str, str]

    async def served(self) -> collections.Counter[Key]:
        return servicefix.served(self.sim)

    async def rows(self) -> collections.Counter[Key]:
        return await servicefix.loaded(self.settings.database.url)

    async def archive(self) -> collections.Counter[Key]:
        return await servicefix.archived(self.settings, self.stack.info)


@pytest.fixture
async def run(stack: RunningStack, tmp_path: Path) -> AsyncIterator[Run]:
    db_url = fresh_database_url(stack.info)
    redis_url = f"{stack.info.redis_url.rstrip('/')}/{next(_redis_db) % 16}"
    client = aioredis.from_url(redis_url)
    await client.flushdb()
    await client.aclose()
    env = {
        "POLLER_STATE_DIR": str(tmp_path / "state"),
        "POLLER_INSTANCE_ID": "e2e",
        "POLLER_DATABASE_URL": db_url,
        "POLLER_REDIS_URL": redis_url,
        "POLLER_S3_ENDPOINT_URL": stack.info.s3_endpoint_url,
        "POLLER_S3_BUCKET": stack.info.bucket,
        "POLLER_S3_PREFIX": f"t{uuid.uuid4().hex[:10]}",
        "POLLER_API_PORT": "0",
        "POLLER_INGEST_FLUSH_INTERVAL_S": "0.2",
        "POLLER_INGEST_SHUTDOWN_GRACE_S": "15",
        "POLLER_POLLING_RESYNC_INTERVAL_S": "5",
        "POLLER_POLLING_ALLOWED_NETWORKS": "127.0.0.0/8,::1/128",  # the simulator's
    }
    settings = config.load(config_path=None, env=env)
    sim = Simulator(SimulatorConfig(devices=DEVICES, seed=5, record_served=True))
    port = await sim.start()
    base = f"http://127.0.0.1:{port}"
    from poller import db, migrate

    conn = await db.connect(db_url)
    try:
        await migrate.migrate(conn)
        box = sealing.SecretBox(sealing.load_key(settings.state_dir))
        entries = []
        for cid in sim.cloud_ids():
            email, password = credentials_for(cid, 5)
            entries.append((cid, email, "eagle-cloud", base, INTERVAL_S, password))
        await Registry(conn, box, NetPolicy.from_settings(settings.polling)).upsert_many(entries)
    finally:
        await conn.close()
    try:
        yield Run(settings, sim, base, stack, env)
    finally:
        await sim.stop()


async def _serve_for(run: Run, seconds: float,
                     during: Callable[[Service], Any] | None = None) -> Service:
    service = Service(run.settings)
    await service.start()
    try:
        if during is not None:
            await during(service)
        await asyncio.sleep(seconds)
    finally:
        await service.stop()
    return service


async def _assert_complete(run: Run) -> collections.Counter[Key]:
    served = await run.served()
    rows = await run.rows()
    archive = await run.archive()
    assert sum(served.values()) > DEVICES * 3
    assert rows == served, _diff(served, rows)
    assert archive == rows, _diff(rows, archive)
    return served


def _fleet(service: Service) -> FleetSnapshot:
    assert service.view is not None, "the service is not started"
    return service.view.fleet()


def _diff(a: collections.Counter[Key], b: collections.Counter[Key]) -> str:
    return f"missing {sum((a - b).values())}, extra {sum((b - a).values())}"


async def test_clean_run_everything_everywhere(run: Run) -> None:
    service = await _serve_for(run, 3.0)
    served = await _assert_complete(run)
    client = aioredis.from_url(run.settings.redis.url)
    try:
        latest = await client.hgetall(keys.LATEST)
        state = await client.hgetall(keys.STATE)
    finally:
        await client.aclose()
    assert len(latest) == DEVICES
    doc = orjson.loads(state[b"f00001"])
    per_device = sum(n for (cid, _, _), n in served.items() if cid == "f00001")
    assert doc["total_events_logged"] == per_device
    assert doc["state"] == "stopped"
    assert doc["first_timestamp"] <= doc["last_timestamp"]
    assert _fleet(service).rows_committed == sum(served.values())


async def test_postgres_outage_loses_nothing(run: Run) -> None:
    # The session's server holds every test's databases: stopped as it is, its
    # shutdown checkpoint takes seconds (thousands of files to sync), the
    # outage lasts that much longer than the 2 s meant, and the service's
    # reconnect back-off may then outlast the run. Flushed first, it stops at once.
    conn = await asyncpg.connect(run.settings.database.url)
    try:
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()

    async def outage(service: Service) -> None:
        await asyncio.sleep(1.0)
        await asyncio.to_thread(run.stack.stack.stop_component, "postgres")
        try:
            await asyncio.sleep(2.0)
            assert not _fleet(service).postgres_up
            assert _fleet(service).polls_by_outcome["ok"] > 0  # polling goes on
        finally:
            await asyncio.to_thread(run.stack.stack.start_component, "postgres")

    await _serve_for(run, 4.0, outage)
    await _assert_complete(run)
    # The rollups of what the catch-up loaded late equal the raw rows.
    assert await assert_rollups_match(run.settings.database.url) >= DEVICES


async def test_s3_outage_loses_nothing(run: Run) -> None:
    async def outage(service: Service) -> None:
        await asyncio.to_thread(run.stack.stack.stop_component, "s3")
        try:
            await asyncio.sleep(1.5)
            # Close the hour early so there is something to upload during the outage.
            assert service.ingest is not None
            await service.ingest.spool.close_all()
            service.ingest.uploader.kick() if service.ingest.uploader else None
            await asyncio.sleep(1.5)
            assert service.ingest.spool.closed_segments()  # kept locally
        finally:
            await asyncio.to_thread(run.stack.stack.start_component, "s3")

    await _serve_for(run, 2.0, outage)
    await _assert_complete(run)


async def test_valkey_outage_state_rebuilt(run: Run) -> None:
    async def outage(service: Service) -> None:
        await asyncio.sleep(1.0)
        await asyncio.to_thread(run.stack.stack.stop_component, "valkey")
        try:
            await asyncio.sleep(2.0)
            assert not _fleet(service).redis_up
        finally:
            await asyncio.to_thread(run.stack.stack.start_component, "valkey")
        await asyncio.sleep(1.5)
        assert _fleet(service).redis_up

    await _serve_for(run, 1.0, outage)
    await _assert_complete(run)
    client = aioredis.from_url(run.settings.redis.url)
    try:
        assert await client.hlen(keys.LATEST) == DEVICES
    finally:
        await client.aclose()


def _spawn_serve(run: Run, log_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **run.env}
    return subprocess.Popen([sys.executable, "-m", "poller", "serve"], env=env,
                            stdout=log_path.open("ab"), stderr=subprocess.STDOUT)


async def _wait_polling(run: Run, seconds: float) -> None:
    deadline = time.monotonic() + 30
    while not run.sim.served() and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert run.sim.served(), "serve never polled"
    await asyncio.sleep(seconds)


async def test_sigterm_flushes_and_exits_zero(run: Run, tmp_path: Path) -> None:
    proc = _spawn_serve(run, tmp_path / "serve.log")
    try:
        await _wait_polling(run, 2.0)
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
    await _assert_complete(run)


async def test_kill_9_loses_at_most_a_flush_and_never_duplicates(run: Run,
                                                                 tmp_path: Path) -> None:
    proc = _spawn_serve(run, tmp_path / "serve.log")
    try:
        await _wait_polling(run, 2.0)
        proc.kill()  # SIGKILL: no flush, no goodbye
        await asyncio.to_thread(proc.wait, 30)
        killed_at = time.time()
        served_before = await run.served()
        # Start again: the spool's torn tail is cut, the loader catches up
        # from its checkpoint, the segment is uploaded at shutdown.
        proc = _spawn_serve(run, tmp_path / "serve.log")
        await _wait_polling(run, 1.5)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    served = await run.served()
    rows = await run.rows()
    archive = await run.archive()
    assert not rows - served, "a row nobody served"  # never invented
    assert archive == rows
    lost = served - rows
    # Only readings of the last flush interval before the kill may be lost.
    flush_window = float(run.env["POLLER_INGEST_FLUSH_INTERVAL_S"]) + INTERVAL_S
    assert sum(lost.values()) <= DEVICES * (flush_window / INTERVAL_S + 1)
    for cloud_id, device_at, _ in lost:
        assert killed_at - device_at <= flush_window + 2.0, (cloud_id, device_at)
    assert sum(served_before.values()) > 0


async def test_reload_applies_tokens_and_poll_settings(run: Run) -> None:
    import aiohttp

    service = Service(run.settings)
    await service.start()
    try:
        url = f"http://127.0.0.1:{service.api_port}/api/fleet"
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as resp:
                assert resp.status == 200  # no token configured: open on loopback
            token = "r" * 24
            fresh = config.load(config_path=None, env={
                **run.env, "POLLER_API_READ_TOKEN": token, "POLLER_POLLING_TIMEOUT_S": "0.2",
                "POLLER_DATABASE_URL": "postgresql://elsewhere/db"})
            later = service.reload(fresh)
            assert later == ["database"]  # kept, needs a restart
            assert service.settings.database.url == run.settings.database.url
            assert service.engine is not None
            assert service.engine.pool.timeout_for(6.0) == 0.2
            async with http.get(url) as resp:
                assert resp.status == 401
            async with http.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 200
    finally:
        await service.stop()


async def _wait_for(predicate: Callable[[], bool], within_s: float) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < within_s, "not within the time allowed"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_registry_changes_reach_a_running_serve_within_2_s(run: Run) -> None:
    service = Service(run.settings)
    await service.start()
    conn = await asyncpg.connect(run.settings.database.url)
    try:
        assert service.engine is not None
        pool = service.engine.pool
        reg = Registry(conn, sealing.SecretBox(sealing.load_key(run.settings.state_dir)),
                       NetPolicy.from_settings(run.settings.polling))
        assert len(pool.loops) == DEVICES
        # add: a device the simulator knows but the registry did not
        await reg.remove("f00003")
        await _wait_for(lambda: len(pool.loops) == DEVICES - 1, 2.0)
        email, password = credentials_for("f00003", 5)
        rec = await reg.add("f00003", email=email, driver="eagle-cloud", url=run.base_url,
                            interval_s=INTERVAL_S, options={}, secret=password)
        await _wait_for(lambda: rec.id in pool.loops, 2.0)
        await _wait_for(lambda: pool.loops[rec.id].target.readings > 0, 3.0)
        # update: wrong credentials -> auth_failed; right ones -> ok again
        await reg.update("f00003", secret="wrong")
        await _wait_for(lambda: pool.loops[rec.id].target.state.value == "auth_failed", 2.5)
        await reg.update("f00003", secret=password)
        await _wait_for(lambda: pool.loops[rec.id].target.state.value == "ok", 2.5)
        # disable and remove
        await reg.update("f00004", enabled=False)
        await _wait_for(lambda: all(lp.target.cloud_id != "f00004"
                                    for lp in pool.loops.values()), 2.0)
        await reg.remove("f00003")
        await _wait_for(lambda: rec.id not in pool.loops, 2.0)
    finally:
        await conn.close()
        await service.stop()


async def test_replay_cli_restores_the_table_from_the_archive(run: Run) -> None:
    await _serve_for(run, 2.0)
    before = await run.rows()
    await assert_rollups_match(run.settings.database.url)  # settled: no mark left
    conn = await asyncpg.connect(run.settings.database.url)
    try:
        full = await conn.fetch("SELECT * FROM readings ORDER BY device_id, tick_at")
        await conn.execute("DELETE FROM readings")
        assert await conn.fetchval("SELECT count(*) FROM readings") == 0
        proc = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "poller", "replay",
                             "--since", "2000-01-01", "--until", "2100-01-01"],
            env={**os.environ, **run.env}, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert f"inserted {sum(before.values())}" in proc.stdout
        assert "replay [" in proc.stderr  # progress shown
        again = await conn.fetch("SELECT * FROM readings ORDER BY device_id, tick_at")
        assert [tuple(r) for r in again] == [tuple(r) for r in full]
        # The replay marked what it loaded: the rollups equal the raw rows again.
        assert await conn.fetchval("SELECT count(*) FROM rollup_dirty") > 0
        assert await assert_rollups_match(run.settings.database.url) >= DEVICES
    finally:
        await conn.close()


async def test_redis_counters_continue_across_restarts(run: Run) -> None:
    await _serve_for(run, 1.5)
    await _serve_for(run, 1.5)
    conn = await asyncpg.connect(run.settings.database.url)
    try:
        stored = await conn.fetchval(
            "SELECT count(*) FROM readings r JOIN devices d ON d.id = r.device_id "
            "WHERE d.cloud_id = 'f00002'")
    finally:
        await conn.close()
    client = aioredis.from_url(run.settings.redis.url)
    try:
        state = await client.hget(keys.STATE, "f00002")
        assert state is not None
        doc = orjson.loads(state)
    finally:
        await client.aclose()
    assert stored > 3
    assert doc["total_events_logged"] == stored  # the second run added to the first
