"""Replay from the archive (real SeaweedFS) into Postgres (real, embedded)."""

from __future__ import annotations

import gzip
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from poller.archive.naming import archive_key
from poller.archive.replay import replay
from poller.archive.s3 import ArchiveStore
from poller.archive.uploader import Uploader
from poller.ingest.spool import Spool
from poller.migrate import migrate
from poller.reading import READING_COLUMNS, Reading
from tests.rows import to_records
from tests.stackfix import RunningStack, fresh_database_url
from tests.test_archive import encode

# 2029-12-31T23:00Z: the next hour is another day, and neither day has a
# partition yet, so replay must create both.
H = 1_893_452_400
_prefixes = iter(range(1, 1_000_000))


def hour_rows(hour: int, devices: range, step_s: int = 120) -> list[Reading]:
    return [Reading(d, float(t), t - 0.25 if d % 2 else None, t + 0.5, 10.0 * d + t % 7,
                    1e6 + t, None if d % 3 else 2.5, 0.1 if t % 2 else None, f"dev-{d}")
            for t in range(hour, hour + 3600, step_s) for d in devices]


@pytest.fixture
def prefix() -> str:
    return f"replay{next(_prefixes)}-{time.time_ns()}"


async def put_segment(store: ArchiveStore, tmp: Path, prefix: str, hour: int, seq: int,
                      body: bytes, instance: str = "gw-a") -> str:
    name = f"{instance}-{time.strftime('%Y%m%dT%H', time.gmtime(hour))}-{seq:06d}.ndjson.gz"
    (tmp / name).write_bytes(body)
    key = archive_key(prefix, name)
    await store.upload_file(tmp / name, key)
    return key


async def table(pool: asyncpg.Pool) -> list[tuple[Any, ...]]:
    rows = await pool.fetch(f"SELECT {', '.join(READING_COLUMNS)} FROM readings "
                            "ORDER BY device_id, tick_at")
    return [tuple(r) for r in rows]


async def load_directly(pool: asyncpg.Pool, rows: list[Reading]) -> None:
    """As the live loader does: its conversion, straight COPY."""
    async with pool.acquire() as conn:
        await conn.execute("SELECT poller_ensure_partitions('2029-12-31'::date, 2)")
        await conn.copy_records_to_table("readings", records=to_records(rows),
                                         columns=READING_COLUMNS)


