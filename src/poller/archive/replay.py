"""Replay archived readings from S3 into Postgres.

Objects whose hour partition overlaps ``[since, until)`` are streamed,
decompressed member by member, and their readings with ``tick_at`` in range
are COPYed into a temporary staging table, then moved with
``INSERT ... ON CONFLICT (device_id, tick_at) DO NOTHING``: replaying twice,
or replaying what Postgres already has, inserts nothing.

Damage is reported, never fatal to the run: a line that is not a reading
the loader would take (bad JSON, a timestamp outside 0001..9999, ...) or that
Postgres refuses goes to ``readings_quarantine`` as the loader puts it there
(same key: segment and line, so nothing is quarantined twice) and is reported
with its object key and line number; bad or truncated gzip data ends that
object (the complete lines before it are kept) and is reported the same way.
Only an unreachable archive or database stops the replay::

    result = await replay(store, "poller", pool,
                          datetime(2024, 3, 1, tzinfo=UTC), datetime(2024, 3, 2, tzinfo=UTC))
    print(result.rows_inserted, result.errors)
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Protocol

import asyncpg

from poller.archive.naming import (
    SEGMENT_SUFFIX,
    date_prefix,
    parse_archive_key,
    readings_prefix,
)
from poller.archive.s3 import ArchiveError, ArchiveUnavailable
from poller.db import Conn, ConnectionSource, connect
from poller.ingest import quarantine
from poller.ingest.pgcopy import row_problem
from poller.reading import READING_COLUMNS, Reading
from poller.retention.restore import RestoreBook
from poller.segment import DecodeError, decode_line

log = logging.getLogger(__name__)

_STAGING = "poller_replay_staging"
_COLUMNS = ", ".join(READING_COLUMNS)
# ``line``: where each row is in its object, should Postgres refuse it.
_CREATE_STAGING = f"CREATE TEMP TABLE IF NOT EXISTS {_STAGING} (LIKE readings, line bigint)"
_STAGED_COLUMNS = (*READING_COLUMNS, "line")
_MOVE = (f"INSERT INTO readings ({_COLUMNS}) SELECT {_COLUMNS} FROM {_STAGING} "
         "ON CONFLICT (device_id, tick_at) DO NOTHING")
# The rollups' dirty-bucket record (schema/005), in the move's transaction:
# every minute of the object's rows, when the object inserted any.
_MARK_DIRTY = (f"INSERT INTO rollup_dirty (level, bucket) SELECT DISTINCT 'minute', "
               f"date_bin('1 minute', tick_at, timestamptz 'epoch') FROM {_STAGING} "
               "ON CONFLICT (level, bucket) DO UPDATE SET marked_at = now()")
_MOVE_LINES = (f"INSERT INTO readings ({_COLUMNS}) SELECT {_COLUMNS} FROM {_STAGING} "
               "WHERE line = ANY($1::bigint[]) ON CONFLICT (device_id, tick_at) DO NOTHING")
_REFUSED_LINES = (f"SELECT line, device_id, extract(epoch FROM tick_at)::float8 AS tick, "
                  f"(to_jsonb(s) - 'line')::text AS raw FROM {_STAGING} s "
                  "WHERE line = ANY($1::bigint[])")
_HOUR_S = 3600
_DAY_S = 86400
# Issues kept in the result; all are counted in ``errors``.
MAX_ISSUES = 200
_NUMBER = (int, float)

Record = tuple[Any, ...]


class ArchiveReader(Protocol):
    """What replay needs of the archive (``ArchiveStore`` is one)."""

    async def list_keys(self, prefix: str) -> list[tuple[str, int]]: ...

    def stream(self, key: str, chunk_bytes: int = ...) -> AsyncGenerator[bytes, None]: ...


@dataclass(frozen=True, slots=True)
class ReplayIssue:
    key: str
    line: int | None
    """1-based line in the decompressed object, when known."""
    message: str

    def __str__(self) -> str:
        where = self.key if self.line is None else f"{self.key} line {self.line}"
        return f"{where}: {self.message}"


@dataclass(frozen=True, slots=True)
class ReplayResult:
    objects: int
    """Archive objects read."""
    rows_read: int
    """Valid readings with ``tick_at`` in range."""
    rows_inserted: int
    rows_present: int
    """Read but already in Postgres (or twice in the archive)."""
    rows_out_of_range: int
    errors: int
    rows_quarantined: int = 0
    """Lines newly put in ``readings_quarantine`` (each also in ``errors``)."""
    issues: tuple[ReplayIssue, ...] = field(default=())
    """The first :data:`MAX_ISSUES` problems, in the order met."""
    days_restored: tuple[date, ...] = ()
    """Days retention had dropped that the replay loaded rows into again."""


async def replay(
    store: ArchiveReader,
    prefix: str,
    pg_pool_or_url: ConnectionSource | str,
    since: datetime,
    until: datetime,
    progress: Callable[[int, int], None] | None = None,
    *,
    batch_rows: int = 50_000,
) -> ReplayResult:
    """Load archived readings with ``since <= tick_at < until`` into ``readings``.

    Naive datetimes are taken as UTC. ``progress(done, total)`` is called
    after each object. Raises :class:`ArchiveUnavailable` or an asyncpg error
    when a server fails; everything loaded before stays loaded, and running
    the replay again completes it.
    """
    since_s, until_s = _utc_seconds(since), _utc_seconds(until)
    if since_s >= until_s:
        raise ValueError("since must be before until")
    if batch_rows < 1:
        raise ValueError("batch_rows must be positive")
    keys = await _select_keys(store, prefix, since_s, until_s)
    tally = _Tally()
    async with _connection(pg_pool_or_url) as conn:
        await conn.execute(_CREATE_STAGING)
        # Manifest rows and restored days for retention (poller.retention.restore).
        book = await RestoreBook.open(conn)
        try:
            for done, (key, size) in enumerate(keys, 1):
                await _replay_object(store, conn, key, size, book, since_s, until_s,
                                     batch_rows, tally)
                if progress is not None:
                    progress(done, len(keys))
        finally:
            if not conn.is_closed():
                await conn.execute(f"DROP TABLE IF EXISTS {_STAGING}")
    if tally.errors:
        log.warning("replay met %d problems in %d objects", tally.errors, len(keys))
    return ReplayResult(
        objects=len(keys), rows_read=tally.rows_read, rows_inserted=tally.inserted,
        rows_present=tally.rows_read - tally.inserted, rows_out_of_range=tally.out_of_range,
        errors=tally.errors, rows_quarantined=tally.quarantined, issues=tuple(tally.issues),
        days_restored=tuple(sorted(book.restored)))


class _Tally:
    __slots__ = ("errors", "inserted", "issues", "out_of_range", "quarantined", "rows_read")

    def __init__(self) -> None:
        self.rows_read = 0
        self.inserted = 0
        self.quarantined = 0
        self.out_of_range = 0
        self.errors = 0
        self.issues: list[ReplayIssue] = []

    def problem(self, key: str, line: int | None, message: str) -> None:
        self.errors += 1
        if len(self.issues) < MAX_ISSUES:
            issue = ReplayIssue(key, line, message)
            self.issues.append(issue)
            log.warning("replay: %s", issue)


_MAX_DAY_LISTINGS = 62


async def _select_keys(store: ArchiveReader, prefix: str, since_s: float,
                       until_s: float) -> list[tuple[str, int]]:
    """``(key, size)`` of the archive objects whose hour overlaps the range,
    oldest hour first."""
    found: list[tuple[tuple[int, int, str], str, int]] = []
    first_day = int(since_s // _DAY_S) * _DAY_S
    # A short range lists its days' prefixes; a long one (a year of backfill,
    # "everything") lists the archive once instead of thousands of empty days.
    if (until_s - first_day) / _DAY_S > _MAX_DAY_LISTINGS:
        prefixes = [readings_prefix(prefix)]
    else:
        prefixes = [date_prefix(prefix, day)
                    for day in range(first_day, int(until_s) + 1, _DAY_S) if day < until_s]
    for listing in prefixes:
        for key, size in await store.list_keys(listing):
            try:
                seg = parse_archive_key(key)
            except ValueError:
                continue  # not ours (a manual upload, a lifecycle marker)
            if seg.hour_epoch < until_s and seg.hour_epoch + _HOUR_S > since_s:
                found.append(((seg.hour_epoch, seg.seq, seg.instance), key, size))
    found.sort()
    return [(key, size) for _, key, size in found]


async def _replay_object(store: ArchiveReader, conn: Conn, key: str, size: int,
                         book: RestoreBook, since_s: float, until_s: float, batch_rows: int,
                         tally: _Tally) -> None:
    await conn.execute(f"TRUNCATE {_STAGING}")
    decoder = _ObjectDecoder(key, since_s, until_s, tally)
    batch: list[Record] = []
    readable = True
    try:
        async with aclosing(store.stream(key)) as chunks:
            async for chunk in chunks:
                for record in decoder.feed(chunk):
                    batch.append(record)
                    if len(batch) >= batch_rows:
                        await _stage(conn, batch)
                if decoder.broken:
                    break
            else:
                batch.extend(decoder.finish())
    except ArchiveUnavailable:
        raise
    except ArchiveError as exc:
        # Gone since the listing, or refused: the other objects still count.
        readable = False
        tally.problem(key, None, str(exc))
    if batch:
        await _stage(conn, batch)
    if decoder.first_day is not None and decoder.last_day is not None:
        days = (decoder.last_day - decoder.first_day).days + 1
        await conn.execute("SELECT poller_ensure_partitions($1::date, $2)",
                           decoder.first_day, days)
    # The move and the quarantine of this object commit together.
    async with conn.transaction():
        refused: list[quarantine.Quarantined] = []
        if decoder.first_day is not None:
            inserted_before = tally.inserted
            refused = await _move(conn, key, tally)
            if tally.inserted > inserted_before:
                await conn.execute(_MARK_DIRTY)
        tally.rows_read -= len(refused)  # not readings after all, nor "present"
        for q in refused:
            tally.problem(key, q.line, f"{q.reason}; quarantined")
        rows = sorted(decoder.quarantined + refused)
        if rows:
            instance, segment = _segment_of(key)
            tally.quarantined += await quarantine.insert(conn, instance, segment, rows)
        if readable:
            await book.note_object(conn, key, size, decoder.lines, decoder.first_day,
                                   decoder.last_day)


async def _move(conn: Conn, key: str,
                tally: _Tally) -> list[quarantine.Quarantined]:
    """Move the staged rows into ``readings``; the rows Postgres refuses
    (found a half at a time, see :func:`quarantine.bisect`) are returned."""
    try:
        async with conn.transaction():
            status = await conn.execute(_MOVE)
        tally.inserted += int(status.rsplit(" ", 1)[-1])
        return []
    except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
        if not quarantine.is_refusal(exc):
            raise
        log.warning("replay: Postgres refused rows of %s (%s); sorting them out", key,
                    quarantine.refusal_reason(exc))
    lines = [r["line"] for r in await conn.fetch(f"SELECT line FROM {_STAGING} ORDER BY line")]

    async def attempt(part: Sequence[int]) -> int:
        status: str = await conn.execute(_MOVE_LINES, list(part))
        return int(status.rsplit(" ", 1)[-1])

    inserted, refused = await quarantine.bisect(conn, lines, attempt)
    tally.inserted += inserted
    reasons = dict(refused)
    found = await conn.fetch(_REFUSED_LINES, list(reasons))
    return [quarantine.quarantined(r["line"], r["raw"], reasons[r["line"]],
                                   (r["device_id"], r["tick"])) for r in found]


def _segment_of(key: str) -> tuple[str, str]:
    """``(instance, segment file name)`` an archive key holds."""
    seg = parse_archive_key(key)
    hour = time.strftime("%Y%m%dT%H", time.gmtime(seg.hour_epoch))
    return seg.instance, f"{seg.instance}-{hour}-{seg.seq:06d}{SEGMENT_SUFFIX}"


async def _stage(conn: Conn, batch: list[Record]) -> None:
    await conn.copy_records_to_table(_STAGING, records=batch, columns=_STAGED_COLUMNS)
    batch.clear()


class _ObjectDecoder:
    """Turns one object's compressed chunks into staged records, noting damage."""

    __slots__ = ("_in_member", "_inflate", "_key", "_line", "_rest", "_since_s", "_tally",
                 "_until_s", "broken", "first_day", "last_day", "quarantined")

    def __init__(self, key: str, since_s: float, until_s: float, tally: _Tally) -> None:
        self._key = key
        self._since_s = since_s
        self._until_s = until_s
        self._tally = tally
        self._inflate = zlib.decompressobj(wbits=31)
        self._in_member = False
        self._rest = b""
        self._line = 0
        self.broken = False
        self.first_day: date | None = None
        self.last_day: date | None = None
        self.quarantined: list[quarantine.Quarantined] = []
        """Lines that are not readings the loader would take."""

    @property
    def lines(self) -> int:
        """Lines met so far (all of them once the object is read)."""
        return self._line

    def feed(self, chunk: bytes) -> Iterator[Record]:
        data, damage = self._inflate_all(chunk)
        if data:
            lines = (self._rest + data).split(b"\n")
            self._rest = lines.pop()
            yield from self._records(lines)
        if damage is not None:
            # The complete lines before the damage were kept; a partial one is dropped.
            self.broken = True
            self._rest = b""
            self._tally.problem(self._key, self._line + 1,
                                f"bad gzip data ({damage}); rest of the object skipped")

    def finish(self) -> Iterator[Record]:
        if self._in_member:
            self._tally.problem(self._key, self._line + 1,
                                "truncated gzip member at the end of the object")
        rest, self._rest = self._rest, b""
        if rest.strip():
            yield from self._records([rest])

    def _inflate_all(self, chunk: bytes) -> tuple[bytes, str | None]:
        out: list[bytes] = []
        data = chunk
        try:
            while data:
                self._in_member = True
                out.append(self._inflate.decompress(data))
                if not self._inflate.eof:
                    break
                # Members are concatenated: start a new one with what is left.
                data = self._inflate.unused_data
                self._inflate = zlib.decompressobj(wbits=31)
                self._in_member = False
        except zlib.error as exc:
            return b"".join(out), str(exc)
        return b"".join(out), None

    def _records(self, lines: list[bytes]) -> Iterator[Record]:
        since_s, until_s, tally = self._since_s, self._until_s, self._tally
        for raw in lines:
            self._line += 1
            if not raw.strip():
                continue
            try:
                tick_s, record = _to_record(decode_line(raw))
            except DecodeError as exc:
                tally.problem(self._key, self._line, "not valid JSON; quarantined")
                self.quarantined.append(
                    quarantine.quarantined(self._line, raw, f"not JSON: {exc}"))
                continue
            except (KeyError, TypeError, ValueError, OverflowError) as exc:
                tally.problem(self._key, self._line, f"not a reading ({exc}); quarantined")
                self.quarantined.append(
                    quarantine.quarantined(self._line, raw, f"not a reading: {exc}"))
                continue
            if not since_s <= tick_s < until_s:
                tally.out_of_range += 1
                continue
            tally.rows_read += 1
            day = record[1].date()
            if self.first_day is None or day < self.first_day:
                self.first_day = day
            if self.last_day is None or day > self.last_day:
                self.last_day = day
            yield (*record, self._line)


