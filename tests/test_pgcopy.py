"""Our COPY BINARY encoder against asyncpg's own, in a real PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poller.ingest.pgcopy import (
    ENCODE_ERRORS,
    END_S,
    HEADER,
    MIN_S,
    TRAILER,
    as_source,
    encode_rows,
    encode_valid,
    pg_micros,
    row_problem,
)
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
        demand, delivered, received, price = fields[1:]
        rows.append(Reading(mask + 1, 1_800_000_000.5, device_at, 1_800_000_001.75,
                            demand, delivered, received, price, "c"))
    ours, theirs = asyncio.run(_both_ways(copy_db, rows))
    assert ours == theirs
    assert None not in ours[0]
    assert ours[31][2] is None and ours[31][4:] == (None,) * 4


# Anything a spool line or a driver could hand the encoder, poison included.
poison_seconds = st.sampled_from([
    float("nan"), float("inf"), float("-inf"), 1e308, -1e308, 2.0**64 - 1, 2**64 - 1,
    -(2**63), 1.7e15, 1.7e12, MIN_S - 1e-6, END_S, END_S + 1, 253_402_300_800.0])
any_seconds = unix_s | poison_seconds | st.just(MIN_S) | st.just(END_S - 0.5) \
    | st.integers(min_value=-(2**70), max_value=2**70) | st.just("1700000000") | st.none()
any_value = value | st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e308,
                                     2**64 - 1, "12", [1]])
any_row = st.tuples(
    st.integers(min_value=-(2**64), max_value=2**64) | st.just(1.5) | st.just("7"),
    any_seconds, any_seconds, any_seconds, any_value, any_value, any_value, any_value)


@settings(max_examples=400)
@given(st.lists(any_row, max_size=6))
def test_the_encoder_refuses_exactly_the_rows_row_problem_names(rows: list[tuple[Any, ...]]
                                                                ) -> None:
    problems = [row_problem(r) for r in rows]
    try:
        data = encode_rows(rows)
    except ENCODE_ERRORS:
        assert any(p is not None for p in problems)
    else:
        assert problems == [None] * len(rows)
        assert encode_valid(rows) == (data, list(range(len(rows))), [])
    sorted_out = encode_valid(rows)
    assert sorted_out.taken == [i for i, p in enumerate(problems) if p is None]
    assert sorted_out.refused == [(i, p) for i, p in enumerate(problems) if p is not None]
    assert sorted_out.data == encode_rows([rows[i] for i in sorted_out.taken])


@pytest.mark.parametrize(("row", "problem"), [
    ((1, 2.0**64 - 1, None, 1.7e9, 1.0, None, None, None),
     "tick_at 1.8446744073709552e+19 is outside 0001-01-01..9999-12-31 UTC"),
    ((1, 1.7e9, 1.7e15, 1.7e9, 1.0, None, None, None),
     "device_at 1700000000000000.0 is outside 0001-01-01..9999-12-31 UTC"),
    ((1, 1.7e9, -1e19, 1.7e9, 1.0, None, None, None),
     "device_at -1e+19 is outside 0001-01-01..9999-12-31 UTC"),
    ((1, 1.7e9, None, float("nan"), 1.0, None, None, None),
     "received_at nan is outside 0001-01-01..9999-12-31 UTC"),
    ((1, 1.7e9, None, 1.7e9, float("inf"), None, None, None),
     "demand_w is inf, not a finite number"),
    ((1, 1.7e9, None, 1.7e9, None, None, None, float("nan")),
     "price is nan, not a finite number"),
    ((2**64 - 1, 1.7e9, None, 1.7e9, 1.0, None, None, None),
     "device_id 18446744073709551615 is outside bigint"),
    ((1, None, None, 1.7e9, 1.0, None, None, None), "tick_at is null"),
    ((1, 1.7e9, None, 1.7e9, "12", None, None, None), "demand_w '12' is not a number"),
])
def test_row_problem_names_the_field_and_why(row: tuple[Any, ...], problem: str) -> None:
    assert row_problem(row) == problem
    with pytest.raises(ENCODE_ERRORS):
        encode_rows([row])


def test_the_bounds_load_and_read_back_as_datetimes(copy_db: str) -> None:
    first, last = MIN_S, END_S - 0.5  # (a float this large steps by 30 µs)
    rows = [Reading(1, first, last, first, 1e308, -1e308, 0.0, None, "c"),
            Reading(2, last, first, last, None, None, None, None, "c")]
    assert all(row_problem(r) is None for r in rows)
    # (Not compared with asyncpg's own encoding: it writes 0001-01-01 UTC as -infinity.)
    ours, _ = asyncio.run(_both_ways(copy_db, rows))
    first_dt = datetime(1, 1, 1, tzinfo=UTC)
    last_dt = datetime(9999, 12, 31, 23, 59, 58, 500000, tzinfo=UTC)
    assert ours == [(1, first_dt, last_dt, first_dt, 1e308, -1e308, 0.0, None),
                    (2, last_dt, first_dt, last_dt, None, None, None, None)]
