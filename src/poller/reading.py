"""The reading record: what one completed poll of one device produces.

A reading is a plain tuple so the hot path allocates one object per poll and
the Postgres loader hands it to ``COPY`` with a single conversion pass.
Timestamps are Unix seconds (floats) until the loader converts them.
"""

from __future__ import annotations

from typing import NamedTuple


class Reading(NamedTuple):
    device_id: int
    """Internal device id (``devices.id``)."""
    tick_at: float
    """The scheduled tick this poll belongs to, Unix seconds. With
    ``device_id`` it identifies the reading: a replay of it is a no-op."""
    device_at: float | None
    """The device's own timestamp, Unix seconds, when it reports one."""
    received_at: float
    """When the poller had the complete answer, Unix seconds."""
    demand_w: float | None
    """Instantaneous demand in watts; negative while the home exports."""
    delivered_wh: float | None
    """Meter total delivered to the home (summation delivered), Wh."""
    received_wh: float | None
    """Meter total received from the home (summation received), Wh."""
    price: float | None
    """Current price per kWh in the meter's currency, when reported."""
    cloud_id: str
    """The device's external id; in the archive so it stands on its own.
    Not a ``readings`` column: the loader copies ``reading[:8]``."""


PlainReading = tuple[int, float, float | None, float, float | None, float | None,
                     float | None, float | None, str]
"""A :class:`Reading`'s fields in a plain tuple, for readings held long
(a device's latest): the cyclic collector untracks those, never a subclass."""


# Column order of the ``readings`` table as the loader copies it.
READING_COLUMNS: tuple[str, ...] = (
    "device_id",
    "tick_at",
    "device_at",
    "received_at",
    "demand_w",
    "delivered_wh",
    "received_wh",
    "price",
)
