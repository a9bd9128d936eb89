"""The Postgres loader: spool members into ``readings``, exactly once.

Each transaction loads whole spool members and moves the segment's row in
``ingest_checkpoints`` to the last member's end, so after any failure a
member is either loaded and checkpointed or absent. The checkpoint row is
locked first, which orders concurrent loaders of one segment and lets a
second load of a member see it is done and insert nothing.

Rows go in by binary COPY straight into ``readings``, encoded by
:mod:`poller.ingest.pgcopy` (floats in, no datetime objects). Only when that meets a
duplicate key (a member loaded by an earlier life whose checkpoint was lost,
say) does the batch go again through a temporary staging table and
``INSERT ... ON CONFLICT DO NOTHING``. Measured on 100k-row loads (2 shared
cores): COPY straight in ran at 108k-161k rows/s, staging every batch at
70k-103k rows/s, so the common case of no duplicates takes the direct path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Sequence
from datetime import date, timedelta
from typing import Any, Literal

import asyncpg
import orjson

from poller.endpoints import redact_url
from poller.errors import PollerError
from poller.ingest.pgcopy import as_source, encode_rows
from poller.ingest.spool import Spool, SpoolPosition
from poller.reading import READING_COLUMNS, Reading

log = logging.getLogger(__name__)

Strategy = Literal["copy-first", "staged"]
Record = tuple[Any, ...]

DAY_S = 86400
_EPOCH_DAY = date(1970, 1, 1)
_STAGE = "poller_ingest_stage"

_LOCK_CHECKPOINT = """
INSERT INTO ingest_checkpoints AS c (instance_id, segment, end_offset, rows, updated_at)
VALUES ($1, $2, 0, 0, now())
ON CONFLICT (instance_id, segment) DO UPDATE SET end_offset = c.end_offset
RETURNING end_offset"""
_MOVE_CHECKPOINT = """
UPDATE ingest_checkpoints SET end_offset = $3, rows = rows + $4, updated_at = now()
WHERE instance_id = $1 AND segment = $2"""
_CREATE_STAGE = f"""
CREATE TEMPORARY TABLE IF NOT EXISTS {_STAGE} (LIKE readings) ON COMMIT DELETE ROWS"""
_FROM_STAGE = f"""
INSERT INTO readings SELECT * FROM {_STAGE} ON CONFLICT (device_id, tick_at) DO NOTHING"""


class LoaderUnavailable(PollerError):
    """Postgres cannot be reached or went away mid-load; nothing was half-loaded.

    Retry later; :meth:`PgLoader.catch_up` loads whatever was missed."""


class LoaderError(PollerError):
    """Postgres refused the data for a reason a retry will not fix."""


class _CheckpointMoved(Exception):
    """The checkpoint is not where this transaction expected it."""

    def __init__(self, at: int) -> None:
        super().__init__(at)
        self.at = at


# Errors that mean "the server is gone or going", as opposed to "bad data".
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
)


def days_of(rows: Sequence[Reading]) -> set[int]:
    return {int(r[1] // DAY_S) for r in rows}


class _Chunk:
    """Members read from one segment for one transaction, encoded off-loop."""

    __slots__ = ("data", "days", "end", "rows")

    def __init__(self, end: int, data: bytes, rows: int, days: set[int]) -> None:
        self.end = end
        self.data = data
        """The COPY BINARY stream of the rows."""
        self.rows = rows
        self.days = days


def records_from_ndjson(ndjson: bytes) -> tuple[list[Record], set[int]]:
    """``reading[:8]`` tuples and UTC days of one spool member, straight from
    its NDJSON, skipping Reading objects (catch-up's main cost after COPY)."""
    if not ndjson:
        return [], set()
    objects = orjson.loads(b"[" + ndjson.rstrip(b"\n").replace(b"\n", b",") + b"]")
    records: list[Record] = []
    append = records.append
    days: set[int] = set()
    day = -1
    for o in objects:
        tick = o["tick_at"]
        append((o["device_id"], tick, o["device_at"], o["received_at"], o["demand_w"],
                o["delivered_wh"], o["received_wh"], o["price"]))
        d = int(tick // DAY_S)
        if d != day:
            days.add(d)
            day = d
    return records, days


def _take(members: Iterator[tuple[int, bytes]], max_rows: int,
          until: int | None) -> _Chunk | None:
    end = -1
    records: list[Record] = []
    days: set[int] = set()
    for end, payload in members:
        member_records, member_days = records_from_ndjson(payload)
        records.extend(member_records)
        days |= member_days
        if len(records) >= max_rows or (until is not None and end >= until):
            break
    return None if end < 0 else _Chunk(end, encode_rows(records), len(records), days)


class PgLoader:
    """Loads spool members into ``readings`` with a checkpoint per segment.

    >>> loader = PgLoader(pool, "poller-a", spool)        # doctest: +SKIP
    >>> await loader.start()
    >>> for pos in await spool.append(batch):
    ...     await loader.load(pos, rows_of_that_member)
    >>> await loader.catch_up()                           # after an outage

    ``pool_or_url``: a pool the caller owns, or a URL (the loader then owns a
    small pool that connects lazily, so it starts while Postgres is down).
    """

    def __init__(self, pool_or_url: asyncpg.Pool | str, instance_id: str, spool: Spool, *,
                 strategy: Strategy = "copy-first", catch_up_rows: int = 100_000,
                 timeout_s: float = 60.0) -> None:
        if not instance_id:
            raise ValueError("instance_id must not be empty")
        if strategy not in ("copy-first", "staged"):
            raise ValueError(f"unknown strategy {strategy!r}")
        if catch_up_rows < 1:
            raise ValueError(f"catch_up_rows must be >= 1, got {catch_up_rows}")
        self.instance_id = instance_id
        self.strategy: Strategy = strategy
        self.catch_up_rows = catch_up_rows
        self.timeout_s = timeout_s
        self._spool = spool
        self._url = pool_or_url if isinstance(pool_or_url, str) else None
        self._pool: asyncpg.Pool | None = None if isinstance(pool_or_url, str) else pool_or_url
        self._owns_pool = isinstance(pool_or_url, str)
        self._days: set[int] = set()
        # segment -> end offset known committed; see is_loaded().
        self._loaded: dict[str, int] = {}
        self.rows_loaded = 0
        """Rows inserted into ``readings`` by this loader since it started."""
        self.segments_refused = 0
        """Segments a catch-up passed over because Postgres refused their data."""
        self.duplicates_seen = 0
        """Batches that met existing rows and went through the staging table."""

    async def start(self) -> None:
        if self._pool is None and self._url is not None:
            self._pool = await asyncpg.create_pool(
                self._url, min_size=0, max_size=2, timeout=self.timeout_s)

    async def stop(self) -> None:
        """Close the pool if the loader made it. Idempotent."""
        if self._owns_pool and self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    def _acquire(self) -> Any:
        if self._pool is None:
            raise RuntimeError("PgLoader.start() was not called")
        return self._pool.acquire(timeout=self.timeout_s)

    def _unavailable(self, exc: BaseException) -> LoaderUnavailable:
        where = redact_url(self._url) if self._url else "the pool's server"
        return LoaderUnavailable(f"PostgreSQL unavailable ({where}): "
                                 f"{type(exc).__name__}: {exc}")

    # -- public API --------------------------------------------------------

    async def load(self, position: SpoolPosition, rows: Sequence[Reading]) -> int:
        """Load one appended member; return the rows inserted (0: already loaded).

        If the segment's checkpoint lies before ``position.start_offset``
        (an earlier member was never loaded), the missing members are read
        back from the spool and loaded first, in order.
        """
        data = encode_rows(rows)
        try:
            return await self._load_one(position, data, len(rows), days_of(rows))
        except _CheckpointMoved as moved:
            if moved.at >= position.end_offset:
                return 0
            return await self._load_from(position.segment, moved.at, until=position.end_offset)

    async def catch_up(self) -> int:
        """Load every member of every spool segment past its checkpoint.

        Oldest segment first, ``catch_up_rows`` rows per transaction. Returns
        the rows inserted.
        """
        done = await self.checkpoints()
        total = 0
        started = time.perf_counter()
        for info in self._spool.segments():
            start = done.get(info.name, 0)
            if start >= info.size:
                continue
            try:
                total += await self._load_from(info.name, start)
            except FileNotFoundError:
                # Deleted since listed: the deleter had it loaded already.
                continue
            except LoaderError as exc:
                # Data Postgres refuses: it stays in the spool (never deleted
                # unloaded) and goes to the archive; the segments after it
                # must not wait behind it.
                self.segments_refused += 1
                log.error("loader: %s refused, left in the spool: %s", info.name, exc)
        if total:
            elapsed = time.perf_counter() - started
            log.info("loader: caught up %d readings in %.1f s (%.0f rows/s)", total, elapsed,
                     total / elapsed if elapsed else 0.0)
        return total

    async def checkpoints(self) -> dict[str, int]:
        """``segment -> end_offset`` of this instance's checkpoints."""
        try:
            async with self._acquire() as conn:
                rows = await conn.fetch(
                    "SELECT segment, end_offset FROM ingest_checkpoints WHERE instance_id = $1",
                    self.instance_id, timeout=self.timeout_s)
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc
        found: dict[str, int] = {r["segment"]: r["end_offset"] for r in rows}
        self._loaded.update(found)
        return found

    def is_loaded(self, segment: str) -> bool:
        """True when the segment is closed and its checkpoint covers the whole file.

        Answers from the checkpoints this loader committed or read (by
        :meth:`catch_up` or :meth:`checkpoints`), without a round trip, so the
        archive uploader can call it as its ``may_delete``. It errs towards
        False: a segment is never reported loaded before its commit.
        """
        info = self._spool.segment(segment)
        if info is None or not info.closed:
            return False
        return self._loaded.get(segment, -1) >= info.size

    async def forget(self, segment: str) -> None:
        """Drop a segment's checkpoint once the spool has deleted the segment."""
        try:
            async with self._acquire() as conn:
                await conn.execute(
                    "DELETE FROM ingest_checkpoints WHERE instance_id = $1 AND segment = $2",
                    self.instance_id, segment, timeout=self.timeout_s)
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc
        self._loaded.pop(segment, None)

    # -- internals ---------------------------------------------------------

    async def _load_from(self, segment: str, start: int, until: int | None = None) -> int:
        """Load members of ``segment`` after ``start``, several per transaction,
        reading the next chunk on a thread while the current one loads."""
        total = 0
        while True:
            members = self._spool.read_raw_members(segment, start)
            try:
                chunk = await asyncio.to_thread(_take, members, self.catch_up_rows, until)
                while chunk is not None:
                    ahead = asyncio.ensure_future(asyncio.to_thread(
                        _take, members, self.catch_up_rows, until)) \
                        if until is None or chunk.end < until else None
                    try:
                        pos = SpoolPosition(segment, chunk.end, 0, chunk.rows, start)
                        total += await self._load_one(pos, chunk.data, chunk.rows,
                                                      chunk.days)
                    finally:
                        # Never leave the reader thread running on its own.
                        nxt = await ahead if ahead is not None else None
                    start = chunk.end
                    chunk = nxt
                return total
            except _CheckpointMoved as moved:
                # Another loader got further (or a checkpoint was reset): resume there.
                if until is not None and moved.at >= until:
                    return total
                start = moved.at
            finally:
                members.close()

    async def _load_one(self, position: SpoolPosition, data: bytes, rows: int,
                        days: set[int]) -> int:
        staged = self.strategy == "staged"
        retried_partitions = False
        while True:
            try:
                async with self._acquire() as conn:
                    await self._ensure_partitions(conn, days)
                    inserted = await self._transaction(conn, position, data, rows, staged)
                self.rows_loaded += inserted
                return inserted
            except asyncpg.UniqueViolationError:
                if staged:
                    raise
                staged = True
                self.duplicates_seen += 1
            except asyncpg.CheckViolationError as exc:
                # A partition this process believed in was dropped (retention).
                if retried_partitions or "no partition" not in str(exc):
                    raise LoaderError(f"loader: {position.segment}: {exc}") from exc
                retried_partitions = True
                self._days.clear()
            except _UNAVAILABLE as exc:
                raise self._unavailable(exc) from exc
            except asyncpg.PostgresError as exc:
                raise LoaderError(f"loader: {position.segment} up to {position.end_offset}: "
                                  f"{type(exc).__name__}: {exc}") from exc

    async def _transaction(self, conn: asyncpg.Connection, position: SpoolPosition,
                           data: bytes, rows: int, staged: bool) -> int:
        timeout = self.timeout_s
        async with conn.transaction():
            at: int = await conn.fetchval(_LOCK_CHECKPOINT, self.instance_id,
                                          position.segment, timeout=timeout)
            if at >= position.end_offset:
                self._note_loaded(position.segment, at)
                return 0
            if position.start_offset >= 0 and at != position.start_offset:
                raise _CheckpointMoved(at)
            if staged:
                await conn.execute(_CREATE_STAGE, timeout=timeout)
                await conn.copy_to_table(_STAGE, source=as_source(data), format="binary",
                                         columns=READING_COLUMNS, timeout=timeout)
                status = await conn.execute(_FROM_STAGE, timeout=timeout)
            else:
                status = await conn.copy_to_table(
                    "readings", source=as_source(data), format="binary",
                    columns=READING_COLUMNS, timeout=timeout)
            await conn.execute(_MOVE_CHECKPOINT, self.instance_id, position.segment,
                               position.end_offset, rows, timeout=timeout)
        self._note_loaded(position.segment, position.end_offset)
        return int(status.rsplit(" ", 1)[1])

    def _note_loaded(self, segment: str, end_offset: int) -> None:
        if end_offset > self._loaded.get(segment, -1):
            self._loaded[segment] = end_offset

    async def _ensure_partitions(self, conn: asyncpg.Connection, days: set[int]) -> None:
        missing = sorted(days - self._days)
        if not missing:
            return
        first = missing[0]
        # One call for the whole span: batches touch one or two days.
        await conn.fetchval("SELECT poller_ensure_partitions($1, $2)",
                            _EPOCH_DAY + timedelta(days=first), missing[-1] - first + 1,
                            timeout=self.timeout_s)
        self._days.update(range(first, missing[-1] + 1))
