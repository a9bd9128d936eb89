"""The pool's targets by cloud id and, per state, by device id in order.

What the API asks of a running fleet: one device's status by its cloud id,
and a page of the devices in one state after a cursor. Both must cost the
same at 100 devices and at 100,000 (a walk over the fleet per request, or per
row, stalls polling for as long as it runs). The pool files a target here as
it starts and stops, a loop moves it on each state change (never per poll).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

from poller.polling.target import DeviceState, Target

_CHUNK = 512
"""Ids per chunk of a :class:`SortedIds` (up to twice as many before a split):
an insert moves at most 8 kB, a lookup bisects a few hundred chunk maxima."""


class SortedIds:
    """Distinct ints in ascending order, as a list of sorted chunks.

    Insert and remove cost O(log n + chunk), a page from any cursor
    O(log n + page); 8-9 bytes an id.

    >>> ids = SortedIds()
    >>> for i in (5, 1, 9, 3):
    ...     ids.add(i)
    >>> ids.page(after=1, limit=2), len(ids)
    ([3, 5], 4)
    >>> ids.remove(3); ids.page(after=0, limit=10)
    [1, 5, 9]
    """

    __slots__ = ("_chunks", "_maxes", "_size")

    def __init__(self) -> None:
        self._chunks: list[list[int]] = []
        self._maxes: list[int] = []
        """Largest id of each chunk: where an id belongs is a bisect away."""
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, value: int) -> None:
        maxes, chunks = self._maxes, self._chunks
        if not maxes:
            chunks.append([value])
            maxes.append(value)
            self._size = 1
            return
        i = bisect_left(maxes, value)
        if i == len(maxes):  # above every id: the common case for new devices
            i -= 1
            chunk = chunks[i]
            chunk.append(value)
            maxes[i] = value
        else:
            chunk = chunks[i]
            j = bisect_left(chunk, value)
            if chunk[j] == value:
                return
            chunk.insert(j, value)
        self._size += 1
        if len(chunk) > 2 * _CHUNK:
            upper = chunk[_CHUNK:]
            del chunk[_CHUNK:]
            chunks.insert(i + 1, upper)
            maxes[i] = chunk[-1]
            maxes.insert(i + 1, upper[-1])

    def remove(self, value: int) -> None:
        """Remove ``value`` if present."""
        maxes = self._maxes
        i = bisect_left(maxes, value)
        if i == len(maxes):
            return
        chunk = self._chunks[i]
        j = bisect_left(chunk, value)
        if chunk[j] != value:
            return
        del chunk[j]
        self._size -= 1
        if not chunk:
            del self._chunks[i]
            del maxes[i]
        elif j == len(chunk):
            maxes[i] = chunk[-1]

    def page(self, after: int, limit: int) -> list[int]:
        """Up to ``limit`` ids above ``after``, ascending."""
        chunks = self._chunks
        out: list[int] = []
        i = bisect_right(self._maxes, after)
        if i < len(chunks):
            chunk = chunks[i]
            j = bisect_right(chunk, after)
            out.extend(chunk[j:j + limit])
            i += 1
        while len(out) < limit and i < len(chunks):
            out.extend(chunks[i][:limit - len(out)])
            i += 1
        return out


class TargetIndex:
    """Cloud id -> device id, and the ids in each state in order.

    The pool :meth:`add`\\ s a target when its loop starts (or its driver
    refuses it) and :meth:`remove`\\ s it when the loop stops; a loop reports
    each state change with :meth:`moved`.
    """

    __slots__ = ("_by_cloud_id", "_by_state", "visited")

    def __init__(self) -> None:
        self._by_cloud_id: dict[str, int] = {}
        self._by_state = {state: SortedIds() for state in DeviceState}
        self.visited = 0
        """Ids handed out by :meth:`page`, in total: the work a listing did
        is counted, not timed (tests assert it stays within the page)."""

    def add(self, target: Target) -> None:
        record = target.record
        self._by_cloud_id[record.cloud_id] = record.id
        self._by_state[target.state].add(record.id)

    def remove(self, target: Target) -> None:
        record = target.record
        # A cloud id freed by one device may already name its successor.
        if self._by_cloud_id.get(record.cloud_id) == record.id:
            del self._by_cloud_id[record.cloud_id]
        self._by_state[target.state].remove(record.id)

    def moved(self, device_id: int, previous: DeviceState, state: DeviceState) -> None:
        if previous is not state:
            self._by_state[previous].remove(device_id)
            self._by_state[state].add(device_id)

    def device_id(self, cloud_id: str) -> int | None:
        return self._by_cloud_id.get(cloud_id)

    def count(self, state: DeviceState) -> int:
        return len(self._by_state[state])

    def page(self, state: DeviceState, after_id: int, limit: int) -> list[int]:
        """Ids of the devices in ``state`` above ``after_id``, ascending, at
        most ``limit``."""
        ids = self._by_state[state].page(after_id, limit)
        self.visited += len(ids)
        return ids
