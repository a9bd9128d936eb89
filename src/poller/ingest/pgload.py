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

No row stalls loading. A batch the encoder refuses (a device clock in
microseconds, a timestamp of 2^64-1, a line that is not a reading) or that
PostgreSQL refuses for its values (SQLSTATE classes 22 and 23: a range, a
constraint, a day whose partition cannot be made) is read again from the
spool and sorted out line by line: see :mod:`poller.ingest.quarantine`. The
good rows load, the others go to ``readings_quarantine`` with the reason, in
the same transaction that moves the checkpoint, and loading goes on. A batch
from memory goes the same way, so a member loads alike from memory or from
disk. Only an outage (:class:`LoaderUnavailable`) or a refusal that is not
about the rows (:class:`LoaderError`: permissions, a missing table) leaves a
member in the spool for later.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Generator, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, closing
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal, Protocol

import asyncpg

from poller.db import Conn, ConnectionSource
from poller.endpoints import redact_url
from poller.errors import PollerError
from poller.ingest import quarantine
from poller.ingest.pgcopy import ENCODE_ERRORS, as_source, encode_rows
from poller.ingest.quarantine import SortedLines, sort_lines
from poller.ingest.spool import Spool, SpoolPosition
from poller.reading import READING_COLUMNS, PlainReading
from poller.segment import decode_records

log = logging.getLogger(__name__)

Strategy = Literal["copy-first", "staged"]
Record = tuple[Any, ...]
MarkDirty = Callable[[Conn, list[int]], Awaitable[None]]
"""Called in a loading transaction with the Unix minutes (``tick // 60``)
of the rows it inserted: the rollups' dirty-bucket record."""

