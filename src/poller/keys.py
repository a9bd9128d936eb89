"""Redis key names, in one place.

Live state is kept in a few large hashes keyed by cloud id rather than a key
per device: one ``HSET`` per flush carries every changed device, so writing
the state of 16k polls per second costs a handful of round trips.
"""

from __future__ import annotations

PREFIX = "poller:"
LATEST = PREFIX + "latest"
"""Hash: cloud id -> JSON of the device's latest reading."""
STATE = PREFIX + "state"
"""Hash: cloud id -> JSON of the device's status and counters
(``total_events_logged``, ``first_timestamp``, ``last_timestamp``, last outcome
and error, consecutive failures, failure counts by outcome)."""


def failures(cloud_id: str) -> str:
    """Hash: outcome -> count of failed polls of one device."""
    return f"{PREFIX}failures:{cloud_id}"


def cluster(name: str, part: str) -> str:
    """A key of cluster ``name`` (``poller.cluster``): ``members``, a sorted
    set of member id -> lease expiry (ms, the store's clock); ``info``, a hash
    of member id -> JSON status; ``seen``, a hash of member id -> its last
    heartbeat (ms), kept after its lease ends so that a missing member shows."""
    return f"{PREFIX}cluster:{name}:{part}"
