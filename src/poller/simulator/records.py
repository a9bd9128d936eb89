"""What the simulator remembers about the traffic it saw.

- Poll arrivals: the wall time of each demand request (cloud
  ``get_instantaneous_demand``, local ``device_query``), the last
  ``arrivals_kept`` per device in a fixed ring.
- Jitter: with an expected poll interval, ``|interval - expected|`` of every
  pair of consecutive arrivals of a device goes into a 1 ms histogram.
- Served readings (when enabled): each demand or totals answer written with
  HTTP 200 and a complete, well-formed body.
"""

from __future__ import annotations

from array import array
from typing import NamedTuple

_BIN_S = 0.001
_BINS = 10_001  # 0 .. 10 s in 1 ms bins; the last bin holds everything above


class ServedReading(NamedTuple):
    """A reading as the device served it.

    Demand answers carry ``demand_w``; the cloud's ``get_current_summation``
    answers carry only the totals (``demand_w`` is None); a local
    ``device_query`` carries what its components asked for.
    """

    cloud_id: str
    device_at: int
    """The device's timestamp, Unix seconds."""
    demand_w: float | None
    delivered_wh: float | None
    received_wh: float | None


class _Ring:
    __slots__ = ("count", "last", "times")

    def __init__(self, size: int) -> None:
        self.times = array("d", bytes(8 * size))
        self.count = 0
        self.last = 0.0
        """The latest of ``times`` (read per arrival, the ring only when asked)."""


class Records:
    """Arrival rings, the jitter histogram and the served-readings log."""

    __slots__ = (
        "_bins",
        "_by_index",
        "_rings",
        "_served",
        "arrivals_kept",
        "expected_interval_s",
        "intervals",
        "jitter_max_s",
        "late_intervals",
        "polls",
        "record_served",
    )

    def __init__(
        self, expected_interval_s: float | None, arrivals_kept: int, record_served: bool
    ) -> None:
        if arrivals_kept < 2:
            raise ValueError("arrivals_kept must be at least 2 to measure intervals")
        self.expected_interval_s = expected_interval_s
        self.arrivals_kept = arrivals_kept
        self.record_served = record_served
        self._rings: dict[str, _Ring] = {}
        # The same rings by device index: a list index per arrival rather
        # than a lookup in a dict as big as the fleet, which missed the
        # caches (7 % of the simulator's CPU at 20,000 devices).
        self._by_index: list[_Ring | None] = []
        self._served: list[ServedReading] = []
        self._bins = [0] * _BINS
        self.polls = 0
        self.intervals = 0
        self.late_intervals = 0
        self.jitter_max_s = 0.0

    def reset(self) -> None:
        self._rings.clear()
        self._by_index.clear()
        self._served = []
        self._bins = [0] * _BINS
        self.polls = self.intervals = self.late_intervals = 0
        self.jitter_max_s = 0.0

    def arrival(self, index: int, cloud_id: str, now: float) -> None:
        """A poll of device number ``index``, ``cloud_id``, arrived at ``now``."""
        by_index = self._by_index
        if index >= len(by_index):
            by_index.extend([None] * (index + 1 - len(by_index)))
        ring = by_index[index]
        if ring is None:
            ring = by_index[index] = self._rings[cloud_id] = _Ring(self.arrivals_kept)
        size = self.arrivals_kept
        count = ring.count
        expected = self.expected_interval_s
        if count and expected is not None:
            interval = now - ring.last
            jitter = abs(interval - expected)
            self._bins[min(int(jitter / _BIN_S), _BINS - 1)] += 1
            self.intervals += 1
            if jitter > self.jitter_max_s:
                self.jitter_max_s = jitter
            if interval > 1.5 * expected:
                self.late_intervals += 1
        ring.times[count % size] = now
        ring.last = now
        ring.count = count + 1
        self.polls += 1

    def add_served(self, reading: ServedReading) -> None:
        self._served.append(reading)

    def served(self, offset: int = 0) -> list[ServedReading]:
        """Served readings in the order written, from position ``offset``."""
        return self._served[offset:]

    def arrivals(self, cloud_id: str) -> list[float]:
        """The kept poll arrival times of one device, oldest first."""
        ring = self._rings.get(cloud_id)
        if ring is None:
            return []
        size = self.arrivals_kept
        first = max(0, ring.count - size)
        return [ring.times[i % size] for i in range(first, ring.count)]

    def polls_of(self, cloud_id: str) -> int:
        ring = self._rings.get(cloud_id)
        return 0 if ring is None else ring.count

    def jitter_report(self) -> dict[str, object]:
        counts = [ring.count for ring in self._rings.values()]
        return {
            "expected_interval_s": self.expected_interval_s,
            "polls": self.polls,
            "devices": len(counts),
            "polls_per_device_min": min(counts, default=0),
            "polls_per_device_max": max(counts, default=0),
            "intervals": self.intervals,
            "late_intervals": self.late_intervals,
            "jitter_p50_s": self._quantile(0.50),
            "jitter_p99_s": self._quantile(0.99),
            "jitter_max_s": self.jitter_max_s,
        }

    def _quantile(self, q: float) -> float | None:
        """Upper edge of the 1 ms bin holding quantile ``q`` (None when empty)."""
        if not self.intervals:
            return None
        rank = q * self.intervals
        seen = 0
        for i, n in enumerate(self._bins):
            seen += n
            if seen >= rank and n:
                return min((i + 1) * _BIN_S, self.jitter_max_s)
        return self.jitter_max_s
