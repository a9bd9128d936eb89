"""Our COPY BINARY encoder against asyncpg's own, in a real PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poller.ingest.pgcopy import HEADER, TRAILER, as_source, encode_rows, pg_micros
from poller.reading import READING_COLUMNS, Reading
from tests.rows import to_records
from tests.stackfix import RunningStack, fresh_database_url

# 1990 .. 2100, with sub-microsecond fractions and exact halves in them.
unix_s = st.floats(min_value=631_152_000.0, max_value=4_102_444_800.0,
                   allow_nan=False, allow_infinity=False)
half_us = st.integers(min_value=631_152_000_000_000, max_value=4_102_444_800_000_000).map(
    lambda us: (us + 0.5) / 1e6)
value = st.none() | st.floats(allow_nan=False, allow_infinity=False, width=64)


def _pg_epoch_us(dt: datetime) -> int:
    delta = dt - datetime(2000, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


@given(st.one_of(unix_s, half_us))
def test_microseconds_round_as_datetime_does(t: float) -> None:
    assert pg_micros(t) == _pg_epoch_us(datetime.fromtimestamp(t, UTC))


def test_empty_batch_is_header_and_trailer() -> None:
    assert encode_rows([]) == HEADER + TRAILER


readings = st.builds(
    Reading,
    device_id=st.integers(min_value=1, max_value=2**63 - 1),
    tick_at=unix_s,
    device_at=st.none() | unix_s,
    received_at=unix_s,
    demand_w=value,
    delivered_wh=value,
    received_wh=value,
    price=value,
    cloud_id=st.just("c"),
)

_TABLE = """CREATE TABLE IF NOT EXISTS {name} (
    device_id bigint, tick_at timestamptz, device_at timestamptz, received_at timestamptz,
    demand_w double precision, delivered_wh double precision,
    received_wh double precision, price double precision)"""


@pytest.fixture(scope="module")
def copy_db(stack: RunningStack) -> str:
    return fresh_database_url(stack.info)


async def _both_ways(url: str, rows: list[Reading]) -> tuple[list[tuple[object, ...]], ...]:
    conn = await asyncpg.connect(url)
    try:
        for name in ("ours", "theirs"):
            await conn.execute(_TABLE.format(name=name))
            await conn.execute(f"TRUNCATE {name}")
        status = await conn.copy_to_table("ours", source=as_source(encode_rows(rows)),
                                          format="binary", columns=READING_COLUMNS)
        assert status == f"COPY {len(rows)}"
        await conn.copy_records_to_table("theirs", records=to_records(rows),
                                         columns=READING_COLUMNS)
        ours = [tuple(r) for r in await conn.fetch("SELECT * FROM ours ORDER BY 1, 2, 4")]
        theirs = [tuple(r) for r in await conn.fetch("SELECT * FROM theirs ORDER BY 1, 2, 4")]
        return ours, theirs
    finally:
        await conn.close()


@settings(max_examples=25, deadline=None)
@given(st.lists(readings, max_size=40))
def test_rows_load_exactly_as_asyncpg_encodes_them(copy_db: str, rows: list[Reading]) -> None:
    ours, theirs = asyncio.run(_both_ways(copy_db, rows))
    assert ours == theirs
    assert len(ours) == len(rows)


def test_every_null_pattern_round_trips(copy_db: str) -> None:
    rows = []
    for mask in range(32):
        fields = [None if mask & (1 << i) else 100.25 * (i + 1) for i in range(5)]
        device_at = None if fields[0] is None else 1_800_000_000.123456
        rows.append(Reading(mask + 1, 1_800_000_000.5, device_at, 1_800_000_001.75,
                            *fields[1:], "c"))
    ours, theirs = asyncio.run(_both_ways(copy_db, rows))
    assert ours == theirs
    assert None not in ours[0]
    assert ours[31][2] is None and ours[31][4:] == (None,) * 4
