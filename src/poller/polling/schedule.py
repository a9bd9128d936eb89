"""Tick arithmetic: stable phases pinned to wall-clock time.

Device ``d`` with interval ``T`` polls at wall times ``phase(d) + k*T`` for
whole ``k``. The phase comes from a hash of the device id mixed with a
per-instance seed, so a fleet spreads evenly over the interval and keeps its
phase across restarts.

    >>> p = phase("00ce69", "seed", 6.0)
    >>> 0.0 <= p < 6.0 and p == phase("00ce69", "seed", 6.0)
    True
    >>> next_tick_index(100.0, 6.0, 1.0)    # ticks at 1, 7, ..., 97, 103
    17
"""

from __future__ import annotations

import hashlib
import math


def phase(cloud_id: str, seed: str, interval_s: float) -> float:
    digest = hashlib.blake2b(f"{seed}\x00{cloud_id}".encode(), digest_size=8).digest()
    fraction = int.from_bytes(digest, "big") / 2.0**64
    return fraction * interval_s


def next_tick_index(now_wall: float, interval_s: float, phase_s: float) -> int:
    """Index of the first tick strictly after ``now_wall``."""
    return math.floor((now_wall - phase_s) / interval_s) + 1


def first_tick_at_or_after(when_wall: float, interval_s: float, phase_s: float) -> int:
    return math.ceil((when_wall - phase_s) / interval_s)


def tick_time(index: int, interval_s: float, phase_s: float) -> float:
    """Wall time of tick ``index``, rounded to the microsecond that Postgres keeps,
    so the same tick always maps to the same stored ``tick_at``. (Integer
    rounding of the microseconds: a fifth of the cost of ``round(x, 6)``,
    which formats digits.)"""
    return round((index * interval_s + phase_s) * 1e6) / 1e6
