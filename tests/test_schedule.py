"""Tick arithmetic and the timing wheel, through the clock seam: no sleeping."""

from __future__ import annotations

import asyncio
import statistics

from hypothesis import given
from hypothesis import strategies as st

from poller.polling import schedule
from poller.polling.wheel import TimingWheel


def test_phases_are_stable_and_spread() -> None:
    ids = [f"{i:06x}" for i in range(10_000)]
    phases = [schedule.phase(cid, "seed", 6.0) for cid in ids]
    assert phases == [schedule.phase(cid, "seed", 6.0) for cid in ids]  # restarts keep them
    buckets = [0] * 60
    for p in phases:
        buckets[int(p / 0.1)] += 1
    # 10k devices over sixty 100 ms slots: each near 167, none empty or doubled.
    assert min(buckets) > 110 and max(buckets) < 230
    assert schedule.phase("000001", "other-seed", 6.0) != schedule.phase("000001", "seed", 6.0)


@given(now=st.floats(1e9, 3e9), interval=st.floats(0.1, 3600), frac=st.floats(0, 0.999))
def test_next_tick_is_strictly_after_now_and_on_the_grid(now: float, interval: float,
                                                         frac: float) -> None:
    ph = frac * interval
    k = schedule.next_tick_index(now, interval, ph)
    assert k * interval + ph > now - 1e-6
    assert (k - 1) * interval + ph <= now + 1e-6


def test_many_ticks_do_not_drift() -> None:
    # A million intervals later the tick is still exactly phase + k * interval.
    ph = schedule.phase("00ce69", "s", 6.0)
    t = schedule.tick_time(300_000_000, 6.0, ph)
    assert abs(t - (300_000_000 * 6.0 + ph)) < 1e-6
    assert schedule.first_tick_at_or_after(t, 6.0, ph) == 300_000_000


class _Fired:
    def __init__(self, log: list[tuple[int, float]], ident: int, due: float) -> None:
        self.log, self.ident, self.due = log, ident, due

    def fire(self) -> None:
        import time

        self.log.append((self.ident, time.monotonic() - self.due))


async def test_wheel_fires_each_item_once_never_early() -> None:
    import time

    loop = asyncio.get_running_loop()
    wheel = TimingWheel(loop, 0.005)
    fired: list[tuple[int, float]] = []
    start = time.monotonic()
    for i in range(500):
        due = start + 0.01 + (i % 50) * 0.004
        wheel.add(due, _Fired(fired, i, due))
    await asyncio.sleep(0.35)
    wheel.close()
    assert sorted(i for i, _ in fired) == list(range(500))
    lateness = [late for _, late in fired]
    assert min(lateness) >= 0  # never early
    assert statistics.median(lateness) < 0.05


def test_tick_times_are_whole_microseconds_and_match_the_loops() -> None:
    from datetime import UTC, datetime

    from poller.ingest.pgcopy import pg_micros

    ph = schedule.phase("00ce69", "s", 6.0)
    for k in (0, 1, 293_982_600, 300_000_000):
        t = schedule.tick_time(k, 6.0, ph)
        assert abs(t - (k * 6.0 + ph)) <= 0.5e-6 + 1e-9
        # Stored as the same microsecond however it travels (COPY or datetime).
        assert pg_micros(t) == pg_micros(float(f"{t:.6f}"))
        assert datetime.fromtimestamp(t, UTC).timestamp() == float(f"{t:.6f}")
