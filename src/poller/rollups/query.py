"""Reading a device's or the fleet's history from the right level.

A request names a range and a step. The step picks the level: a multiple of
an hour reads ``readings_1h``, of a minute ``readings_1m``, anything else
the raw rows; so a year of hourly points reads 8,760 rollup rows, not five
million readings. Buckets at a rollup level lie on the step's grid from the
Unix epoch (a step of 3600 gives whole UTC hours) and whole buckets of the
level are read, so ``from`` and ``to`` are taken out to the level's bucket.

A rollup exists once its bucket has settled (see
:mod:`poller.rollups.worker`); the buckets after the last settled one are
read from the level below (hours from minutes, minutes from raw rows) and
binned alike, so the newest point is as fresh as the raw data.

Energy: each point's ``energy_*_wh`` is its last meter total minus the last
total of the point before it (the first point: minus its own first total),
so the energies of consecutive points add up to the meter's advance from the
first total in the range to the last, with nothing lost at a bucket's edge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson

from poller.config import RollupSettings
from poller.db import Conn

Level = Literal["raw", "minute", "hour"]
LEVEL_S: dict[Level, int] = {"minute": 60, "hour": 3600}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_FIRST = "min(ARRAY[extract(epoch FROM {t})::float8, {v}]) FILTER (WHERE {v} IS NOT NULL)"
_LAST = "max(ARRAY[extract(epoch FROM {t})::float8, {v}]) FILTER (WHERE {v} IS NOT NULL)"


def level_for(step_s: int) -> Level:
    """The coarsest level whose buckets tile a step.

    >>> level_for(3600 * 24), level_for(300), level_for(90)
    ('hour', 'minute', 'raw')
    """
    if step_s % 3600 == 0:
        return "hour"
    if step_s % 60 == 0:
        return "minute"
    return "raw"


def _rollup_bins(table: str) -> str:
    return f"""
SELECT date_bin($4::interval, bucket, $5::timestamptz) AS t,
       sum(readings)::bigint AS n, sum(demand_n)::bigint AS dn, sum(demand_sum) AS ds,
       min(demand_min) AS lo, max(demand_max) AS hi,
       min(delivered_first_at) AS dfa,
       ({_FIRST.format(t="delivered_first_at", v="delivered_first_wh")})[2] AS df,
       max(delivered_last_at) AS dla,
       ({_LAST.format(t="delivered_last_at", v="delivered_last_wh")})[2] AS dl,
       min(received_first_at) AS rfa,
       ({_FIRST.format(t="received_first_at", v="received_first_wh")})[2] AS rf,
       max(received_last_at) AS rla,
       ({_LAST.format(t="received_last_at", v="received_last_wh")})[2] AS rl,
       ({_LAST.format(t="bucket", v="price_last")})[2] AS pl,
       sum(failed)::bigint AS failed
FROM {table} WHERE device_id = $1 AND bucket >= $2 AND bucket < $3
GROUP BY 1 ORDER BY 1"""


def _raw_bins(source: str) -> str:
    return f"""
WITH r AS (
    SELECT date_bin($4::interval, tick_at, $5::timestamptz) AS t,
           count(*) AS n, count(demand_w) AS dn, sum(demand_w) AS ds,
           min(demand_w) AS lo, max(demand_w) AS hi,
           min(tick_at) FILTER (WHERE delivered_wh IS NOT NULL) AS dfa,
           ({_FIRST.format(t="tick_at", v="delivered_wh")})[2] AS df,
           max(tick_at) FILTER (WHERE delivered_wh IS NOT NULL) AS dla,
           ({_LAST.format(t="tick_at", v="delivered_wh")})[2] AS dl,
           min(tick_at) FILTER (WHERE received_wh IS NOT NULL) AS rfa,
           ({_FIRST.format(t="tick_at", v="received_wh")})[2] AS rf,
           max(tick_at) FILTER (WHERE received_wh IS NOT NULL) AS rla,
           ({_LAST.format(t="tick_at", v="received_wh")})[2] AS rl,
           ({_LAST.format(t="tick_at", v="price")})[2] AS pl
    FROM {source}
    GROUP BY 1),
f AS (
    SELECT date_bin($4::interval, tick_at, $5::timestamptz) AS t, count(*) AS failed
    FROM poll_failures WHERE device_id = $1 AND tick_at >= $2 AND tick_at < $3
    GROUP BY 1)
