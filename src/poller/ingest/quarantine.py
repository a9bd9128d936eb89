"""The quarantine: spool lines that cannot go into ``readings``, kept with why.

One reading the COPY encoder cannot take (a device clock in microseconds, a
timestamp of 2^64-1, a line that is not a reading at all) or that PostgreSQL
refuses (a constraint, a day whose partition cannot be made) must not hold up
the readings around it. The loader sorts such a batch out line by line
(:func:`sort_lines`), lets PostgreSQL judge the rest a half at a time inside
the loading transaction (:func:`bisect`, one savepoint per try) and puts each
line refused into ``readings_quarantine`` with its text and the reason
(:func:`insert`), in the transaction that moves the segment's checkpoint past
it. The line itself also stays in the segment archived on S3.

A quarantined row is keyed by where its line is: ``(instance_id, segment,
line)``, the 1-based line of the segment's decompressed NDJSON. The loader and
``poller replay`` count lines the same way, so loading a member again or
replaying the archived segment inserts nothing twice.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

import asyncpg

from poller.db import Conn
from poller.ingest.pgcopy import END_S, MIN_S, encode_valid
from poller.segment import DecodeError, decode_line

DAY_S = 86400
RAW_MAX_CHARS = 16_384
"""Longer lines are cut in the table; the archived segment has them whole."""
Record = tuple[Any, ...]

# SQLSTATE classes 22 (data exception) and 23 (integrity constraint
# violation): what a row's own values cause. Anything else (permissions, a
# missing table, a read-only server) would refuse every row alike, so it is
# not the rows' fault and quarantining them would empty the pipeline into
# this table.
_REFUSALS = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)

_INSERT = """
INSERT INTO readings_quarantine (instance_id, segment, line, device_id, tick_at, raw, reason)
SELECT $1, $2, q.line, q.device_id, q.tick_at, q.raw, q.reason
FROM unnest($3::bigint[], $4::bigint[], $5::timestamptz[], $6::text[], $7::text[])
     AS q (line, device_id, tick_at, raw, reason)
ON CONFLICT (instance_id, segment, line) DO NOTHING"""

_REQUIRED = ("device_id", "tick_at", "received_at")


class Quarantined(NamedTuple):
    """One line for ``readings_quarantine``."""

    line: int
    """1-based line in the segment (or in the batch, until the loader adds
    the lines of the segment before it)."""
    raw: str
    reason: str
    device_id: int | None
    """The line's device id, when it has one that fits a bigint."""
    tick_at: float | None
    """Its ``tick_at``, when it has one within 0001..9999."""


def quarantined(line: int, raw: bytes | str, reason: str,
                record: Sequence[Any] | None = None) -> Quarantined:
    """A :class:`Quarantined` row for ``raw``, with the ids ``record`` has.

    >>> quarantined(3, b'{"device_id": 7, "tick_at": 1e300}', "bad tick",
    ...             (7, 1e300)).tick_at is None
    True
    """
    device_id: int | None = None
    tick_at: float | None = None
    if record is not None and len(record) >= 2:
        ident, tick = record[0], record[1]
        if isinstance(ident, int) and not isinstance(ident, bool) \
                and -(1 << 63) <= ident < (1 << 63):
            device_id = ident
        if isinstance(tick, (int, float)) and not isinstance(tick, bool) \
                and MIN_S <= tick < END_S:
            tick_at = float(tick)
    text = raw if isinstance(raw, str) else raw.decode("utf-8", "backslashreplace")
    return Quarantined(line, _text(text), _text(reason), device_id, tick_at)


def _text(text: str) -> str:
    # PostgreSQL text holds no NUL; a NUL from a damaged file is shown escaped.
    text = text.replace("\x00", "\\x00")
    if len(text) > RAW_MAX_CHARS:
        text = f"{text[:RAW_MAX_CHARS]}... [cut: {len(text)} characters in all]"
    return text


def refusal_reason(exc: BaseException) -> str:
    """``Type: message DETAIL: ...`` of a PostgreSQL refusal, on one line."""
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")


def is_refusal(exc: BaseException) -> bool:
    """PostgreSQL refused the rows for their values (not a duplicate key,
    which the loader's staging path resolves, nor an outage)."""
    return isinstance(exc, _REFUSALS) and not isinstance(exc, asyncpg.UniqueViolationError)


