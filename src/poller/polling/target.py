"""A device as the poller knows it: identity, health and counters.

Targets are what the API and the live-state writer read. Only the device's
own loop writes to its target.
"""

from __future__ import annotations

import enum
from typing import Any

from poller.polling.stats import OUTCOMES
from poller.reading import PlainReading
from poller.registry import DeviceRecord


class DeviceState(enum.Enum):
    PENDING = "pending"
    """Registered, not polled yet."""
    OK = "ok"
    """The last poll gave a reading."""
    FAILING = "failing"
    """Network or device failures; polled with exponential back-off."""
    AUTH_FAILED = "auth_failed"
    """Credentials rejected; polled rarely until they change."""
    STOPPED = "stopped"


class Target:
    __slots__ = (
        "consecutive_failures",
        "counted",
        "dirty",
        "failures",
        "first_reading_at",
        "last_error",
        "last_outcome",
        "last_poll_at",
        "last_reading_at",
        "latest",
        "readings",
        "record",
        "skipped_ticks",
        "state",
        "state_changed",
    )

    def __init__(self, record: DeviceRecord) -> None:
        self.record = record
        self.state = DeviceState.PENDING
        self.last_outcome: str | None = None
        self.last_error: str | None = None
        self.consecutive_failures = 0
        self.failures: list[int] | None = None
        """Failed polls by outcome index (OUTCOMES order; ok stays 0), and the
        flaws of kept readings (a field out of bounds, failed totals), made at
        the first of them: a healthy device carries no list (144 B saved)."""
        self.readings = 0
        self.skipped_ticks = 0
        self.first_reading_at: float | None = None
        self.last_reading_at: float | None = None
        self.last_poll_at: float | None = None
        self.latest: PlainReading | None = None
        """The last reading kept, as a plain tuple (see loop.py ``_keep``)."""
        self.dirty = False
        self.state_changed = True
        """Set on each state change; the live-state writer clears it."""
        self.counted = False
        """The counters include what Redis had for this device (the
        live-state writer reads it once, before the device's first write)."""

    def count_failure(self, index: int, n: int = 1) -> None:
        counts = self.failures
        if counts is None:
            counts = self.failures = [0] * len(OUTCOMES)
        counts[index] += n

    @property
    def cloud_id(self) -> str:
        return self.record.cloud_id

    def inherit(self, old: Target) -> None:
        """Keep the counters of the loop this one replaces (state starts afresh)."""
        self.failures = old.failures
        self.readings = old.readings
        self.skipped_ticks = old.skipped_ticks
        self.first_reading_at = old.first_reading_at
        self.last_reading_at = old.last_reading_at
        self.latest = old.latest
        self.counted = old.counted

    def snapshot(self) -> dict[str, Any]:
        return {
            "cloud_id": self.record.cloud_id,
            "state": self.state.value,
            "last_outcome": self.last_outcome,
            "last_error": self.last_error,
            "consecutive_failures": self.consecutive_failures,
            "total_events_logged": self.readings,
            "first_timestamp": self.first_reading_at,
            "last_timestamp": self.last_reading_at,
            "last_poll_at": self.last_poll_at,
            "skipped_ticks": self.skipped_ticks,
            "failures": {} if self.failures is None else {
                o.value: n for o, n in zip(OUTCOMES, self.failures, strict=True) if n},
        }
