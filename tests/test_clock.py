"""The clock seam: the fake clock tests drive, the real one production uses,
and what a wall-clock step shows to operators (metrics, unit ordering).

The pool's behaviour across clock steps is tested with the simulator in
test_polling.py.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

import poller.clock
import poller.polling.schedule
from poller.api.metrics import make_registry
from poller.api.view import FleetSnapshot
from poller.clock import Clock, FakeClock, LoopClock, settle
from poller.polling.stats import LogHistogram
from tests import sources
from tests.apiview import fixed_snapshot

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.mark.parametrize("module", [poller.clock, poller.polling.schedule])
def test_docstring_examples(module: Any) -> None:
    result = sources.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_fake_timers_run_in_order_each_at_its_instant() -> None:
    clock = FakeClock(wall=2_000_000_000.0, monotonic=50.0)
    seen: list[tuple[str, float]] = []

    def note(name: str) -> None:
        seen.append((name, clock.monotonic()))

    clock.call_at(53.0, lambda: note("c"))
    clock.call_later(1.0, lambda: note("a"))
    clock.call_at(51.0, lambda: note("a2"))  # same instant: in the order armed
    dropped = clock.call_later(2.0, lambda: note("never"))
    dropped.cancel()
    # A timer armed by a timer runs in the same advance if it falls due in it.
    clock.call_later(1.5, lambda: clock.call_later(0.25, lambda: note("nested")))
    clock.advance(2.9)
    assert seen == [("a", 51.0), ("a2", 51.0), ("nested", 51.75)]
    assert clock.monotonic() == pytest.approx(52.9)
    assert clock.wall() == pytest.approx(2_000_000_002.9)
    assert clock.next_at() == 53.0
    clock.advance(0.1)
    assert seen[-1] == ("c", 53.0) and clock.next_at() is None
    with pytest.raises(ValueError, match="does not go back"):
        clock.advance(-1.0)


def test_a_stall_runs_overdue_timers_late_and_a_wall_step_moves_only_the_wall() -> None:
    clock = FakeClock(wall=1_000.0, monotonic=10.0)
    seen: list[float] = []
    clock.call_later(1.0, lambda: seen.append(clock.monotonic()))
    clock.stall(5.0)
    assert seen == []  # a blocked loop runs nothing
    clock.advance(0.0)
    assert seen == [15.0]  # run late, reading the time it ran at
    clock.step_wall(-30.0)
    assert (clock.monotonic(), clock.wall()) == (15.0, 975.0)
    clock.step_wall(+60.0)
    assert (clock.monotonic(), clock.wall()) == (15.0, 1_035.0)


async def test_fake_sleepers_and_waits_wake_only_as_time_is_run() -> None:
    clock = FakeClock()
    woke: list[tuple[str, float]] = []
    kicked = asyncio.Event()

    async def sleeper() -> None:
        for _ in range(3):  # each sleep armed only after the last one woke
            await clock.sleep(1.0)
            woke.append(("sleep", clock.monotonic() - 1000.0))

    async def waiter() -> None:
        woke.append(("timeout", float(await clock.wait(10.0, kicked))))
        woke.append(("kicked", float(await clock.wait(10.0, kicked))))

    tasks = [asyncio.create_task(sleeper()), asyncio.create_task(waiter())]
    await settle()
    assert woke == []  # no time has passed
    await clock.run(10.5)
    assert woke == [("sleep", 1.0), ("sleep", 2.0), ("sleep", 3.0), ("timeout", 0.0)]
    kicked.set()
    await settle()
    assert woke[-1] == ("kicked", 1.0)
    await asyncio.gather(*tasks)


async def test_a_cancelled_fake_sleep_leaves_no_timer() -> None:
    clock = FakeClock()
    task = asyncio.create_task(clock.sleep(5.0))
    await settle()
    assert clock.next_at() == 1005.0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert clock.next_at() is None


async def test_the_loop_clock_is_the_system_clocks_and_the_loops_timers() -> None:
    clock: Clock = LoopClock()
    # The builtins themselves, bound once: the hot path pays nothing extra.
    assert clock.monotonic is time.monotonic and clock.wall is time.time
    loop = asyncio.get_running_loop()
    assert abs(clock.monotonic() - loop.time()) < 0.01  # the loop's timer scale
    fired = asyncio.Event()
    armed_at = clock.monotonic()
    clock.call_at(armed_at, fired.set)
    assert await clock.wait(5.0, fired)
    later = clock.call_later(60.0, fired.clear)
    later.cancel()
    assert fired.is_set()
    nothing = asyncio.Event()
    assert not await clock.wait(0.0, nothing)  # a timeout says False


def test_steps_and_conflicts_are_exported_as_counters() -> None:
    class View:
        def fleet(self) -> FleetSnapshot:
            return fixed_snapshot(clock_steps=2, tick_conflicts=40)

        def lateness(self) -> LogHistogram:
            return LogHistogram()

        copy_latency = commit_latency = lateness

        def loop_responsive(self) -> bool:
            return True

    text = generate_latest(make_registry(View())).decode()
    assert "poller_clock_steps_total 2.0" in text
    assert "poller_tick_conflicts_total 40.0" in text


@pytest.mark.parametrize("unit", ["poller.service", "poller@.service"])
def test_units_start_after_the_clock_is_synchronized(unit: str) -> None:
    after: list[str] = []
    wants: list[str] = []
    for line in (SCRIPTS / unit).read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "After":
            after += value.split()
        elif key == "Wants":
            wants += value.split()
    assert "time-sync.target" in after
    # Passive target: the time service pulls it in, units only order after it.
    assert "time-sync.target" not in wants
