"""Closed months of the hour level, sorted by device once.

The hour rollups of a month are written hour by hour, every device's row of
an hour beside the others', so one device's year lies on one page per row:
about 8,800 pages read for a one-year chart, which from a cold cache misses
the 100 ms target. Rewritten in ``(device_id, bucket)`` order once the month
is closed, the same chart reads about 220 pages (measured with ``poller bench
--rollups --rollup-part queries``: 74.7 ms warm before, 48.1 ms after).

``CLUSTER`` locks the month's partition while it rewrites it (seconds at
10,000 devices, a few minutes at 100,000): it runs once a month, from the
daily retention run, only for a month ended more than a day ago with no hour
of it waiting to be recomputed. Postgres marks the index it sorted by
(``pg_index.indisclustered``); a marked month is not done again.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from poller.db import Conn

log = logging.getLogger("poller.rollups")

_UNSORTED_MONTHS_SQL = r"""
SELECT c.relname AS part, i.indexrelid::regclass::text AS index
FROM pg_inherits h
JOIN pg_class c ON c.oid = h.inhrelid
JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
WHERE h.inhparent = to_regclass('readings_1h')
  AND c.relname ~ '^readings_1h_p[0-9]{6}$'
  AND NOT EXISTS (SELECT 1 FROM pg_index j WHERE j.indrelid = c.oid AND j.indisclustered)
ORDER BY c.relname
"""
_DIRTY_SQL = """
SELECT EXISTS (SELECT 1 FROM rollup_dirty
               WHERE level = 'hour' AND bucket >= $1 AND bucket < $2)
"""
_SETTLE = timedelta(days=1)


def month_bounds(part: str) -> tuple[datetime, datetime]:
    """The UTC month a ``readings_1h_pYYYYMM`` partition holds.

    >>> [d.isoformat() for d in month_bounds("readings_1h_p202612")]
    ['2026-12-01T00:00:00+00:00', '2027-01-01T00:00:00+00:00']
    """
    year, month = int(part[-6:-2]), int(part[-2:])
    start = datetime(year, month, 1, tzinfo=UTC)
    end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
    return start, end


async def sort_closed_months(conn: Conn, now: datetime) -> list[str]:
    """``CLUSTER`` every closed, settled month of the hour level not sorted
    yet; the partitions sorted, oldest first."""
    if await conn.fetchval("SELECT to_regclass('readings_1h')") is None:
        return []
    done = []
    for row in await conn.fetch(_UNSORTED_MONTHS_SQL):
        start, end = month_bounds(row["part"])
        if end > now - _SETTLE or await conn.fetchval(_DIRTY_SQL, start, end):
            continue
        part, index = row["part"], row["index"]
        await conn.execute(f'CLUSTER "{part}" USING {index}')
        log.info("rollups: sorted %s by device (one-year charts read it in order)", part)
        done.append(part)
    return done
