"""What the HTTP API and the metrics see of the running service.

The service's :class:`poller.fleetview.FleetView` implements
:class:`ServiceView`; the API depends on nothing else of the service, so it
can be started against any object that does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import redis.asyncio as aioredis

from poller.config import Settings
from poller.db import ConnectionSource
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
    """p50, p99 and max since start."""
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
    clock_steps: int = 0
    """Wall-clock steps the polling schedule was re-anchored after."""
    lateness_window_p50_s: float = 0.0
    lateness_window_p99_s: float = 0.0
    lateness_window_s: float = 0.0
    """The span the two above cover: the last hour (less, early on)."""
    tick_conflicts: int = 0
    """Ticks not polled after a backward step: a reading of that device and
    tick exists already."""
    task_restarts: dict[str, int] = field(default_factory=dict)
    """Restarts of each background task after a failure, since start."""
    rows_quarantined: int = 0
    """Spool lines the loader put in ``readings_quarantine``, since start."""
    spool_ceiling_bytes: int = 0
    """What the spool may hold now (``ingest.spool_max_bytes``/``_percent``)."""
    spool_full: bool = False
    """The spool refused the last batch for want of room."""
    spool_errors: int = 0
    """Spool file operations that failed (ENOSPC, EIO, EROFS, ...), since start."""
    segments_evicted: int = 0
    """Segments removed from the spool, verified in S3, before Postgres loaded them."""
    segments_awaiting_archive_load: int = 0
    """Evicted segments Postgres has not loaded from S3 yet."""
    rows_loaded_from_archive: int = 0
    """Readings loaded from S3 (evicted segments), since start."""
    segments_unarchived: int = 0
    """Segments deleted at the ceiling with S3 failing: in Postgres, not archived."""
    shed_ticks: int = 0
    """Ticks not polled because they came due too late (overload), since start."""
    connections_open: int = 0
    """Open device connections of the fast transport (eagle drivers)."""
    connections_opened: int = 0
    """Device connections opened since start."""
    connects_deferred: int = 0
    """Connects put off by ``polling.max_connects_per_s``, since start."""
    timeouts_kept: int = 0
    """Connections kept open after a missed deadline to read the late answer."""
    requests_refused: int = 0
    """Requests turned away at once, every connection busy and the queue full."""
    extra: dict[str, Any] = field(default_factory=dict)


class MetricsView(Protocol):
    """What /metrics reads of the service, at scrape time."""

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

    def loop_responsive(self) -> bool:
        """The event loop answered its last heartbeat in time."""
        ...


class ServiceView(MetricsView, Protocol):
    settings: Settings
    box: SecretBox

    @property
    def db(self) -> ConnectionSource:
        """The API's own Postgres pool (registry writes, listings, readings,
        readiness), small and with a statement timeout, so the loader never
        waits behind a request."""
        ...

    @property
    def redis(self) -> aioredis.Redis | None:
        """The live-state Redis client; None if not started."""
        ...

    def device_status(self, cloud_id: str) -> dict[str, Any] | None:
        """In-memory status of a polled device (Target.snapshot()), or None. O(1)."""
        ...

    def has_status(self, device_id: int) -> bool:
        """The device is in the polling pool (``device_status`` is not None). O(1)."""
        ...

    def device_ids_in_state(self, state: str, after_id: int, limit: int) -> list[int]:
        """Ids of the pool's devices in ``state`` (a DeviceState value) above
        ``after_id``, ascending, at most ``limit``: O(log n + limit)."""
        ...

    def most_failing(self, limit: int) -> list[int]:
        """Ids of the pool's failing and auth_failed devices with the most
        failures in a row, most first (ties: lower id first), at most
        ``limit``; every such device is ranked. O(limit): the pool keeps
        the ranking as devices fail, never sorts per request."""
        ...
