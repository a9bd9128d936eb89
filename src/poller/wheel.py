"""A timing wheel: one timer for every due tick, not one per device.

Two users: the device loops' ticks (:mod:`poller.polling`) and the fast HTTP
client's deadlines of requests not yet on a connection
(:mod:`poller.transport`); so it lives beside the clock, in neither.

A timer per device (``asyncio.sleep`` or ``call_at``) costs more than the
HTTP exchange at 100k devices (see ``make bench``). The wheel rounds each due
instant *up* to a slot of ``resolution_s`` (nothing fires early), keeps one
list per slot and arms a single clock timer for the earliest slot.

Instants are the clock's monotonic seconds (:mod:`poller.clock`). When the
timer fires, the slots due are judged by ``clock.monotonic()`` itself: a loop
timer that fires a little early (uvloop counts whole milliseconds) fires
nothing and is armed again.
"""

from __future__ import annotations

import heapq
import math
from typing import Protocol

from poller.clock import Clock, TimerHandle


class Due(Protocol):
    def fire(self) -> None: ...


class TimingWheel:
    __slots__ = ("_call_at", "_heap", "_now", "_res", "_slots", "_timer", "_timer_slot")

    def __init__(self, clock: Clock, resolution_s: float = 0.005) -> None:
        if resolution_s <= 0:
            raise ValueError("resolution_s must be positive")
        self._call_at = clock.call_at
        self._now = clock.monotonic
        self._res = resolution_s
        self._slots: dict[int, list[Due]] = {}
        self._heap: list[int] = []
        self._timer: TimerHandle | None = None
        self._timer_slot = -1

    def __len__(self) -> int:
        return sum(len(v) for v in self._slots.values())

    def add(self, when: float, item: Due) -> None:
        """Call ``item.fire()`` at monotonic instant ``when`` (or within one slot after)."""
        slot = math.ceil(when / self._res)
        bucket = self._slots.get(slot)
        if bucket is not None:
            bucket.append(item)
            return
        self._slots[slot] = [item]
        heapq.heappush(self._heap, slot)
        if self._timer is None or slot < self._timer_slot:
            self._arm(slot)

    def _arm(self, slot: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_slot = slot
        self._timer = self._call_at(slot * self._res, self._run)

    def _run(self) -> None:
        self._timer = None
        # The slot's instant as armed, compared as armed: exact on any clock.
        now, res = self._now(), self._res
        heap, slots = self._heap, self._slots
        while heap and heap[0] * res <= now:
            for item in slots.pop(heapq.heappop(heap)):
                item.fire()
        if heap:
            self._arm(heap[0])

    def drain(self) -> list[Due]:
        """Take every item out, earliest first, and disarm: the caller puts
        them back at new instants (the pool does, after a wall-clock step)."""
        items = [item for slot in sorted(self._slots) for item in self._slots[slot]]
        self.close()
        return items

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._slots.clear()
        self._heap.clear()