class SortedLines:
    """The lines of some spool members: the readings the encoder takes, and
    the rest as :class:`Quarantined` rows. Lines count from 1 across the
    members."""

    __slots__ = ("data", "days", "lines", "n_lines", "quarantined", "raws", "records")

    def __init__(self) -> None:
        self.records: list[Record] = []
        """``reading[:8]`` of each line taken."""
        self.lines: list[int] = []
        """The line number of each record."""
        self.raws: list[bytes] = []
        """The text of each record's line (for the quarantine, should
        PostgreSQL refuse it)."""
        self.data = b""
        """The COPY BINARY stream of ``records``."""
        self.days: set[int] = set()
        """UTC days (since 1970-01-01) of the records' ``tick_at``."""
        self.quarantined: list[Quarantined] = []
        self.n_lines = 0

    def refused(self, index: int, reason: str) -> Quarantined:
        """The quarantine row of ``records[index]``, refused for ``reason``."""
        return quarantined(self.lines[index], self.raws[index], reason, self.records[index])


def sort_lines(payloads: Iterable[bytes]) -> SortedLines:
    """Split spool members (decompressed NDJSON, in order) line by line.

    The slow path, for members the whole-batch parse or the encoder refused.
    A blank line counts as a line and is neither loaded nor quarantined: it
    holds no reading.
    """
    out = SortedLines()
    candidates: list[Record] = []
    lines: list[int] = []
    raws: list[bytes] = []
    n = 0
    for payload in payloads:
        split = payload.split(b"\n")
        if split and not split[-1]:
            split.pop()  # the newline ending the member ends its last line
        for raw in split:
            n += 1
            if not raw.strip():
                continue
            try:
                record = _record(decode_line(raw))
            except DecodeError as exc:
                out.quarantined.append(quarantined(n, raw, f"not JSON: {exc}"))
                continue
            except _NotAReading as exc:
                out.quarantined.append(quarantined(n, raw, f"not a reading: {exc}"))
                continue
            candidates.append(record)
            lines.append(n)
            raws.append(raw)
    out.n_lines = n
    encoded = encode_valid(candidates)
    for i, reason in encoded.refused:
        out.quarantined.append(quarantined(lines[i], raws[i], reason, candidates[i]))
    out.quarantined.sort()
    out.records = [candidates[i] for i in encoded.taken]
    out.lines = [lines[i] for i in encoded.taken]
    out.raws = [raws[i] for i in encoded.taken]
    out.data = encoded.data
    out.days = {int(r[1] // DAY_S) for r in out.records}
    return out


class _NotAReading(Exception):
    pass


def _record(doc: Any) -> Record:
    if not isinstance(doc, dict):
        raise _NotAReading(f"a JSON {type(doc).__name__}, not an object")
    missing = [name for name in _REQUIRED if name not in doc]
    if missing:
        raise _NotAReading(f"no {', '.join(missing)}")
    get = doc.get
    return (doc["device_id"], doc["tick_at"], get("device_at"), doc["received_at"],
            get("demand_w"), get("delivered_wh"), get("received_wh"), get("price"))


Attempt = Callable[[Sequence[int]], Awaitable[int]]


async def bisect(conn: Conn, items: Sequence[int],
                 attempt: Attempt) -> tuple[int, list[tuple[int, str]]]:
    """Run ``attempt(part)`` over ``items`` in savepoints, halving any part
    PostgreSQL refuses until the refused items stand alone.

    Call it inside a transaction. Returns ``(sum of what the attempts that
    held returned, [(item, reason), ...] of the items refused)``. k refused
    items among n cost about 2·k·log2(n/k) tries and n·log2(k) rows sent
    (measured, a 100k-row chunk on 2 busy shared cores: 1 refused 4-7 s,
    100 refused 11-20 s, 1,000 refused 27-49 s, where a clean load takes
    about 1 s). Halving beats splitting around the row a COPY's error
    names: the rest after that row would go again whole, once per refused
    row (1,000 refused: 356 s). Anything but a refusal (see
    :func:`is_refusal`) propagates and the caller's transaction decides.
    """
    done = 0
    refused: list[tuple[int, str]] = []
    parts: list[Sequence[int]] = [items] if items else []
    while parts:
        part = parts.pop()
        try:
            async with conn.transaction():
                done += await attempt(part)
        except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
            if not is_refusal(exc):
                raise
            if len(part) == 1:
                refused.append((part[0], refusal_reason(exc)))
                continue
            half = len(part) // 2
            parts.append(part[half:])
            parts.append(part[:half])  # popped first: rows go in in order
    return done, refused


async def insert(conn: Conn, instance_id: str, segment: str,
                 rows: Sequence[Quarantined], *, line_base: int = 0,
                 timeout: float | None = None) -> int:
    """Insert ``rows`` (their lines shifted by ``line_base``); return how many
    were new (a line quarantined before is left as it is)."""
    if not rows:
        return 0
    fromts = datetime.fromtimestamp
    status: str = await conn.execute(
        _INSERT, instance_id, segment,
        [line_base + r.line for r in rows],
        [r.device_id for r in rows],
        [None if r.tick_at is None else fromts(r.tick_at, UTC) for r in rows],
        [r.raw for r in rows],
        [r.reason for r in rows],
        timeout=timeout)
    return int(status.rsplit(" ", 1)[1])
