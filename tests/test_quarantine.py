"""Poison readings never stall loading: real PostgreSQL, real spool, real S3.

Good readings and poison ones share segments and members here; every good one
must reach ``readings``, each poison one ``readings_quarantine`` with the
reason, the checkpoint the end of the segment, and loading a member again or
replaying the archived segment must add nothing.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from poller.api.metrics import make_registry, render
from poller.api.view import FleetSnapshot
from poller.archive.naming import archive_key
from poller.archive.replay import replay
from poller.archive.s3 import ArchiveStore
from poller.config import IngestSettings
from poller.ingest.pgload import PgLoader
from poller.ingest.pipeline import Ingest
from poller.ingest.spool import Spool
from poller.migrate import migrate
from poller.polling.stats import LogHistogram
from poller.reading import Reading
from tests.apiview import fixed_snapshot
from tests.rows import FakeClock, make_rows
from tests.stackfix import RunningStack, fresh_database_url

# 2029-12-31T23:00Z, as in test_pgload: no partitions made ahead for it.
H0 = 1_893_452_400
SEGMENT = "inst-20291231T23-000001.ndjson.gz"
BLOCKED_DAY = "20300105"
BLOCKED_TICK = 1_893_801_600.0 + 6  # 2030-01-05T00:00:06Z: its partition cannot be made
U64_MAX = 2**64 - 1


async def _prepare(url: str) -> None:
    """Migrate, then two rules of this database's for a poison row to break."""
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
        await conn.execute("ALTER TABLE readings ADD CONSTRAINT no_666 CHECK (device_id <> 666)")
        # A plain table with the partition's name: poller_ensure_partitions
        # finds the name taken and makes nothing, so that day has no partition.
        await conn.execute(f"CREATE TABLE readings_p{BLOCKED_DAY} (squatter int)")
    finally:
        await conn.close()


@pytest.fixture
async def pool(stack: RunningStack) -> AsyncIterator[asyncpg.Pool]:
    url = fresh_database_url(stack.info)
    await _prepare(url)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=3)
    yield pool
    await pool.close()


def line(device_id: Any, tick: Any = None, *, device_at: Any = "same", received: Any = None,
         demand: Any = 230.5, **extra: Any) -> bytes:
    tick = H0 + 6 if tick is None else tick
    doc = {"device_id": device_id, "tick_at": tick,
           "device_at": tick - 0.5 if device_at == "same" else device_at,
           "received_at": tick + 0.25 if received is None else received,
           "demand_w": demand, "delivered_wh": 1000.0, "received_wh": None, "price": None,
           "cloud_id": f"dev-{device_id}"}
    doc.update(extra)
    return orjson.dumps(doc)


def good(device_id: int, tick: float = H0 + 6, **kw: Any) -> tuple[object, ...]:
    """The ``readings`` row of ``line(device_id, tick, **kw)``."""
    demand = kw.get("demand", 230.5)
    return (device_id, datetime.fromtimestamp(tick, UTC),
            datetime.fromtimestamp(tick - 0.5, UTC), datetime.fromtimestamp(tick + 0.25, UTC),
            demand, 1000.0, None, None)


# (line, what its reason must say); None: a good line, loaded.
POISON_SEGMENT: list[list[tuple[bytes, str | None]]] = [
    [  # member 1
        (line(1), None),
        (line(101, U64_MAX), "tick_at 18446744073709551615 is outside"),
        (line(2), None),
        (line(102, device_at=U64_MAX), "device_at 18446744073709551615 is outside"),
        (line(103, device_at=-1e19), "device_at -1e+19 is outside"),
        (line(104, device_at=(H0 + 5.5) * 1e6), "device_at 1893452405500000.0 is outside"),
        (line(105, device_at=(H0 + 5.5) * 1e3), "device_at 1893452405500.0 is outside"),
        (line(106, device_at=1e308), "device_at 1e+308 is outside"),
        (line(107, -1e19), "tick_at -1e+19 is outside"),
        (line(108, 253_402_300_800.0), "tick_at 253402300800.0 is outside"),
        (line(3, demand=1e308), None),  # a double Postgres holds: loaded as it is
        (line(666), "CheckViolationError"),
        (line(4), None),
    ],
    [  # member 2
        (line(5), None),
        (line(109).replace(b'"demand_w":230.5', b'"demand_w":NaN'), "not JSON"),
        (line(110).replace(b'"demand_w":230.5', b'"demand_w":Infinity'), "not JSON"),
        (line(111).replace(b'"demand_w":230.5', b'"demand_w":1e999'), "not JSON"),
        (b"", None),  # a blank line: no reading, but a line all the same
        (line(U64_MAX), "device_id 18446744073709551615 is outside bigint"),
        (line("ten"), "device_id 'ten' is not an integer"),
        (b"this is not a reading", "not JSON"),
        (b"[1, 2, 3]", "not a reading: a JSON list"),
        (orjson.dumps({"device_id": 112, "tick_at": H0 + 6}), "not a reading: no received_at"),
        (line(113, demand="12"), "demand_w '12' is not a number"),
        (line(114, BLOCKED_TICK), "no partition"),
        (line(6), None),
    ],
    [(line(7), None), (line(8), None)],  # member 3: nothing wrong in it
]
GOOD_ROWS = sorted([good(1), good(2), good(3, demand=1e308), good(4), good(5), good(6),
                    good(7), good(8)])


