"""An in-process reading sink: keeps readings in a list (tests, simulations)."""

from __future__ import annotations

from poller.reading import Reading


class MemorySink:
    __slots__ = ("accepting", "readings")

    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self.accepting = True

    def accept(self, reading: Reading) -> None:
        self.readings.append(reading)
