"""What each storage level holds: raw days, minute and hour rollups.

Every level is a set of time-partitioned tables, read from the catalog, so a
level whose tables do not exist (a database before schema/005 or 007) is
simply empty:

* ``raw``: ``readings_pYYYYMMDD`` and, for days compacted by schema/007,
  ``packed_readings_pYYYYMMDD``; also ``poll_failures_pYYYYMMDD`` (schema/005:
  the failed polls, which the minute rollup is recomputed from, so they go
  with the minute level, not with raw);
* ``minute``: ``readings_1m_pYYYYMMDD`` and the unpartitioned ``fleet_1m``;
* ``hour``: ``readings_1h_pYYYYMM``, one partition a month.

Row counts are the planner's estimates (``reltuples``, kept by autovacuum),
counted exactly only for a partition never analysed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

from poller.db import Conn

LEVELS = ("raw", "minute", "hour")

# parent table -> (level, name pattern of its partitions)
_PARENTS: dict[str, tuple[str, re.Pattern[str]]] = {
    "readings": ("raw", re.compile(r"^readings_p(\d{4})(\d{2})(\d{2})$")),
    "packed_readings": ("raw", re.compile(r"^packed_readings_p(\d{4})(\d{2})(\d{2})$")),
    "poll_failures": ("minute", re.compile(r"^poll_failures_p(\d{4})(\d{2})(\d{2})$")),
    "readings_1m": ("minute", re.compile(r"^readings_1m_p(\d{4})(\d{2})(\d{2})$")),
    "readings_1h": ("hour", re.compile(r"^readings_1h_p(\d{4})(\d{2})()$")),
}
UNPARTITIONED_MINUTE = "fleet_1m"

_PARTITIONS_SQL = """
SELECT c.relname AS name, pg_total_relation_size(c.oid) AS bytes,
       c.reltuples::bigint AS estimate
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = to_regclass($1)
ORDER BY c.relname"""


@dataclass(frozen=True, slots=True)
class Partition:
    parent: str
    name: str
    level: str
    day: date
    """Its first day (the first of the month for ``readings_1h``)."""
    monthly: bool
    bytes: int
    rows: int


@dataclass(frozen=True, slots=True)
class LevelSummary:
    level: str
    keep_days: int
    """0: forever."""
    oldest: date | None
    newest: date | None
    rows: int
    bytes: int


async def partitions(conn: Conn, parents: tuple[str, ...] = tuple(_PARENTS)) -> list[Partition]:
    """The partitions of ``parents`` that exist, oldest first."""
    found: list[Partition] = []
    for parent in parents:
        level, pattern = _PARENTS[parent]
        for r in await conn.fetch(_PARTITIONS_SQL, parent):
            m = pattern.match(r["name"])
            if m is None:
                continue  # not one we name (an operator's own table)
            monthly = not m.group(3)
            first = date(int(m.group(1)), int(m.group(2)), 1 if monthly else int(m.group(3)))
            rows = r["estimate"]
            if rows < 0:  # never analysed: small or new, so counting is cheap
                rows = await conn.fetchval(f'SELECT count(*) FROM "{r["name"]}"')
            found.append(Partition(parent, r["name"], level, first, monthly, r["bytes"], rows))
    found.sort(key=lambda p: (p.day, p.name))
    return found


async def fleet_minutes(conn: Conn) -> tuple[date | None, date | None, int, int]:
    """``(oldest day, newest day, rows, bytes)`` of ``fleet_1m``; all empty
    when the table does not exist."""
    if await conn.fetchval("SELECT to_regclass($1)", UNPARTITIONED_MINUTE) is None:
        return None, None, 0, 0
    r = await conn.fetchrow(
        f"SELECT (min(bucket) AT TIME ZONE 'UTC')::date AS oldest, "
        f"(max(bucket) AT TIME ZONE 'UTC')::date AS newest, count(*) AS n, "
        f"pg_total_relation_size('{UNPARTITIONED_MINUTE}') AS bytes "
        f"FROM {UNPARTITIONED_MINUTE}")
    assert r is not None
    return r["oldest"], r["newest"], r["n"], r["bytes"]


async def summaries(conn: Conn, keep_days: dict[str, int]) -> list[LevelSummary]:
    """One line per level: what it holds now."""
    parts = await partitions(conn)
    fleet = await fleet_minutes(conn)
    out: list[LevelSummary] = []
    for level in LEVELS:
        mine = [p for p in parts if p.level == level and p.rows > 0]
        # poll_failures count in bytes (they cost disk) but not in the level's span.
        spans = [p for p in mine if p.parent != "poll_failures"]
        oldest = min((p.day for p in spans), default=None)
        newest = max((last_day(p) for p in spans), default=None)
        rows = sum(p.rows for p in mine)
        size = sum(p.bytes for p in parts if p.level == level)
        if level == "minute" and fleet[2]:
            oldest = min(d for d in (oldest, fleet[0]) if d is not None)
            newest = max(d for d in (newest, fleet[1]) if d is not None)
            rows += fleet[2]
        if level == "minute":
            size += fleet[3]
        out.append(LevelSummary(level, keep_days[level], oldest, newest, rows, size))
    return out


def last_day(p: Partition) -> date:
    """The last day a partition covers."""
    if not p.monthly:
        return p.day
    following = date(p.day.year + p.day.month // 12, p.day.month % 12 + 1, 1)
    return date.fromordinal(following.toordinal() - 1)
