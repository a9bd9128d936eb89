"""The rollup worker: recompute the buckets the loader marked dirty.

The loader marks, in the transaction that inserts raw rows, each minute those
rows fall in (``rollup_dirty``; the failure writer does the same for failed
polls). This worker takes marks of minutes that are *settled* (ended
``settle_s`` ago: the polls of a minute are loaded a few seconds after it),
recomputes each minute whole from the raw rows, then the fleet's row of that
minute, and marks the minute's hour; hours are recomputed from their minute
rows once settled too. Take, recompute and commit are one transaction: a
failure puts the marks back.

So the rule the tests check holds at every commit: a bucket without a mark
equals the aggregate over its raw rows. Late data (a catch-up after an
outage, ``poller replay``, a spool loaded from S3) only adds marks; a row
loaded twice is stored once and so counted once; a quarantined line never
reaches ``readings`` and is never counted.

Why a worker and not the loader's own transaction: measured in
:mod:`poller.bench.rollups` (README, "Rollups and query levels").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from datetime import UTC, date, datetime

import asyncpg

from poller.clock import Clock, LoopClock
from poller.config import RollupSettings
from poller.db import Conn, ConnectionSource
from poller.rollups import sql

log = logging.getLogger("poller.rollups")

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError, asyncpg.exceptions.CannotConnectNowError)
_FAR_FUTURE = datetime(9999, 1, 1, tzinfo=UTC)


class RollupWorker:
    """Recomputes dirty rollup buckets; ``run()`` for serve, ``step()`` and
    ``settle_all()`` for tests and commands.

    >>> worker = RollupWorker(pool, RollupSettings())      # doctest: +SKIP
    >>> await worker.settle_all()    # every marked bucket, settled or not
    """

    def __init__(self, pool: ConnectionSource, settings: RollupSettings,
                 clock: Clock | None = None) -> None:
        self._pool = pool
        self.settings = settings
        self._clock = clock if clock is not None else LoopClock()
        self.minutes_done = 0
        self.hours_done = 0
        self.failures = 0
        """Steps that failed (Postgres away or a refusal); the marks stayed."""
        self._down = False

    async def run(self) -> None:
        """Work until cancelled: a step every ``interval_s``."""
        while True:
            try:
                await self.step()
                if self._down:
                    log.info("rollups: recomputing again")
                self._down = False
            except _UNAVAILABLE as exc:
                self.failures += 1
                if not self._down:
                    log.warning("rollups: postgres unavailable, dirty buckets wait: %s", exc)
                self._down = True
            except asyncpg.PostgresError as exc:
                self.failures += 1
                log.error("rollups: a step failed, its buckets stay dirty: %s: %s",
                          type(exc).__name__, exc)
            await self._clock.sleep(self.settings.interval_s)

    async def step(self, now_s: float | None = None) -> int:
        """Recompute every settled dirty bucket; return the buckets done.
        ``now_s``: Unix seconds to judge settling by (default the clock's)."""
        now = self._clock.wall() if now_s is None else now_s
        settle = self.settings.settle_s
        minutes_before = _at(now - sql.MINUTE_S - settle)
        hours_before = _at(now - sql.HOUR_S - settle)
        return await self._drain(minutes_before, hours_before)

    async def settle_all(self) -> int:
        """Recompute every dirty bucket now, settled or not (tests, bench)."""
        return await self._drain(_FAR_FUTURE, _FAR_FUTURE)

    async def pending(self) -> dict[str, tuple[int, datetime]]:
        """``level -> (dirty buckets, oldest)``."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(sql.PENDING)
        return {r["level"]: (r["n"], r["oldest"]) for r in rows}

    async def _drain(self, minutes_before: datetime, hours_before: datetime) -> int:
        done = 0
        batch = self.settings.batch_minutes
        async with self._pool.acquire() as conn:
            while n := await self._minutes(conn, minutes_before, batch):
                done += n
            while n := await self._hours(conn, hours_before, max(1, batch // 60)):
                done += n
        return done

    async def _minutes(self, conn: Conn, before: datetime, limit: int) -> int:
        async with conn.transaction():
            taken: list[datetime] = [r["bucket"] for r in
                                     await conn.fetch(sql.TAKE, "minute", before, limit)]
            if not taken:
                return 0
            dropped = await _dropped_days(conn, taken)
            if dropped:
                # Retention dropped these days' raw rows: what arrives late
                # for them is a part of the day, and recomputing from it would
                # replace the whole day's rollups with that part. Keep them.
                log.warning("rollups: late rows for raw days retention dropped (%s): their "
                            "rollups are kept as computed from the whole day",
                            ", ".join(str(d) for d in sorted(dropped)))
                taken = [b for b in taken if b.astimezone(UTC).date() not in dropped]
                if not taken:
                    return len(dropped)
            await self._ensure_partitions(conn, taken)
            compacted = await _compacted_days(conn, taken)
            plain = [b for b in taken if b.astimezone(UTC).date() not in compacted]
            packed = [b for b in taken if b.astimezone(UTC).date() in compacted]
            if plain:
                await conn.execute(sql.minute_from_raw(sql.RAW_SOURCE), plain)
            if packed:
                await conn.execute(sql.minute_from_raw(sql.SPAN_SOURCE), packed)
            await conn.execute(sql.FLEET_MINUTE, taken)
            await conn.execute(sql.MARK_HOURS, taken)
        self.minutes_done += len(taken)
        return len(taken)

    async def _hours(self, conn: Conn, before: datetime, limit: int) -> int:
        async with conn.transaction():
            taken = [r["bucket"] for r in await conn.fetch(sql.TAKE, "hour", before, limit)]
            if not taken:
                return 0
            await self._ensure_partitions(conn, taken)
            await conn.execute(sql.HOUR_FROM_MINUTES, taken)
        self.hours_done += len(taken)
        return len(taken)

    async def _ensure_partitions(self, conn: Conn, buckets: Sequence[datetime]) -> None:
        for day in sorted({b.astimezone(UTC).date() for b in buckets}):
            await conn.fetchval(sql.ENSURE_PARTITIONS, day, 1)


async def _compacted_days(conn: Conn, buckets: Sequence[datetime]) -> set[date]:
    """Days among the buckets' whose raw rows may be packed (the storage
    layer's ``packed_readings_pYYYYMMDD`` exists): read through its
    ``readings_span`` there, straight from ``readings`` elsewhere (cheaper)."""
    days = sorted({b.astimezone(UTC).date() for b in buckets})
    names = [f"packed_readings_p{d:%Y%m%d}" for d in days]
    found = await conn.fetch("SELECT n FROM unnest($1::text[]) AS n WHERE to_regclass(n) "
                             "IS NOT NULL", names)
    present = {r["n"] for r in found}
    return {d for d, n in zip(days, names, strict=True) if n in present}


async def _dropped_days(conn: Conn, buckets: Sequence[datetime]) -> set[date]:
    """Days among the buckets' whose raw partition retention dropped and no
    replay brought back (``retention_dropped``, when that migration ran)."""
    if not await conn.fetchval("SELECT to_regclass('retention_dropped') IS NOT NULL"):
        return set()
    days = sorted({b.astimezone(UTC).date() for b in buckets})
    rows = await conn.fetch("SELECT day FROM retention_dropped WHERE day = ANY($1::date[]) "
                            "AND restored_at IS NULL", days)
    return {r["day"] for r in rows}


def _at(unix_s: float) -> datetime:
    if not math.isfinite(unix_s):
        return _FAR_FUTURE
    return datetime.fromtimestamp(unix_s, UTC)


def minutes_of(ticks: Sequence[float]) -> list[int]:
    """The Unix minutes (``tick // 60``) of ``ticks``, each once.

    >>> minutes_of([120.0, 179.9, 180.0, 60.5])
    [1, 2, 3]
    """
    return sorted({int(t // 60) for t in ticks})



async def mark_minutes(conn: Conn, minutes: list[int]) -> None:
    """Mark ``minutes`` (Unix minutes) dirty, in the caller's transaction:
    the loader's :attr:`~poller.ingest.pgload.PgLoader.mark_dirty`."""
    await conn.execute(sql.MARK_MINUTES, minutes)
