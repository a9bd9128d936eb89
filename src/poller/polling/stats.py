"""Cheap fleet statistics for the hot path: outcome counters and a log histogram.

``prometheus_client`` takes a lock per observation; at 16k polls/s that is
measurable, so the loops count into plain lists and the metrics endpoint
reads them when scraped.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left
from collections import deque

from poller.drivers.base import Outcome

OUTCOMES: tuple[Outcome, ...] = tuple(Outcome)
OUTCOME_INDEX: dict[Outcome, int] = {o: i for i, o in enumerate(OUTCOMES)}
OK_INDEX = OUTCOME_INDEX[Outcome.OK]

_GROWTH = 1.04
_LOG_GROWTH = math.log(_GROWTH)
_MIN_S = 1e-5  # 10 µs: anything below counts as on time
_BUCKETS = 600  # up to 10 µs * 1.04^600 ~ 170 000 s
_BOUNDS = tuple(_MIN_S * _GROWTH**i for i in range(_BUCKETS))
"""Upper bound of each bucket but the last, which takes everything above."""


class LogHistogram:
    """Durations in buckets growing by 4 %: quantiles within 4 %, O(1) record."""

    __slots__ = ("count", "counts", "max", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (_BUCKETS + 1)
        self.count = 0
        self.sum = 0.0
        self.max = 0.0

    def record(self, seconds: float) -> None:
        self.count += 1
        self.sum += seconds
        if seconds > self.max:
            self.max = seconds
        # A binary search in C: a third of the cost of computing the log.
        self.counts[bisect_left(_BOUNDS, seconds)] += 1

    def record_ages(self, now: float, times: list[float]) -> None:
        """``record(now - t)`` for each of ``times``, in one call."""
        if not times:
            return
        counts = self.counts
        total = 0.0
        for t in times:
            age = now - t
            total += age
            counts[bisect_left(_BOUNDS, age)] += 1
        self.count += len(times)
        self.sum += total
        oldest = now - min(times)
        if oldest > self.max:
            self.max = oldest

    @staticmethod
    def upper_bound(index: int) -> float:
        return _MIN_S * _GROWTH**index

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding quantile ``q`` (0 when empty)."""
        if self.count == 0:
            return 0.0
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= rank and n:
                return min(self.upper_bound(i), self.max)
        return self.max

    def cumulative(self, bounds: tuple[float, ...]) -> list[int]:
        """Counts at or below each bound, for a Prometheus histogram."""
        out = []
        for b in bounds:
            limit = 0 if b <= _MIN_S else int(math.log(b / _MIN_S) / _LOG_GROWTH)
            out.append(sum(self.counts[: min(limit, _BUCKETS) + 1]))
        return out


class Window:
    """A :class:`LogHistogram` over a trailing span: marks of its bucket
    counts a ``every_s`` apart, and the difference between now and the
    oldest mark within ``span_s``. Marks are arrays (the collector does not
    walk them): at the hour's 60 marks about 290 kB.

    >>> h = LogHistogram(); w = Window(h, span_s=3600.0, every_s=60.0)
    >>> h.record(5.0); w.mark(0.0)                 # an old, slow poll
    >>> for i in range(1, 100):
    ...     h.record(0.002); w.mark(i * 60.0)      # then fast ones, a minute apart
    >>> round(w.quantile(1.0, 100 * 60.0), 4), h.quantile(1.0)  # the slow one is out
    (0.0021, 5.0)
    >>> w.span(100 * 60.0)                          # what the quantile covers
    3600.0
    """

    __slots__ = ("_every_s", "_hist", "_marks", "_span_s")

    def __init__(self, hist: LogHistogram, *, span_s: float, every_s: float) -> None:
        self._hist = hist
        self._span_s = span_s
        self._every_s = every_s
        self._marks: deque[tuple[float, array[int]]] = deque()

    def mark(self, now: float) -> None:
        """Note the counts at ``now`` (monotonic seconds), at most every ``every_s``."""
        marks = self._marks
        if marks and now - marks[-1][0] < self._every_s:
            return
        marks.append((now, array("q", self._hist.counts)))
        while len(marks) > 1 and now - marks[1][0] >= self._span_s:
            marks.popleft()

    def _base(self, now: float) -> tuple[float, array[int]] | None:
        for at, counts in self._marks:  # oldest first: the first one inside the span
            if now - at <= self._span_s:
                return at, counts
        return None

    def span(self, now: float) -> float:
        """Seconds the window covers at ``now`` (less than ``span_s`` early on)."""
        base = self._base(now)
        return 0.0 if base is None else now - base[0]

    def quantile(self, q: float, now: float) -> float:
        """Quantile ``q`` of what was recorded in the span (0 when nothing was)."""
        base = self._base(now)
        if base is None:
            return self._hist.quantile(q)
        counts = [n - b for n, b in zip(self._hist.counts, base[1], strict=True)]
        total = sum(counts)
        if total == 0:
            return 0.0
        rank = q * total
        seen = 0
        for i, n in enumerate(counts):
            seen += n
            if seen >= rank and n:
                return min(LogHistogram.upper_bound(i), self._hist.max)
        return self._hist.max


class FleetStats:
    """Totals across all devices; per-device counts live on each Target."""

    __slots__ = ("backpressure_skips", "by_driver", "clock_steps", "lateness", "polls_started",
                 "shed_ticks", "skipped_ticks", "tick_conflicts")

    def __init__(self) -> None:
        self.by_driver: dict[str, list[int]] = {}
        self.lateness = LogHistogram()
        self.polls_started = 0
        self.skipped_ticks = 0
        """Ticks passed over: the previous poll overran them, or nothing was
        sent for want of a connection in time (see also ``shed_ticks``)."""
        self.shed_ticks = 0
        """Ticks not polled because they came due too late (overload: the
        poller could not start them within ``polling.shed_after_s``)."""
        self.backpressure_skips = 0
        self.clock_steps = 0
        """Wall-clock steps the pool re-anchored the schedule after."""
        self.tick_conflicts = 0
        """Ticks not polled after a backward wall-clock step because a reading
        of the same device and tick exists already (or the tick was passed)."""

    def driver_outcomes(self, driver: str) -> list[int]:
        """The counter list loops of ``driver`` count into (index: OUTCOMES)."""
        counts = self.by_driver.get(driver)
        if counts is None:
            counts = self.by_driver[driver] = [0] * len(OUTCOMES)
        return counts

    @property
    def outcomes(self) -> list[int]:
        totals = [0] * len(OUTCOMES)
        for counts in self.by_driver.values():
            for i, n in enumerate(counts):
                totals[i] += n
        return totals

    def outcome_counts(self) -> dict[str, int]:
        totals = self.outcomes
        return {o.value: totals[i] for i, o in enumerate(OUTCOMES)}

    def driver_outcome_counts(self) -> dict[tuple[str, str], int]:
        return {(driver, o.value): counts[i] for driver, counts in self.by_driver.items()
                for i, o in enumerate(OUTCOMES)}
