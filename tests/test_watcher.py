"""The registry watcher against a real Postgres: a bulk resync pauses the
cyclic GC only between its awaits, and the periodic resync keeps the
injected clock's time."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import asyncpg
import pytest

from poller import migrate, sealing
from poller.clock import FakeClock
from poller.config import PollingSettings
from poller.netpolicy import DEFAULT_DENIED_NETWORKS, LOOPBACK_NETWORKS, NetPolicy
from poller.polling.memsink import MemorySink
from poller.polling.pool import DevicePool
from poller.polling.sync import RegistryWatcher
from poller.registry import Registry
from poller.transport import FastHttpClient

DEAD_URL = "http://127.0.0.1:9"
"""Nothing answers there: these tests are about the registry, not polling."""


@pytest.fixture
def collector_on() -> Iterator[None]:
    """The collector on for the test, and as it was afterwards, nothing frozen."""
    enabled = gc.isenabled()
    gc.enable()
    try:
        yield
    finally:
        gc.unfreeze()
        if not enabled:
            gc.disable()


@dataclass
class Registered:
    url: str
    key: bytes
    cloud_ids: list[str]


async def _register(url: str, devices: int) -> Registered:
    key = sealing.generate_key()
    conn = await asyncpg.connect(url)
    try:
        await migrate.migrate(conn)
        loopback = NetPolicy.from_lists(allowed=LOOPBACK_NETWORKS,
                                        denied=DEFAULT_DENIED_NETWORKS)
        cloud_ids = [f"{0xc00000 + i:06x}" for i in range(devices)]
        await Registry(conn, sealing.SecretBox(key), loopback).upsert_many(
            [(cid, "o@example.com", "eagle-cloud", DEAD_URL, 60.0, "pw") for cid in cloud_ids])
    finally:
        await conn.close()
    return Registered(url, key, cloud_ids)


@pytest.fixture
async def client() -> AsyncIterator[FastHttpClient]:
    client = FastHttpClient()
    try:
        yield client
    finally:
        await client.close()


async def test_a_bulk_resync_never_leaves_the_collector_off_while_it_awaits(
        fresh_db: str, collector_on: None, client: FastHttpClient) -> None:
    """Enough devices for a bulk build in two slices, fetched from Postgres
    one at a time: while the watcher waits on Postgres, every other task
    (polls, ingest) runs with the collector on; the build is frozen."""
    devices = 2500
    registered = await _register(fresh_db, devices)

    observed: list[bool] = []
    done = asyncio.Event()

    async def observe() -> None:
        # A task like any other: it sees the collector as it is between the
        # watcher's steps.
        while not done.is_set():
            observed.append(gc.isenabled())
            await asyncio.sleep(0)

    pool = DevicePool(PollingSettings(), MemorySink(), {"eagle-cloud": client}, seed="s")
    await pool.start()
    watcher = RegistryWatcher(fresh_db, sealing.SecretBox(registered.key), pool, 60.0)
    frozen = gc.get_freeze_count()
    observer = asyncio.create_task(observe())
    try:
        await watcher.start()
        started = len(pool.loops)
    finally:
        done.set()
        await observer
        await watcher.stop()
        await pool.stop(1.0)
    assert started == devices
    assert len(observed) > 10  # the observer ran while the watcher awaited Postgres
    assert all(observed), f"collector off in {observed.count(False)} of {len(observed)} turns"
    assert gc.isenabled()
    assert gc.get_freeze_count() > frozen  # the build was frozen out of its reach


async def test_the_periodic_resync_runs_on_the_injected_clock(
        fresh_db: str, client: FastHttpClient) -> None:
    """A change made without a notification (one missed while the listening
    connection was down) is picked up by the resync a period later, by the
    pool's clock: a fake one here, so the period passes at once."""
    registered = await _register(fresh_db, 3)
    clock = FakeClock(wall=float(int(time.time())), monotonic=500.0)
    pool = DevicePool(PollingSettings(), MemorySink(), {"eagle-cloud": client}, seed="s",
                      clock=clock)
    await pool.start()
    watcher = RegistryWatcher(fresh_db, sealing.SecretBox(registered.key), pool, 60.0)
    conn = await asyncpg.connect(fresh_db)
    try:
        await watcher.start()
        assert watcher.resyncs == 1 and len(pool.loops) == 3
        changed = registered.cloud_ids[1]
        await conn.execute("UPDATE devices SET interval_s = 30, updated_at = now() "
                           "WHERE cloud_id = $1", changed)
        await clock.run(59.0)
        assert watcher.resyncs == 1  # not due yet, by the clock the watcher reads
        await clock.run(2.0)
        deadline = time.monotonic() + 10.0
        while watcher.resyncs < 2:  # real time: the resync waits on Postgres
            assert time.monotonic() < deadline, "no resync a period later"
            await asyncio.sleep(0.01)
        target = pool.target_by_cloud_id(changed)
        assert target is not None and target.record.interval_s == 30
    finally:
        await conn.close()
        await watcher.stop()
        await pool.stop(1.0)
