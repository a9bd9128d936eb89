"""The segment format (poller.segment): one name rule for the spool and the
archive, and the NDJSON of each member, encoded and decoded in one place."""

from __future__ import annotations

import gzip
from pathlib import Path

import orjson
import pytest

import poller.segment
from poller.archive.naming import archive_key, is_segment_name, parse_archive_key
from poller.ingest.spool import Spool
from poller.segment import (
    OPEN_SUFFIX,
    DecodeError,
    SegmentName,
    decode_line,
    decode_readings,
    decode_records,
    encode_readings,
    parse_segment_name,
    segment_name,
)
from tests import sources
from tests.rows import FakeClock, make_rows

H0 = 1_763_884_800  # 2025-11-23T08:00:00Z, an hour boundary


def test_docstring_examples() -> None:
    result = sources.testmod(poller.segment)
    assert result.attempted > 0 and result.failed == 0


# -- names ------------------------------------------------------------------

# (name, what it parses to), for names a segment may have: the spool's names
# (open or closed) and what the archive keys by. seq outgrows six digits.
VALID = [
    ("a-b.c-20251123T08-000042.ndjson.gz", SegmentName("a-b.c", H0, 42)),
    ("x-20251123T08-000001.ndjson.gz", SegmentName("x", H0, 1)),
    ("gw_1-20251123T08-1234567.ndjson.gz", SegmentName("gw_1", H0, 1_234_567)),
    ("9-20251123T08-000000.ndjson.gz", SegmentName("9", H0, 0)),
    (f"{'a' * 63}-20251123T08-000003.ndjson.gz", SegmentName("a" * 63, H0, 3)),
]
# Neither a closed nor an open segment. The spool's old parser took the first
# three (an instance its config can never have, which no archive key could
# hold) and crashed on the hour of the fourth and fifth instead of passing
# over the file; the archive's parser refused them all.
INVALID = [
    "x y-20251123T08-000001.ndjson.gz",
    "-20251123T08-000001.ndjson.gz",
    f"{'a' * 64}-20251123T08-000001.ndjson.gz",
    "x-20251399T08-000001.ndjson.gz",
    "x-20251123T24-000001.ndjson.gz",
    "x-20251123T8-000001.ndjson.gz",
    "x-20251123T08-00001.ndjson.gz",
    "x-20251123T08-000001.ndjson",
    "x-20251123T08-000001.ndjson.gz.uploaded",
    "x-20251123T08-000001.ndjson.gz.open.open",
    "seq",
    "x.lock",
    "",
]


@pytest.mark.parametrize(("name", "parsed"), VALID)
def test_segment_names_parse_back(name: str, parsed: SegmentName) -> None:
    assert parse_segment_name(name) == parsed
    assert segment_name(*parsed) == name
    # An open segment is the same segment; only the spool asks for those.
    assert parse_segment_name(name + OPEN_SUFFIX, open_ok=True) == parsed
    with pytest.raises(ValueError, match="not a closed segment name"):
        parse_segment_name(name + OPEN_SUFFIX)
    assert is_segment_name(name) and not is_segment_name(name + OPEN_SUFFIX)


@pytest.mark.parametrize("name", INVALID)
def test_other_names_are_refused_alike(name: str) -> None:
    for open_ok in (False, True):
        with pytest.raises(ValueError, match=r"segment name|bad hour"):
            parse_segment_name(name, open_ok=open_ok)
    with pytest.raises(ValueError):
        archive_key("poller", name)
    assert not is_segment_name(name)


def test_format_pads_seq_and_keys_round_trip() -> None:
    name = segment_name("gw-east-1", H0 - 3600, 7)
    assert name == "gw-east-1-20251123T07-000007.ndjson.gz"
    key = archive_key("poller/", name)
    assert key == "poller/readings/date=2025-11-23/hour=07/gw-east-1-000007.ndjson.gz"
    assert parse_archive_key(key) == parse_segment_name(name) == ("gw-east-1", H0 - 3600, 7)


