"""Candidate layouts of raw readings, measured on one realistic partition.

    python -m poller.bench.layouts --database-url postgresql://... [--devices 500 --hours 4]

Loads a synthetic fleet's readings through the real loader into a database
of its own (``poller_bench_layouts``, dropped and made again: rerunnable),
then builds each candidate from the same rows and prints bytes per reading
(heap + indexes + TOAST) and the time to read one device's day:

- ``today``: the ``readings`` partition, btree primary key (device_id, tick_at);
- ``brin``: the same heap with a BRIN index instead of the btree: no unique
  key, so no idempotent load, and a BRIN over (device_id, tick_at) of rows in
  tick order cannot find one device's rows without reading the whole range;
- ``narrow``: device_id int4, receive and device times as int4 microsecond
  offsets, demand and price float4, with the btree key; lossy (float4 rounds
  prices like 0.0884 and demands of divisors other than 1000; int4 offsets
  overflow past 35 minutes): an upper bound of what narrowing a row can give;
- ``narrow_brin``: that row with BRIN and no key;
- ``packed_absolute``: one row per device and hour with tick offsets from
  the hour instead of deltas (float8 values): what the deltas save;
- ``packed_float4``: the packed row with float4 values (lossy): what
  narrowing would add to packing;
- ``packed``: schema/007's layout, written by ``compact_day`` itself (exact).

Nothing here is a test: it measures. ``README.md`` ("Storage cost and compact
layout") quotes a run of it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from poller import argtypes, db
from poller.bench import pgstore
from poller.db import Conn
from poller.ingest.compact import compact_day
from poller.migrate import migrate

_RAW = f"readings_p{pgstore.DAY.strftime('%Y%m%d')}"
_DAY_FROM = "2030-01-01T00:00:00Z"
_DAY_TO = "2030-01-02T00:00:00Z"

_NARROW = f"""
CREATE TABLE {{name}} AS
SELECT device_id::integer AS device_id, tick_at,
       poller_us_between(device_at, tick_at)::integer AS device_us,
       poller_us_between(received_at, tick_at)::integer AS received_us,
       demand_w::real AS demand_w, delivered_wh, received_wh, price::real AS price
FROM {_RAW}"""
_PACKED = f"""
CREATE TABLE {{name}} AS
SELECT device_id, hour_at, count(*)::integer AS n,
       array_agg({{tick}} ORDER BY tick_at) AS tick_us,
       array_agg(poller_us_between(device_at, tick_at) ORDER BY tick_at) AS device_us,
       array_agg(poller_us_between(received_at, tick_at) ORDER BY tick_at) AS received_us,
       array_agg(demand_w::{{value}} ORDER BY tick_at) AS demand_w,
       array_agg(delivered_wh::{{value}} ORDER BY tick_at) AS delivered_wh,
       array_agg(received_wh::{{value}} ORDER BY tick_at) AS received_wh,
       array_agg(price::{{value}} ORDER BY tick_at) AS price
FROM (SELECT r.*, date_trunc('hour', tick_at, 'UTC') AS hour_at,
             poller_us_between(tick_at, date_trunc('hour', tick_at, 'UTC')) AS at_us,
             lag(poller_us_between(tick_at, date_trunc('hour', tick_at, 'UTC')))
                 OVER (PARTITION BY device_id, date_trunc('hour', tick_at, 'UTC')
                       ORDER BY tick_at) AS prev_us
      FROM {_RAW} r) s
GROUP BY device_id, hour_at"""


@dataclass(frozen=True, slots=True)
class Layout:
    name: str
    exact: bool
    """Every value and time comes back as loaded."""
    idempotent: bool
    """A unique key on (device_id, tick_at) (or its packed equivalent)."""
    rows: int
    heap_bytes: int
    index_bytes: int
    toast_bytes: int
    total_bytes: int
    bytes_per_reading: float
    device_day_ms: float | None
    """Median time to read one device's day of readings (None: not measured)."""


async def _size(conn: Conn, name: str, rows: int) -> tuple[int, int, int, int]:
    size = await conn.fetchrow(
        """SELECT pg_relation_size(c.oid) AS heap, pg_indexes_size(c.oid) AS idx,
                  coalesce(pg_total_relation_size(nullif(c.reltoastrelid, 0)), 0) AS toast,
                  pg_total_relation_size(c.oid) AS total
           FROM pg_class c WHERE c.oid = to_regclass($1)""", name)
    assert size is not None
    return size["heap"], size["idx"], size["toast"], size["total"]


