"""What a reading may hold: the bounds every driver's Sample is checked against.

A device can answer anything: a TimeStamp of 0xffffffffffffffff, a time in
microseconds where seconds were due, NaN, 1e308, a negative meter total. Such
a value cannot be stored as it is (Postgres and the binary COPY encoder refuse
a timestamp millions of years away) and means nothing anyway, so the field is
stored as null, the rest of the reading is kept, and the poll is counted under
the outcome that names why (besides OK: a reading was stored).

The check runs once per poll for every driver, in the polling loop, which
alone knows the poll time. On the good path it is a few float comparisons and
allocates nothing; a NaN fails every comparison, so "finite" costs nothing
extra there.

>>> bounds = SampleBounds(device_time_max_behind_s=86400, device_time_max_ahead_s=3600,
...                       max_demand_w=1e6, max_total_wh=1e12, max_price=1e6)
>>> bounds.check(Sample(1_700_000_000.0, 512.0, 1e6, 0.0, 0.12), 1_700_000_006.0) is None
True
>>> flawed = bounds.check(Sample(1.7e15, float("nan"), -5.0, 0.0, None), 1_700_000_006.0)
>>> flawed.sample
Sample(device_at=None, demand_w=None, delivered_wh=None, received_wh=0.0, price=None)
>>> [o.value for o in flawed.outcomes]
['device_time_out_of_range', 'value_not_finite', 'value_out_of_range']
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

from poller.drivers.base import Outcome, Sample

if TYPE_CHECKING:
    from poller.config import PollingSettings

MAX_MESSAGE_CHARS = 200
_FIELDS = Sample._fields


class Flawed(NamedTuple):
    """A Sample with its out-of-bounds fields set to None, and why."""

    sample: Sample
    outcomes: tuple[Outcome, ...]
    """Each reason once, in field order."""
    message: str
    """Which fields, what they held, the bound: for the device's last error."""


class SampleBounds:
    """The configured limits (``polling.device_time_max_*_s``, ``max_*``)."""

    __slots__ = ("_ahead_s", "_behind_s", "_max_demand_w", "_max_price", "_max_total_wh")

    def __init__(self, *, device_time_max_behind_s: float, device_time_max_ahead_s: float,
                 max_demand_w: float, max_total_wh: float, max_price: float) -> None:
        limits = {"device_time_max_behind_s": device_time_max_behind_s,
                  "device_time_max_ahead_s": device_time_max_ahead_s,
                  "max_demand_w": max_demand_w, "max_total_wh": max_total_wh,
                  "max_price": max_price}
        for name, value in limits.items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        self._behind_s = float(device_time_max_behind_s)
        self._ahead_s = float(device_time_max_ahead_s)
        self._max_demand_w = float(max_demand_w)
        self._max_total_wh = float(max_total_wh)
        self._max_price = float(max_price)

    @classmethod
    def from_settings(cls, settings: PollingSettings) -> SampleBounds:
        return cls(device_time_max_behind_s=settings.device_time_max_behind_s,
                   device_time_max_ahead_s=settings.device_time_max_ahead_s,
                   max_demand_w=settings.max_demand_w, max_total_wh=settings.max_total_wh,
                   max_price=settings.max_price)

    def check(self, sample: Sample, poll_at: float) -> Flawed | None:
        """None when every field of ``sample`` is within bounds (or None) for a
        poll at ``poll_at`` (Unix seconds); otherwise the sample cleaned."""
        device_at, demand, delivered, received, price = sample
        # Written so that NaN, which fails every comparison, lands outside.
        if (device_at is None or poll_at - self._behind_s <= device_at <= poll_at + self._ahead_s) \
                and (demand is None or -self._max_demand_w <= demand <= self._max_demand_w) \
                and (delivered is None or 0.0 <= delivered <= self._max_total_wh) \
                and (received is None or 0.0 <= received <= self._max_total_wh) \
                and (price is None or -self._max_price <= price <= self._max_price):
            return None
        return self._flawed(sample, poll_at)

    def _flawed(self, sample: Sample, poll_at: float) -> Flawed:
        values: list[float | None] = list(sample)
        outcomes: list[Outcome] = []
        notes: list[str] = []
        for i, value in enumerate(values):
            if value is None:
                continue
            why = self._why(i, value, poll_at)
            if why is None:
                continue
            outcome, note = why
            values[i] = None
            if outcome not in outcomes:
                outcomes.append(outcome)
            notes.append(f"{_FIELDS[i]} {value:.6g} {note}")
        message = "stored as null: " + "; ".join(notes)
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 3] + "..."
        return Flawed(Sample(*values), tuple(outcomes), message)

    def _why(self, i: int, value: float, poll_at: float) -> tuple[Outcome, str] | None:
        if i == 0:
            if poll_at - self._behind_s <= value <= poll_at + self._ahead_s:
                return None
            return (Outcome.DEVICE_TIME_OUT_OF_RANGE,
                    f"not within -{self._behind_s:g}/+{self._ahead_s:g} s of the poll")
        if not math.isfinite(value):
            return Outcome.VALUE_NOT_FINITE, "not finite"
        if i == 1:
            limit, low = self._max_demand_w, -self._max_demand_w
        elif i == 4:
            limit, low = self._max_price, -self._max_price
        else:
            limit, low = self._max_total_wh, 0.0
        if low <= value <= limit:
            return None
        return Outcome.VALUE_OUT_OF_RANGE, f"outside {low:g}..{limit:g}"