def _to_record(doc: Any) -> tuple[float, Record]:
    """``(tick_at seconds, readings row)`` from one archived line."""
    if isinstance(doc, list):
        if len(doc) != len(Reading._fields):
            raise ValueError(f"{len(doc)} fields")
        doc = dict(zip(Reading._fields, doc, strict=True))
    if not isinstance(doc, dict):
        raise TypeError("not an object")
    device_id = doc["device_id"]
    if not isinstance(device_id, int) or isinstance(device_id, bool):
        raise TypeError("device_id is not an integer")
    tick_s = _number(doc, "tick_at")
    received_s = _number(doc, "received_at")
    device_s = _optional_number(doc, "device_at")
    values = (_optional_number(doc, "demand_w"), _optional_number(doc, "delivered_wh"),
              _optional_number(doc, "received_wh"), _optional_number(doc, "price"))
    # The loader's rule, so a line is loaded or quarantined alike either way.
    problem = row_problem((device_id, tick_s, device_s, received_s, *values))
    if problem is not None:
        raise ValueError(problem)
    return tick_s, (
        device_id,
        datetime.fromtimestamp(tick_s, UTC),
        None if device_s is None else datetime.fromtimestamp(device_s, UTC),
        datetime.fromtimestamp(received_s, UTC),
        *values,
    )


def _number(doc: dict[str, Any], name: str) -> float:
    value = doc[name]
    if not isinstance(value, _NUMBER) or isinstance(value, bool):
        raise TypeError(f"{name} is not a number")
    return float(value)


def _optional_number(doc: dict[str, Any], name: str) -> float | None:
    value = doc.get(name)
    if value is None:
        return None
    if not isinstance(value, _NUMBER) or isinstance(value, bool):
        raise TypeError(f"{name} is not a number")
    return float(value)


def _utc_seconds(moment: datetime) -> float:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@asynccontextmanager
async def _connection(pg: ConnectionSource | str) -> AsyncIterator[Conn]:
    # The staging table is per session, so the whole replay uses one connection.
    if isinstance(pg, str):
        conn: Conn = await connect(pg)
        try:
            yield conn
        finally:
            await conn.close()
    else:
        async with pg.acquire() as conn:
            yield conn