DAY_S = 86400
_EPOCH_DAY = date(1970, 1, 1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_STAGE = "poller_ingest_stage"

_LOCK_CHECKPOINT = """
INSERT INTO ingest_checkpoints AS c (instance_id, segment, end_offset, rows, updated_at)
VALUES ($1, $2, 0, 0, now())
ON CONFLICT (instance_id, segment) DO UPDATE SET end_offset = c.end_offset
RETURNING end_offset, rows"""
_MOVE_CHECKPOINT = """
UPDATE ingest_checkpoints SET end_offset = $3, rows = rows + $4, updated_at = now()
WHERE instance_id = $1 AND segment = $2"""
_CREATE_STAGE = f"""
CREATE TEMPORARY TABLE IF NOT EXISTS {_STAGE} (LIKE readings) ON COMMIT DELETE ROWS"""
_FROM_STAGE = f"""
INSERT INTO readings SELECT * FROM {_STAGE} ON CONFLICT (device_id, tick_at) DO NOTHING"""
_EMPTY_STAGE = f"TRUNCATE {_STAGE}"
# A row that only a partition of its day would take, never kept: see _unpartitioned.
_PROBE = "INSERT INTO readings (device_id, tick_at, received_at) VALUES (0, $1, $1)"


class LoaderUnavailable(PollerError):
    """Postgres cannot be reached or went away mid-load; nothing was half-loaded.

    Retry later; :meth:`PgLoader.catch_up` loads whatever was missed."""


class LoaderError(PollerError):
    """Postgres refused a batch for a reason that is not its rows' values
    (permissions, a missing table, a trigger's own error): the member stays in
    the spool. Rows refused for their values are quarantined instead."""


class _Refused(Exception):
    """PostgreSQL refused a batch for its values: sort it out line by line."""


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


def days_of(rows: Sequence[PlainReading]) -> set[int]:
    return {int(r[1] // DAY_S) for r in rows}


class _Chunk:
    """Members read from one segment for one transaction, encoded off-loop."""

    __slots__ = ("data", "days", "end", "minutes", "rows", "sorted")

    def __init__(self, end: int, data: bytes, rows: int, days: set[int],
                 sorted_lines: SortedLines | None = None,
                 minutes: list[int] | None = None) -> None:
        self.end = end
        self.data = data
        """The COPY BINARY stream of the rows."""
        self.rows = rows
        """Lines in the members (readings, and any quarantined)."""
        self.days = days
        self.sorted = sorted_lines
        """Set when the members were sorted out line by line."""
        self.minutes = minutes
        """Unix minutes of the rows, when the loader marks rollups dirty."""


def _minutes(records: Sequence[Record]) -> list[int]:
    return list({int(r[1] // 60) for r in records})


def _take(members: Iterator[tuple[int, bytes]], max_rows: int, until: int | None,
          line_by_line: bool = False, minutes: bool = False) -> _Chunk | None:
    end = -1
    payloads: list[bytes] = []
    records: list[Record] = []
    days: set[int] = set()
    lines = 0
    sound = not line_by_line
    for end, payload in members:
        payloads.append(payload)
        member_lines = payload.count(b"\n")
        lines += member_lines
        if sound:
            try:
                member_records, member_days = decode_records(payload)
            except (ValueError, KeyError, TypeError, OverflowError):
                sound = False  # orjson.JSONDecodeError is a ValueError
            else:
                # One object per line, or the line numbers of the quarantine
                # would not be the lines of the file.
                sound = len(member_records) == member_lines and payload[-1:] in (b"", b"\n")
                records.extend(member_records)
                days |= member_days
        if lines >= max_rows or (until is not None and end >= until):
            break
    if end < 0:
        return None
    if sound:
        try:
            return _Chunk(end, encode_rows(records), len(records), days,
                          minutes=_minutes(records) if minutes else None)
        except ENCODE_ERRORS:
            pass
    found = sort_lines(payloads)
    return _Chunk(end, found.data, found.n_lines, found.days, found,
                  _minutes(found.records) if minutes else None)


class ArchivedSegments(Protocol):
    """Segments the spool evicted unloaded, readable from the archive
    (:class:`poller.archive.fetch.EvictedSegments`)."""

    def read_raw_members(self, segment: str, from_offset: int = 0
                         ) -> Generator[tuple[int, bytes], None, None]: ...

    async def catch_up(self, loader: PgLoader) -> int: ...


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

    def __init__(self, pool_or_url: ConnectionSource | str, instance_id: str, spool: Spool, *,
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
        self._pool: ConnectionSource | None = \
            None if isinstance(pool_or_url, str) else pool_or_url
        self._own_pool: asyncpg.Pool | None = None
        """The pool made from the URL: the loader closes this one only."""
        self._days: set[int] = set()
        # segment -> end offset known committed; see is_loaded().
        self._loaded: dict[str, int] = {}
        self.rows_loaded = 0
        """Rows inserted into ``readings`` by this loader since it started."""
        self.segments_refused = 0
        """Segments a catch-up passed over because Postgres refused them for a
        reason other than their rows' values (see :class:`LoaderError`)."""
        self.rows_quarantined = 0
        """Spool lines put in ``readings_quarantine`` by this loader since it
        started (not loadable: see :mod:`poller.ingest.quarantine`)."""
        self.duplicates_seen = 0
        """Batches that met existing rows and went through the staging table."""
        self.archived: ArchivedSegments | None = None
        """Where segments the spool evicted before they were loaded are read
        (S3: their checkpoints apply to the objects as they did to the files)."""
        self.mark_dirty: MarkDirty | None = None
        """Set when rollups are kept (:mod:`poller.rollups.worker`): each
        transaction that inserts rows marks their minutes in it."""

    async def start(self) -> None:
        if self._pool is None and self._url is not None:
            self._pool = self._own_pool = await asyncpg.create_pool(
                self._url, min_size=0, max_size=2, timeout=self.timeout_s)

    async def stop(self) -> None:
        """Close the pool if the loader made it. Idempotent."""
        pool, self._own_pool = self._own_pool, None
        if pool is not None:
            self._pool = None
            await pool.close()

    def _acquire(self) -> AbstractAsyncContextManager[Conn]:
        if self._pool is None:
            raise RuntimeError("PgLoader.start() was not called")
        return self._pool.acquire(timeout=self.timeout_s)

    def _unavailable(self, exc: BaseException) -> LoaderUnavailable:
        where = redact_url(self._url) if self._url else "the pool's server"
        return LoaderUnavailable(f"PostgreSQL unavailable ({where}): "
                                 f"{type(exc).__name__}: {exc}")

    # -- public API --------------------------------------------------------

    async def load(self, position: SpoolPosition, rows: Sequence[PlainReading]) -> int:
        """Load one appended member; return the rows inserted (0: already loaded).

        If the segment's checkpoint lies before ``position.start_offset``
        (an earlier member was never loaded), the missing members are read
        back from the spool and loaded first, in order. A member with a row
        the encoder or PostgreSQL refuses is read back too and sorted out
        line by line, exactly as a catch-up would load it.
        """
        segment, end = position.segment, position.end_offset
        try:
            data = encode_rows(rows)
        except ENCODE_ERRORS:
            # As the spool holds it: NaN there is null, so it may well encode.
            return await self._load_from(segment, max(position.start_offset, 0), until=end)
        minutes = _minutes(rows) if self.mark_dirty is not None else None
        try:
            return await self._load_one(position, data, len(rows), days_of(rows),
                                        minutes=minutes)
        except _CheckpointMoved as moved:
            if moved.at >= end:
                return 0
            return await self._load_from(segment, moved.at, until=end)
        except _Refused:
            return await self._load_from(segment, max(position.start_offset, 0), until=end,
                                         line_by_line=True)

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
                # Deleted since listed: the deleter had it loaded already,
                # or evicted it to S3 (loaded from there below).
                continue
            except LoaderError as exc:
                # Refused for a reason that is not its rows' (those are
                # quarantined): it stays in the spool (never deleted unloaded)
                # and goes to the archive; the segments after it must not
                # wait behind it.
                self.segments_refused += 1
                log.error("loader: %s refused, left in the spool: %s", info.name, exc)
        if self.archived is not None:
            total += await self.archived.catch_up(self)
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
        # Only the spool's segments: rows of segments deleted long ago (their
        # forget() met an outage) would otherwise come back at every catch-up
        # and stay in memory for the life of the process.
        held = {info.name for info in self._spool.segments()}
        self._loaded.update((name, end) for name, end in found.items() if name in held)
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
        # First, and whether or not the row can go now: nothing asks about a
        # deleted segment again, and an entry left behind would be kept for good.
        self._loaded.pop(segment, None)
        try:
            async with self._acquire() as conn:
                await conn.execute(
                    "DELETE FROM ingest_checkpoints WHERE instance_id = $1 AND segment = $2",
                    self.instance_id, segment, timeout=self.timeout_s)
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc

    async def load_segment(self, segment: str, start: int = 0) -> int:
        """Load the members of ``segment`` past ``start`` (its checkpoint),
        from the spool or, once evicted, from :attr:`archived`."""
        return await self._load_from(segment, start)

    # -- internals ---------------------------------------------------------

    def _members(self, segment: str, start: int) -> Generator[tuple[int, bytes], None, None]:
        if self.archived is not None and self._spool.segment(segment) is None:
            return self.archived.read_raw_members(segment, start)
        return self._spool.read_raw_members(segment, start)

    async def _load_from(self, segment: str, start: int, until: int | None = None, *,
                         line_by_line: bool = False) -> int:
        """Load members of ``segment`` after ``start``, several per transaction,
        reading the next chunk on a thread while the current one loads."""
        total = 0
        rows = self.catch_up_rows
        marks = self.mark_dirty is not None
        while True:
            members = self._members(segment, start)
            try:
                chunk = await asyncio.to_thread(_take, members, rows, until, line_by_line,
                                                marks)
                while chunk is not None:
                    ahead = asyncio.ensure_future(asyncio.to_thread(
                        _take, members, rows, until, line_by_line, marks)) \
                        if until is None or chunk.end < until else None
                    try:
                        pos = SpoolPosition(segment, chunk.end, 0, chunk.rows, start)
                        total += await self._load_chunk(pos, chunk)
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

    async def _load_chunk(self, position: SpoolPosition, chunk: _Chunk) -> int:
        if chunk.sorted is None:
            try:
                return await self._load_one(position, chunk.data, chunk.rows, chunk.days,
                                            minutes=chunk.minutes)
            except _Refused as refused:
                log.warning("loader: PostgreSQL refused a batch of %s (%s); sorting it out "
                            "line by line", position.segment, refused)
                chunk = await asyncio.to_thread(self._take_line_by_line, position)
        return await self._load_one(position, chunk.data, chunk.rows, chunk.days,
                                    chunk.sorted, minutes=chunk.minutes)

    def _take_line_by_line(self, position: SpoolPosition) -> _Chunk:
        with closing(self._members(position.segment, position.start_offset)) as members:
            chunk = _take(members, sys.maxsize, position.end_offset, line_by_line=True,
                          minutes=self.mark_dirty is not None)
        if chunk is None or chunk.end != position.end_offset:
            raise LoaderError(f"loader: {position.segment} no longer has the members "
                              f"{position.start_offset}..{position.end_offset} it had")
        return chunk

    async def _load_one(self, position: SpoolPosition, data: bytes, rows: int,
                        days: set[int], lines: SortedLines | None = None, *,
                        minutes: list[int] | None = None) -> int:
        """Load one chunk in one transaction. With ``lines`` (a chunk sorted
        line by line), rows PostgreSQL refuses are quarantined; without,
        such a refusal raises :class:`_Refused`."""
        staged = self.strategy == "staged"
        retried_partitions = False
        while True:
            try:
                async with self._acquire() as conn:
                    if lines is None:
                        await self._ensure_partitions(conn, days)
                    else:
                        await self._ensure_each_partition(conn, position.segment, days)
                    inserted = await self._transaction(conn, position, data, rows, staged,
                                                       lines, minutes)
                self.rows_loaded += inserted
                return inserted
            except asyncpg.UniqueViolationError:
                if staged:
                    raise
                staged = True
                self.duplicates_seen += 1
            except _UNAVAILABLE as exc:
                raise self._unavailable(exc) from exc
            except asyncpg.PostgresError as exc:
                if lines is None and isinstance(exc, asyncpg.CheckViolationError) \
                        and not retried_partitions and "no partition" in str(exc):
                    # A partition this process believed in was dropped (retention).
                    retried_partitions = True
                    self._days.clear()
                    continue
                if lines is None and quarantine.is_refusal(exc):
                    raise _Refused(quarantine.refusal_reason(exc)) from exc
                raise LoaderError(f"loader: {position.segment} up to {position.end_offset}: "
                                  f"{type(exc).__name__}: {exc}") from exc

    async def _transaction(self, conn: Conn, position: SpoolPosition,
                           data: bytes, rows: int, staged: bool,
                           lines: SortedLines | None, minutes: list[int] | None = None) -> int:
        timeout = self.timeout_s
        quarantined = 0
        async with conn.transaction():
            mark = await conn.fetchrow(_LOCK_CHECKPOINT, self.instance_id, position.segment,
                                       timeout=timeout)
            assert mark is not None  # an upsert with RETURNING returns its row
            at: int = mark["end_offset"]
            if at >= position.end_offset:
                self._note_loaded(position.segment, at)
                return 0
            if position.start_offset >= 0 and at != position.start_offset:
                raise _CheckpointMoved(at)
            if lines is None:
                inserted = await self._copy(conn, data, staged)
            else:
                inserted, quarantined = await self._copy_or_quarantine(
                    conn, position.segment, lines, staged, line_base=mark["rows"])
            if inserted and minutes and self.mark_dirty is not None:
                await self.mark_dirty(conn, minutes)
            await conn.execute(_MOVE_CHECKPOINT, self.instance_id, position.segment,
                               position.end_offset, rows, timeout=timeout)
        self._note_loaded(position.segment, position.end_offset)
        self.rows_quarantined += quarantined
        return inserted

    async def _copy(self, conn: Conn, data: bytes, staged: bool, *,
                    empty_stage: bool = False) -> int:
        timeout = self.timeout_s
        if staged:
            await conn.execute(_CREATE_STAGE, timeout=timeout)
            await conn.copy_to_table(_STAGE, source=as_source(data), format="binary",
                                     columns=READING_COLUMNS, timeout=timeout)
            status = await conn.execute(_FROM_STAGE, timeout=timeout)
            if empty_stage:
                await conn.execute(_EMPTY_STAGE, timeout=timeout)
        else:
            status = await conn.copy_to_table(
                "readings", source=as_source(data), format="binary",
                columns=READING_COLUMNS, timeout=timeout)
        return int(status.rsplit(" ", 1)[1])

    async def _copy_or_quarantine(self, conn: Conn, segment: str,
                                  lines: SortedLines, staged: bool,
                                  line_base: int) -> tuple[int, int]:
        """COPY the lines' readings, quarantine what PostgreSQL refuses and the
        lines the encoder refused; ``(inserted, quarantined)``.

        ``line_base``: lines of the segment before this chunk (the
        checkpoint's row count), so quarantined lines are numbered in the
        segment as ``poller replay`` numbers them."""
        records = lines.records
        # A day without a partition refuses every row of it: found with one
        # probe, not row by row.
        blocked = await self._unpartitioned(conn, lines.days)
        items: Sequence[int] = range(len(records))
        if blocked:
            items = [i for i, r in enumerate(records) if int(r[1] // DAY_S) not in blocked]

        async def attempt(part: Sequence[int]) -> int:
            # Each try empties the staging table behind it: the next one must
            # not see rows a try before it moved already.
            data = lines.data if len(part) == len(records) else \
                encode_rows([records[i] for i in part])
            return await self._copy(conn, data, staged, empty_stage=True)

        inserted, refused = await quarantine.bisect(conn, items, attempt)
        rows = lines.quarantined + [lines.refused(i, reason) for i, reason in refused]
        if blocked:
            rows += [lines.refused(i, blocked[int(r[1] // DAY_S)])
                     for i, r in enumerate(records) if int(r[1] // DAY_S) in blocked]
        rows.sort()
        quarantined = await quarantine.insert(conn, self.instance_id, segment, rows,
                                              line_base=line_base, timeout=self.timeout_s)
        if rows:
            first = rows[0]
            log.warning("loader: %s: %d line(s) quarantined, %d reading(s) loaded; first at "
                        "line %d: %s", segment, len(rows), inserted, line_base + first.line,
                        first.reason)
        return inserted, quarantined

    async def _unpartitioned(self, conn: Conn,
                             days: set[int]) -> dict[int, str]:
        """The days among ``days`` that no partition of ``readings`` takes,
        with PostgreSQL's reason: a probe row per day, always rolled back."""
        found: dict[int, str] = {}
        for day in sorted(days):
            probe = conn.transaction()
            await probe.start()
            try:
                await conn.execute(_PROBE, _EPOCH + timedelta(days=day), timeout=self.timeout_s)
            except asyncpg.CheckViolationError as exc:
                if "no partition" in str(exc):
                    found[day] = (f"{type(exc).__name__}: no partition of readings takes "
                                  f"{_EPOCH_DAY + timedelta(days=day)}")
            except asyncpg.PostgresError as exc:
                # Refused for anything else (a rule of this database's): the
                # day has its partition as far as the probe can tell.
                if isinstance(exc, _UNAVAILABLE):
                    raise
            finally:
                await probe.rollback()
        return found

    def _note_loaded(self, segment: str, end_offset: int) -> None:
        if end_offset > self._loaded.get(segment, -1):
            self._loaded[segment] = end_offset

    async def _ensure_partitions(self, conn: Conn, days: set[int]) -> None:
        missing = sorted(days - self._days)
        if not missing:
            return
        # One call per run of consecutive days (batches touch one or two),
        # never one across a gap: a single stray tick_at years away must not
        # make every partition in between.
        for first, last in _runs(missing):
            try:
                await conn.fetchval("SELECT poller_ensure_partitions($1, $2)",
                                    _EPOCH_DAY + timedelta(days=first), last - first + 1,
                                    timeout=self.timeout_s)
            except _UNAVAILABLE:
                raise
            except asyncpg.PostgresError as exc:
                raise _Refused(f"partitions from day {first}: {type(exc).__name__}: "
                               f"{exc}") from exc
            self._days.update(range(first, last + 1))

    async def _ensure_each_partition(self, conn: Conn, segment: str,
                                     days: set[int]) -> None:
        """Make each day's partition on its own, whatever this process
        believes exists; a day whose partition cannot be made is logged, and
        its rows are then refused by the COPY and quarantined."""
        for day in sorted(days):
            try:
                await conn.fetchval("SELECT poller_ensure_partitions($1, 1)",
                                    _EPOCH_DAY + timedelta(days=day), timeout=self.timeout_s)
            except _UNAVAILABLE:
                raise
            except asyncpg.PostgresError as exc:
                log.error("loader: %s: no partition can be made for %s: %s: %s", segment,
                          _EPOCH_DAY + timedelta(days=day), type(exc).__name__, exc)
            else:
                self._days.add(day)


def _runs(days: list[int]) -> Iterator[tuple[int, int]]:
    """``(first, last)`` of each run of consecutive numbers in sorted ``days``."""
    first = last = days[0]
    for day in days[1:]:
        if day != last + 1:
            yield first, last
            first = day
        last = day
    yield first, last
