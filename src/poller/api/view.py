"""What the HTTP API and the metrics see of the running service.

The service implements :class:`ServiceView`; the API depends on nothing else
of it, so it can be started against any running service object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg
import redis.asyncio as aioredis

from poller.config import Settings
from poller.polling.stats import LogHistogram
from poller.sealing import SecretBox


@dataclass(frozen=True, slots=True)
class FleetSnapshot:
    """Fleet-wide numbers at one instant."""

    instance_id: str
    started_at: float
    """Unix seconds."""
    devices: int
    devices_by_state: dict[str, int]
    polls_by_outcome: dict[str, int]
    """Totals since start, by outcome label (ok, timeout, ...)."""
    polls_by_driver_outcome: dict[tuple[str, str], int]
    polls_per_s: dict[str, float]
    """Rates by outcome over the last minute (or since start if shorter)."""
    expected_polls_per_s: float
    """Sum over enabled devices of 1 / interval."""
    lateness_p50_s: float
    lateness_p99_s: float
    lateness_max_s: float
    skipped_ticks: int
    backpressure_skips: int
    in_flight: int
    buffer_rows: int
    rows_committed: int
    copy_batches: int
    ingest_lag_s: float
    """Age of the oldest reading not yet committed to Postgres (0: none)."""
    spool_bytes: int
    segments_pending_upload: int
    upload_failures: int
    upload_lag_s: float
    """Age of the oldest closed segment not yet on S3 (0: none)."""
    disk_used_fraction: float
    disk_warning: bool
    postgres_up: bool
    redis_up: bool
    s3_up: bool
    polling: bool
    extra: dict[str, Any] = field(default_factory=dict)


class ServiceView(Protocol):
    settings: Settings
    box: SecretBox

    @property
    def db(self) -> asyncpg.Pool:
        """The service's Postgres pool (registry writes, readings queries)."""
        ...

    @property
    def redis(self) -> aioredis.Redis | None:
        """The live-state Redis client; None if not started."""
        ...

    def fleet(self) -> FleetSnapshot: ...

    def lateness(self) -> LogHistogram:
        """Lateness of every poll since start (actual minus scheduled send)."""
        ...

    def copy_latency(self) -> LogHistogram:
        """Seconds per COPY batch."""
        ...

    def commit_latency(self) -> LogHistogram:
        """Poll-to-committed seconds, per reading."""
        ...

    def device_status(self, cloud_id: str) -> dict[str, Any] | None:
        """In-memory status of a polled device (Target.snapshot()), or None."""
        ...

    def loop_responsive(self) -> bool:
        """The event loop answered its last heartbeat in time."""
        ...
