"""Readings and a settable clock shared by the spool and loader tests."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from poller.reading import Reading


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_rows(n: int, tick: float, first_id: int = 1) -> list[Reading]:
    """``n`` readings of one tick, with every nullable field both set and None."""
    return [Reading(first_id + i, tick, None if i % 2 else tick - 0.5, tick + 0.25,
                    -12.5 + i, 1000.0 + i, None, 0.11 if i % 3 == 0 else None,
                    f"dev-{first_id + i}")
            for i in range(n)]


def to_records(rows: list[Reading]) -> list[tuple[Any, ...]]:
    """``reading[:8]`` with Unix seconds as aware datetimes: the rows as
    asyncpg reads them back from ``readings``."""
    fromts = datetime.fromtimestamp
    return [(r[0], fromts(r[1], UTC), None if r[2] is None else fromts(r[2], UTC),
             fromts(r[3], UTC), r[4], r[5], r[6], r[7]) for r in rows]
