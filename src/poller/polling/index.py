"""The pool's targets by cloud id, per state by device id in order, and the
failing ones ranked by failures in a row.

What the API asks of a running fleet: one device's status by its cloud id,
a page of the devices in one state after a cursor, and the devices failing
longest. Each must cost the same at 100 devices and at 100,000 (a walk over
the fleet per request, or per row, stalls polling for as long as it runs:
sorting 100,000 failing devices took 20 ms). The pool files a target here as
it starts and stops, a loop moves it on each state change and re-ranks it on
each failure (never on a poll that keeps a reading).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

from poller.polling.target import DeviceState, Target

_ID_BITS = 64
"""Device ids are positive bigints, below ``2**63``: a rank key holds the
failures in a row above them."""
_ID_MASK = (1 << _ID_BITS) - 1
_FAILING, _AUTH_FAILED = DeviceState.FAILING, DeviceState.AUTH_FAILED
"""The ranked states (compared by identity: enum hashing costs a call)."""

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

    def first(self, limit: int) -> list[int]:
        """The ``limit`` smallest ids, ascending: O(limit)."""
        out: list[int] = []
        for chunk in self._chunks:
            if len(out) >= limit:
                break
            out.extend(chunk[:limit - len(out)])
        return out


def rank_key(failures: int, device_id: int) -> int:
    """One int that sorts the most failures in a row first, then the lower id.

    >>> keys = sorted(rank_key(f, i) for f, i in [(2, 9), (5, 7), (2, 3), (0, 1)])
    >>> [k & _ID_MASK for k in keys]
    [7, 3, 9, 1]
    """
    return (-failures << _ID_BITS) + device_id


class TargetIndex:
    """Cloud id -> device id, the ids in each state in order, and the
    failing and auth_failed devices ranked by failures in a row.

    The pool :meth:`add`\\ s a target when its loop starts (or its driver
    refuses it) and :meth:`remove`\\ s it when the loop stops; a loop reports
    each state change, and each failure, with :meth:`moved`.

    The ranking is exact, not sampled: a target's failures in a row change
    only in its loop, which reports each change before it returns to the
    event loop (a failure, and the reset that comes with a move to ok); a
    stopped loop changes its target after the pool has removed it here.
    """

    __slots__ = ("_by_cloud_id", "_by_state", "_rank_keys", "_ranked", "visited")

    def __init__(self) -> None:
        self._by_cloud_id: dict[str, int] = {}
        self._by_state = {state: SortedIds() for state in DeviceState}
        self._ranked = SortedIds()
        """:func:`rank_key` of each failing and auth_failed device: the most
        failing are the first ids, read without a sort."""
        self._rank_keys: dict[int, int] = {}
        """Device id -> its key in ``_ranked``, to move or drop it."""
        self.visited = 0
        """Ids handed out by :meth:`page` and :meth:`most_failing`, in total:
        the work a listing did is counted, not timed (tests assert it stays
        within the page)."""

    def add(self, target: Target) -> None:
        record = target.record
        self._by_cloud_id[record.cloud_id] = record.id
        state = target.state
        self._by_state[state].add(record.id)
        if state is _FAILING or state is _AUTH_FAILED:
            self._rank(record.id, target.consecutive_failures)

    def remove(self, target: Target) -> None:
        record = target.record
        # A cloud id freed by one device may already name its successor.
        if self._by_cloud_id.get(record.cloud_id) == record.id:
            del self._by_cloud_id[record.cloud_id]
        self._by_state[target.state].remove(record.id)
        self._unrank(record.id)

    def moved(self, target: Target, previous: DeviceState) -> None:
        """``target`` went from ``previous`` to its state, or (the same
        state) only its outcome or its failures in a row changed."""
        device_id, state = target.record.id, target.state
        if previous is not state:
            self._by_state[previous].remove(device_id)
            self._by_state[state].add(device_id)
        if state is _FAILING or state is _AUTH_FAILED:
            self._rank(device_id, target.consecutive_failures)
        elif previous is _FAILING or previous is _AUTH_FAILED:
            self._unrank(device_id)

    def _rank(self, device_id: int, failures: int) -> None:
        """File, or re-file, a failing device: O(log n + chunk)."""
        key = rank_key(failures, device_id)
        keys = self._rank_keys
        old = keys.get(device_id)
        if old != key:
            if old is not None:
                self._ranked.remove(old)
            self._ranked.add(key)
            keys[device_id] = key

    def _unrank(self, device_id: int) -> None:
        key = self._rank_keys.pop(device_id, None)
        if key is not None:
            self._ranked.remove(key)

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

    def most_failing(self, limit: int) -> list[int]:
        """Ids of the failing and auth_failed devices with the most failures
        in a row, most first (ties: lower id first), at most ``limit``:
        O(limit), whatever the number failing."""
        keys = self._ranked.first(limit)
        self.visited += len(keys)
        mask = _ID_MASK
        return [key & mask for key in keys]
