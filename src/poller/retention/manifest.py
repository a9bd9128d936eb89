"""Is a day in the archive? The manifest (what Postgres loaded) against S3's listing.

``archive_manifest`` (schema/006) lists every segment whose rows went into
``readings``, per instance, with the bytes loaded; S3 lists the objects of a
day under ``PREFIX/readings/date=YYYY-MM-DD/``. An hour is *verified* when
each of its segments in the manifest is an object of exactly that size:
count and bytes agree. A segment missing from S3 (not uploaded yet, or shed
at a full spool), or an object of another size (truncated, overwritten),
leaves the hour unverified and says which::

    >>> from datetime import date
    >>> m = [Expected("a", "a-20240301T07-000001.ndjson.gz", 7, 100, 10),
    ...      Expected("b", "b-20240301T07-000001.ndjson.gz", 7, 50, 5)]
    >>> day = compare(date(2024, 3, 1), m, {"a-20240301T07-000001.ndjson.gz": 100})
    >>> day.verified, day.hours[0].missing
    (False, ('b-20240301T07-000001.ndjson.gz',))
    >>> compare(date(2024, 3, 1), m[:1], {"a-20240301T07-000001.ndjson.gz": 90}).problems()
    ['hour 07: a-20240301T07-000001.ndjson.gz is 90 bytes in S3, 100 loaded']

Objects S3 has beyond the manifest (segments never loaded here) count in
the listing's bytes and block nothing: Postgres holds none of their rows.
"""

from __future__ import annotations

import calendar
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Protocol

from poller.archive.naming import date_prefix, parse_archive_key
from poller.db import Conn
from poller.segment import parse_segment_name, segment_name

HOUR_S = 3600
DAY_S = 86400


class ArchiveLister(Protocol):
    """What the check needs of the archive (``ArchiveStore`` is one)."""

    async def list_keys(self, prefix: str) -> list[tuple[str, int]]: ...


@dataclass(frozen=True, slots=True)
class Expected:
    """One manifest row: a segment some of whose rows Postgres loaded."""

    instance: str
    segment: str
    hour: int
    """0-23, UTC."""
    bytes: int
    rows: int
    """Lines loaded (readings, and any quarantined)."""


@dataclass(frozen=True, slots=True)
class HourArchive:
    hour: int
    expected_segments: int
    expected_bytes: int
    expected_rows: int
    listed_segments: int
    """Objects S3 lists for the hour, of any instance."""
    listed_bytes: int
    missing: tuple[str, ...] = ()
    """Manifest segments S3 does not have."""
    mismatched: tuple[tuple[str, int, int], ...] = ()
    """``(segment, bytes in S3, bytes loaded)`` of objects of another size."""
    unloaded: tuple[str, ...] = ()
    """Objects S3 has that no manifest row names: not loaded (yet)."""

    @property
    def verified(self) -> bool:
        """S3 has every segment Postgres loaded, at its size."""
        return not self.missing and not self.mismatched


@dataclass(frozen=True, slots=True)
class DayArchive:
    day: date
    hours: tuple[HourArchive, ...]
    """Hours the manifest or the listing names, in order."""
    manifest: frozenset[tuple[str, str, int]] = field(default_factory=frozenset)
    """``(instance, segment, bytes)`` as read: a later read that differs
    means a loader wrote to the day meanwhile."""

    @property
    def verified(self) -> bool:
        return all(h.verified for h in self.hours)

    @property
    def complete(self) -> bool:
        """Verified, and every object of the day loaded: the two sides agree
        in count and bytes, hour by hour."""
        return all(h.verified and not h.unloaded for h in self.hours)

    @property
    def expected_hours(self) -> list[HourArchive]:
        return [h for h in self.hours if h.expected_segments]

    @property
    def segments(self) -> int:
        return sum(h.expected_segments for h in self.hours)

    @property
    def listed_bytes(self) -> int:
        return sum(h.listed_bytes for h in self.hours)

    def rows_by_hour(self) -> dict[int, int]:
        return {h.hour: h.expected_rows for h in self.hours}

    def reasons(self) -> set[str]:
        """Labels for /metrics: ``segment_missing``, ``size_mismatch``,
        ``not_loaded``."""
        found: set[str] = set()
        for h in self.hours:
            if h.missing:
                found.add("segment_missing")
            if h.mismatched:
                found.add("size_mismatch")
            if h.unloaded:
                found.add("not_loaded")
        return found

    def problems(self) -> list[str]:
        """Each unverified segment, in words (for logs and the CLI)."""
        lines: list[str] = []
        for h in self.hours:
            lines.extend(f"hour {h.hour:02d}: {name} is not in S3" for name in h.missing)
            lines.extend(f"hour {h.hour:02d}: {name} is {got} bytes in S3, {want} loaded"
                         for name, got, want in h.mismatched)
            lines.extend(f"hour {h.hour:02d}: {name} is in S3 but not loaded into PostgreSQL"
                         for name in h.unloaded)
        return lines


