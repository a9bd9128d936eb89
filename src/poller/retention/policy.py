"""Retention: which partitions go, which stay and why, and dropping them.

Whole partitions go, never rows (TimescaleDB's ``drop_chunks``), oldest
level first:

1. **raw**, a UTC day older than ``retention.raw_days`` (whole days before
   today), only when the archive holds all of it: S3 lists, hour by hour,
   exactly the segments the manifest says Postgres loaded, at the sizes
   loaded (:mod:`.manifest`); no rows of the day are unaccounted for by the
   manifest (rows loaded before it existed); no rollup bucket of the day
   waits to be recomputed (it would be recomputed from nothing). Otherwise
   the day stays, with its reasons: logged, in ``/metrics``
   (``poller_retention_blocked_days{level,reason}``) and in ``poller
   retention``. A day reloaded by ``poller replay`` is held
   ``retention.replay_hold_days``.
2. **minute** (``readings_1m``, ``fleet_1m`` and the ``poll_failures`` they
   are recomputed from) older than ``retention.minute_days``, once that
   day's raw partition is gone.
3. **hour** (``readings_1h``, by month) whose whole month is older than
   ``retention.hour_days``, once no raw day of the month is left.

The drop of a raw day re-reads the manifest under an exclusive lock on
``readings``: a loader that wrote to the day since the check makes the
manifest differ, and the day stays (``manifest_changed``) until the next run.
Only one process applies retention at a time (an advisory lock); a dry run
(the default of ``poller retention``) changes nothing::

    policy = RetentionPolicy(settings.retention, store, "poller")
    report = await policy.run(conn, apply=False)
    for d in report.decisions:
        print(d.level, d.day, "drop" if d.drop else "keep", d.reasons)
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import asyncpg

from poller.archive.s3 import ArchiveError
from poller.config import RetentionSettings
from poller.db import Conn
from poller.retention import levels
from poller.retention.levels import LevelSummary, Partition
from poller.retention.manifest import (
    ArchiveLister,
    DayArchive,
    check_day,
    day_bounds,
    read_manifest,
)

log = logging.getLogger("poller.retention")

_LOCK_KEY = 7419033
"""One process applies retention at a time (schema/001 uses ...031 for
partitions, migrate ...030, 005 ...032)."""
NOT_BLOCKED = frozenset({"replay_hold"})
"""Reasons that keep a day on purpose: not counted as blocked."""


@dataclass(frozen=True, slots=True)
class Decision:
    level: str
    tables: tuple[str, ...]
    day: date
    """The day (the first of the month for an hour partition)."""
    drop: bool
    reasons: tuple[str, ...] = ()
    """Why it stays (empty when it goes): ``segment_missing``,
    ``size_mismatch``, ``not_loaded``, ``rows_unaccounted``,
    ``rollups_pending``, ``s3_unavailable``, ``manifest_changed``,
    ``lock_timeout``, ``raw_kept``, ``replay_hold``."""
    details: tuple[str, ...] = ()
    bytes: int = 0
    rows: int = 0
    done: bool = False
    """Dropped (``apply``)."""

    @property
    def blocked(self) -> bool:
        return not self.drop and bool(set(self.reasons) - NOT_BLOCKED)

    def describe(self) -> str:
        verb = ("dropped" if self.done else "would drop") if self.drop else "keep"
        why = "archived" if self.drop and self.level == "raw" else \
            "older than its retention" if self.drop else ", ".join(self.reasons)
        return (f"{self.level:6} {self.day.isoformat()}  {verb:10}  {_size(self.bytes):>9}  "
                f"~{self.rows:,} rows  {why}")


@dataclass(frozen=True, slots=True)
class RetentionReport:
    at: float
    """Unix seconds of the run."""
    applied: bool
    levels: tuple[LevelSummary, ...]
    """What each level held before the run."""
    decisions: tuple[Decision, ...] = ()
    skipped: str | None = None
    """Set when another process was applying retention: nothing was done."""
    fleet_rows_deleted: int = field(default=0)

    def blocked(self) -> Counter[tuple[str, str]]:
        """Days kept against their age, by ``(level, reason)``."""
        counts: Counter[tuple[str, str]] = Counter()
        for d in self.decisions:
            if d.blocked:
                for reason in d.reasons:
                    if reason not in NOT_BLOCKED:
                        counts[(d.level, reason)] += 1
        return counts

    def dropped(self) -> Counter[str]:
        return Counter(d.level for d in self.decisions if d.done)


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n = n / 1000  # type: ignore[assignment]
    return str(n)


class RetentionPolicy:
    """Decides and (with ``apply``) drops; see the module docstring."""

    def __init__(self, settings: RetentionSettings, store: ArchiveLister, prefix: str, *,
                 wall: Callable[[], float] = time.time, lock_timeout_s: float = 5.0) -> None:
        if lock_timeout_s <= 0:
            raise ValueError("lock_timeout_s must be positive")
        self.settings = settings
        self._store = store
        self._prefix = prefix
        self._wall = wall
        self._lock_timeout_ms = max(1, round(lock_timeout_s * 1000))

    @property
    def store(self) -> ArchiveLister:
        return self._store

    @property
    def prefix(self) -> str:
        return self._prefix

    def keep_days(self) -> dict[str, int]:
        s = self.settings
        return {"raw": s.raw_days, "minute": s.minute_days, "hour": s.hour_days}

    async def run(self, conn: Conn, *, apply: bool,
                  progress: Callable[[Decision], None] | None = None) -> RetentionReport:
        """Decide for every partition past its level's age, and drop with ``apply``.

        ``progress(decision)`` is called as each is made. Raises asyncpg
        errors when Postgres fails; S3 failures keep the day (``s3_unavailable``)."""
        now = self._wall()
        summary = tuple(await levels.summaries(conn, self.keep_days()))
        if apply and not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_KEY):
            return RetentionReport(now, apply, summary,
                                   skipped="another process is applying retention")
        try:
            decisions, fleet_deleted = await self._decide_all(conn, now, apply, progress)
        finally:
            if apply:
                await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
        report = RetentionReport(now, apply, summary, tuple(decisions),
                                 fleet_rows_deleted=fleet_deleted)
        if apply:
            _log(report)
        return report

    async def _decide_all(self, conn: Conn, now: float, apply: bool,
                          progress: Callable[[Decision], None] | None
                          ) -> tuple[list[Decision], int]:
        today = datetime.fromtimestamp(now, UTC).date()
        s = self.settings
        parts = await levels.partitions(conn)
        decisions: list[Decision] = []

        def note(d: Decision) -> None:
            decisions.append(d)
            if progress is not None:
                progress(d)

        raw_days_left: set[date] = {p.day for p in parts if p.level == "raw"
                                    and p.parent != "poll_failures"}
        if s.raw_days:
            cutoff = today - timedelta(days=s.raw_days)
            held = await self._held(conn, now)
            by_day: dict[date, list[Partition]] = {}
            for p in parts:
                if p.parent in ("readings", "packed_readings") and p.day < cutoff:
                    by_day.setdefault(p.day, []).append(p)
            for day, group in sorted(by_day.items()):
                d = await self._raw_day(conn, day, group, day in held, apply)
                if d.done:
                    raw_days_left.discard(day)
                note(d)
        fleet_deleted = 0
        if s.minute_days:
            cutoff = today - timedelta(days=s.minute_days)
            for p in parts:
                if p.parent in ("readings_1m", "poll_failures") and p.day < cutoff:
                    note(await self._rollup(conn, p, raw_days_left, apply))
            if apply:
                fleet_deleted = await self._trim_fleet(conn, cutoff, raw_days_left)
        if s.hour_days:
            cutoff = today - timedelta(days=s.hour_days)
            for p in parts:
                if p.parent == "readings_1h" and levels.last_day(p) < cutoff:
                    note(await self._rollup(conn, p, raw_days_left, apply))
        return decisions, fleet_deleted

    async def _held(self, conn: Conn, now: float) -> set[date]:
        if not self.settings.replay_hold_days:
            return set()
        since = datetime.fromtimestamp(now, UTC) - timedelta(days=self.settings.replay_hold_days)
        rows = await conn.fetch("SELECT day FROM retention_dropped WHERE restored_at > $1", since)
        return {r["day"] for r in rows}

    # -- raw -----------------------------------------------------------------

    async def _raw_day(self, conn: Conn, day: date, group: list[Partition], held: bool,
                       apply: bool) -> Decision:
        tables = tuple(p.name for p in group)
        size, rows = sum(p.bytes for p in group), sum(p.rows for p in group)

        def keep(reasons: list[str] | set[str], details: list[str]) -> Decision:
            return Decision("raw", tables, day, False, tuple(sorted(reasons)), tuple(details),
                            size, rows)

        if held:
            return keep(["replay_hold"], [f"reloaded by poller replay within "
                                          f"{self.settings.replay_hold_days} days"])
        pending = await _dirty_buckets(conn, day, ("minute", "hour"))
        if pending:
            return keep(["rollups_pending"], [f"{pending} rollup bucket(s) of the day wait to "
                                              "be recomputed from its raw rows"])
        try:
            archive = await check_day(conn, self._store, self._prefix, day)
        except ArchiveError as exc:
            return keep(["s3_unavailable"], [f"cannot list the archive: {exc}"])
        if not archive.complete:
            return keep(archive.reasons(), archive.problems())
        unaccounted = await _rows_unaccounted(conn, archive)
        if unaccounted:
            return keep(["rows_unaccounted"], unaccounted)
        if not apply:
            return Decision("raw", tables, day, True, bytes=size, rows=rows)
        try:
            changed = await self._drop_raw(conn, archive, tables, size, rows)
        except asyncpg.LockNotAvailableError:
            return keep(["lock_timeout"], ["readings was busy past the lock timeout; "
                                           "tried again at the next run"])
        if changed:
            return keep(["manifest_changed"], ["a loader wrote to the day during the check; "
                                               "checked again at the next run"])
        return Decision("raw", tables, day, True, bytes=size, rows=rows, done=True)

    async def _drop_raw(self, conn: Conn, archive: DayArchive, tables: tuple[str, ...],
                        size: int, rows: int) -> bool:
        """Drop the day's partitions; True (and nothing dropped) when the
        manifest changed since it was checked."""
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = {self._lock_timeout_ms}")
            # Loaders write the manifest in the transaction that inserts the
            # rows: once we hold readings, the manifest of the day is final.
            await conn.execute("LOCK TABLE readings IN ACCESS EXCLUSIVE MODE")
            if await conn.fetchval("SELECT to_regclass('packed_readings')") is not None:
                await conn.execute("LOCK TABLE packed_readings IN ACCESS EXCLUSIVE MODE")
            now = frozenset((e.instance, e.segment, e.bytes)
                            for e in await read_manifest(conn, archive.day))
            if now != archive.manifest:
                return True
            if await conn.fetchval("SELECT to_regproc('poller_drop_day')") is not None:
                # schema/007: a compacted day lives in two tables; its function drops both.
                await conn.execute("SELECT poller_drop_day($1::date)", archive.day)
            else:
                for table in tables:
                    await conn.execute(f'DROP TABLE IF EXISTS "{table}"')
            await conn.execute(
                "INSERT INTO retention_dropped (day, bytes, rows, segments) "
                "VALUES ($1, $2, $3, $4) ON CONFLICT (day) DO UPDATE SET "
                "dropped_at = now(), bytes = EXCLUDED.bytes, rows = EXCLUDED.rows, "
                "segments = EXCLUDED.segments, restored_at = NULL",
                archive.day, size, rows, archive.segments)
        return False

    # -- rollups ---------------------------------------------------------------

    async def _rollup(self, conn: Conn, p: Partition, raw_days_left: set[date],
                      apply: bool) -> Decision:
        last = levels.last_day(p)
        kept_raw = sorted(d for d in raw_days_left if p.day <= d <= last)
        if kept_raw:
            return Decision(p.level, (p.name,), p.day, False, ("raw_kept",),
                            (f"raw day {kept_raw[0]} is still in PostgreSQL",), p.bytes, p.rows)
        if p.parent in ("readings_1m", "poll_failures"):
            # The hour rollup is recomputed from the day's minutes.
            pending = await _dirty_buckets(conn, p.day, ("hour",))
            if pending:
                return Decision(p.level, (p.name,), p.day, False, ("rollups_pending",),
                                (f"{pending} hour bucket(s) wait to be recomputed from "
                                 "these minutes",), p.bytes, p.rows)
        if not apply:
            return Decision(p.level, (p.name,), p.day, True, bytes=p.bytes, rows=p.rows)
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = {self._lock_timeout_ms}")
                await conn.execute(f'DROP TABLE IF EXISTS "{p.name}"')
        except asyncpg.LockNotAvailableError:
            return Decision(p.level, (p.name,), p.day, False, ("lock_timeout",),
                            (f"{p.parent} was busy past the lock timeout",), p.bytes, p.rows)
        return Decision(p.level, (p.name,), p.day, True, bytes=p.bytes, rows=p.rows, done=True)

    async def _trim_fleet(self, conn: Conn, cutoff: date, raw_days_left: set[date]) -> int:
        if await conn.fetchval("SELECT to_regclass($1)", levels.UNPARTITIONED_MINUTE) is None:
            return 0
        # Never past a raw day still kept (its minutes may be recomputed).
        until = min([cutoff, *raw_days_left])
        status: str = await conn.execute(
            f"DELETE FROM {levels.UNPARTITIONED_MINUTE} WHERE bucket < $1", day_bounds(until)[0])
        return int(status.rsplit(" ", 1)[-1])


async def _dirty_buckets(conn: Conn, day: date, kinds: tuple[str, ...]) -> int:
    """Rollup buckets of ``day`` marked for recomputing (schema/005), 0 without it."""
    if await conn.fetchval("SELECT to_regclass('rollup_dirty')") is None:
        return 0
    start, end = day_bounds(day)
    n: int = await conn.fetchval(
        "SELECT count(*) FROM rollup_dirty WHERE level = ANY($1::text[]) "
        "AND bucket >= $2 AND bucket < $3", list(kinds), start, end)
    return n


async def _rows_unaccounted(conn: Conn, archive: DayArchive) -> list[str]:
    """Hours holding more rows than the manifest's segments had lines: rows
    that came some other way (loaded before the manifest existed, say), which
    the archive check cannot vouch for. One scan of the day's partition, run
    only for a day about to go."""
    start, end = day_bounds(archive.day)
    listed = archive.rows_by_hour()
    if not listed:
        # No manifest at all: one row is enough to keep the day.
        found = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM readings WHERE tick_at >= $1 AND tick_at < $2)",
            start, end)
        if not found and await conn.fetchval("SELECT to_regclass('packed_readings')"):
            found = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM packed_readings WHERE hour_at >= $1 "
                "AND hour_at < $2)", start, end)
        return ["rows in PostgreSQL, but no segment of the day in the manifest (loaded "
                "before schema 006?)"] if found else []
    counts: Counter[int] = Counter()
    for r in await conn.fetch(
            "SELECT extract(hour FROM tick_at AT TIME ZONE 'UTC')::int AS h, count(*) AS n "
            "FROM readings WHERE tick_at >= $1 AND tick_at < $2 GROUP BY 1", start, end):
        counts[r["h"]] += r["n"]
    if await conn.fetchval("SELECT to_regclass('packed_readings')") is not None:
        for r in await conn.fetch(
                "SELECT extract(hour FROM hour_at AT TIME ZONE 'UTC')::int AS h, "
                "sum(n)::bigint AS n FROM packed_readings WHERE hour_at >= $1 AND hour_at < $2 "
                "GROUP BY 1", start, end):
            counts[r["h"]] += r["n"]
    return [f"hour {h:02d}: {n} rows in PostgreSQL, {listed.get(h, 0)} lines in its segments"
            for h, n in sorted(counts.items()) if n > listed.get(h, 0)]


def _log(report: RetentionReport) -> None:
    for d in report.decisions:
        if d.done:
            log.info("retention: dropped %s %s (%s, ~%d rows)%s", d.level, d.day,
                     _size(d.bytes), d.rows, " (verified in S3)" if d.level == "raw" else "")
        elif d.blocked:
            log.warning("retention: keeping %s day %s past its retention: %s", d.level, d.day,
                        "; ".join(d.details[:5]) + (f" (and {len(d.details) - 5} more)"
                                                    if len(d.details) > 5 else ""))