def write_segment(directory: Path) -> tuple[Path, dict[int, str]]:
    """The segment as a closed spool file; returns it and ``line -> reason``."""
    directory.mkdir(parents=True, exist_ok=True)
    expected: dict[int, str] = {}
    n = 0
    body = b""
    for member in POISON_SEGMENT:
        for _, reason in member:
            n += 1
            if reason is not None:
                expected[n] = reason
        body += gzip.compress(b"".join(text + b"\n" for text, _ in member))
    path = directory / SEGMENT
    path.write_bytes(body)
    return path, expected


async def readings(pool: asyncpg.Pool) -> list[tuple[object, ...]]:
    return sorted(tuple(r) for r in await pool.fetch(
        "SELECT * FROM readings ORDER BY device_id, tick_at"))


async def quarantine_rows(pool: asyncpg.Pool) -> dict[int, asyncpg.Record]:
    rows = await pool.fetch("SELECT * FROM readings_quarantine WHERE segment = $1", SEGMENT)
    return {r["line"]: r for r in rows}


async def test_poison_lines_are_quarantined_and_everything_else_loads(
        pool: asyncpg.Pool, store: ArchiveStore, stack: RunningStack, tmp_path: Path) -> None:
    path, expected = write_segment(tmp_path / "spool")
    lines_in_all = sum(len(m) for m in POISON_SEGMENT)
    spool = Spool(tmp_path / "spool", "inst", FakeClock(H0 + 7200))
    await spool.open()
    loader = PgLoader(pool, "inst", spool, catch_up_rows=10)  # several chunks
    await loader.start()
    try:
        assert await loader.catch_up() == len(GOOD_ROWS)
        assert await readings(pool) == GOOD_ROWS
        found = await quarantine_rows(pool)
        assert sorted(found) == sorted(expected)
        for n, reason in expected.items():
            assert reason in found[n]["reason"], (n, found[n]["reason"])
        # The raw line as written, and the ids where the line has them.
        lines = gzip.decompress(path.read_bytes()).split(b"\n")
        assert all(found[n]["raw"] == lines[n - 1].decode() for n in found)
        assert found[12]["device_id"] == 666
        assert found[12]["tick_at"] == datetime.fromtimestamp(H0 + 6, UTC)
        assert found[2]["device_id"] == 101 and found[2]["tick_at"] is None
        assert loader.rows_quarantined == len(expected)
        assert loader.rows_loaded == len(GOOD_ROWS)
        # The checkpoint is at the end: the segment counts as loaded (so the
        # uploader may delete it once archived) and nothing waits behind it.
        checkpoint = await pool.fetchrow(
            "SELECT end_offset, rows FROM ingest_checkpoints WHERE segment = $1", SEGMENT)
        assert checkpoint is not None
        assert tuple(checkpoint) == (path.stat().st_size, lines_in_all)
        assert loader.is_loaded(SEGMENT)
        assert loader.segments_refused == 0

        # Loaded again: nothing new, whether the checkpoint says so or is lost.
        assert await loader.catch_up() == 0
        await pool.execute("DELETE FROM ingest_checkpoints")
        assert await loader.catch_up() == 0
        assert await readings(pool) == GOOD_ROWS
        assert await quarantine_rows(pool) == found
        assert loader.rows_quarantined == len(expected)
    finally:
        await loader.stop()
        await spool.close()

    # The archived segment replayed: nothing new either...
    prefix = f"quarantine-{time.time_ns()}"
    await store.upload_file(path, archive_key(prefix, SEGMENT))
    since, until = datetime.fromtimestamp(H0, UTC), datetime(2030, 1, 6, tzinfo=UTC)
    result = await replay(store, prefix, pool, since, until)
    assert (result.rows_inserted, result.rows_quarantined) == (0, 0)
    assert result.errors == len(expected)
    assert {i.line for i in result.issues} == set(expected)
    assert await readings(pool) == GOOD_ROWS
    assert await quarantine_rows(pool) == found

    # ...and into a database the loader never saw, the same split.
    fresh_url = fresh_database_url(stack.info)
    await _prepare(fresh_url)
    fresh = await asyncpg.create_pool(fresh_url, min_size=1, max_size=2)
    try:
        result = await replay(store, prefix, fresh, since, until)
        assert (result.rows_inserted, result.rows_quarantined) == (len(GOOD_ROWS),
                                                                   len(expected))
        assert await readings(fresh) == GOOD_ROWS
        replayed = await quarantine_rows(fresh)
        assert sorted(replayed) == sorted(expected)
        # The encoder's, Postgres', bad JSON's and a missing partition's reasons.
        for n, says in ((2, "tick_at 1.8446744073709552e+19 is outside"),
                        (12, "CheckViolationError"), (15, "not JSON"), (25, "no partition")):
            assert says in replayed[n]["reason"], (n, replayed[n]["reason"])
    finally:
        await fresh.close()


