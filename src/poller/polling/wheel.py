"""A timing wheel: one loop timer for every due tick, not one per device.

Per-device ``asyncio.sleep`` or ``call_at`` costs more than the HTTP exchange
at 100k devices (see NOTES-performance). The wheel rounds each due time *up*
to a slot of ``resolution_s`` (ticks are never early), keeps one list per slot
and arms a single timer for the earliest slot.

Times are ``time.monotonic()`` seconds. uvloop's ``loop.time()`` is libuv's
cached, coarse clock and can lag the real monotonic clock by milliseconds;
arming a loop timer for a monotonic instant therefore never fires early, and
the slots due are judged by the real clock.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from typing import Protocol


class Due(Protocol):
    def fire(self) -> None: ...


class TimingWheel:
    __slots__ = ("_heap", "_loop", "_res", "_slots", "_timer", "_timer_slot")

    def __init__(self, loop: asyncio.AbstractEventLoop, resolution_s: float = 0.005) -> None:
        if resolution_s <= 0:
            raise ValueError("resolution_s must be positive")
        self._loop = loop
        self._res = resolution_s
        self._slots: dict[int, list[Due]] = {}
        self._heap: list[int] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_slot = -1

    def __len__(self) -> int:
        return sum(len(v) for v in self._slots.values())

    def add(self, when: float, item: Due) -> None:
        """Call ``item.fire()`` at loop time ``when`` (or within one slot after)."""
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
        self._timer = self._loop.call_at(slot * self._res, self._run)

    def _run(self) -> None:
        self._timer = None
        now_slot = math.floor(time.monotonic() / self._res)
        heap, slots = self._heap, self._slots
        while heap and heap[0] <= now_slot:
            for item in slots.pop(heapq.heappop(heap)):
                item.fire()
        if heap:
            self._arm(heap[0])

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._slots.clear()
        self._heap.clear()
