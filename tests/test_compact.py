"""Compact raw storage (schema/007, poller.ingest.compact) against the real
PostgreSQL: every reading kept exactly, idempotent, late data loaded once,
the read path the same before and after, and the storage measure sane."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from poller import cli
from poller.bench import pgstore
from poller.ingest.compact import CompactError, compact_day, day_bytes
from poller.ingest.pgload import PgLoader
from poller.ingest.spool import Spool
from poller.migrate import migrate
from poller.reading import READING_COLUMNS, Reading
from tests.rows import FakeClock
from tests.stackfix import RunningStack

DAY = date(2020, 3, 1)
T0 = datetime(2020, 3, 1, tzinfo=UTC).timestamp()
DEVICES = 12
HOURS = 2
_SPAN = ("2020-03-01T00:00:00Z", "2020-03-02T00:00:00Z")
_HASH = ("SELECT count(*), sum(hashtextextended((device_id, tick_at, device_at, received_at, "
         "demand_w, delivered_wh, received_wh, price)::text, 0)) "
         "FROM readings_span($1::timestamptz, $2::timestamptz)")


def _ts(x: float | None) -> datetime | None:
    return None if x is None else datetime.fromtimestamp(x, UTC)


def _record(r: Reading) -> tuple[Any, ...]:
    return (r.device_id, _ts(r.tick_at), _ts(r.device_at), _ts(r.received_at), r.demand_w,
            r.delivered_wh, r.received_wh, r.price)


def _edge_rows() -> list[tuple[Any, ...]]:
    """Values a packed row must carry exactly: lone readings, nulls, extreme
    floats, offsets past int4 microseconds, ticks a microsecond apart and on
    the hour's edges."""
    h5 = datetime(2020, 3, 1, 5, tzinfo=UTC)
    us = timedelta(microseconds=1)
    return [
        (900, h5 + timedelta(minutes=17, microseconds=3), None, h5 + timedelta(minutes=17),
         None, None, None, None),
        (901, h5 + 7 * us, h5 - timedelta(days=3650), h5 + timedelta(minutes=40, seconds=3),
         -1000.0, 9.1937250123e7, 0.0, 0.0884),
        (901, h5 + 8 * us, h5 + timedelta(days=400), h5 + 9 * us, -0.0, 1e308, 5e-324, -1e-300),
        (902, h5 - us, h5 - timedelta(seconds=1), h5, 0.1, 0.2, 0.30000000000000004, 1 / 3),
        (902, h5, h5, h5 + us, 2.0 ** 53 + 2, -2.0 ** 60, None, 1e-7),
        (902, h5 + timedelta(minutes=59, seconds=59, microseconds=999_999), None,
         h5 + timedelta(hours=1), 123.456, None, None, None),
    ]


async def _prepare(url: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(url)
    await migrate(conn)
    await conn.execute("SELECT poller_ensure_partitions($1, 1)", DAY)
    rows = [_record(r) for batch in pgstore.synthetic(DEVICES, HOURS, 6.0, seed=3, start_s=T0)
            for r in batch]
    await conn.copy_records_to_table("readings", records=rows + _edge_rows(),
                                     columns=READING_COLUMNS)
    return conn


@pytest.fixture
async def conn(fresh_db: str) -> AsyncIterator[asyncpg.Connection]:
    c = await _prepare(fresh_db)
    yield c
    await c.close()


async def _all(conn: asyncpg.Connection) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in await conn.fetch(
        "SELECT * FROM readings_span($1::timestamptz, $2::timestamptz)", *_SPAN_TS)]


_SPAN_TS = tuple(datetime.fromisoformat(s) for s in _SPAN)
# One device's windows that cut hours in the middle, and one on the edge rows.
_WINDOWS = [(3, datetime(2020, 3, 1, 0, 30, tzinfo=UTC), datetime(2020, 3, 1, 1, 10, tzinfo=UTC)),
            (8, datetime(2020, 3, 1, 1, 59, 50, tzinfo=UTC), datetime(2020, 3, 2, tzinfo=UTC)),
            (902, datetime(2020, 3, 1, 5, tzinfo=UTC), datetime(2020, 3, 1, 6, tzinfo=UTC))]


async def _windows(conn: asyncpg.Connection) -> list[list[tuple[Any, ...]]]:
    return [[tuple(r) for r in await conn.fetch("SELECT * FROM readings_all($1, $2, $3)", *w)]
            for w in _WINDOWS]


