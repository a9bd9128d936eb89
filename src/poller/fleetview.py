"""What the HTTP API, ``/metrics`` and systemd's STATUS see of a running
service: the fleet and its figures, read from the parts when asked.

:class:`FleetView` implements :class:`poller.api.view.ServiceView`. The
service builds it once its parts exist and hands it to the API; it owns two
small background loops of its own (the rate sampler and the event loop's
heartbeat), which the service runs under its supervisor.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from poller.api.view import FleetSnapshot
from poller.archive.fetch import EvictedSegments
from poller.archive.uploader import Uploader
from poller.clock import Clock, LoopClock
from poller.cluster.membership import Membership
from poller.config import Settings
from poller.db import ConnectionSource
from poller.ingest.livestate import LiveState
from poller.ingest.pipeline import Ingest
from poller.ingest.spool import SpoolError, SpoolUsage
from poller.polling.engine import PollingEngine
from poller.polling.stats import LogHistogram, Window
from poller.polling.target import DeviceState
from poller.retention.job import RetentionJob
from poller.sealing import SecretBox
from poller.tasks import Supervisor

RATE_WINDOW_S = 60.0
LATENESS_WINDOW_S = 3600.0
LATENESS_MARK_S = 60.0
SAMPLE_EVERY_S = 5.0
HEARTBEAT_S = 1.0


class FleetView:
    """The fleet and its figures, for the API (a ``ServiceView``)."""

    def __init__(self, settings: Settings, box: SecretBox, db: ConnectionSource,
                 engine: PollingEngine, ingest: Ingest, uploader: Uploader | None,
                 live: LiveState | None, supervisor: Supervisor, *, started_at: float,
                 postgres_ready: Callable[[], bool] = lambda: True,
                 clock: Clock | None = None, evicted: EvictedSegments | None = None) -> None:
        self.settings = settings
        """The running configuration; the service replaces it on SIGHUP."""
        self.box = box
        self._db = db
        self._engine = engine
        self._ingest = ingest
        self._uploader = uploader
        self._live = live
        self._supervisor = supervisor
        self._postgres_ready = postgres_ready
        self._evicted = evicted
        self.started_at = started_at
        self._clock = clock if clock is not None else LoopClock()
        self.polling = True
        """False from the start of a stop on."""
        self._samples: collections.deque[tuple[float, dict[str, int]]] = collections.deque()
        self._late_hour = Window(engine.pool.stats.lateness, span_s=LATENESS_WINDOW_S,
                                 every_s=LATENESS_MARK_S)
        self._heartbeat_at = self._clock.monotonic()
        self.retention: RetentionJob | None = None
        """The daily retention run (/metrics, /api/archive); set by the service."""
        self.cluster: Membership | None = None
        """This instance's cluster membership (/api/fleet, /metrics); set by the
        service when ``cluster.enabled``."""

    # -- ServiceView ----------------------------------------------------------------

    @property
    def db(self) -> ConnectionSource:
        return self._db

    @property
    def redis(self) -> aioredis.Redis | None:
        return self._live.client if self._live is not None else None

    def lateness(self) -> LogHistogram:
        return self._engine.pool.stats.lateness

    def copy_latency(self) -> LogHistogram:
        return self._ingest.copy_seconds

    def commit_latency(self) -> LogHistogram:
        return self._ingest.commit_latency

    def device_status(self, cloud_id: str) -> dict[str, Any] | None:
        target = self._engine.pool.target_by_cloud_id(cloud_id)
        return None if target is None else target.snapshot()

    def has_status(self, device_id: int) -> bool:
        return self._engine.pool.target(device_id) is not None

    def device_ids_in_state(self, state: str, after_id: int, limit: int) -> list[int]:
        return self._engine.pool.index.page(DeviceState(state), after_id, limit)

    def most_failing(self, limit: int) -> list[int]:
        return self._engine.pool.most_failing(limit)

    def loop_responsive(self) -> bool:
        return self._clock.monotonic() - self._heartbeat_at < 5 * HEARTBEAT_S

    def fleet(self) -> FleetSnapshot:
        pool = self._engine.pool
        ingest = self._ingest
        stats = pool.stats
        totals = stats.outcome_counts()
        now = self._clock.monotonic()
        up = self._uploader.stats() if self._uploader is not None else None
        try:
            usage = ingest.spool.usage()
        except SpoolError:
            usage = SpoolUsage(ingest.spool.pending_bytes, 0, 1.0)
        spool_bytes, disk_used = usage.spool_bytes, usage.disk_used_fraction
        evicted = self._evicted
        http = self._engine.fast.stats()
        return FleetSnapshot(
            instance_id=self.settings.instance_id,
            started_at=self.started_at,
            devices=len(pool.loops) + len(pool.rejected),
            devices_by_state=pool.devices_by_state(),
            polls_by_outcome=totals,
            polls_by_driver_outcome=stats.driver_outcome_counts(),
            polls_per_s=self._rates(totals),
            expected_polls_per_s=pool.expected_polls_per_s(),
            lateness_p50_s=stats.lateness.quantile(0.5),
            lateness_p99_s=stats.lateness.quantile(0.99),
            lateness_max_s=stats.lateness.max,
            lateness_window_p50_s=self._late_hour.quantile(0.5, now),
            lateness_window_p99_s=self._late_hour.quantile(0.99, now),
            lateness_window_s=self._late_hour.span(now),
            skipped_ticks=stats.skipped_ticks,
            backpressure_skips=stats.backpressure_skips,
            in_flight=pool.in_flight,
            buffer_rows=ingest.buffer_rows,
            rows_committed=ingest.rows_committed,
            copy_batches=ingest.copy_batches,
            ingest_lag_s=ingest.ingest_lag_s(),
            spool_bytes=spool_bytes,
            segments_pending_upload=up.segments_pending if up else 0,
            upload_failures=up.consecutive_failures if up else 0,
            upload_lag_s=up.upload_lag_s if up else 0.0,
            disk_used_fraction=disk_used,
            disk_warning=(up.disk_warning if up else False)
            or disk_used * 100 >= self.settings.ingest.disk_warn_percent,
            # The loader waits for the instance lock without failing: a lost
            # lock is Postgres down as far as storage goes.
            postgres_up=ingest.postgres_up and self._postgres_ready(),
            redis_up=self._live.up if self._live is not None else False,
            s3_up=(up.consecutive_failures == 0) if up else False,
            polling=self.polling,
            clock_steps=stats.clock_steps,
            tick_conflicts=stats.tick_conflicts,
            task_restarts=dict(self._supervisor.restarts),
            rows_quarantined=ingest.loader.rows_quarantined,
            spool_ceiling_bytes=usage.ceiling_bytes,
            spool_full=ingest.spool_full,
            spool_errors=ingest.spool.io_errors,
            segments_evicted=up.segments_evicted if up else 0,
            segments_awaiting_archive_load=evicted.count() if evicted is not None else 0,
            rows_loaded_from_archive=evicted.rows_loaded if evicted is not None else 0,
            segments_unarchived=up.segments_unarchived if up else 0,
            shed_ticks=stats.shed_ticks,
            connections_open=http.open_connections,
            connections_opened=http.connections_opened,
            connects_deferred=http.connects_deferred,
            timeouts_kept=http.timeouts_kept,
            requests_refused=http.refused,
        )

    def _rates(self, totals: dict[str, int]) -> dict[str, float]:
        if not self._samples:
            return {k: 0.0 for k in totals}
        then, old = self._samples[0]
        span = max(self._clock.monotonic() - then, 1e-3)
        return {k: (v - old.get(k, 0)) / span for k, v in totals.items()}

    # -- its background loops ---------------------------------------------------------

    async def sample_rates(self) -> None:
        """Keep a minute of outcome totals, for the rates of :meth:`fleet`, and
        an hour of lateness marks."""
        clock = self._clock
        while True:
            now = clock.monotonic()
            self._samples.append((now, self._engine.pool.stats.outcome_counts()))
            self._late_hour.mark(now)
            while self._samples and now - self._samples[0][0] > RATE_WINDOW_S:
                self._samples.popleft()
            await clock.sleep(SAMPLE_EVERY_S)

    async def heartbeat(self) -> None:
        """Note that the event loop still runs its timers (``loop_responsive``)."""
        clock = self._clock
        while True:
            self._heartbeat_at = clock.monotonic()
            await clock.sleep(HEARTBEAT_S)