SELECT coalesce(r.t, f.t) AS t, coalesce(r.n, 0) AS n, coalesce(r.dn, 0) AS dn, r.ds, r.lo,
       r.hi, r.dfa, r.df, r.dla, r.dl, r.rfa, r.rf, r.rla, r.rl, r.pl,
       coalesce(f.failed, 0) AS failed
FROM r FULL JOIN f ON f.t = r.t ORDER BY 1"""


def _rollup_rows(table: str) -> str:
    """The rows themselves, when the step is the level's bucket: no
    grouping, and columns in :class:`_Bin`'s order."""
    return f"""
SELECT bucket AS t, readings::bigint AS n, demand_n::bigint AS dn, demand_sum AS ds,
       demand_min AS lo, demand_max AS hi, delivered_first_at AS dfa,
       delivered_first_wh AS df, delivered_last_at AS dla, delivered_last_wh AS dl,
       received_first_at AS rfa, received_first_wh AS rf, received_last_at AS rla,
       received_last_wh AS rl, price_last AS pl, failed::bigint AS failed
FROM {table} WHERE device_id = $1 AND bucket >= $2 AND bucket < $3 ORDER BY bucket"""


_SQL: dict[Level, str] = {
    "hour": _rollup_bins("readings_1h"),
    "minute": _rollup_bins("readings_1m"),
}
_ROWS_SQL: dict[Level, str] = {
    "hour": _rollup_rows("readings_1h"),
    "minute": _rollup_rows("readings_1m"),
}
_RAW_PLAIN = _raw_bins("readings WHERE device_id = $1 AND tick_at >= $2 AND tick_at < $3")
_RAW_ALL = _raw_bins("readings_all($1, $2, $3)")
_FINER: dict[Level, Level] = {"hour": "minute", "minute": "raw"}


@dataclass(slots=True)
class _Bin:
    t: datetime
    n: int = 0
    dn: int = 0
    ds: float | None = None
    lo: float | None = None
    hi: float | None = None
    dfa: datetime | None = None
    df: float | None = None
    dla: datetime | None = None
    dl: float | None = None
    rfa: datetime | None = None
    rf: float | None = None
    rla: datetime | None = None
    rl: float | None = None
    pl: float | None = None
    failed: int | None = None

    def row(self) -> tuple[Any, ...]:
        return (self.t, self.n, self.dn, self.ds, self.lo, self.hi, self.dfa, self.df,
                self.dla, self.dl, self.rfa, self.rf, self.rla, self.rl, self.pl, self.failed)

    def merge(self, row: Any, later: bool) -> None:
        """Add a partial bin of the same ``t`` read from another level;
        ``later``: it covers time after what this bin holds."""
        self.n += row["n"]
        self.dn += row["dn"]
        self.ds = _add(self.ds, row["ds"])
        self.lo = _pick(min, self.lo, row["lo"])
        self.hi = _pick(max, self.hi, row["hi"])
        if row["dfa"] is not None and (self.dfa is None or row["dfa"] < self.dfa):
            self.dfa, self.df = row["dfa"], row["df"]
        if row["dla"] is not None and (self.dla is None or row["dla"] > self.dla):
            self.dla, self.dl = row["dla"], row["dl"]
        if row["rfa"] is not None and (self.rfa is None or row["rfa"] < self.rfa):
            self.rfa, self.rf = row["rfa"], row["rf"]
        if row["rla"] is not None and (self.rla is None or row["rla"] > self.rla):
            self.rla, self.rl = row["rla"], row["rl"]
        if row["pl"] is not None and (later or self.pl is None):
            self.pl = row["pl"]
        if row["failed"] is not None:
            self.failed = (self.failed or 0) + row["failed"]


