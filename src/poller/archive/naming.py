"""The archive keys closed segment files map to.

The segment file name (:mod:`poller.segment` owns its format) is
``{instance}-{YYYYMMDDTHH}-{seq:06d}.ndjson.gz``. Its archive key is
Hive-style and depends on the name only, so a retried upload overwrites the
same object::

    >>> archive_key("poller", "gw-1-20240301T07-000003.ndjson.gz")
    'poller/readings/date=2024-03-01/hour=07/gw-1-000003.ndjson.gz'
"""

from __future__ import annotations

import re
import time

from poller.segment import INSTANCE_PATTERN, SegmentName, parse_hour, parse_segment_name
from poller.segment import SUFFIX as SEGMENT_SUFFIX

__all__ = ["SEGMENT_SUFFIX", "SegmentName", "archive_key", "date_prefix", "is_segment_name",
           "parse_archive_key", "parse_segment_name", "readings_prefix"]

_KEY_RE = re.compile(
    r"(?:^|/)readings/date=(?P<date>\d{4}-\d{2}-\d{2})/hour=(?P<hour>\d{2})/"
    rf"(?P<instance>{INSTANCE_PATTERN})-(?P<seq>\d{{6,}})\.ndjson\.gz$")


def is_segment_name(name: str) -> bool:
    """True for a closed segment file name (not ``.open``, not a marker)."""
    try:
        parse_segment_name(name)
    except ValueError:
        return False
    return True


def readings_prefix(prefix: str) -> str:
    """The key prefix under which all archived readings live (ends in ``/``)."""
    base = prefix.strip("/")
    return f"{base}/readings/" if base else "readings/"


def date_prefix(prefix: str, day_epoch: int) -> str:
    """The key prefix of one UTC day's partition (ends in ``/``)."""
    return f"{readings_prefix(prefix)}date={time.strftime('%Y-%m-%d', time.gmtime(day_epoch))}/"


def archive_key(prefix: str, name: str) -> str:
    """The object key of a closed segment file name."""
    seg = parse_segment_name(name)
    hour = time.gmtime(seg.hour_epoch)
    return (f"{date_prefix(prefix, seg.hour_epoch)}hour={hour.tm_hour:02d}/"
            f"{seg.instance}-{seg.seq:06d}{SEGMENT_SUFFIX}")


def parse_archive_key(key: str) -> SegmentName:
    """The segment an archive key holds; ``ValueError`` for foreign keys."""
    m = _KEY_RE.search(key)
    if m is None:
        raise ValueError(f"not an archive segment key: {key!r}")
    hour = parse_hour(f"{m.group('date')}T{m.group('hour')}", "%Y-%m-%dT%H", key)
    return SegmentName(m.group("instance"), hour, int(m.group("seq")))