async def test_a_live_batch_with_poison_readings_loads_the_rest(pool: asyncpg.Pool,
                                                               tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", "inst", FakeClock(H0 + 60))
    await spool.open()
    loader = PgLoader(pool, "inst", spool)
    await loader.start()
    try:
        t = H0 + 12.0
        fine = make_rows(20, t)
        poison = [
            Reading(201, t, float(U64_MAX), t + 0.25, 1.0, None, None, None, "p"),
            Reading(202, t, (t - 0.5) * 1e6, t + 0.25, 1.0, None, None, None, "p"),
            Reading(203, t, -1e19, t + 0.25, 1.0, None, None, None, "p"),
            Reading(204, t, 1e308, t + 0.25, 1.0, None, None, None, "p"),
            Reading(666, t, t - 0.5, t + 0.25, 1.0, None, None, None, "p"),
        ]
        # NaN and infinities: the spool writes them as null, and the loader
        # loads what the spool (and so the archive) holds.
        nulled = [
            Reading(301, t, t - 0.5, t + 0.25, float("nan"), 5.0, 6.0, None, "n"),
            Reading(302, t, t - 0.5, t + 0.25, 1.0, float("inf"), float("-inf"), None, "n"),
            Reading(303, t, float("nan"), t + 0.25, 1.0, None, None, None, "n"),
        ]
        batch = fine[:10] + poison + nulled + fine[10:]
        (pos,) = await spool.append(batch)
        assert await loader.load(pos, batch) == len(fine) + len(nulled)
        assert loader.rows_quarantined == len(poison)
        found = await pool.fetch("SELECT device_id, line, reason FROM readings_quarantine "
                                 "ORDER BY line")
        assert [r["line"] for r in found] == list(range(11, 11 + len(poison)))
        assert [r["device_id"] for r in found] == [201, 202, 203, 204, 666]
        assert "device_at 1.8446744073709552e+19 is outside" in found[0]["reason"]
        assert "CheckViolationError" in found[4]["reason"]
        loaded = {r["device_id"]: r for r in await pool.fetch("SELECT * FROM readings")}
        assert len(loaded) == len(fine) + len(nulled)
        assert loaded[301]["demand_w"] is None and loaded[301]["delivered_wh"] == 5.0
        assert (loaded[302]["delivered_wh"], loaded[302]["received_wh"]) == (None, None)
        assert loaded[303]["device_at"] is None
        # The rest of the hour is not held up: the next member loads at once.
        later = make_rows(20, t + 6, first_id=1000)
        (pos2,) = await spool.append(later)
        assert pos2.segment == pos.segment
        assert await loader.load(pos2, later) == len(later)
        assert await pool.fetchval(
            "SELECT end_offset FROM ingest_checkpoints WHERE segment = $1",
            pos.segment) == pos2.end_offset
    finally:
        await loader.stop()
        await spool.close()


async def test_the_pipeline_keeps_loading_and_its_lag_returns_to_zero(
        pool: asyncpg.Pool, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", "inst", time.time)
    loader = PgLoader(pool, "inst", spool)
    ingest = Ingest(IngestSettings(batch_rows=10, flush_interval_s=0.05), spool, loader,
                    None, None)
    await ingest.start()
    try:
        now = time.time()
        fine = make_rows(30, now) + make_rows(30, now + 6, first_id=100)
        poison = [Reading(900 + i, now, (now - 1) * 1e6, now + 0.1, 1.0, None, None, None,
                          "p") for i in range(5)]
        for r in fine[:15] + poison + fine[15:]:
            ingest.accept(r)
        deadline = time.monotonic() + 20
        while (ingest.rows_committed < len(fine) or loader.rows_quarantined < len(poison)) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert ingest.rows_committed == len(fine)
        assert loader.rows_quarantined == len(poison)
        assert ingest.ingest_lag_s() == 0.0
        assert ingest.loader_failures == 0
        assert await pool.fetchval("SELECT count(*) FROM readings") == len(fine)
        assert await pool.fetchval("SELECT count(*) FROM readings_quarantine") == len(poison)
    finally:
        await ingest.stop(time.monotonic() + 10)


async def test_a_stray_day_gets_its_partition_not_every_day_between(
        pool: asyncpg.Pool, tmp_path: Path) -> None:
    # The spool writes one hour per segment; a file from elsewhere need not.
    far = 32_503_680_000.0 + 6  # 3000-01-01T00:00:06Z: a valid time, far away
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / SEGMENT).write_bytes(gzip.compress(
        b"".join(line(i) + b"\n" for i in range(1, 6))
        + b"".join(line(i, far) + b"\n" for i in range(50, 55))))
    spool = Spool(tmp_path / "spool", "inst", FakeClock(H0 + 7200))
    await spool.open()
    loader = PgLoader(pool, "inst", spool)
    await loader.start()
    count = "SELECT count(*) FROM pg_inherits WHERE inhparent = 'readings'::regclass"
    try:
        before = await pool.fetchval(count)
        assert await loader.catch_up() == 10
        assert await pool.fetchval(count) - before == 2
        assert await pool.fetchval("SELECT count(*) FROM readings_p30000101") == 5
    finally:
        await loader.stop()
        await spool.close()


class _View:
    """Just what the metrics collector reads of a service."""

    def __init__(self, rows_quarantined: int) -> None:
        self.snapshot = fixed_snapshot(rows_quarantined=rows_quarantined)

    def fleet(self) -> FleetSnapshot:
        return self.snapshot

    def lateness(self) -> LogHistogram:
        return LogHistogram()

    copy_latency = commit_latency = lateness

    def loop_responsive(self) -> bool:
        return True


def test_metrics_count_quarantined_rows() -> None:
    text = render(make_registry(_View(7))).decode()
    assert "\npoller_rows_quarantined_total 7.0\n" in text


async def test_a_day_without_a_partition_is_quarantined_and_loading_goes_on(
        pool: asyncpg.Pool, tmp_path: Path) -> None:
    # Every reading of the hour falls on a day whose partition cannot be
    # made: all of them are quarantined at once, and the next hour loads.
    await pool.execute("CREATE TABLE readings_p20291231 (squatter int)")
    spool = Spool(tmp_path / "spool", "inst", FakeClock(H0 + 60))
    await spool.open()
    loader = PgLoader(pool, "inst", spool)
    await loader.start()
    try:
        blocked = make_rows(2_000, H0 + 6)
        (pos,) = await spool.append(blocked)
        assert await loader.load(pos, blocked) == 0
        assert loader.rows_quarantined == len(blocked)
        reasons = await pool.fetch("SELECT DISTINCT reason FROM readings_quarantine")
        assert [r["reason"] for r in reasons] == [
            "CheckViolationError: no partition of readings takes 2029-12-31"]
        assert await pool.fetchval("SELECT end_offset FROM ingest_checkpoints "
                                   "WHERE segment = $1", pos.segment) == pos.end_offset
        after = make_rows(10, H0 + 3600 + 6)  # 2030-01-01: a partition as usual
        (pos2,) = await spool.append(after)
        assert await loader.load(pos2, after) == len(after)
    finally:
        await loader.stop()
        await spool.close()
