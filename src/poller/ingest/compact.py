"""Compaction: a closed day's raw readings rewritten into one packed row per
device and hour (``packed_readings``, schema/007_compact.sql).

A packed hour costs about a tenth of its raw rows (README, "Storage cost and
compact layout"). Each batch of devices moves in one transaction that
deletes the raw rows, merges them with what the hour had packed already (a
day compacted again after late data), writes the packed rows and checks,
before it commits, that the packed rows unpack to exactly the readings that
went in (count and a hash of every column). Once the raw partition holds no
row, it is truncated so the space returns to the filesystem.

Safe to run at any time and any number of times: a day with no raw rows is
left as it is; two compactions of one day take turns (an advisory lock);
loaders writing late rows into the day wait for the batch in progress, and
a trigger the first batch installs skips a late row whose reading is packed
already, so a reading is never in both forms.

>>> result = await compact_day(conn, date(2030, 1, 1))   # doctest: +SKIP
>>> result.rows_moved, result.bytes_before, result.bytes_after
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from poller.db import Conn
from poller.errors import PollerError

log = logging.getLogger(__name__)

DEFAULT_BATCH_DEVICES = 100
"""Devices per transaction: a day of 100 devices at 6 s is 1.44 million raw
rows, a few seconds of work, and the longest a late row of those devices waits."""
CLOSED_AFTER = timedelta(hours=2)
"""A day is closed this long after it ends: its last hour's segments close
30 s after the hour and load within seconds; later rows are late data,
which compaction handles but need not chase."""
_LOCK_KEY = 7419032
_GUARD = "poller_packed_guard"

# One row per reading, as text: float8 prints its shortest exact form and
# timestamptz its microseconds, so equal hashes mean equal columns.
_HASH = ("SELECT count(*) AS n, coalesce(sum(hashtextextended("
         "(device_id, tick_at, device_at, received_at, demand_w, delivered_wh, "
         "received_wh, price)::text, 0)), 0) AS h FROM ")
_PACK = """
INSERT INTO {packed} (device_id, hour_at, n, tick_us, device_us, received_us,
                      demand_w, delivered_wh, received_wh, price)
SELECT device_id, hour_at, count(*)::integer,
       array_agg(at_us - coalesce(prev_us, 0) ORDER BY tick_at),
       array_agg(poller_us_between(device_at, tick_at) ORDER BY tick_at),
       array_agg(poller_us_between(received_at, tick_at) ORDER BY tick_at),
       array_agg(demand_w ORDER BY tick_at), array_agg(delivered_wh ORDER BY tick_at),
       array_agg(received_wh ORDER BY tick_at), array_agg(price ORDER BY tick_at)
FROM (SELECT r.*, poller_us_between(r.tick_at, h.hour_at) AS at_us,
             lag(poller_us_between(r.tick_at, h.hour_at))
                 OVER (PARTITION BY r.device_id, h.hour_at ORDER BY r.tick_at) AS prev_us,
             h.hour_at
      FROM (SELECT * FROM poller_compact_moved UNION ALL SELECT * FROM poller_compact_old) r,
           LATERAL (SELECT date_trunc('hour', r.tick_at, 'UTC') AS hour_at) h) s
