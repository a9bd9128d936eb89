"""What a replay records for retention, in each object's transaction.

* The object goes in the manifest (``archive_manifest``) at its S3 size: its
  rows are in ``readings`` now and S3 has them, which is what lets
  retention drop the day again later (a database restored from the archive
  alone has no other manifest).
* A day retention dropped (``retention_dropped``) is marked restored, so it
  is held ``retention.replay_hold_days`` before it may go again.
* Its rollups are left as they are: they were computed from the complete
  day before the drop (a raw day goes only with no bucket waiting), and the
  replay brings back exactly those rows, the ones S3 held for every segment
  loaded. Recomputing instead would be wrong once the day's minutes or
  failed polls have gone by their own retention, and for a minute the
  replay's range cuts; so the buckets the replay marked dirty in a dropped
  day are unmarked in the same transaction.

Every table is optional (a database before schema/005 or 006 replays as
before)::

    book = await RestoreBook.open(conn)
    async with conn.transaction():
        ...                                     # move the object's rows
        await book.note_object(conn, key, size, lines, first_day, last_day)
"""

from __future__ import annotations

from datetime import date, timedelta

from poller.archive.naming import parse_archive_key
from poller.db import Conn
from poller.retention.manifest import day_bounds
from poller.segment import segment_name


class RestoreBook:
    __slots__ = ("_dirty", "_dropped", "_manifest", "restored")

    def __init__(self, manifest: bool, dropped: set[date], dirty: bool) -> None:
        self._manifest = manifest
        self._dropped = dropped
        self._dirty = dirty
        self.restored: set[date] = set()
        """Dropped days this replay loaded rows into."""

    @classmethod
    async def open(cls, conn: Conn) -> RestoreBook:
        manifest = await conn.fetchval("SELECT to_regclass('archive_manifest')") is not None
        dropped: set[date] = set()
        if await conn.fetchval("SELECT to_regclass('retention_dropped')") is not None:
            dropped = {r["day"] for r in await conn.fetch("SELECT day FROM retention_dropped")}
        dirty = await conn.fetchval("SELECT to_regclass('rollup_dirty')") is not None
        return cls(manifest, dropped, dirty)

    async def note_object(self, conn: Conn, key: str, size: int, lines: int,
                          first_day: date | None, last_day: date | None) -> None:
        """Record one replayed object (call inside its move's transaction)."""
        if self._manifest:
            seg = parse_archive_key(key)
            await conn.execute(
                "INSERT INTO archive_manifest AS m (instance_id, segment, hour_at, bytes, rows) "
                "VALUES ($1, $2, to_timestamp($3), $4, $5) "
                "ON CONFLICT (instance_id, segment) DO UPDATE SET "
                "bytes = greatest(m.bytes, EXCLUDED.bytes), "
                "rows = greatest(m.rows, EXCLUDED.rows), updated_at = now() "
                "WHERE EXCLUDED.bytes > m.bytes OR EXCLUDED.rows > m.rows",
                seg.instance, segment_name(seg.instance, seg.hour_epoch, seg.seq),
                float(seg.hour_epoch), size, lines)
        if first_day is None or last_day is None:
            return
        day = first_day
        while day <= last_day:
            if day in self._dropped:
                await self._restored(conn, day)
            day += timedelta(days=1)

    async def _restored(self, conn: Conn, day: date) -> None:
        start, end = day_bounds(day)
        if self._dirty:
            await conn.execute("DELETE FROM rollup_dirty WHERE bucket >= $1 AND bucket < $2",
                               start, end)
        await conn.execute("UPDATE retention_dropped SET restored_at = now() WHERE day = $1", day)
        self.restored.add(day)
