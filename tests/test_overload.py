"""Overload at the loop: a tick that comes due too late is shed, not sent.

The wheel fires on the fake clock's time; the loops read a monotonic clock
that runs ``lag`` behind it, as a busy event loop's callbacks run late.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from itertools import pairwise
from typing import Any

from poller.bench.hotpath import AnswerNow
from poller.clock import FakeClock
from poller.config import PollingSettings
from poller.drivers.base import DeviceSpec
from poller.drivers.eagle_cloud import EagleCloudDriver
from poller.http import HttpRequest, HttpResponse
from poller.polling.context import LoopContext
from poller.polling.loop import DeviceLoop
from poller.polling.memsink import MemorySink
from poller.polling.target import Target
from poller.registry import DeviceRecord
from poller.simulator.payloads import cloud_demand
from poller.transport.connection import OnDone
from poller.wheel import TimingWheel

WALL = float(int(time.time()))
T0 = datetime(2026, 1, 1, tzinfo=UTC)
INTERVAL_S = 1.0
STEP_S = 0.01


class HoldOneRefuseTheRest:
    """Keeps the first request unanswered and turns every other away at once,
    as a full queue for connections does."""

    def __init__(self) -> None:
        self.held: OnDone | None = None
        self.refused = 0

    def prepared(self, request: HttpRequest) -> Any:
        return request

    def shared(self, prepared: Any) -> tuple[Any, bytes | None]:
        return prepared, None

    def start(self, prepared: Any, deadline: float, on_done: OnDone,
              headers: bytes | None = None) -> bool:
        if self.held is None:
            self.held = on_done
            return True
        self.refused += 1
        return False


class Rig:
    def __init__(self, devices: int, *, shed_after_s: float, timeout_s: float,
                 max_in_flight: int = 20_000, transport: Any = None) -> None:
        self.clock = FakeClock(wall=WALL, monotonic=1000.0)
        self.lag = 0.0
        settings = PollingSettings(interval_s=INTERVAL_S, timeout_s=timeout_s,
                                   totals_every=100_000, shed_after_s=shed_after_s,
                                   wheel_resolution_s=STEP_S, max_in_flight=max_in_flight)
        self.sink = MemorySink()
        self.ctx = LoopContext(settings, self.sink, lambda: self.clock.monotonic() + self.lag,
                               lambda *_: None)
        self.ctx.wheel = TimingWheel(self.clock, STEP_S)
        self.ctx.wall_offset = self.clock.wall() - self.clock.monotonic()
        body = cloud_demand("d8d5b9000001", "00135001000000a1", int(WALL), "0x0003b0", True)
        self.transport = transport if transport is not None else \
            AnswerNow(HttpResponse(200, (), body))
        driver = EagleCloudDriver("http://127.0.0.1:9")
        self.loops: list[DeviceLoop] = []
        for i in range(devices):
            cloud_id = f"{i + 1:06x}"
            record = DeviceRecord(i + 1, cloud_id, "me@example.com", "eagle-cloud", None, {},
                                  INTERVAL_S, True, T0, T0)
            session = driver.session(DeviceSpec(i + 1, cloud_id, "me@example.com", "pw",
                                                None, {}))
            loop = DeviceLoop(self.ctx, Target(record), session, self.transport, INTERVAL_S,
                              i * INTERVAL_S / devices)
            loop.start()
            self.loops.append(loop)

    def ticks(self, n: int) -> None:
        self.clock.advance(n * INTERVAL_S)


def test_a_late_tick_is_shed_and_the_bar_rises_for_the_device_shed() -> None:
    rig = Rig(1, shed_after_s=0.1, timeout_s=0.8)
    rig.lag = 0.15  # every tick starts 0.15 s late: over the bar once, not twice
    rig.ticks(10)
    target = rig.loops[0].target
    stats = rig.ctx.stats
    assert len(rig.sink.readings) == 5
    assert stats.shed_ticks == target.skipped_ticks == 5
    assert stats.skipped_ticks == 0
    # Polled and shed in turn: each reading's tick is two ticks after the last.
    ticks = [r.tick_at for r in rig.sink.readings]
    assert [round(b - a, 6) for a, b in pairwise(ticks)] == [2.0] * 4
    assert stats.lateness.count == 5 and stats.lateness.max <= 0.15 + 1e-9


def test_a_tick_later_than_half_the_timeout_is_never_sent() -> None:
    rig = Rig(3, shed_after_s=0.1, timeout_s=0.8)
    rig.lag = 0.45  # past the bar's ceiling, half the timeout, however often shed
    rig.ticks(6)
    assert rig.transport.sent == 0 and not rig.sink.readings
    assert rig.ctx.stats.shed_ticks == sum(lp.target.skipped_ticks for lp in rig.loops) == 18
    assert rig.ctx.stats.lateness.count == 0
    rig.lag = 0.0  # the loop catches up: polling resumes on the next tick
    rig.ticks(2)
    assert len(rig.sink.readings) == 6


def test_sheds_spread_over_the_fleet_when_lateness_varies() -> None:
    # Lateness that depends on the moment (as a busy loop's does) sheds some
    # devices' ticks; the rising bar keeps any device from being starved.
    rig = Rig(200, shed_after_s=0.05, timeout_s=0.8)
    for step in range(2000):  # 20 s in steps of 10 ms; lateness 0..0.18 s
        rig.lag = (step % 19) * 0.01
        rig.clock.advance(STEP_S)
    polls_before = len(rig.sink.readings)
    shed = rig.ctx.stats.shed_ticks
    assert shed > 200 and polls_before > 200
    per_device = [lp.target.readings for lp in rig.loops]
    assert min(per_device) >= 0.5 * (sum(per_device) / len(per_device))
    # After k sheds in a row the bar is 0.05 * (k + 1) s, above any lateness
    # here (0.18 s) once k = 3: never more than three sheds in a row.
    for lp in rig.loops:
        ticks = sorted(r.tick_at for r in rig.sink.readings if r.device_id == lp.target.record.id)
        gaps = [b - a for a, b in pairwise(ticks)]
        assert max(gaps) <= 4 * INTERVAL_S + 1e-6


def test_a_refused_request_skips_the_tick_and_blames_no_device() -> None:
    # One poll holds the only slot; every other loop waits for it, and each
    # is refused by the transport once let in. 3,000 of them, let in by one
    # call: refusals end their polls at once, inside it, and must not nest.
    transport = HoldOneRefuseTheRest()
    rig = Rig(3000, shed_after_s=0.5, timeout_s=0.8, max_in_flight=1, transport=transport)
    rig.clock.advance(INTERVAL_S)
    limiter = rig.ctx.limiter
    assert transport.held is not None and len(limiter.waiting) == 2999
    transport.held(HttpResponse(503, (), b""))
    assert not limiter.waiting and limiter.in_flight == 0
    # Those that waited past the shed bar (0.4 s: half the timeout) are shed
    # when let in; the rest are sent and refused.
    stats = rig.ctx.stats
    assert transport.refused > 0 and stats.shed_ticks > 0
    assert transport.refused + stats.shed_ticks == 2999
    assert stats.skipped_ticks == transport.refused
    assert stats.outcome_counts()["connect_error"] == 0
    assert sum(lp.target.consecutive_failures for lp in rig.loops) == 1  # the 503 only