def _add(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else a + b


def _pick(f: Any, a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else f(a, b)


def _floor(at: datetime, step_s: int) -> datetime:
    return _EPOCH + timedelta(seconds=(int((at - _EPOCH).total_seconds()) // step_s) * step_s)


def _ceil(at: datetime, step_s: int) -> datetime:
    s = (at - _EPOCH).total_seconds()
    return _EPOCH + timedelta(seconds=math.ceil(s / step_s) * step_s)


@dataclass(frozen=True, slots=True)
class Series:
    level: Level
    start: datetime
    end: datetime
    points: list[dict[str, Any]]


async def device_series(conn: Conn, device_id: int, start: datetime, end: datetime,
                        step_s: int, *, settled: datetime) -> Series:
    """One device's points; ``settled``: rollups exist for buckets
    ending before it (now less the worker's settle time)."""
    level = level_for(step_s)
    raw_sql = _RAW_ALL if await _has_packed(conn) else _RAW_PLAIN
    step = timedelta(seconds=step_s)
    if level == "raw":
        rows = await conn.fetch(raw_sql, device_id, start, end, step, start)
        return Series(level, start, end, _points(rows))
    start = _floor(start, LEVEL_S[level])
    end = _ceil(end, LEVEL_S[level])
    # Records as fetched, in time order (each query is ordered, and the
    # levels are read oldest first); a _Bin only where two levels share a step.
    found: dict[datetime, Any] = {}
    lo = start
    current: Level = level
    used: Level | None = None
    while lo < end:
        binned: tuple[Any, ...] = (step, _EPOCH)
        if current == "raw":
            hi = end
            sql = raw_sql
        else:
            hi = max(lo, min(end, _floor(settled, LEVEL_S[current])))
            sql = _SQL[current]
            if step_s == LEVEL_S[current]:
                sql, binned = _ROWS_SQL[current], ()
        if hi > lo:
            used = used or current
            for r in await conn.fetch(sql, device_id, lo, hi, *binned):
                into = found.get(r[0])
                if into is None:
                    found[r[0]] = r
                else:  # a step that straddles the edge between two levels
                    if not isinstance(into, _Bin):
                        into = found[r[0]] = _Bin(*into)
                    into.merge(r, True)
        lo = hi
        if current != "raw":
            current = _FINER[current]
    return Series(used or level, start, end, _points(
        [b.row() if isinstance(b, _Bin) else b for b in found.values()]))


def _points(rows: Sequence[Any]) -> list[dict[str, Any]]:
    """The JSON points of rows in :class:`_Bin`'s column order (a year of
    hours is 8,784 of them: positional, no attribute lookups)."""
    out: list[dict[str, Any]] = []
    append = out.append
    last_d: float | None = None
    last_r: float | None = None
    for t, n, dn, ds, lo, hi, _, df, _, dl, _, rf, _, rl, _, failed in rows:
        e_d = e_r = None
        if dl is not None:
            e_d = dl - (last_d if last_d is not None else df if df is not None else dl)
            last_d = dl
        if rl is not None:
            e_r = rl - (last_r if last_r is not None else rf if rf is not None else rl)
            last_r = rl
        append({"t": t.isoformat(), "min": lo, "max": hi, "count": n,
                "avg": ds / dn if dn and ds is not None else None,
                "energy_delivered_wh": e_d, "energy_received_wh": e_r, "failed": failed})
    return out


_HAS_PACKED: list[bool] = []


async def _has_packed(conn: Conn) -> bool:
    """Whether the storage layer's compacted days exist (schema/007): raw
    reads then go through ``readings_all``. Asked once per process."""
    if not _HAS_PACKED:
        found = await conn.fetchval("SELECT to_regproc('readings_all') IS NOT NULL")
        _HAS_PACKED.append(bool(found))
    return _HAS_PACKED[0]


_FLEET_SQL = """
SELECT date_bin($3::interval, bucket, timestamptz 'epoch') AS t,
       avg(total_w) AS total_w, max(devices) AS devices, array_agg(outcomes) AS outcomes
FROM fleet_1m WHERE bucket >= $1 AND bucket < $2
GROUP BY 1 ORDER BY 1"""


async def fleet_series(conn: Conn, start: datetime, end: datetime, step_s: int) -> Series:
    """The fleet's demand per step (a multiple of 60 s): ``total_w`` the
    mean over the step's minutes of the fleet's total demand, ``devices``
    and each outcome's count the largest of a minute in the step."""
    start, end = _floor(start, 60), _ceil(end, 60)
    rows = await conn.fetch(_FLEET_SQL, start, end, timedelta(seconds=step_s))
    points = []
    for r in rows:
        outcomes: dict[str, int] = {}
        for doc in r["outcomes"]:
            for name, n in _json(doc).items():
                if n > outcomes.get(name, 0):
                    outcomes[name] = n
        points.append({"t": r["t"].isoformat(), "total_w": r["total_w"],
                       "devices": r["devices"], "outcomes": outcomes})
    return Series("minute", start, end, points)


def _json(doc: Any) -> dict[str, int]:
    if isinstance(doc, str):
        parsed: dict[str, int] = orjson.loads(doc)
        return parsed
    return dict(doc)


def settled_before(settings: RollupSettings, now: datetime | None = None) -> datetime:
    """Buckets ending before this have their rollup (when rollups are kept):
    the worker's settle time and two of its intervals ago."""
    if not settings.enabled:
        return _EPOCH
    now = datetime.now(UTC) if now is None else now
    return now - timedelta(seconds=settings.settle_s + 2 * settings.interval_s + 5)
