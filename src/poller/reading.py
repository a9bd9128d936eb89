"""The reading record: what one completed poll of one device produces.

A reading is a tuple in :class:`Reading`'s field order. The loops make an
exact tuple (:data:`PlainReading`), one object per poll, which goes to the
sink and stays as the device's latest; the Postgres loader hands it to
``COPY`` with a single conversion pass. :class:`Reading` names the fields for
code off the hot path (segments read back, tests). Timestamps are Unix
seconds (floats) until the loader converts them.
"""

from __future__ import annotations

from typing import Final, NamedTuple


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
"""A :class:`Reading`'s fields in an exact tuple, as the loops make them. A
reading outlives its poll (in the ingest buffer until flushed, as the
device's latest for an interval): the cyclic collector untracks an exact
tuple of numbers and strings at its first pass, never a subclass, so readings
held this way are not walked by every full collection. A :class:`Reading` is
a :data:`PlainReading` too."""

TICK_AT: Final = 1
"""Index of ``tick_at`` in a reading."""
RECEIVED_AT: Final = 3
"""Index of ``received_at`` in a reading."""


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