async def test_compaction_keeps_every_reading_exactly_and_is_idempotent(
        conn: asyncpg.Connection) -> None:
    n = await conn.fetchval("SELECT count(*) FROM readings")
    assert n == DEVICES * HOURS * 600 + len(_edge_rows())
    before = await _all(conn)
    hashed = await conn.fetchrow(_HASH, *_SPAN_TS)
    windows = await _windows(conn)
    assert len(windows[0]) == 400 and len(windows[1]) in (1, 2) and len(windows[2]) == 2
    bytes_before = await day_bytes(conn, DAY)

    dry = await compact_day(conn, DAY, dry_run=True)
    assert (dry.raw_rows_before, dry.rows_moved) == (n, 0)
    assert await conn.fetchval("SELECT count(*) FROM readings") == n

    done = await compact_day(conn, DAY, batch_devices=5)
    assert (done.raw_rows_before, done.rows_moved, done.truncated) == (n, n, True)
    assert done.hours_written == DEVICES * HOURS + 4  # edge rows: 900, 901, 902 in two
    assert await conn.fetchval("SELECT count(*) FROM readings") == 0
    assert await conn.fetchval("SELECT sum(n) FROM packed_readings") == n
    assert await conn.fetchval("SELECT poller_day_rows($1)", DAY) == n
    assert await _all(conn) == before
    assert await conn.fetchrow(_HASH, *_SPAN_TS) == hashed
    assert await _windows(conn) == windows
    # -0.0 == 0.0 in Python: the sign must survive as PostgreSQL prints it.
    assert await conn.fetchval("SELECT demand_w::text FROM readings_all(901, $1, $2) "
                               "ORDER BY tick_at DESC LIMIT 1", *_SPAN_TS) == "-0"
    assert math.isclose(done.bytes_after, await day_bytes(conn, DAY))
    assert done.bytes_after * 3 < bytes_before

    again = await compact_day(conn, DAY)
    assert (again.raw_rows_before, again.rows_moved, again.hours_written) == (0, 0, 0)
    assert again.bytes_after == done.bytes_after
    assert await conn.fetchrow(_HASH, *_SPAN_TS) == hashed


async def test_late_data_into_a_compacted_day_is_loaded_once(
        conn: asyncpg.Connection, fresh_db: str, tmp_path: Path) -> None:
    before = await _all(conn)
    await compact_day(conn, DAY)
    first = next(pgstore.synthetic(DEVICES, HOURS, 6.0, seed=3, start_s=T0))
    # A replay of readings already packed, and readings the day never had:
    # between two packed ticks, a device the day had not seen, a new hour.
    again = first[:40]
    new = [Reading(2, T0 + 601.5, None, T0 + 602.0, 7.0, None, None, None, "b"),
           Reading(2, T0 + 2 * 3600 + 1.25, T0 + 2 * 3600, T0 + 2 * 3600 + 2, 8.0, 9.0, 0.0,
                   0.5, "b"),
           Reading(77, T0 + 1000.000001, None, T0 + 1001, -3.5, None, None, None, "c")]
    spool = Spool(tmp_path / "spool", "late", FakeClock(T0 + 86400 * 3))
    await spool.open()
    loader = PgLoader(fresh_db, "late", spool)
    await loader.start()
    try:
        await spool.append(again + new)
        await spool.close_all()
        assert await loader.catch_up() == len(new)
        assert await conn.fetchval("SELECT count(*) FROM readings") == len(new)
        expected = sorted(before + [_record(r) for r in new], key=lambda r: (r[0], r[1]))
        assert await _all(conn) == expected
        # Loaded again (a checkpoint lost): nothing more, raw or packed.
        await conn.execute("DELETE FROM ingest_checkpoints")
        assert await loader.catch_up() == 0
        assert await _all(conn) == expected

        merged = await compact_day(conn, DAY)
        assert (merged.rows_moved, merged.truncated) == (len(new), True)
        assert merged.hours_written == 3  # one packed hour merged, two new
        assert await conn.fetchval("SELECT count(*) FROM readings") == 0
        assert await _all(conn) == expected

        await conn.execute("DELETE FROM ingest_checkpoints")
        assert await loader.catch_up() == 0
        assert await _all(conn) == expected
    finally:
        await loader.stop()
        await spool.close()