def day_bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return start, start + timedelta(days=1)


def day_epoch(day: date) -> int:
    return calendar.timegm(day.timetuple())


async def read_manifest(conn: Conn, day: date) -> list[Expected]:
    """The manifest rows of ``day`` (every instance)."""
    start, end = day_bounds(day)
    rows = await conn.fetch(
        "SELECT instance_id, segment, extract(hour FROM hour_at AT TIME ZONE 'UTC')::int AS h, "
        "bytes, rows FROM archive_manifest WHERE hour_at >= $1 AND hour_at < $2 "
        "ORDER BY hour_at, instance_id, segment", start, end)
    return [Expected(r["instance_id"], r["segment"], r["h"], r["bytes"], r["rows"])
            for r in rows]


async def list_day(store: ArchiveLister, prefix: str, day: date) -> dict[str, int]:
    """``segment file name -> object size`` of the day's archive objects.

    Raises :class:`~poller.archive.s3.ArchiveError` when S3 cannot list."""
    found: dict[str, int] = {}
    for key, size in await store.list_keys(date_prefix(prefix, day_epoch(day))):
        try:
            seg = parse_archive_key(key)
        except ValueError:
            continue  # not a segment (a manual upload, a lifecycle marker)
        found[segment_name(seg.instance, seg.hour_epoch, seg.seq)] = size
    return found


def compare(day: date, manifest: Iterable[Expected], listing: Mapping[str, int]) -> DayArchive:
    """The day's archive, hour by hour: see the module docstring."""
    by_hour: dict[int, list[Expected]] = {}
    for e in manifest:
        by_hour.setdefault(e.hour, []).append(e)
    listed_by_hour: dict[int, list[tuple[str, int]]] = {}
    base = day_epoch(day)
    for name, size in listing.items():
        hour = _hour_of(name, base)
        if hour is not None:
            listed_by_hour.setdefault(hour, []).append((name, size))
    hours: list[HourArchive] = []
    seen: set[tuple[str, str, int]] = set()
    for hour in sorted(by_hour.keys() | listed_by_hour.keys()):
        expected = by_hour.get(hour, [])
        missing: list[str] = []
        mismatched: list[tuple[str, int, int]] = []
        for e in expected:
            seen.add((e.instance, e.segment, e.bytes))
            stored = listing.get(e.segment)
            if stored is None:
                missing.append(e.segment)
            elif stored != e.bytes:
                mismatched.append((e.segment, stored, e.bytes))
        listed = listed_by_hour.get(hour, [])
        names = {e.segment for e in expected}
        unloaded = tuple(sorted(name for name, _ in listed if name not in names))
        hours.append(HourArchive(
            hour, len(expected), sum(e.bytes for e in expected), sum(e.rows for e in expected),
            len(listed), sum(size for _, size in listed), tuple(missing), tuple(mismatched),
            unloaded))
    return DayArchive(day, tuple(hours), frozenset(seen))


def _hour_of(name: str, day_start: int) -> int | None:
    try:
        hour_epoch = parse_segment_name(name).hour_epoch
    except ValueError:
        return None
    offset = hour_epoch - day_start
    return offset // HOUR_S if 0 <= offset < DAY_S else None


async def check_day(conn: Conn, store: ArchiveLister, prefix: str, day: date) -> DayArchive:
    """List S3, read the manifest and compare. The listing comes first: a
    segment loaded in between is then in the manifest and not in the
    listing, so it shows as missing, never as verified."""
    listing = await list_day(store, prefix, day)
    return compare(day, await read_manifest(conn, day), listing)


BEHIND_AFTER_S = 900.0
"""An hour whose segments S3 still lacks this long after the hour ended is
*behind*: segments close 30 s after the hour and upload within seconds, so
a quarter of an hour means uploads are failing or the loader lags."""


def day_status(archive: DayArchive, now: float) -> dict[str, object]:
    """One day of ``GET /api/archive``: hours the manifest expects in S3,
    those verified, the bytes S3 holds, the hours not verified and whether
    any of them is overdue.

    >>> from datetime import date
    >>> m = [Expected("a", "a-20240301T07-000001.ndjson.gz", 7, 100, 10)]
    >>> day_status(compare(date(2024, 3, 1), m, {}), 1_709_280_000.0 + 3600)
    {'day': '2024-03-01', 'hours_expected': 1, 'hours_uploaded': 0, 'bytes': 0, \
'missing': [7], 'behind': True}
    """
    base = day_epoch(archive.day)
    expected = archive.expected_hours
    missing = [h.hour for h in expected if not h.verified]
    behind = any(now - (base + (hour + 1) * HOUR_S) > BEHIND_AFTER_S for hour in missing)
    return {"day": archive.day.isoformat(), "hours_expected": len(expected),
            "hours_uploaded": len(expected) - len(missing), "bytes": archive.listed_bytes,
            "missing": missing, "behind": behind}
