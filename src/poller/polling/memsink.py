"""An in-process reading sink: keeps readings in a list (tests, simulations)."""

from __future__ import annotations

from poller.reading import Reading


class MemorySink:
    __slots__ = ("accepting", "failures", "readings")

    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self.failures: list[tuple[int, float, int, float]] = []
        """``(device_id, tick_at, outcome index, failed_at)`` of failed polls."""
        self.accepting = True

    def accept(self, reading: Reading) -> None:
        self.readings.append(reading)

    def record_failure(self, device_id: int, tick_at: float, outcome: int,
                       failed_at: float) -> None:
        self.failures.append((device_id, tick_at, outcome, failed_at))
