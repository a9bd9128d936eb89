"""PostgreSQL binary COPY of ``readings`` rows, encoded by us.

Handing asyncpg tuples of aware datetimes cost the loader about 4 µs a row
in the profile of a 10k-device bench (three ``datetime`` objects made per
row, then asyncpg's timestamptz encoder subtracting an epoch with timedelta
arithmetic for each). Readings carry Unix seconds as floats, so we write the
wire format directly: one ``struct`` call per row for the two shapes that
make up nearly every batch (demand only; demand with meter totals), a field
at a time for any other.

The format (PostgreSQL docs, "COPY ... BINARY"): an 11-byte signature, two
int32 (flags, header extension length), then per row an int16 field count
and per field an int32 length (-1 for NULL) and the value in network order;
an int16 -1 ends the stream. ``timestamptz`` is int64 microseconds since
2000-01-01 UTC, ``double precision`` an IEEE double, ``bigint`` an int64.

Timestamps are rounded to the microsecond exactly as
``datetime.fromtimestamp`` rounds them (half to even on the fraction), so a
row loaded from this encoding and one loaded from a datetime are equal.

What the encoder takes is narrower than what the wire format can carry:
timestamps within 0001-01-01 .. 9999-12-31 UTC (what a ``datetime`` holds,
so every row loaded can be read back through asyncpg; PostgreSQL itself
would take up to year 294276 and the int64 up to 292277) and values that are
finite (the spool writes NaN and infinities as null, so loading the same
member from memory or from the spool gives the same row). :func:`encode_rows`
raises on the first row outside that; :func:`row_problem` says why a row is
outside it, and :func:`encode_valid` leaves such rows out. The check costs a
few comparisons a row; the reasons are worked out only for a batch that
failed.
"""

from __future__ import annotations

import math
import struct
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, NamedTuple

HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
TRAILER = struct.pack(">h", -1)
N_FIELDS = 8
"""device_id, tick_at, device_at, received_at, demand_w, delivered_wh,
received_wh, price: ``READING_COLUMNS``."""

_PG_EPOCH_S = 946_684_800  # 2000-01-01T00:00:00Z in Unix seconds
MIN_S = -62_135_596_800.0
"""0001-01-01T00:00:00Z in Unix seconds: the first instant encoded."""
END_S = 253_402_300_799.0
"""9999-12-31T23:59:59Z in Unix seconds: the first instant refused (a second
short of year 10000, so no rounding to the microsecond can reach it)."""
MIN_DAY = -719_162
"""0001-01-01 in days since 1970-01-01: the first day a ``tick_at`` may fall on."""
MAX_DAY = 2_932_896
"""9999-12-31 in days since 1970-01-01: the last."""
ENCODE_ERRORS: tuple[type[Exception], ...] = (struct.error, ValueError, OverflowError,
                                              TypeError)
"""What :func:`encode_rows` raises for a row it does not take."""
_VALUE_FIELDS = ("demand_w", "delivered_wh", "received_wh", "price")
_INT64_MIN = -(1 << 63)
_INT64_END = 1 << 63
_NULL = struct.pack(">i", -1)

# Field-count, then (length, value) pairs. -1 lengths are NULLs.
_DEMAND_ONLY = struct.Struct(">h iq iq iq iq id iii").pack
_WITH_TOTALS = struct.Struct(">h iq iq iq iq id id id i").pack
_ROW_START = struct.Struct(">h iq iq").pack
_TS = struct.Struct(">iq").pack
_F8 = struct.Struct(">id").pack

_modf = math.modf


def pg_micros(unix_s: float) -> int:
    """Microseconds since 2000-01-01 UTC, rounded as ``datetime`` rounds."""
    frac, whole = _modf(unix_s)
    return (int(whole) - _PG_EPOCH_S) * 1_000_000 + round(frac * 1e6)