def dt(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


async def test_round_trip_is_exact_and_idempotent(store: ArchiveStore, pool: asyncpg.Pool,
                                                  prefix: str, tmp_path: Path) -> None:
    first, second = hour_rows(H, range(1, 6)), hour_rows(H + 3600, range(1, 6))
    other = hour_rows(H, range(100, 103))
    await put_segment(store, tmp_path, prefix, H, 1, encode(first, members=4))
    await put_segment(store, tmp_path, prefix, H, 2, encode(other), instance="gw-b")
    await put_segment(store, tmp_path, prefix, H + 3600, 3, encode(second, members=3))
    everything = first + second + other
    await load_directly(pool, everything)
    original = await table(pool)
    n = len(everything)
    assert len(original) == n == 390

    seen: list[tuple[int, int]] = []
    result = await replay(store, prefix, pool, dt(H), dt(H + 7200),
                          lambda done, total: seen.append((done, total)))
    # The archive holds exactly what Postgres has: nothing new.
    assert (result.objects, result.rows_read, result.rows_inserted, result.rows_present,
            result.errors) == (3, n, 0, n, 0)
    assert seen == [(1, 3), (2, 3), (3, 3)]

    async with pool.acquire() as conn:
        await conn.execute("DELETE FROM readings")
        await conn.execute("DROP TABLE readings_p20300101")  # the partition must come back
    result = await replay(store, prefix, pool, dt(H), dt(H + 7200))
    assert (result.rows_inserted, result.rows_present, result.errors) == (n, 0, 0)
    assert await table(pool) == original

    await pool.execute("DELETE FROM readings WHERE device_id % 2 = 0")
    result = await replay(store, prefix, pool, dt(H), dt(H + 7200))
    assert result.rows_inserted == sum(1 for r in everything if r.device_id % 2 == 0)
    assert await table(pool) == original

    again = await replay(store, prefix, pool, dt(H), dt(H + 7200))
    assert (again.rows_inserted, again.rows_present) == (0, n)
    assert await table(pool) == original


async def test_range_selects_objects_and_rows(stack: RunningStack, store: ArchiveStore,
                                              pool: asyncpg.Pool, prefix: str,
                                              tmp_path: Path) -> None:
    rows = hour_rows(H, range(1, 3)) + hour_rows(H + 3600, range(1, 3))
    await put_segment(store, tmp_path, prefix, H, 1, encode(rows[:60]))
    await put_segment(store, tmp_path, prefix, H + 3600, 2, encode(rows[60:]))
    await put_segment(store, tmp_path, prefix, H - 86400, 3, encode(hour_rows(H - 86400,
                                                                               range(1, 2))))
    since, until = H + 1800, H + 3600 + 600
    wanted = [r for r in rows if since <= r.tick_at < until]
    # Passing a URL: replay opens and closes its own connection.
    url = fresh_database_url(stack.info)
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
        result = await replay(store, prefix, url, dt(since), datetime(2030, 1, 1, 0, 10))
        assert (result.objects, result.rows_read, result.rows_inserted) == (2, len(wanted),
                                                                            len(wanted))
        assert result.rows_out_of_range == len(rows) - len(wanted)
        got = await conn.fetch(f"SELECT {', '.join(READING_COLUMNS)} FROM readings "
                               "ORDER BY device_id, tick_at")
        assert sorted(tuple(r) for r in got) == sorted(to_records(wanted))
    finally:
        await conn.close()
    with pytest.raises(ValueError):
        await replay(store, prefix, pool, dt(H), dt(H))


async def test_corrupt_objects_are_reported_and_skipped(store: ArchiveStore, pool: asyncpg.Pool,
                                                        prefix: str, tmp_path: Path) -> None:
    good = hour_rows(H, range(1, 4))
    garbage_key = await put_segment(store, tmp_path, prefix, H, 1, b"this is not gzip\n" * 50)
    good_key = await put_segment(store, tmp_path, prefix, H, 2, encode(good))
    lines = [orjson.dumps(r._asdict()) for r in hour_rows(H, range(10, 11))]
    lines[2] = b'{"device_id": 10, "tick_at": '             # line 3: broken JSON
    lines[4] = orjson.dumps({"device_id": "ten", "tick_at": H})  # line 5: not a reading
    bad_lines_key = await put_segment(store, tmp_path, prefix, H, 3,
                                      gzip.compress(b"\n".join(lines) + b"\n"))
    cut_rows = hour_rows(H, range(20, 21))
    whole = encode(cut_rows, members=2)
    first_member = len(gzip.compress(b"".join(orjson.dumps(r._asdict()) + b"\n"
                                              for r in cut_rows[:15])))
    cut_key = await put_segment(store, tmp_path, prefix, H, 4, whole[:first_member + 40])

    result = await replay(store, prefix, pool, dt(H), dt(H + 3600))
    assert result.objects == 4
    assert result.errors == 4
    found = {(i.key, i.line) for i in result.issues}
    assert (garbage_key, 1) in found
    assert (bad_lines_key, 3) in found and (bad_lines_key, 5) in found
    assert any(key == cut_key for key, _ in found)
    messages = "\n".join(str(i) for i in result.issues)
    assert "bad gzip" in messages and "truncated" in messages
    assert f"{bad_lines_key} line 3: not valid JSON" in messages
    assert good_key not in messages

    loaded = set(await table(pool))
    expected_good = set(to_records(good))
    kept_lines = [r for i, r in enumerate(hour_rows(H, range(10, 11))) if i not in (2, 4)]
    assert expected_good <= loaded
    assert set(to_records(kept_lines)) <= loaded
    cut_loaded = {r for r in loaded if r[0] == 20}
    # The complete first member is loaded; of the cut one, at most whole lines.
    assert set(to_records(cut_rows[:15])) <= cut_loaded <= set(to_records(cut_rows))
    assert len(loaded) == len(expected_good) + len(kept_lines) + len(cut_loaded)
    assert result.rows_inserted == len(loaded)


async def test_spool_files_round_trip_through_uploader(store: ArchiveStore, pool: asyncpg.Pool,
                                                       prefix: str, tmp_path: Path) -> None:
    """The spool's own files, uploaded by the uploader, replay to the same rows."""
    rows = hour_rows(H, range(1, 4)) + hour_rows(H + 3600, range(1, 4))
    spool = Spool(tmp_path / "spool", "gw-e2e")
    await spool.open()
    try:
        for i in range(0, len(rows), 25):  # many members per segment
            await spool.append(rows[i:i + 25])
        closed = await spool.close_all()
        assert len(closed) == 2
        uploader = Uploader(store, spool.directory, prefix, lambda name: True,
                            delete=spool.delete)
        assert await uploader.upload_pending() == 2
        assert spool.closed_segments() == []
    finally:
        await spool.close()
    result = await replay(store, prefix, pool, dt(H), dt(H + 7200))
    assert (result.objects, result.rows_inserted, result.errors) == (2, len(rows), 0)
    assert sorted(await table(pool)) == sorted(to_records(rows))
