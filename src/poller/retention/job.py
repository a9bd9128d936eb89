"""The daily retention run inside ``serve``.

Once a UTC day, at ``retention.run_at_hour_utc``, the job applies the policy
(:mod:`.policy`) and keeps the report for ``/metrics``. Time comes from the
service's clock, so a test advances a :class:`~poller.clock.FakeClock` past
the hour instead of waiting. A run that finds Postgres or S3 away is tried
again an hour later; instances sharing a database take turns through the
policy's advisory lock (the second finds the work done)::

    job = RetentionJob(policy, database, clock)
    supervisor.spawn("retention", job.run)
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import UTC, datetime, timedelta

import asyncpg

from poller.clock import Clock
from poller.db import ConnectionSource
from poller.ingest.compact import CompactError, closed_days, compact_day
from poller.retention.policy import RetentionPolicy, RetentionReport
from poller.rollups.layout import sort_closed_months

log = logging.getLogger("poller.retention")

RETRY_S = 3600.0
"""After a failed run (Postgres away): try again this much later, not tomorrow."""
_EARLY_S = 1.0


def next_run_at(now: float, hour_utc: int) -> float:
    """Unix seconds of the next ``hour_utc``:00 UTC strictly after ``now``.

    >>> next_run_at(1_767_225_600.0, 3) - 1_767_225_600.0   # 2026-01-01 00:00 -> 03:00
    10800.0
    >>> next_run_at(1_767_225_600.0 + 10800, 3) - 1_767_225_600.0   # at 03:00: tomorrow's
    97200.0
    """
    moment = datetime.fromtimestamp(now, UTC)
    target = moment.replace(hour=hour_utc, minute=0, second=0, microsecond=0)
    if target.timestamp() <= now:
        target += timedelta(days=1)
    return target.timestamp()


class RetentionJob:
    """Runs the policy daily; ``last`` is the report of the last run."""

    def __init__(self, policy: RetentionPolicy, pool: ConnectionSource, clock: Clock) -> None:
        self.policy = policy
        self._pool = pool
        self.clock = clock
        self.last: RetentionReport | None = None
        self.runs = 0
        self.failures = 0
        self.dropped_total: Counter[str] = Counter()
        """Partitions dropped since start, by level."""
        self.compacted_rows = 0
        """Raw readings packed (schema/007) since start."""

    def __repr__(self) -> str:
        return f"RetentionJob(runs={self.runs}, failures={self.failures})"

    async def run(self) -> None:
        """Forever: wait for the hour, apply, repeat (a supervised task)."""
        target = next_run_at(self.clock.wall(), self.policy.settings.run_at_hour_utc)
        while True:
            # Sleep on the monotonic scale, then look at the wall again: a
            # wall clock set back meanwhile means more waiting, not a run.
            await self.clock.sleep(max(_EARLY_S, target - self.clock.wall()))
            if self.clock.wall() < target - _EARLY_S:
                continue
            if await self.run_once() is None:
                target = self.clock.wall() + RETRY_S
            else:
                target = next_run_at(self.clock.wall(),
                                     self.policy.settings.run_at_hour_utc)

    async def run_once(self) -> RetentionReport | None:
        """Apply the policy now; None when Postgres could not be used."""
        try:
            async with self._pool.acquire() as conn:
                report = await self.policy.run(conn, apply=True)
        except (OSError, ConnectionError, asyncpg.PostgresError,
                asyncpg.InterfaceError) as exc:
            self.failures += 1
            log.warning("retention: could not run (%s: %s); trying again in %.0f min",
                        type(exc).__name__, exc, RETRY_S / 60)
            return None
        self.dropped_total.update(report.dropped())
        if report.skipped:
            log.info("retention: %s", report.skipped)
        if self.policy.settings.compact:
            await self.compact()
        await self.sort_hour_months()
        self.runs += 1  # a run is over once its days are packed too
        self.last = report
        return report

    async def sort_hour_months(self) -> list[str]:
        """Rewrite each closed month of hour rollups in device order, once
        (:mod:`poller.rollups.layout`); the partitions sorted."""
        now = datetime.fromtimestamp(self.clock.wall(), UTC)
        try:
            async with self._pool.acquire() as conn:
                return await sort_closed_months(conn, now)
        except (OSError, ConnectionError, asyncpg.PostgresError,
                asyncpg.InterfaceError) as exc:
            self.failures += 1
            log.warning("retention: sorting closed months of hour rollups stopped (%s: %s); "
                        "the next daily run goes on", type(exc).__name__, exc)
            return []

    async def compact(self) -> int:
        """Pack every closed day still in raw form (after the drops: a day about
        to go is not worth packing); the days packed. Each batch is its own
        transaction, so a failure keeps what was packed and tomorrow's run
        goes on from there."""
        now = datetime.fromtimestamp(self.clock.wall(), UTC)
        packed = 0
        try:
            async with self._pool.acquire() as conn:
                for day in await closed_days(conn, now):
                    result = await compact_day(conn, day)
                    packed += 1
                    self.compacted_rows += result.rows_moved
                    log.info("retention: packed %s: %d readings, %d -> %d bytes", day.isoformat(),
                             result.rows_moved, result.bytes_before, result.bytes_after)
        except (OSError, ConnectionError, asyncpg.PostgresError,
                asyncpg.InterfaceError, CompactError) as exc:
            self.failures += 1
            log.warning("retention: packing closed days stopped (%s: %s); the next daily "
                        "run goes on", type(exc).__name__, exc)
        return packed
