"""The one clock every part of the service reads: wall time, monotonic time, timers.

Two scales, and only the device pool converts between them:

* ``wall()`` is Unix seconds (``time.time()``). Ticks are pinned to it
  (:mod:`poller.polling.schedule`), readings carry it, spool segments are
  named by its UTC hour. It can step: NTP at boot, an operator, a VM resumed.
* ``monotonic()`` is seconds on the event loop's timer scale. It never steps.
  Deadlines, timers, ages, back-off and lateness are measured on it, and
  ``call_at`` takes it.

The pool keeps ``wall_offset = wall() - monotonic()`` and turns a tick's wall
time into the monotonic instant its timer fires at; a wall-clock step shows
as a change of that offset, and the pool re-anchors the schedule.

Parts take a :class:`Clock` in their constructor (default :class:`LoopClock`);
``serve`` builds one and hands the same object to every part. Tests hand them
a :class:`FakeClock` and move time themselves instead of sleeping:

    >>> clock = FakeClock(wall=1_767_225_600.0, monotonic=100.0)
    >>> seen = []
    >>> handle = clock.call_later(2.0, lambda: seen.append(clock.monotonic()))
    >>> clock.advance(1.0); seen
    []
    >>> clock.advance(1.5); seen
    [102.0]
    >>> clock.monotonic(), clock.wall() - 1_767_225_600.0
    (102.5, 2.5)
    >>> clock.step_wall(-3600.0)    # the wall clock is set back; monotonic is not
    >>> clock.monotonic(), clock.wall() - 1_767_225_600.0
    (102.5, -3597.5)
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from typing import Protocol

Callback = Callable[[], object]


class TimerHandle(Protocol):
    """A scheduled callback; ``cancel()`` stops it if it has not run."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    """Wall time, monotonic time and timers on the monotonic scale."""

    def wall(self) -> float:
        """Unix seconds now."""
        ...

    def monotonic(self) -> float:
        """Seconds on the timer scale now; never goes back."""
        ...

    def call_at(self, when: float, callback: Callback) -> TimerHandle:
        """Run ``callback`` once ``monotonic()`` reaches ``when`` (never early by
        more than the loop's timer granularity: see :class:`LoopClock`)."""
        ...

    def call_later(self, delay_s: float, callback: Callback) -> TimerHandle: ...

    async def sleep(self, seconds: float) -> None: ...

    async def wait(self, timeout_s: float, *events: asyncio.Event) -> bool:
        """Wait until one of ``events`` is set or ``timeout_s`` passes; True if
        one is set."""
        ...


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _TimedWaits:
    """``sleep`` and ``wait`` on the clock's own timers, so that a fake clock
    wakes them as it advances and the real one as the loop runs."""

    __slots__ = ()

    def call_later(self, delay_s: float, callback: Callback) -> TimerHandle:
        raise NotImplementedError

    async def sleep(self, seconds: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        handle = self.call_later(seconds, lambda: _resolve(fut))
        try:
            await fut
        finally:
            handle.cancel()

    async def wait(self, timeout_s: float, *events: asyncio.Event) -> bool:
        if any(e.is_set() for e in events):
            return True
        loop = asyncio.get_running_loop()
        timer = loop.create_future()
        handle = self.call_later(timeout_s, lambda: _resolve(timer))
        waiters = [loop.create_task(e.wait()) for e in events]
        try:
            await asyncio.wait([timer, *waiters], return_when=asyncio.FIRST_COMPLETED)
        finally:
            handle.cancel()
            for waiter in waiters:
                waiter.cancel()
        return any(e.is_set() for e in events)


class LoopClock(_TimedWaits):
    """The system clocks and the running event loop's timers (production).

    ``monotonic`` *is* ``time.monotonic``, bound once as an attribute: reading
    it costs what the builtin costs (the polling hot path reads it once per
    poll), and it is the clock ``loop.time()`` reads on asyncio's loops and,
    in whole milliseconds, on uvloop's. So a timer armed with ``call_at`` for
    an instant read here fires at that instant by this clock, give or take
    uvloop's millisecond; code that must never act early (the timing wheel)
    checks ``monotonic()`` when its timer fires.
    """

    __slots__ = ("monotonic", "wall")

    def __init__(self) -> None:
        self.wall: Callable[[], float] = time.time
        self.monotonic: Callable[[], float] = time.monotonic

    def call_at(self, when: float, callback: Callback) -> TimerHandle:
        return asyncio.get_running_loop().call_at(when, callback)

    def call_later(self, delay_s: float, callback: Callback) -> TimerHandle:
        return asyncio.get_running_loop().call_later(delay_s, callback)

    def __repr__(self) -> str:
        return "LoopClock()"


class _FakeTimer:
    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callback) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock(_TimedWaits):
    """A clock for tests: time stands still until :meth:`advance` (or
    :meth:`run`) moves it; :meth:`step_wall` moves the wall clock alone, as
    NTP or an operator would.

    Timers run in the order of their instants (ties in the order they were
    armed), each with ``monotonic()`` reading its own instant.
    """

    __slots__ = ("_heap", "_mono", "_offset", "_seq")

    def __init__(self, wall: float = 1_767_225_600.0, monotonic: float = 1000.0) -> None:
        self._mono = monotonic
        self._offset = wall - monotonic
        self._heap: list[tuple[float, int, _FakeTimer]] = []
        self._seq = itertools.count()

    def wall(self) -> float:
        return self._mono + self._offset

    def monotonic(self) -> float:
        return self._mono

    def call_at(self, when: float, callback: Callback) -> TimerHandle:
        timer = _FakeTimer(callback)
        heapq.heappush(self._heap, (when, next(self._seq), timer))
        return timer

    def call_later(self, delay_s: float, callback: Callback) -> TimerHandle:
        return self.call_at(self._mono + delay_s, callback)

    def step_wall(self, delta_s: float) -> None:
        """Step the wall clock by ``delta_s`` (either sign); monotonic time
        and the timers do not move."""
        self._offset += delta_s

    def stall(self, seconds: float) -> None:
        """Move time on without running the timers that fall due, as an event
        loop blocked for ``seconds`` would: the next :meth:`advance` runs
        them, late, with ``monotonic()`` reading the time they run at."""
        if seconds < 0:
            raise ValueError(f"time does not go back: stall({seconds})")
        self._mono += seconds

    def next_at(self) -> float | None:
        """The instant of the earliest live timer, None when none is armed."""
        heap = self._heap
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, running every timer that falls due
        on the way, in order (timers they arm run too if due by the end).

        Callbacks run here, synchronously; tasks they wake (sleepers, waits)
        run when the caller next yields to the loop. When such a task arms
        its next timer inside the span, use :meth:`run`."""
        if seconds < 0:
            raise ValueError(f"time does not go back: advance({seconds})")
        end = self._mono + seconds
        heap = self._heap
        while heap and heap[0][0] <= end:
            when, _, timer = heapq.heappop(heap)
            if timer.cancelled:
                continue
            self._mono = max(self._mono, when)
            timer.callback()
        self._mono = end

    async def run(self, seconds: float, *, turns: int = 8) -> None:
        """Advance by ``seconds`` as if they passed: after each due instant the
        event loop gets ``turns`` turns, so the tasks it woke run and arm their
        next timers before time moves on."""
        end = self._mono + seconds
        await settle(turns)
        while (when := self.next_at()) is not None and when <= end:
            self.advance(max(0.0, when - self._mono))
            await settle(turns)
        self.advance(end - self._mono)
        await settle(turns)

    def __repr__(self) -> str:
        return f"FakeClock(wall={self.wall()!r}, monotonic={self._mono!r})"


async def settle(turns: int = 8) -> None:
    """Give the event loop ``turns`` turns (no time passes on any clock)."""
    for _ in range(turns):
        await asyncio.sleep(0)
