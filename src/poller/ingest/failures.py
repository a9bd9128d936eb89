"""Failed polls as rows: ``poll_failures``, what the rollups count as failed.

The polling loop hands each poll that ended without a reading to its sink
(``record_failure``); the ingest pipeline keeps them in memory and writes
them here from its loader task, after the readings, with the minutes they
fall in marked dirty for the rollups in the same transaction. A failure is
keyed by ``(device_id, tick_at)`` like a reading, so writing a batch again
after an outage half-way inserts nothing twice.

Why not through the spool like readings: a failure holds no measurement, so
losing the last flush of them to a ``kill -9`` loses no reading, while a new
line kind in the spool would have to be understood by every reader of the
segments (the loader, the quarantine, ``poller replay``, the archive's
users) and would make segments of this version unreadable by older ones.
They wait in memory through a Postgres outage (bounded: the oldest go first,
counted) and are not in the S3 archive.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, timedelta

import asyncpg

from poller.db import ConnectionSource
from poller.ingest.pgload import LoaderUnavailable, MarkDirty
from poller.polling.stats import OUTCOMES

DAY_S = 86400
_EPOCH_DAY = date(1970, 1, 1)
Failure = tuple[int, float, int, float]
"""``(device_id, tick_at, outcome index, failed_at)``, Unix seconds."""
_NAMES = tuple(o.value for o in OUTCOMES)
_INSERT = """
INSERT INTO poll_failures (device_id, tick_at, outcome, failed_at)
SELECT f.d, to_timestamp(f.t), f.o, to_timestamp(f.a)
FROM unnest($1::bigint[], $2::float8[], $3::text[], $4::float8[]) AS f (d, t, o, a)
ON CONFLICT (device_id, tick_at) DO NOTHING
RETURNING floor(extract(epoch FROM tick_at) / 60)::bigint AS minute"""
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError)


class FailureLog:
    """Writes failed polls to ``poll_failures`` and marks their minutes."""

    def __init__(self, pool: ConnectionSource, mark_dirty: MarkDirty | None,
                 timeout_s: float = 60.0) -> None:
        self._pool = pool
        self._mark = mark_dirty
        self.timeout_s = timeout_s
        self.rows_written = 0

    async def write(self, failures: Sequence[Failure]) -> int:
        """Insert ``failures`` (those already there are skipped); return the
        rows inserted. :class:`LoaderUnavailable` when Postgres is away."""
        if not failures:
            return 0
        days = sorted({int(f[1] // DAY_S) for f in failures})
        try:
            async with self._pool.acquire(timeout=self.timeout_s) as conn:
                for day in days:
                    await conn.fetchval("SELECT poller_ensure_rollup_partitions($1::date, 1)",
                                        _EPOCH_DAY + timedelta(days=day),
                                        timeout=self.timeout_s)
                async with conn.transaction():
                    inserted = await conn.fetch(
                        _INSERT, [f[0] for f in failures], [f[1] for f in failures],
                        [_NAMES[f[2]] for f in failures], [f[3] for f in failures],
                        timeout=self.timeout_s)
                    if inserted and self._mark is not None:
                        await self._mark(conn, sorted({r["minute"] for r in inserted}))
        except _UNAVAILABLE as exc:
            raise LoaderUnavailable(f"PostgreSQL unavailable writing failed polls: "
                                    f"{type(exc).__name__}: {exc}") from exc
        self.rows_written += len(inserted)
        return len(inserted)