async def test_late_data_during_a_compaction_is_loaded_once(
        conn: asyncpg.Connection, fresh_db: str, tmp_path: Path) -> None:
    before = await _all(conn)
    first = next(pgstore.synthetic(DEVICES, HOURS, 6.0, seed=3, start_s=T0))
    new = [Reading(d, T0 + 3.000001 * d, None, T0 + 4 * d, float(d), None, None, None, "n")
           for d in range(1, DEVICES + 1)]
    spool = Spool(tmp_path / "spool", "late", FakeClock(T0 + 86400 * 3))
    await spool.open()
    loader = PgLoader(fresh_db, "late", spool)
    await loader.start()
    other = await asyncpg.connect(fresh_db)
    try:
        # One member per device, so loads interleave with the batches.
        for d in range(DEVICES):
            await spool.append([r for r in first if r.device_id == d + 1] + [new[d]])
        await spool.close_all()
        _, loaded = await asyncio.gather(compact_day(other, DAY, batch_devices=2),
                                         loader.catch_up())
        assert loaded == len(new)
        await compact_day(conn, DAY)
        assert await conn.fetchval("SELECT count(*) FROM readings") == 0
        assert await _all(conn) == sorted(before + [_record(r) for r in new],
                                          key=lambda r: (r[0], r[1]))
    finally:
        await other.close()
        await loader.stop()
        await spool.close()


async def test_a_reading_both_raw_and_packed_stops_compaction(
        conn: asyncpg.Connection) -> None:
    await compact_day(conn, DAY)
    # Only a writer that bypasses the guard (dropped by hand) can do this.
    await conn.execute("DROP TRIGGER poller_packed_guard ON readings_p20200301")
    await conn.execute("INSERT INTO readings SELECT * FROM readings_all(3, $1, $2) LIMIT 2",
                       *_SPAN_TS)
    with pytest.raises(CompactError, match="both raw and packed"):
        await compact_day(conn, DAY)
    assert await conn.fetchval("SELECT count(*) FROM readings") == 2


async def test_storage_measure_gives_sane_bytes_per_reading(
        stack: RunningStack, fresh_db: str) -> None:
    conn = await asyncpg.connect(fresh_db)
    try:
        await migrate(conn)
        rows, seconds = await pgstore.load(fresh_db, 30, 1, 6.0)
        assert rows == 30 * 600 and seconds > 0
        raw = await pgstore.partition_sizes(conn, pgstore.DAY)
        assert [s.rows for s in raw] == [rows]
        size = raw[0]
        assert size.heap_bytes > 0 and size.index_bytes > 0
        assert size.total_bytes >= size.heap_bytes + size.index_bytes + size.toast_bytes
        raw_bpr = pgstore.per_reading(raw)
        # A heap row and its key entry hold 64 bytes of data and ~60 of overhead.
        assert raw_bpr is not None and 90 < raw_bpr < 250
        await compact_day(conn, pgstore.DAY)
        packed = await pgstore.partition_sizes(conn, pgstore.DAY)
        assert [s.rows for s in packed] == [0, rows]
        packed_bpr = pgstore.per_reading(packed)
        assert packed_bpr is not None and 1 < packed_bpr < raw_bpr / 2
    finally:
        await conn.close()


def test_compact_command(fresh_db: str, stack: RunningStack, tmp_path: Path,
                         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
                         ) -> None:
    async def prepare() -> None:
        await (await _prepare(fresh_db)).close()

    asyncio.run(prepare())
    for key, value in (("DATABASE_URL", fresh_db), ("REDIS_URL", stack.info.redis_url),
                       ("S3_ENDPOINT_URL", stack.info.s3_endpoint_url),
                       ("STATE_DIR", str(tmp_path))):
        monkeypatch.setenv(f"POLLER_{key}", value)

    def run(*argv: str) -> int:
        with pytest.raises(SystemExit) as exited:
            cli.main(["compact", *argv])
        return int(exited.value.code or 0)

    today = datetime.now(UTC).date().isoformat()
    assert run("--day", today) == 2
    assert "not closed yet" in capsys.readouterr().err
    assert run("--dry-run") == 0
    assert f"{DAY}: would pack {DEVICES * HOURS * 600 + 6:,} raw rows" in capsys.readouterr().out
    assert run("--day", DAY.isoformat()) == 0
    assert f"{DAY}: packed {DEVICES * HOURS * 600 + 6:,} raw rows" in capsys.readouterr().out
    assert run() == 0
    assert "nothing to compact" in capsys.readouterr().out
