"""The simulated fleet: device identities, credentials and meter values.

Device ``i`` (0-based) has cloud id ``f"{id_offset + i:06x}"``; with the
default offset ``0xf00000`` that is ``f00000``, ``f00001``, ... (``f{i:05x}``).
Its email is ``dev{i}@sim.invalid`` and its password, which is also its local
install code, is 16 hex digits of HMAC-SHA256(seed, cloud id): see
:func:`credentials_for`, which the CLI uses to register the fleet.

Devices are created on their first request, and their values advance only
when asked (no timers), so a fleet of 100,000 costs nothing while idle.
Demand is a bounded random walk in whole watts; some devices (a seeded
``negative_fraction``) range below zero as if exporting solar power. The meter
totals integrate the demand between requests: positive demand feeds
"delivered", negative demand feeds "received", so both only grow.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math

DEFAULT_ID_OFFSET = 0xF00000
_ID_SPACE = 0x1000000  # six hex digits
_M64 = (1 << 64) - 1
_SLOPE = 2.0**-53

# Walk bounds and step, watts. A 6 s poll moves demand by at most _STEP_W.
_CONSUMER_RANGE_W = (120.0, 9000.0)
_PROSUMER_RANGE_W = (-6000.0, 7000.0)
_STEP_W = 400.0
_STEP_PERIOD_S = 6.0


def cloud_id_for(index: int, id_offset: int = DEFAULT_ID_OFFSET) -> str:
    """Cloud id of device ``index``: six lowercase hex digits.

    >>> cloud_id_for(1)
    'f00001'
    """
    value = id_offset + index
    if not 0 <= value < _ID_SPACE:
        raise ValueError(f"device {index} with offset {id_offset:#x} leaves the 6-digit id space")
    return f"{value:06x}"


def credentials_for(
    cloud_id: str, seed: int, id_offset: int = DEFAULT_ID_OFFSET
) -> tuple[str, str]:
    """``(email, password)`` of a simulated device; the password is also its
    EAGLE-200 install code.

    >>> credentials_for("f00002", seed=7)[0]
    'dev2@sim.invalid'
    """
    index = int(cloud_id, 16) - id_offset
    digest = hmac.new(str(seed).encode(), cloud_id.lower().encode(), hashlib.sha256)
    return f"dev{index}@sim.invalid", digest.hexdigest()[:16]


def _mix(value: int) -> int:
    """splitmix64 finaliser: a well-spread 64-bit hash of ``value``."""
    z = value & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


class Device:
    """One simulated gateway and its meter."""

    __slots__ = (
        "basic_auth",
        "cloud_id",
        "delivered_wh",
        "demand_w",
        "device_mac",
        "high_w",
        "http10",
        "index",
        "low_w",
        "meter_mac",
        "password_b",
        "received_wh",
        "rng",
        "t_last",
        "user_b",
        "wide_negative",
    )

    def __init__(
        self, index: int, cloud_id: str, seed: int, id_offset: int, now: float,
        negative: bool, http10: bool,
    ) -> None:
        self.index = index
        self.cloud_id = cloud_id
        email, password = credentials_for(cloud_id, seed, id_offset)
        self.user_b = email.encode()
        self.password_b = password.encode()
        token = base64.b64encode(f"{cloud_id}:{password}".encode())
        self.basic_auth = b"Basic " + token
        self.device_mac = f"0xd8d5b90000{cloud_id}"
        self.meter_mac = f"0x0007810000{cloud_id}"
        self.http10 = http10
        self.rng = _mix(seed * 0x9E3779B97F4A7C15 + index)
        self.low_w, self.high_w = _PROSUMER_RANGE_W if negative else _CONSUMER_RANGE_W
        # Negative demand is sent as 32-bit two's complement on even devices
        # and 24-bit on odd ones: real meters do both.
        self.wide_negative = index % 2 == 0
        self.demand_w = self.low_w + (self.high_w - self.low_w) * self.uniform()
        self.delivered_wh = 1_000_000.0 + 40_000_000.0 * self.uniform()
        self.received_wh = 2_000_000.0 * self.uniform() if negative else 0.0
        self.t_last = now

    def uniform(self) -> float:
        """Next value in [0, 1) from this device's own random stream."""
        self.rng = (self.rng + 0x9E3779B97F4A7C15) & _M64
        return (_mix(self.rng) >> 11) * _SLOPE

    def advance(self, now: float) -> int:
        """Move the meter to ``now`` and return the demand in whole watts."""
        dt = now - self.t_last
        if dt > 0.0:
            demand = self.demand_w
            if demand >= 0.0:
                self.delivered_wh += demand * dt / 3600.0
            else:
                self.received_wh -= demand * dt / 3600.0
            scale = min(math.sqrt(dt / _STEP_PERIOD_S), 4.0)
            demand += (self.uniform() * 2.0 - 1.0) * _STEP_W * scale
            # Reflect at the bounds so the walk stays inside them.
            if demand > self.high_w:
                demand = max(self.low_w, 2.0 * self.high_w - demand)
            elif demand < self.low_w:
                demand = min(self.high_w, 2.0 * self.low_w - demand)
            self.demand_w = demand
            self.t_last = now
        return round(self.demand_w)


class Fleet:
    """Lazily built devices of one simulator, looked up by cloud id."""

    __slots__ = (
        "_devices",
        "http10_fraction",
        "id_offset",
        "negative_fraction",
        "seed",
        "size",
    )

    def __init__(
        self, size: int, id_offset: int, seed: int, negative_fraction: float,
        http10_fraction: float,
    ) -> None:
        if size < 1:
            raise ValueError("a fleet needs at least one device")
        cloud_id_for(size - 1, id_offset)  # validates the id range
        self.size = size
        self.id_offset = id_offset
        self.seed = seed
        self.negative_fraction = negative_fraction
        self.http10_fraction = http10_fraction
        self._devices: dict[str, Device] = {}

    def __len__(self) -> int:
        return len(self._devices)

    def get(self, cloud_id: str, now: float) -> Device | None:
        """The device with ``cloud_id``, or None if the fleet has none."""
        device = self._devices.get(cloud_id)
        if device is not None:
            return device
        if len(cloud_id) != 6:
            return None
        try:
            index = int(cloud_id, 16) - self.id_offset
        except ValueError:
            return None
        if not 0 <= index < self.size or cloud_id != f"{self.id_offset + index:06x}":
            return None
        # Two independent seeded draws decide the device's traits, so they
        # do not change with the order in which devices are first asked.
        negative = self._trait(index, 1) < self.negative_fraction
        http10 = self._trait(index, 2) < self.http10_fraction
        device = Device(index, cloud_id, self.seed, self.id_offset, now, negative, http10)
        self._devices[cloud_id] = device
        return device

    def _trait(self, index: int, salt: int) -> float:
        return (_mix(self.seed * 0x632BE59BD9B4E019 + index * 8 + salt) >> 11) * _SLOPE