async def _time_ms(conn: Conn, sql: str, devices: int, expect: int | None) -> float:
    """Median of reading one device's day, over a spread of devices."""
    times: list[float] = []
    step = max(1, devices // 15)
    for device in range(1, devices + 1, step):
        started = time.perf_counter()
        rows = await conn.fetch(sql, device)
        times.append((time.perf_counter() - started) * 1000)
        if expect is not None and len(rows) != expect:
            raise RuntimeError(f"{sql!r} returned {len(rows)} rows, expected {expect}")
    return statistics.median(times)


async def measure(url: str, devices: int, hours: int, interval_s: float, seed: int,
                  progress: pgstore.Progress) -> tuple[pgstore.StorageRun | None, list[Layout]]:
    conn = await db.connect(url)
    try:
        await migrate(conn)
        rows, load_s = await pgstore.load(url, devices, hours, interval_s, seed=seed,
                                          progress=progress)
        await conn.execute(f"VACUUM ANALYZE {_RAW}")
        per_device = rows // devices
        out: list[Layout] = []

        async def add(name: str, table: str, exact: bool, idempotent: bool,
                      query: str | None) -> None:
            heap, idx, toast, total = await _size(conn, table, rows)
            ms = await _time_ms(conn, query, devices, per_device) if query else None
            out.append(Layout(name, exact, idempotent, rows, heap, idx, toast, total,
                              total / rows, ms))
            progress(f"layouts: {name}: {total / rows:,.1f} B per reading")

        await add("today", _RAW, True, True,
                  f"SELECT * FROM readings WHERE device_id = $1 AND tick_at >= '{_DAY_FROM}' "
                  f"AND tick_at < '{_DAY_TO}'")
        await conn.execute(f"CREATE TABLE lay_brin AS SELECT * FROM {_RAW}")
        await conn.execute("CREATE INDEX ON lay_brin USING brin (device_id, tick_at)")
        await add("brin", "lay_brin", True, False,
                  f"SELECT * FROM lay_brin WHERE device_id = $1 AND tick_at >= '{_DAY_FROM}' "
                  f"AND tick_at < '{_DAY_TO}'")
        await conn.execute(_NARROW.format(name="lay_narrow"))
        await conn.execute("ALTER TABLE lay_narrow ADD PRIMARY KEY (device_id, tick_at)")
        await add("narrow", "lay_narrow", False, True, None)
        await conn.execute(_NARROW.format(name="lay_narrow_brin"))
        await conn.execute("CREATE INDEX ON lay_narrow_brin USING brin (device_id, tick_at)")
        await add("narrow_brin", "lay_narrow_brin", False, False, None)
        await conn.execute(_PACKED.format(name="lay_packed_abs", tick="at_us", value="float8"))
        await conn.execute("ALTER TABLE lay_packed_abs ADD PRIMARY KEY (device_id, hour_at)")
        await add("packed_absolute", "lay_packed_abs", True, True, None)
        await conn.execute(_PACKED.format(name="lay_packed_f4",
                                          tick="at_us - coalesce(prev_us, 0)", value="real"))
        await conn.execute("ALTER TABLE lay_packed_f4 ADD PRIMARY KEY (device_id, hour_at)")
        await add("packed_float4", "lay_packed_f4", False, True, None)
        started = time.perf_counter()
        await compact_day(conn, pgstore.DAY, progress=progress)
        compact_s = time.perf_counter() - started
        packed = await pgstore.partition_sizes(conn, pgstore.DAY)
        await conn.execute(f"VACUUM ANALYZE packed_readings_p{pgstore.DAY.strftime('%Y%m%d')}")
        total = sum(s.total_bytes for s in packed)
        ms = await _time_ms(conn, f"SELECT * FROM readings_all($1, '{_DAY_FROM}', "
                                  f"'{_DAY_TO}')", devices, per_device)
        out.append(Layout("packed", True, True, rows, sum(s.heap_bytes for s in packed),
                          sum(s.index_bytes for s in packed),
                          sum(s.toast_bytes for s in packed), total, total / rows, ms))
        run = pgstore.StorageRun(devices, hours, interval_s, rows, load_s,
                                 rows / load_s if load_s else 0.0, [], None, compact_s,
                                 rows / compact_s if compact_s else None, packed,
                                 total / rows)
        return run, out
    finally:
        await conn.close()


def render(layouts: list[Layout]) -> str:
    base = layouts[0].bytes_per_reading
    lines = [f"  {'layout':16} {'B/reading':>9} {'vs today':>8}  {'heap':>12} {'indexes':>12} "
             f"{'toast':>12}  exact  key  one device-day"]
    for lay in layouts:
        ms = "-" if lay.device_day_ms is None else f"{lay.device_day_ms:.1f} ms"
        lines.append(f"  {lay.name:16} {lay.bytes_per_reading:9.1f} "
                     f"{lay.bytes_per_reading / base:8.2f}  {lay.heap_bytes:12,} "
                     f"{lay.index_bytes:12,} {lay.toast_bytes:12,}  "
                     f"{'yes' if lay.exact else 'no':5}  {'yes' if lay.idempotent else 'no':3}  "
                     f"{ms}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m poller.bench.layouts",
        description="Measure bytes per reading of candidate raw layouts on one realistic "
        "partition (drops and recreates the database poller_bench_layouts).")
    parser.add_argument("--database-url", default=os.environ.get("POLLER_DATABASE_URL"),
                        help="a PostgreSQL server (any database on it; default "
                        "POLLER_DATABASE_URL; `poller stack up` prints the embedded one)")
    parser.add_argument("--devices", type=argtypes.count, default=500)
    parser.add_argument("--hours", type=argtypes.count, default=4,
                        help="hours of readings, at most 24 (default 4)")
    parser.add_argument("--interval", type=argtypes.seconds, default=6.0, metavar="SECONDS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also write the results here")
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error("no server: give --database-url or set POLLER_DATABASE_URL")
    if args.hours > 24:
        parser.error("--hours: one daily partition holds at most 24")

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    async def run() -> tuple[pgstore.StorageRun | None, list[Layout]]:
        url = await pgstore.fresh_database(args.database_url, "poller_bench_layouts")
        return await measure(url, args.devices, args.hours, args.interval, args.seed,
                             progress)

    storage, layouts = asyncio.run(run())
    if storage is not None:
        sys.stdout.write(f"{storage.rows:,} readings loaded at {storage.loader_rows_per_s:,.0f} "
                         f"rows/s; compact_day at {storage.compact_rows_per_s or 0:,.0f} "
                         "rows/s\n")
    sys.stdout.write(render(layouts))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_bytes(orjson.dumps(
            {"storage": asdict(storage) if storage else None,
             "layouts": [asdict(lay) for lay in layouts]}, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
