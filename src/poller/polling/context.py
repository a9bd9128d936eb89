"""What a device loop may touch beyond its own device: one object per pool.

The pool builds a :class:`LoopContext` and owns it; every loop holds the same
one and reads nothing else of the pool. The pool writes the context when its
settings change (``apply``), when the sink is replaced and when the wall
clock steps (``wall_offset``); a loop writes only the counters it is meant
to (the limiter's slots, the fleet statistics) and hands over what the pool
must know (a dirty device, a state change) through the queue and callback
here.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Protocol

from poller.config import PollingSettings
from poller.drivers.bounds import SampleBounds
from poller.polling.stats import FleetStats
from poller.polling.target import DeviceState, Target
from poller.reading import PlainReading
from poller.wheel import TimingWheel

StateChange = Callable[[Target, DeviceState, str, str | None], None]
"""``(target, previous state, outcome, message)``, once ``target.state`` changed,
or its outcome or its failures in a row did (the pool re-ranks failing devices)."""
FailureRecorder = Callable[[int, float, int, float], None]
"""``(device_id, tick_at, outcome index, failed_at)`` of a poll that ended
without a reading: a sink's ``record_failure``, when it keeps failures."""


def _ignore_failure(device_id: int, tick_at: float, outcome: int, failed_at: float) -> None:
    """What a loop calls when its sink keeps no failures."""


class ReadingSink(Protocol):
    """Where finished readings go. ``accept`` is on the hot path: no I/O."""

    def accept(self, reading: PlainReading) -> None: ...

    @property
    def accepting(self) -> bool:
        """False while storage is full: loops skip ticks instead of polling.
        Read before every poll: a plain attribute, not a computation."""
        ...


class DirtyQueue(list[Target]):
    """Targets changed since the live-state writer last took them, each once.

    A list, so that a loop can append in the one C call the hot path can
    afford (see ``DeviceLoop._keep``); everyone else uses :meth:`mark` and
    :meth:`drain`. The taker clears each target's ``dirty`` flag.

    >>> from datetime import UTC, datetime
    >>> from poller.registry import DeviceRecord
    >>> at = datetime(2026, 1, 1, tzinfo=UTC)
    >>> target = Target(DeviceRecord(1, "00ce69", "", "eagle-cloud", None, {}, 6.0, True, at, at))
    >>> queue = DirtyQueue()
    >>> queue.mark(target); queue.mark(target); len(queue)
    1
    >>> [t.cloud_id for t in queue.drain()], len(queue)
    (['00ce69'], 0)
    """

    __slots__ = ()

    def mark(self, target: Target) -> None:
        if not target.dirty:
            target.dirty = True
            self.append(target)

    def drain(self) -> list[Target]:
        """Take every target queued so far (the queue itself stays in place:
        loops hold it)."""
        taken = self[:]
        del self[:]
        return taken


class SlotWaiter(Protocol):
    def resume(self) -> None:
        """A slot is free: start the poll that waited for it (unless the
        waiter stopped meanwhile)."""
        ...


class SlotLimiter:
    """The fleet-wide cap on polls in flight, and the loops that wait for a
    slot, first come first served.

    A loop takes a slot by ``in_flight += 1`` once ``in_flight <
    max_in_flight`` and gives it back by ``in_flight -= 1`` (per poll: no call
    for either), then lets waiters in with :meth:`admit` if any wait."""

    __slots__ = ("_admitting", "in_flight", "max_in_flight", "waiting")

    def __init__(self, max_in_flight: int) -> None:
        self.in_flight = 0
        self.max_in_flight = max_in_flight
        self.waiting: collections.deque[SlotWaiter] = collections.deque()
        self._admitting = False

    def admit(self) -> None:
        """Resume waiting loops while slots are free. A loop resumed here may
        end its poll at once (a refused request, a driver error) and call
        this again: the call in progress goes on with the next waiter, so the
        stack does not grow with the queue."""
        if self._admitting:
            return
        self._admitting = True
        waiting = self.waiting
        try:
            while waiting and self.in_flight < self.max_in_flight:
                waiting.popleft().resume()
        finally:
            self._admitting = False


class LoopContext:
    """Everything the pool's loops share, typed; the one way a loop reaches
    beyond its device."""

    __slots__ = (
        "accept", "auth_failed_interval_s", "backoff_max_s", "bounds", "dirty", "failed",
        "limiter",
        "monotonic", "on_state_change", "shed_after_s", "sink", "stats", "timeout_s",
        "totals_every",
        "wall_offset", "wheel",
    )

    def __init__(self, settings: PollingSettings, sink: ReadingSink,
                 monotonic: Callable[[], float], on_state_change: StateChange) -> None:
        self.monotonic = monotonic
        """The clock's monotonic reader, bound once (read per poll)."""
        self.wall_offset = 0.0
        """``wall - monotonic`` as the pool last anchored it: the tick at wall
        time ``w`` is due at monotonic ``w - wall_offset``."""
        self.wheel: TimingWheel
        """Set by the pool's ``start()``, before any loop starts."""
        self.stats = FleetStats()
        self.dirty = DirtyQueue()
        self.on_state_change = on_state_change
        self.limiter = SlotLimiter(settings.max_in_flight)
        self.sink = sink
        self.accept = sink.accept
        self.failed: FailureRecorder = getattr(sink, "record_failure", _ignore_failure)
        self.apply(settings)

    def apply(self, settings: PollingSettings) -> None:
        """New cadence, back-off, timeout, bounds and cap; loops use them from
        their next poll."""
        self.totals_every = settings.totals_every
        self.backoff_max_s = settings.backoff_max_s
        self.auth_failed_interval_s = settings.auth_failed_interval_s
        self.timeout_s = settings.timeout_s
        self.shed_after_s = settings.shed_after_s
        self.bounds = SampleBounds.from_settings(settings)
        self.limiter.max_in_flight = settings.max_in_flight
        self.limiter.admit()

    def set_sink(self, sink: ReadingSink) -> None:
        self.sink = sink
        self.accept = sink.accept
        self.failed = getattr(sink, "record_failure", _ignore_failure)

    def wall_now(self) -> float:
        return self.monotonic() + self.wall_offset

    def timeout_for(self, interval_s: float) -> float:
        """A poll's time budget: the timeout setting, and never as long as
        the device's interval."""
        return min(self.timeout_s, interval_s * 0.9)
