"""Tick arithmetic and the timing wheel, through the clock seam: no sleeping."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poller.clock import FakeClock
from poller.polling import schedule
from poller.wheel import TimingWheel


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
    def __init__(self, log: list[tuple[int, float]], clock: FakeClock, ident: int,
                 due: float) -> None:
        self.log, self.clock, self.ident, self.due = log, clock, ident, due

    def fire(self) -> None:
        self.log.append((self.ident, self.clock.monotonic() - self.due))


def test_wheel_fires_each_item_once_never_early_at_most_a_slot_late() -> None:
    clock = FakeClock(monotonic=1000.0)
    wheel = TimingWheel(clock, 0.005)
    fired: list[tuple[int, float]] = []
    start = clock.monotonic()
    for i in range(500):
        due = start + 0.01 + (i % 50) * 0.004
        wheel.add(due, _Fired(fired, clock, i, due))
    assert len(wheel) == 500
    clock.advance(0.0095)
    assert fired == []  # nothing is due yet
    clock.advance(0.35)
    assert sorted(i for i, _ in fired) == list(range(500))
    lateness = [late for _, late in fired]
    assert min(lateness) >= 0  # never early
    assert max(lateness) < 0.005 + 1e-9  # rounded up to its slot, no more
    assert len(wheel) == 0 and clock.next_at() is None  # no timer left armed


def test_wheel_fires_nothing_when_its_timer_runs_early() -> None:
    # uvloop counts whole milliseconds: a timer may run a little before its
    # instant by the clock. The wheel judges the slot by the clock and re-arms.
    clock = FakeClock(monotonic=1000.0)
    wheel = TimingWheel(clock, 0.02)
    fired: list[tuple[int, float]] = []
    wheel.add(1000.05, _Fired(fired, clock, 1, 1000.05))
    timer_at = clock.next_at()
    assert timer_at is not None and timer_at == pytest.approx(1000.06)
    early = clock.next_at()
    clock.stall(0.059)  # the loop runs the wheel's timer a millisecond early:
    wheel._run()
    assert fired == []  # nothing fires, the timer is armed again
    clock.advance(0.0)
    assert fired == [] and clock.next_at() == early
    clock.advance(0.002)
    assert [i for i, _ in fired] == [1]


def test_wheel_drain_hands_back_every_item_earliest_first_and_disarms() -> None:
    clock = FakeClock(monotonic=1000.0)
    wheel = TimingWheel(clock, 0.01)
    fired: list[tuple[int, float]] = []
    items = [_Fired(fired, clock, i, 1000.0 + (5 - i) * 0.1) for i in range(5)]
    for item in items:
        wheel.add(item.due, item)
    assert wheel.drain() == items[::-1]
    assert len(wheel) == 0 and clock.next_at() is None
    clock.advance(1.0)
    assert fired == []


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
