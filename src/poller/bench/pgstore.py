"""Postgres storage of readings at a realistic partition size: bytes per
reading (heap, indexes and TOAST of each partition) and the rows per second
the loader sustains, then the same day compacted.

A bench window of a minute writes partitions far too small to measure (the
first pages of a heap and an index cost more per row than a full day's), so
this writes a synthetic fleet's readings through the real path: a spool of
hourly gzip segments, then :meth:`PgLoader.catch_up` (decode, binary COPY,
checkpoints), into a database of its own on the bench's server. Values look
like the meters': integer watts (hex demand / 1000 divisor), kWh totals with
three decimals, a price on local-API devices, totals only every tenth poll
on cloud-API ones, microsecond tick phases and receive times.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

from poller import db
from poller.db import Conn
from poller.ingest.compact import compact_day
from poller.ingest.pgload import PgLoader
from poller.ingest.spool import Spool
from poller.migrate import migrate
from poller.reading import Reading

DAY = date(2030, 1, 1)
"""Far from the days a live run writes, so nothing else lands in its partition."""
_DAY_START = datetime(DAY.year, DAY.month, DAY.day, tzinfo=UTC).timestamp()
_BATCH_ROWS = 10_000
Progress = Callable[[str], None]
_INSTANCE = "bench-storage"


@dataclass(frozen=True, slots=True)
class PartitionSize:
    name: str
    rows: int
    """Readings held (a packed partition: the sum of its rows' counts)."""
    heap_bytes: int
    index_bytes: int
    toast_bytes: int
    """The TOAST table and its index (where packed arrays live)."""
    total_bytes: int
    """All of it, with the free-space and visibility maps."""

    @property
    def bytes_per_reading(self) -> float | None:
        return self.total_bytes / self.rows if self.rows else None


@dataclass(frozen=True, slots=True)
class StorageRun:
    devices: int
    hours: int
    interval_s: float
    rows: int
    load_s: float
    loader_rows_per_s: float
    raw: list[PartitionSize]
    raw_bytes_per_reading: float | None
    compact_s: float | None
    compact_rows_per_s: float | None
    packed: list[PartitionSize]
    packed_bytes_per_reading: float | None
    """After ``compact_day``: both forms of the day (the raw partition emptied)."""


def synthetic(devices: int, hours: int, interval_s: float, seed: int = 0,
              start_s: float = _DAY_START) -> Iterator[list[Reading]]:
    """The fleet's readings in tick order, in batches of about 10,000."""
    rng = random.Random(seed)
    phases = [round(rng.random() * interval_s, 6) for _ in range(devices)]
    skews = [rng.randint(-3, 3) for _ in range(devices)]
    ticks = int(hours * 3600 / interval_s)
    batch: list[Reading] = []
    for k in range(ticks):
        for i in range(devices):
            device_id = i + 1
            tick = start_s + phases[i] + k * interval_s
            local = device_id % 2 == 0
            totals = local or k % 10 == 0
            milli_kwh = 91_937_250 + 31 * device_id + 4 * k
            batch.append(Reading(
                device_id, tick, float(int(tick + skews[i])), tick + 0.02 + 0.3 * rng.random(),
                float(round(500 + 2000 * rng.random())),
                milli_kwh / 1000 * 1000 if totals else None,
                (k // 100) / 1000 * 1000 if totals else None,
                0.0884 if local else None, f"{device_id:06x}"))
            if len(batch) >= _BATCH_ROWS:
                yield batch
                batch = []
    if batch:
        yield batch


async def partition_sizes(conn: Conn, day: date) -> list[PartitionSize]:
    """Heap, indexes and TOAST of the day's raw and packed partitions (those
    that exist), with the readings each holds."""
    stamp = day.strftime("%Y%m%d")
    out: list[PartitionSize] = []
    for name, count in ((f"readings_p{stamp}", "count(*)"),
                        (f"packed_readings_p{stamp}", "coalesce(sum(n), 0)")):
        if await conn.fetchval("SELECT to_regclass($1)", name) is None:
            continue
        rows = int(await conn.fetchval(f'SELECT {count} FROM "{name}"'))
        size = await conn.fetchrow(
            """SELECT pg_relation_size(c.oid) AS heap, pg_indexes_size(c.oid) AS idx,
                      coalesce(pg_total_relation_size(nullif(c.reltoastrelid, 0)), 0) AS toast,
                      pg_total_relation_size(c.oid) AS total
               FROM pg_class c WHERE c.oid = to_regclass($1)""", name)
        assert size is not None
        out.append(PartitionSize(name, rows, size["heap"], size["idx"], size["toast"],
                                 size["total"]))
    return out


def per_reading(sizes: list[PartitionSize]) -> float | None:
    rows = sum(s.rows for s in sizes)
    return sum(s.total_bytes for s in sizes) / rows if rows else None


async def fresh_database(server_url: str, name: str) -> str:
    """An empty database ``name`` on the server of ``server_url`` (dropped
    first if a previous run left it); its URL."""
    if not name.replace("_", "").isalnum():
        raise ValueError(f"database name must be [A-Za-z0-9_]: {name!r}")
    conn = await db.connect(server_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    # Here, not at the top: poller.stack needs the `embedded` extra, which
    # an installed poller may lack (the bench's parser is built at every start).
    from poller.stack.postgres import with_database
    return with_database(server_url, name)


async def load(url: str, devices: int, hours: int, interval_s: float, *, seed: int = 0,
               progress: Callable[[str], None] | None = None) -> tuple[int, float]:
    """Spool the synthetic readings, then time the loader's catch-up of them
    into ``url`` (a migrated database); ``(rows, seconds)``."""
    with tempfile.TemporaryDirectory(prefix="poller-bench-storage-") as tmp:
        spool = Spool(Path(tmp) / "spool", _INSTANCE, lambda: _DAY_START + hours * 3600 + 3600)
        await spool.open()
        try:
            written = 0
            for batch in synthetic(devices, hours, interval_s, seed):
                await spool.append(batch)
                written += len(batch)
                if progress is not None and written % 500_000 < len(batch):
                    progress(f"storage: spooled {written:,} readings")
            await spool.close_all()
            loader = PgLoader(url, _INSTANCE, spool, catch_up_rows=100_000)
            await loader.start()
            try:
                if progress is not None:
                    progress(f"storage: loading {written:,} readings (loader catch-up)")
                started = time.perf_counter()
                rows = await loader.catch_up()
                return rows, time.perf_counter() - started
            finally:
                await loader.stop()
        finally:
            await spool.close()


def run(server_url: str, devices: int, hours: int, interval_s: float, *, seed: int = 0,
        database: str = "poller_bench_storage", compact: bool = True,
        progress: Callable[[str], None] | None = None) -> StorageRun:
    """Load, measure, compact, measure again, in a database of its own."""

    async def main() -> StorageRun:
        url = await fresh_database(server_url, database)
        conn = await db.connect(url)
        try:
            await migrate(conn)
            rows, load_s = await load(url, devices, hours, interval_s, seed=seed,
                                      progress=progress)
            await conn.execute(f"VACUUM ANALYZE readings_p{DAY.strftime('%Y%m%d')}")
            raw = await partition_sizes(conn, DAY)
            compact_s = None
            packed: list[PartitionSize] = []
            if compact:
                started = time.perf_counter()
                await compact_day(conn, DAY, progress=progress)
                compact_s = time.perf_counter() - started
                packed = await partition_sizes(conn, DAY)
            return StorageRun(
                devices, hours, interval_s, rows, load_s, rows / load_s if load_s else 0.0,
                raw, per_reading(raw), compact_s,
                rows / compact_s if compact_s else None, packed,
                per_reading(packed) if packed else None)
        finally:
            await conn.close()

    return asyncio.run(main())


def render(run: StorageRun) -> list[str]:
    out = [f"  synthetic fleet: {run.devices:,} devices every {run.interval_s:g} s for "
           f"{run.hours} h = {run.rows:,} readings, one daily partition",
           f"  loader catch-up: {run.rows:,} rows in {run.load_s:.1f} s = "
           f"{run.loader_rows_per_s:,.0f} rows/s"]
    for label, sizes, bpr in (("raw", run.raw, run.raw_bytes_per_reading),
                              ("compacted", run.packed, run.packed_bytes_per_reading)):
        for s in sizes:
            out.append(f"  {s.name:28} {s.rows:>11,} readings  heap {s.heap_bytes:>12,}  "
                       f"indexes {s.index_bytes:>11,}  toast {s.toast_bytes:>11,}  "
                       f"total {s.total_bytes:>12,} B")
        if bpr is not None:
            out.append(f"  {label} bytes per reading: {bpr:,.1f} B")
    if run.compact_s is not None:
        out.append(f"  compaction: {run.compact_s:.1f} s = {run.compact_rows_per_s or 0:,.0f} "
                   "rows/s")
    return out