GROUP BY device_id, hour_at"""
_UNPACK_NEW = """
SELECT u.* FROM {packed} p
JOIN poller_compact_hours t ON p.device_id = t.device_id AND p.hour_at = t.hour_at,
LATERAL poller_unpack(p.device_id, p.hour_at, p.tick_us, p.device_us, p.received_us,
                      p.demand_w, p.delivered_wh, p.received_wh, p.price) u"""


class CompactError(PollerError):
    """A compaction refused to commit: what it would write does not hold
    exactly the readings it would remove (nothing changed), or the day is
    not one it may compact."""


@dataclass(frozen=True, slots=True)
class CompactResult:
    day: date
    dry_run: bool
    raw_rows_before: int
    packed_rows_before: int
    rows_moved: int
    """Raw rows packed (0 in a dry run)."""
    hours_written: int
    """Packed rows written, new or merged with late rows."""
    bytes_before: int
    """Both partitions of the day (heap + indexes + TOAST) before."""
    bytes_after: int
    truncated: bool
    """The raw partition was emptied and truncated (its space returned)."""


def partition_names(day: date) -> tuple[str, str]:
    """``(raw, packed)`` partition names of a UTC day."""
    stamp = day.strftime("%Y%m%d")
    return f"readings_p{stamp}", f"packed_readings_p{stamp}"


def _day_start(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def is_closed(day: date, now: datetime) -> bool:
    return _day_start(day) + timedelta(days=1) + CLOSED_AFTER <= now


async def _relation_bytes(conn: Conn, name: str) -> int:
    size = await conn.fetchval(
        "SELECT coalesce(pg_total_relation_size(to_regclass($1)), 0)", name)
    return int(size)


async def day_bytes(conn: Conn, day: date) -> int:
    """Both forms of a day on disk: heap, indexes and TOAST of each partition."""
    raw, packed = partition_names(day)
    return await _relation_bytes(conn, raw) + await _relation_bytes(conn, packed)


async def closed_days(conn: Conn, now: datetime) -> list[date]:
    """Closed days whose raw partition holds rows, oldest first."""
    names = await conn.fetch(
        """SELECT c.relname FROM pg_inherits i
           JOIN pg_class c ON c.oid = i.inhrelid
           WHERE i.inhparent = 'readings'::regclass AND c.relname ~ '^readings_p[0-9]{8}$'
           ORDER BY c.relname""")
    days: list[date] = []
    for row in names:
        stamp = row["relname"][len("readings_p"):]
        day = date(int(stamp[:4]), int(stamp[4:6]), int(stamp[6:]))
        if is_closed(day, now) and await conn.fetchval(
                f'SELECT EXISTS (SELECT 1 FROM "{row["relname"]}")'):
            days.append(day)
    return days


async def compact_day(conn: Conn, day: date, *, dry_run: bool = False,
                      batch_devices: int = DEFAULT_BATCH_DEVICES,
                      progress: Callable[[str], None] | None = None) -> CompactResult:
    """Pack the raw readings of ``day`` (UTC) into ``packed_readings``.

    Idempotent: a day with no raw rows left is not touched, and a day with
    late rows has them merged into its packed hours. ``dry_run`` only counts.
    Raises :class:`CompactError` (nothing of the failing batch changed) if a
    batch's packed rows would not unpack to exactly the readings removed.
    """
    if batch_devices < 1:
        raise ValueError(f"batch_devices must be >= 1, got {batch_devices}")
    raw = partition_names(day)[0]
    start = _day_start(day)
    if await conn.fetchval("SELECT to_regclass($1)", raw) is None:
        raise CompactError(f"{day}: no partition {raw}: nothing to compact")
    raw_before = int(await conn.fetchval(f'SELECT count(*) FROM "{raw}"'))
    packed_before = int(await conn.fetchval(
        "SELECT coalesce(sum(n), 0) FROM packed_readings WHERE hour_at >= $1 AND hour_at < $2",
        start, start + timedelta(days=1)))
    bytes_before = await day_bytes(conn, day)
    if dry_run or raw_before == 0:
        return CompactResult(day, dry_run, raw_before, packed_before, 0, 0, bytes_before,
                             bytes_before, False)
    async with conn.transaction():
        await conn.fetchval("SELECT poller_ensure_packed_partition($1)", day)
    moved = hours = 0
    next_id: int | None = int(await conn.fetchval(f'SELECT min(device_id) FROM "{raw}"'))
    while next_id is not None:
        first = next_id
        async with conn.transaction():
            b_moved, b_hours = await _batch(conn, day, first, first + batch_devices)
            next_id = await conn.fetchval(
                f'SELECT min(device_id) FROM "{raw}" WHERE device_id >= $1',
                first + batch_devices)
        moved += b_moved
        hours += b_hours
        if progress is not None:
            progress(f"compact {day}: {moved:,} of {raw_before:,} raw rows packed "
                     f"({hours:,} device-hours)")
    truncated = await _truncate_if_empty(conn, raw)
    bytes_after = await day_bytes(conn, day)
    log.info("compact %s: %d raw rows into %d device-hours, %d -> %d bytes", day, moved,
             hours, bytes_before, bytes_after)
    return CompactResult(day, False, raw_before, packed_before, moved, hours, bytes_before,
                         bytes_after, truncated)


async def _batch(conn: Conn, day: date, first_id: int, end_id: int) -> tuple[int, int]:
    """Move the raw rows of devices ``[first_id, end_id)`` into packed rows,
    inside the caller's transaction; ``(rows moved, device-hours written)``."""
    raw, packed = partition_names(day)
    await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", _LOCK_KEY,
                       (day - date(1970, 1, 1)).days)
    # Loaders wait while the batch moves rows (reads go on): a late row must
    # not slip in between the delete and the guard seeing its packed hour.
    await conn.execute(f'LOCK TABLE "{raw}" IN SHARE ROW EXCLUSIVE MODE')
    await conn.execute(
        f"""DO $$ BEGIN
              IF NOT EXISTS (SELECT 1 FROM pg_trigger
                             WHERE tgrelid = '"{raw}"'::regclass AND tgname = '{_GUARD}') THEN
                  CREATE TRIGGER {_GUARD} BEFORE INSERT ON "{raw}"
                      FOR EACH ROW EXECUTE FUNCTION poller_packed_guard();
              END IF;
            END $$""")
    for temp in ("poller_compact_moved", "poller_compact_old"):
        await conn.execute(f"CREATE TEMPORARY TABLE {temp} (LIKE readings) ON COMMIT DROP")
    await conn.execute(
        f"""WITH d AS (DELETE FROM "{raw}" WHERE device_id >= $1 AND device_id < $2
                       RETURNING *)
            INSERT INTO poller_compact_moved SELECT * FROM d""", first_id, end_id)
    await conn.execute(
        """CREATE TEMPORARY TABLE poller_compact_hours ON COMMIT DROP AS
           SELECT DISTINCT device_id, date_trunc('hour', tick_at, 'UTC') AS hour_at
           FROM poller_compact_moved""")
    await conn.execute(
        f"""WITH d AS (DELETE FROM "{packed}" p USING poller_compact_hours t
                       WHERE p.device_id = t.device_id AND p.hour_at = t.hour_at
                       RETURNING p.*)
            INSERT INTO poller_compact_old
            SELECT u.* FROM d, LATERAL poller_unpack(
                d.device_id, d.hour_at, d.tick_us, d.device_us, d.received_us, d.demand_w,
                d.delivered_wh, d.received_wh, d.price) u""")
    expect = await conn.fetchrow(
        _HASH + "(SELECT * FROM poller_compact_moved UNION ALL "
                "SELECT * FROM poller_compact_old) AS a")
    assert expect is not None
    keys = await conn.fetchval(
        """SELECT count(*) FROM (SELECT device_id, tick_at FROM poller_compact_moved
                                 UNION SELECT device_id, tick_at FROM poller_compact_old) k""")
    if keys != expect["n"]:
        raise CompactError(f"compact {day}: devices {first_id}..{end_id - 1}: "
                           f"{expect['n'] - keys} reading(s) both raw and packed; "
                           "nothing changed")
    quoted = f'"{packed}"'
    status = await conn.execute(_PACK.format(packed=quoted))
    hours = int(status.rsplit(" ", 1)[1])
    got = await conn.fetchrow(_HASH + f"({_UNPACK_NEW.format(packed=quoted)}) AS a")
    assert got is not None
    if (got["n"], got["h"]) != (expect["n"], expect["h"]):
        raise CompactError(f"compact {day}: devices {first_id}..{end_id - 1}: the packed "
                           f"rows hold {got['n']} reading(s), hash {got['h']}; the raw and "
                           f"packed rows they replace {expect['n']}, hash {expect['h']}; "
                           "nothing changed")
    moved = int(await conn.fetchval("SELECT count(*) FROM poller_compact_moved"))
    return moved, hours


async def _truncate_if_empty(conn: Conn, raw: str) -> bool:
    """Give the emptied raw partition's space back; the guard stays on it."""
    async with conn.transaction():
        await conn.execute(f'LOCK TABLE "{raw}" IN ACCESS EXCLUSIVE MODE')
        if await conn.fetchval(f'SELECT EXISTS (SELECT 1 FROM "{raw}")'):
            return False  # late rows came in: the next compaction packs them
        await conn.execute(f'TRUNCATE "{raw}"')
    return True