def test_spool_refuses_an_instance_its_names_could_not_carry(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="instance_id"):
        Spool(tmp_path, "x y", FakeClock(H0))
    with pytest.raises(ValueError, match="instance_id"):
        Spool(tmp_path, "", FakeClock(H0))


async def test_spool_passes_over_files_that_only_look_like_segments(tmp_path: Path) -> None:
    body = gzip.compress(encode_readings(make_rows(2, H0 + 1)), 3, mtime=0)
    good = "inst-20251123T08-000004.ndjson.gz"
    for name in (good, "inst-20251399T08-000009.ndjson.gz", "inst-20251123T08-01.ndjson.gz",
                 "other-20251123T08-000010.ndjson.gz"):
        (tmp_path / name).write_bytes(body)
    spool = Spool(tmp_path, "inst", FakeClock(H0 + 7200))
    await spool.open()
    try:
        assert [(s.name, s.hour, s.seq) for s in spool.segments()] == [(good, H0, 4)]
        # The next number follows this instance's own segments only.
        (position,) = await spool.append(make_rows(1, H0 + 7100))
        assert parse_segment_name(position.segment, open_ok=True).seq == 5
    finally:
        await spool.close()


# -- members ----------------------------------------------------------------


def test_encode_decode_round_trip_and_json_form() -> None:
    rows = make_rows(5, H0 + 1.5)
    data = encode_readings(rows)
    lines = data.splitlines()
    assert len(lines) == 5 and data.endswith(b"\n")
    assert orjson.loads(lines[0]) == {
        "device_id": 1, "tick_at": H0 + 1.5, "device_at": H0 + 1.0, "received_at": H0 + 1.75,
        "demand_w": -12.5, "delivered_wh": 1000.0, "received_wh": None, "price": 0.11,
        "cloud_id": "dev-1"}
    assert [decode_line(line) for line in lines] == [orjson.loads(line) for line in lines]
    assert decode_readings(data) == rows
    assert decode_readings(b"") == [] and decode_records(b"") == ([], set())
    assert encode_readings([]) == b""


def test_encoding_survives_ids_that_look_like_separators() -> None:
    rows = make_rows(4, H0 + 1.5)
    rows[1] = rows[1]._replace(cloud_id='a},{"b":1},{')
    rows[2] = rows[2]._replace(cloud_id="line\nbreak")
    data = encode_readings(rows)
    assert len(data.splitlines()) == 4
    assert decode_readings(data) == rows


def test_records_are_the_readings_without_cloud_id_and_their_days() -> None:
    # Three UTC days, out of order: every day is reported once.
    rows = (make_rows(2, H0 + 1) + make_rows(2, H0 - 86_400 + 5, first_id=10)
            + make_rows(1, H0 + 86_400 * 2, first_id=20) + make_rows(1, H0 + 2, first_id=30))
    records, days = decode_records(encode_readings(rows))
    assert records == [tuple(r[:8]) for r in rows]
    assert days == {H0 // 86_400 - 1, H0 // 86_400, H0 // 86_400 + 2}


@pytest.mark.parametrize(("member", "error"), [
    (b'{"device_id": 1}\n\n{"device_id": 2}\n', DecodeError),  # a blank line inside
    (b'{"device_id": 1,\n', DecodeError),  # a torn line
    (b'{"device_id": 1, "tick_at": 5}\n', KeyError),  # not a whole reading
    (b"[1, 2]\n", TypeError),  # JSON, not an object
])
def test_a_member_that_is_not_readings_is_refused_whole(member: bytes,
                                                        error: type[Exception]) -> None:
    # The loader then sorts the member out line by line (the quarantine).
    with pytest.raises(error):
        decode_records(member)
    with pytest.raises((DecodeError, KeyError, TypeError)):
        decode_readings(member)