def encode_rows(rows: Iterable[Sequence[Any]]) -> bytes:
    """The COPY BINARY stream for ``rows`` (readings or their first 8 fields).

    Raises one of :data:`ENCODE_ERRORS` if a row is not one the encoder
    takes (see :func:`row_problem`); :func:`encode_valid` sorts such a batch.
    """
    modf = _modf
    epoch = _PG_EPOCH_S
    # Bounds on the float seconds, not on the microseconds: float comparisons
    # are the cheap ones, and a NaN or infinity fails them too.
    lo = MIN_S
    hi = END_S
    # Sum of value * 0.0: stays 0.0 unless a value is NaN or infinite, so one
    # test after the loop covers them all.
    nonfinite = 0.0
    out: list[bytes] = [HEADER]
    append = out.append
    for r in rows:
        device_id, tick, device_at, received, demand, delivered, received_wh, price = r[:8]
        if not (lo <= tick < hi and lo <= received < hi):
            raise ValueError("a tick_at or received_at is outside 0001-01-01..9999-12-31")
        frac, whole = modf(tick)
        tick_us = (int(whole) - epoch) * 1_000_000 + round(frac * 1e6)
        frac, whole = modf(received)
        received_us = (int(whole) - epoch) * 1_000_000 + round(frac * 1e6)
        if device_at is not None and demand is not None and price is None:
            if not lo <= device_at < hi:
                raise ValueError("a device_at is outside 0001-01-01..9999-12-31")
            frac, whole = modf(device_at)
            device_us = (int(whole) - epoch) * 1_000_000 + round(frac * 1e6)
            if delivered is None and received_wh is None:
                nonfinite += demand * 0.0
                append(_DEMAND_ONLY(N_FIELDS, 8, device_id, 8, tick_us, 8, device_us,
                                    8, received_us, 8, demand, -1, -1, -1))
                continue
            if delivered is not None and received_wh is not None:
                nonfinite += demand * 0.0 + delivered * 0.0 + received_wh * 0.0
                append(_WITH_TOTALS(N_FIELDS, 8, device_id, 8, tick_us, 8, device_us,
                                    8, received_us, 8, demand, 8, delivered, 8, received_wh,
                                    -1))
                continue
        append(_ROW_START(N_FIELDS, 8, device_id, 8, tick_us))
        if device_at is None:
            append(_NULL)
        else:
            if not lo <= device_at < hi:
                raise ValueError("a device_at is outside 0001-01-01..9999-12-31")
            append(_TS(8, pg_micros(device_at)))
        append(_TS(8, received_us))
        for value in (demand, delivered, received_wh, price):
            if value is None:
                append(_NULL)
            else:
                nonfinite += value * 0.0
                append(_F8(8, value))
    if nonfinite != 0.0:
        raise ValueError("a value is NaN or infinite")
    append(TRAILER)
    return b"".join(out)


def row_problem(row: Sequence[Any]) -> str | None:
    """Why :func:`encode_rows` would refuse ``row``, or None if it takes it.

    >>> row_problem((1, 1.7e9, 1.7e15, 1.7e9, 5.0, None, None, None))
    'device_at 1700000000000000.0 is outside 0001-01-01..9999-12-31 UTC'
    >>> row_problem((1, 1.7e9, None, 1.7e9, 5.0, None, None, None)) is None
    True
    """
    if len(row) < N_FIELDS:
        return f"{len(row)} fields, not {N_FIELDS}"
    device_id = row[0]
    if not isinstance(device_id, int):
        return f"device_id {device_id!r} is not an integer"
    if not _INT64_MIN <= device_id < _INT64_END:
        return f"device_id {device_id} is outside bigint"
    for name, at in (("tick_at", row[1]), ("device_at", row[2]), ("received_at", row[3])):
        if at is None and name == "device_at":
            continue
        problem = _timestamp_problem(name, at)
        if problem is not None:
            return problem
    for name, value in zip(_VALUE_FIELDS, row[4:8], strict=True):
        if value is None:
            continue
        if not isinstance(value, (int, float)):
            return f"{name} {value!r} is not a number"
        try:
            as_float = float(value)
        except OverflowError:
            return f"{name} {value} does not fit a double"
        if not math.isfinite(as_float):
            return f"{name} is {as_float}, not a finite number"
    return None


def _timestamp_problem(name: str, at: Any) -> str | None:
    if at is None:
        return f"{name} is null"
    if not isinstance(at, (int, float)):
        return f"{name} {at!r} is not a number of seconds"
    if not MIN_S <= at < END_S:
        return f"{name} {at!r} is outside 0001-01-01..9999-12-31 UTC"
    return None


class Encoded(NamedTuple):
    """A batch encoded without the rows the encoder refuses."""

    data: bytes
    """The COPY BINARY stream of the rows taken."""
    taken: list[int]
    """Indices (into the batch) of the rows in ``data``, ascending."""
    refused: list[tuple[int, str]]
    """``(index, reason)`` of each row left out."""


def encode_valid(rows: Sequence[Sequence[Any]]) -> Encoded:
    """Encode the rows :func:`encode_rows` takes; name the others and why.

    The slow path, for a batch :func:`encode_rows` refused: every row is
    checked on its own.
    """
    taken: list[int] = []
    refused: list[tuple[int, str]] = []
    for i, row in enumerate(rows):
        try:
            problem = row_problem(row)
        except TypeError as exc:  # not a sequence at all
            problem = f"{type(exc).__name__}: {exc}"
        if problem is None:
            taken.append(i)
        else:
            refused.append((i, problem))
    try:
        return Encoded(encode_rows([rows[i] for i in taken]), taken, refused)
    except ENCODE_ERRORS:
        pass
    # row_problem missed something the encoder refuses: a row at a time, so
    # one such row still cannot hold up the others.
    parts: list[bytes] = [HEADER]
    kept: list[int] = []
    for i in taken:
        try:
            parts.append(encode_rows((rows[i],))[len(HEADER):-len(TRAILER)])
        except ENCODE_ERRORS as exc:
            refused.append((i, f"{type(exc).__name__}: {exc}"))
        else:
            kept.append(i)
    parts.append(TRAILER)
    refused.sort()
    return Encoded(b"".join(parts), kept, refused)


async def as_source(data: bytes) -> AsyncIterator[bytes]:
    """``data`` as the async iterable ``copy_to_table(source=...)`` reads."""
    yield data
