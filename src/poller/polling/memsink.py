"""In-process reading sinks: keep readings in a list (tests, simulations)."""

from __future__ import annotations

from poller.reading import PlainReading, Reading


class MemorySink:
    """Keeps every reading as a :class:`Reading`, for code that reads fields
    by name, and every failed poll."""

    __slots__ = ("accepting", "failures", "readings")

    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self.failures: list[tuple[int, float, int, float]] = []
        """``(device_id, tick_at, outcome index, failed_at)`` of failed polls."""
        self.accepting = True

    def accept(self, reading: PlainReading) -> None:
        self.readings.append(Reading._make(reading))

    def record_failure(self, device_id: int, tick_at: float, outcome: int,
                       failed_at: float) -> None:
        self.failures.append((device_id, tick_at, outcome, failed_at))


class PlainSink:
    """Keeps readings as the loops made them: what a benchmark of the loops
    should pay for storing one, and no more."""

    __slots__ = ("accepting", "readings")

    def __init__(self) -> None:
        self.readings: list[PlainReading] = []
        self.accepting = True

    def accept(self, reading: PlainReading) -> None:
        self.readings.append(reading)
