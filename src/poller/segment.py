"""The spool segment format: file names, and the NDJSON inside each member.

A segment file is ``{instance}-{YYYYMMDDTHH}-{seq:06d}.ndjson.gz`` (the UTC
hour of its readings' ``tick_at``), with the suffix ``.open`` while the spool
writes it. ``instance`` follows the ``instance_id`` rule of the config (1-63
of ``A-Z a-z 0-9 _ . -``, not starting with a punctuation mark), which is
also what an archive key can hold. ``seq`` has six digits or more.

    >>> name = segment_name("gw-1", 1709276400, 3)
    >>> name
    'gw-1-20240301T07-000003.ndjson.gz'
    >>> parse_segment_name(name)
    SegmentName(instance='gw-1', hour_epoch=1709276400, seq=3)
    >>> parse_segment_name(name + OPEN_SUFFIX, open_ok=True).seq
    3
    >>> parse_segment_name(name + OPEN_SUFFIX)
    Traceback (most recent call last):
    ...
    ValueError: not a closed segment name: 'gw-1-20240301T07-000003.ndjson.gz.open'
    >>> parse_segment_name("gw-1-20241301T07-000003.ndjson.gz")
    Traceback (most recent call last):
    ...
    ValueError: bad hour in 'gw-1-20241301T07-000003.ndjson.gz'

Each gzip member holds NDJSON: one object per reading with the
:class:`~poller.reading.Reading` field names, each line ending in a newline.

    >>> from poller.reading import Reading
    >>> r = Reading(7, 1709276400.0, None, 1709276401.5, 512.0, None, None, None, "c1")
    >>> data = encode_readings([r, r._replace(device_id=8)])
    >>> data.splitlines()[1]
    b'{"device_id":8,"tick_at":1709276400.0,"device_at":null,"received_at":1709276401.5,\
"demand_w":512.0,"delivered_wh":null,"received_wh":null,"price":null,"cloud_id":"c1"}'
    >>> decode_readings(data) == [r, r._replace(device_id=8)]
    True
    >>> decode_records(data)
    ([(7, 1709276400.0, None, 1709276401.5, 512.0, None, None, None), \
(8, 1709276400.0, None, 1709276401.5, 512.0, None, None, None)], {19783})
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Sequence
from operator import itemgetter
from typing import Any, NamedTuple

import orjson

from poller.reading import PlainReading, Reading

SUFFIX = ".ndjson.gz"
OPEN_SUFFIX = ".open"
DAY_S = 86400
INSTANCE_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}"
"""What an instance id may be (the config's ``instance_id`` rule)."""
_INSTANCE_RE = re.compile(f"^{INSTANCE_PATTERN}$")
_NAME_RE = re.compile(
    rf"^(?P<instance>{INSTANCE_PATTERN})-(?P<hour>\d{{8}}T\d{{2}})-(?P<seq>\d{{6,}})"
    + re.escape(SUFFIX) + "(?P<open>" + re.escape(OPEN_SUFFIX) + ")?$")
_from_dict = itemgetter(*Reading._fields)

Record = tuple[Any, ...]
"""``reading[:8]``: a ``readings`` row without the cloud id."""


class SegmentName(NamedTuple):
    instance: str
    hour_epoch: int
    """Start of the segment's UTC hour, Unix seconds."""
    seq: int


def is_instance_id(instance: str) -> bool:
    """True if ``instance`` can name segments (and archive keys)."""
    return _INSTANCE_RE.match(instance) is not None


def hour_label(hour_epoch: int) -> str:
    """``YYYYMMDDTHH`` of a UTC hour."""
    return time.strftime("%Y%m%dT%H", time.gmtime(hour_epoch))


def segment_name(instance: str, hour_epoch: int, seq: int) -> str:
    """The closed file name of segment ``seq`` of an hour."""
    return f"{instance}-{hour_label(hour_epoch)}-{seq:06d}{SUFFIX}"


def parse_segment_name(name: str, *, open_ok: bool = False) -> SegmentName:
    """Split a segment file name; ``ValueError`` for anything else.

    A name ending in ``.open`` (a segment still written) is accepted only
    with ``open_ok``; the result is the same as for the closed name.
    """
    m = _NAME_RE.match(name)
    if m is None or (m["open"] is not None and not open_ok):
        raise ValueError(f"not a {'' if open_ok else 'closed '}segment name: {name!r}")
    return SegmentName(m["instance"], parse_hour(m["hour"], "%Y%m%dT%H", name), int(m["seq"]))


def parse_hour(text: str, fmt: str, whole: str) -> int:
    """Unix seconds of the UTC hour ``text`` in ``fmt``; ``ValueError``
    naming ``whole`` when it is no such hour."""
    try:
        parsed = time.strptime(text, fmt)
    except ValueError:
        raise ValueError(f"bad hour in {whole!r}") from None
    return calendar.timegm(parsed)


def encode_readings(rows: Sequence[PlainReading]) -> bytes:
    """NDJSON, one object per reading with the Reading field names."""
    if not rows:
        return b""
    # One dumps() over the batch costs a third of one per row: encode the
    # batch as an array and turn the separators between its flat objects
    # into newlines. A string holding "},{" would break that; registered ids
    # cannot, but check and fall back anyway.
    array = orjson.dumps([
        {"device_id": a, "tick_at": b, "device_at": c, "received_at": d, "demand_w": e,
         "delivered_wh": f, "received_wh": g, "price": h, "cloud_id": i}
        for a, b, c, d, e, f, g, h, i in rows])
    body = array[1:-1]
    if body.count(b"},{") == len(rows) - 1:
        return body.replace(b"},{", b"}\n{") + b"\n"
    dumps = orjson.dumps
    newline = orjson.OPT_APPEND_NEWLINE
    return b"".join([dumps(dict(zip(Reading._fields, r, strict=True)), option=newline)
                     for r in rows])


decode_line = orjson.loads
"""The JSON value of one line of a member: the slow path, line by line, for
members :func:`decode_objects` refused and for archived segments read back.
Raises :data:`DecodeError`. (The function itself, not a wrapper: it runs
once per line.)"""
DecodeError = orjson.JSONDecodeError
"""What the decoders raise for text that is not JSON (a ``ValueError``)."""


def decode_objects(ndjson: bytes) -> list[Any]:
    """The JSON values of a whole member, one per line; ``ValueError``
    (``orjson.JSONDecodeError``) if any line is not JSON or is blank."""
    if not ndjson:
        return []
    # orjson escapes newlines inside strings, so each raw newline ends one
    # value: one loads() over a JSON array beats one per line.
    objects: list[Any] = orjson.loads(b"[" + ndjson.rstrip(b"\n").replace(b"\n", b",") + b"]")
    return objects


def decode_readings(ndjson: bytes) -> list[Reading]:
    """The readings of a member :func:`encode_readings` wrote."""
    new = tuple.__new__
    getter = _from_dict
    return [new(Reading, getter(obj)) for obj in decode_objects(ndjson)]


def decode_records(ndjson: bytes) -> tuple[list[Record], set[int]]:
    """``reading[:8]`` tuples and UTC days of one member, straight from its
    NDJSON, skipping Reading objects (catch-up's main cost after COPY).
    ``ValueError``, ``KeyError`` or ``TypeError`` if a line is not a reading."""
    records: list[Record] = []
    append = records.append
    days: set[int] = set()
    day = -1
    for o in decode_objects(ndjson):
        tick = o["tick_at"]
        append((o["device_id"], tick, o["device_at"], o["received_at"], o["demand_w"],
                o["delivered_wh"], o["received_wh"], o["price"]))
        d = int(tick // DAY_S)
        if d != day:
            days.add(d)
            day = d
    return records, days
