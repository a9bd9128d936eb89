"""Rollups against the real stack: after a normal load, a load again of the
same segments, late data into a settled bucket and a quarantined line, every
rollup row equals the aggregate of the raw rows (tests/rollupcheck.py); the
readings API picks its level from the step; the fleet endpoint."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from poller.config import IngestSettings, RollupSettings
from poller.drivers.base import Outcome
from poller.ingest.failures import FailureLog
from poller.ingest.pgload import PgLoader
from poller.ingest.pipeline import Ingest
from poller.ingest.spool import Spool
from poller.migrate import migrate
from poller.polling.stats import OUTCOME_INDEX
from poller.reading import Reading
from poller.rollups.layout import sort_closed_months
from poller.rollups.query import device_series, fleet_series, level_for
from poller.rollups.worker import RollupWorker, mark_minutes
from tests.rollupcheck import assert_rollups_match
from tests.rows import FakeClock
from tests.stackfix import RunningStack, fresh_database_url

# 2031-03-04T22:58Z: two minutes before an hour that is also a new day.
T0 = 1_930_431_480.0
DEVICES = 6
TIMEOUT = OUTCOME_INDEX[Outcome.TIMEOUT]
CONNECT = OUTCOME_INDEX[Outcome.CONNECT_ERROR]


def readings(ticks: range, devices: range = range(1, DEVICES + 1),
             at: float = T0) -> list[Reading]:
    """Every device every 6 s: demand always, totals every third tick (the
    way eagle-cloud reads them), a price now and then, a null demand once."""
    out = []
    for k in ticks:
        tick = at + 6 * k
        for d in devices:
            totals = k % 3 == 0
            out.append(Reading(d, tick, tick - 1, tick + 0.3,
                               None if (k, d) == (4, 2) else 100.0 * d + k,
                               1000.0 * d + 7 * k if totals else None,
                               50.0 * d + k if totals and d % 2 else None,
                               0.1 + d / 100 if k % 4 == 1 else None, f"dev-{d}"))
    return out


@pytest.fixture
def db_url(stack: RunningStack) -> str:
    return fresh_database_url(stack.info)


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await migrate(conn)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    spool = Spool(tmp_path / "spool", "inst", FakeClock(T0 + 3600))
    await spool.open()
    yield spool
    await spool.close()


async def load(loader: PgLoader, spool: Spool, rows: list[Reading]) -> int:
    inserted = 0
    for pos in await spool.append(rows):
        inserted += await loader.load(pos, [r for r in rows if int(r.tick_at // 3600) * 3600
                                            == pos.hour])
    return inserted


async def test_rollups_equal_raw_after_load_reload_late_data_and_quarantine(
        db: asyncpg.Pool, db_url: str, spool: Spool) -> None:
    loader = PgLoader(db, "inst", spool)
    loader.mark_dirty = mark_minutes
    await loader.start()
    failures = FailureLog(db, mark_minutes)
    worker = RollupWorker(db, RollupSettings())
    # (a) A normal load across an hour (and day) boundary, with failed polls.
    first = readings(range(0, 30))
    assert await load(loader, spool, first) == len(first)
    assert await failures.write([(7, T0 + 12, TIMEOUT, T0 + 16), (7, T0 + 18, CONNECT, T0 + 22),
                                 (3, T0 + 3 * 60 + 6.5, TIMEOUT, T0 + 200)]) == 3
    # Nothing settled yet at T0 + 1 min: no rollup, every minute still marked.
    assert await worker.step(now_s=T0 + 61) == 0
    assert await db.fetchval("SELECT count(*) FROM readings_1m") == 0
    # Settled an hour later: recomputed, the hours too.
    assert await worker.step(now_s=T0 + 3 * 3600) > 0
    minutes = await assert_rollups_match(db_url, settle=False)
    # Minutes 0-2 of six devices; device 7 (failures only); device 3 in minute 3.
    assert minutes == DEVICES * 3 + 2
    one = await db.fetchrow("SELECT * FROM readings_1m WHERE device_id = 7")
    assert one is not None and (one["readings"], one["failed"]) == (0, 2)
    fleet = await db.fetchrow("SELECT * FROM fleet_1m WHERE bucket = to_timestamp($1)", T0)
    assert fleet is not None
    assert fleet["devices"] == DEVICES and '"timeout": 1' in fleet["outcomes"]

    # (c) The same rows again: a checkpoint lost, so the loader reads the
    # spool from the start; nothing inserted, nothing counted twice.
    before = await db.fetch("SELECT * FROM readings_1m ORDER BY device_id, bucket")
    await db.execute("DELETE FROM ingest_checkpoints")
    assert await loader.catch_up() == 0
    assert await failures.write([(7, T0 + 12, TIMEOUT, T0 + 16)]) == 0
    assert await db.fetchval("SELECT count(*) FROM rollup_dirty") == 0
    # Recomputing every bucket again changes nothing either.
    await db.execute("INSERT INTO rollup_dirty (level, bucket) SELECT DISTINCT 'minute', bucket "
                     "FROM readings_1m")
    await worker.settle_all()
    assert await db.fetch("SELECT * FROM readings_1m ORDER BY device_id, bucket") == before

    # (d) Late data into a settled minute (a device whose spool was caught
    # up late), and a line the encoder refuses, which is quarantined.
    late = readings(range(1, 4), devices=range(20, 22))
    poison = late[0]._replace(device_id=30, device_at=1.8e19)
    assert await load(loader, spool, [*late, poison]) == len(late)
    assert await db.fetchval("SELECT count(*) FROM readings_quarantine") == 1
    assert await db.fetchval("SELECT count(*) FROM rollup_dirty WHERE bucket = "
                             "to_timestamp($1)", T0) == 1
    await worker.step(now_s=T0 + 3 * 3600)
    assert await assert_rollups_match(db_url, settle=False) == minutes + 2
    await loader.stop()


def test_level_follows_the_step() -> None:
    assert [level_for(s) for s in (6, 59, 60, 300, 3599, 3600, 86400)] == \
        ["raw", "raw", "minute", "minute", "raw", "hour", "hour"]


async def test_device_series_reads_the_level_the_step_asks_for(
        db: asyncpg.Pool, spool: Spool) -> None:
    loader = PgLoader(db, "inst", spool)
    loader.mark_dirty = mark_minutes
    await loader.start()
    rows = readings(range(0, 30))
    await load(loader, spool, rows)
    await RollupWorker(db, RollupSettings()).settle_all()
    start = datetime.fromtimestamp(T0, UTC)
    end = start + timedelta(minutes=3)
    settled = end + timedelta(days=1)
    async with db.acquire() as conn:
        # A rollup-level answer matches the raw one for the same bins, and
        # the rollups alone answered (the raw rows could be gone).
        by_minute = await device_series(conn, 3, start, end, 60, settled=settled)
        by_raw = await device_series(conn, 3, start, end, 60, settled=start)
        await conn.execute("DELETE FROM readings")
        only_rollups = await device_series(conn, 3, start, end, 60, settled=settled)
        hourly = await device_series(conn, 3, start, end, 3600, settled=settled)
        fine = await device_series(conn, 3, start, end, 30, settled=settled)
    assert by_minute.level == "minute" and by_raw.level == "raw"
    assert by_minute.points == by_raw.points == only_rollups.points
    assert [p["count"] for p in by_minute.points] == [10, 10, 10]
    # Energy: the points' energies add up to the meter's advance.
    mine = [r.delivered_wh for r in rows if r.device_id == 3 and r.delivered_wh is not None]
    assert sum(p["energy_delivered_wh"] for p in by_minute.points) == mine[-1] - mine[0]
    assert hourly.level == "hour" and len(hourly.points) == 2  # 22:00Z and 23:00Z
    assert sum(p["count"] for p in hourly.points) == 30
    assert fine.level == "raw" and fine.points == []  # the raw rows were deleted
    await loader.stop()


async def test_fleet_demand_sums_each_devices_mean(db: asyncpg.Pool, spool: Spool) -> None:
    loader = PgLoader(db, "inst", spool)
    loader.mark_dirty = mark_minutes
    await loader.start()
    await load(loader, spool, readings(range(0, 10)))
    await FailureLog(db, mark_minutes).write([(9, T0 + 30, TIMEOUT, T0 + 34)])
    await RollupWorker(db, RollupSettings()).settle_all()
    start = datetime.fromtimestamp(T0, UTC)
    async with db.acquire() as conn:
        series = await fleet_series(conn, start, start + timedelta(minutes=1), 60)
    assert series.level == "minute"
    (point,) = series.points
    # Device d's demand in minute 0: 100 d + k for k = 0..9 (device 2 lacks k = 4).
    want = sum(100.0 * d + 4.5 for d in range(1, DEVICES + 1) if d != 2) + \
        (200.0 * 9 + sum(range(10)) - 4) / 9
    assert point["total_w"] == pytest.approx(want)
    assert point["devices"] == DEVICES
    assert point["outcomes"] == {"ok": DEVICES, "timeout": 1}
    await loader.stop()


async def test_failed_polls_reach_postgres_through_the_pipeline(
        db: asyncpg.Pool, db_url: str, tmp_path: Path) -> None:
    """Ingest keeps what the loops report failed and writes it with the
    readings, once, with its minutes marked for the rollups."""
    spool = Spool(tmp_path / "spool", "inst", lambda: T0 + 3600)
    loader = PgLoader(db, "inst", spool)
    loader.mark_dirty = mark_minutes
    ingest = Ingest(IngestSettings(batch_rows=10, flush_interval_s=0.05), spool, loader,
                    None, None, failures=FailureLog(db, mark_minutes))
    await ingest.start()
    try:
        for r in readings(range(0, 2)):
            ingest.accept(r)
        ingest.record_failure(8, T0 + 6, TIMEOUT, T0 + 10)
        ingest.record_failure(8, T0 + 12, CONNECT, T0 + 16)
        ingest.record_failure(8, T0 + 12, CONNECT, T0 + 16)  # reported twice: stored once
    finally:
        await ingest.stop(time.monotonic() + 10)
    rows = await db.fetch("SELECT outcome FROM poll_failures ORDER BY tick_at")
    assert [r["outcome"] for r in rows] == ["timeout", "connect_error"]
    assert await db.fetchval("SELECT count(*) FROM readings") == 2 * DEVICES
    await assert_rollups_match(db_url)
    assert await db.fetchval("SELECT failed FROM readings_1m WHERE device_id = 8") == 2


async def test_late_rows_for_a_dropped_raw_day_keep_its_rollups(
        db: asyncpg.Pool, spool: Spool) -> None:
    loader = PgLoader(db, "inst", spool)
    loader.mark_dirty = mark_minutes
    await loader.start()
    await load(loader, spool, readings(range(0, 10)))
    worker = RollupWorker(db, RollupSettings())
    await worker.settle_all()
    whole = await db.fetch("SELECT * FROM readings_1m ORDER BY device_id, bucket")
    # Retention drops the day; a late row of it arrives after.
    day = datetime.fromtimestamp(T0, UTC).date()
    await db.execute("DELETE FROM readings WHERE tick_at < $1",
                     datetime.fromtimestamp(T0 + 120, UTC))
    await db.execute("INSERT INTO retention_dropped (day, bytes, rows, segments) "
                     "VALUES ($1, 1, 1, 1)", day)
    await load(loader, spool, readings(range(5, 6), devices=range(40, 41)))
    assert await worker.settle_all() == 1
    assert await db.fetch("SELECT * FROM readings_1m ORDER BY device_id, bucket") == whole
    assert await db.fetchval("SELECT count(*) FROM rollup_dirty") == 0
    await loader.stop()


async def test_closed_months_of_hour_rollups_are_sorted_by_device_once(
        db: asyncpg.Pool) -> None:
    # Written hour by hour, as the worker writes them: a device's rows apart.
    def month_rows(day: datetime) -> list[tuple[int, datetime]]:
        return [(device, day + timedelta(hours=h)) for h in range(24) for device in range(1, 41)]

    closed, dirty, current = (datetime(2024, 1, 5, tzinfo=UTC), datetime(2024, 2, 10, tzinfo=UTC),
                              datetime(2024, 3, 2, tzinfo=UTC))
    for day in (closed, dirty, current):
        await db.execute("SELECT poller_ensure_rollup_partitions($1::date, 1)", day)
        await db.executemany("INSERT INTO readings_1h (device_id, bucket, readings, demand_n, "
                             "demand_sum, failed) VALUES ($1, $2, 600, 600, $1::bigint * 10.0, 0)",
                             month_rows(day))
    await db.execute("INSERT INTO rollup_dirty (level, bucket) VALUES ('hour', $1)", dirty)

    async def physical(part: str) -> list[int]:  # a plain scan reads the heap in order
        return [r["device_id"] for r in await db.fetch(f"SELECT device_id FROM {part}")]

    assert await physical("readings_1h_p202401") != sorted(await physical("readings_1h_p202401"))
    total = await db.fetchval("SELECT sum(demand_sum) FROM readings_1h")
    now = datetime(2024, 3, 10, tzinfo=UTC)
    async with db.acquire() as conn:
        # February waits for its dirty hour, March is not over.
        assert await sort_closed_months(conn, now) == ["readings_1h_p202401"]
        assert await sort_closed_months(conn, now) == []  # once
    jan = await physical("readings_1h_p202401")
    assert jan == sorted(jan) and len(jan) == 40 * 24
    assert await physical("readings_1h_p202402") != sorted(await physical("readings_1h_p202402"))
    assert await db.fetchval("SELECT sum(demand_sum) FROM readings_1h") == total
