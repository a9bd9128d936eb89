"""The composition root of ``poller serve``.

Start order (each part needs the ones before it):
  servers (configured or embedded) -> Postgres pool + migrations -> sealing
  key -> ingest (spool, loader, S3 uploader, Redis live state) -> polling
  (transports, device pool, registry watcher) -> HTTP API -> READY.
Stop order is the reverse, so no reading is produced after its path is gone:
  STOPPING -> API -> polling (in-flight polls finish) -> ingest (flush the
  buffer -> COPY -> close the hour files -> upload) -> Postgres pool.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from poller import db, endpoints, migrate, sealing
from poller.api.view import FleetSnapshot
from poller.archive.s3 import ArchiveStore
from poller.archive.uploader import Uploader
from poller.config import Settings
from poller.ingest.livestate import LiveState
from poller.ingest.pgload import PgLoader
from poller.ingest.pipeline import Ingest
from poller.ingest.spool import Spool
from poller.polling.engine import PollingEngine
from poller.polling.stats import LogHistogram
from poller.tasks import cancel_and_wait

log = logging.getLogger("poller.service")
_PARTITION_CHECK_S = 3600.0
_RATE_WINDOW_S = 60.0
_SAMPLE_EVERY_S = 5.0
_HEARTBEAT_S = 1.0


class Service:
    """One running poller. ``start()``/``stop()`` for embedding and tests."""

    def __init__(self, settings: Settings, progress: Callable[[str], None] | None = None,
                 *, wall_clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self._progress = progress
        self._wall_clock = wall_clock
        self._pool: asyncpg.Pool | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.endpoints: endpoints.Endpoints | None = None
        self.box: sealing.SecretBox
        self.ingest: Ingest | None = None
        self.engine: PollingEngine | None = None
        self.store: ArchiveStore | None = None
        self.uploader: Uploader | None = None
        self.live: LiveState | None = None
        self.api_runner: Any = None
        self.api_port: int | None = None
        self.started_at = wall_clock()
        self._samples: collections.deque[tuple[float, dict[str, int]]] = collections.deque()
        self._heartbeat_at = time.monotonic()
        self._stopped = False

    # -- ServiceView ----------------------------------------------------------------

    @property
    def db(self) -> asyncpg.Pool:
        assert self._pool is not None, "service not started"
        return self._pool

    @property
    def redis(self) -> aioredis.Redis | None:
        return self.live.client if self.live is not None else None

    def lateness(self) -> LogHistogram:
        assert self.engine is not None
        return self.engine.pool.stats.lateness

    def copy_latency(self) -> LogHistogram:
        assert self.ingest is not None
        return self.ingest.copy_seconds

    def commit_latency(self) -> LogHistogram:
        assert self.ingest is not None
        return self.ingest.commit_latency

    def device_status(self, cloud_id: str) -> dict[str, Any] | None:
        if self.engine is None:
            return None
        for target in self.engine.pool.targets():
            if target.cloud_id == cloud_id:
                return target.snapshot()
        return None

    def loop_responsive(self) -> bool:
        return time.monotonic() - self._heartbeat_at < 5 * _HEARTBEAT_S

    def fleet(self) -> FleetSnapshot:
        assert self.engine is not None and self.ingest is not None
        pool = self.engine.pool
        stats = pool.stats
        totals = stats.outcome_counts()
        rates = self._rates(totals)
        expected = pool.expected_polls_per_s()
        up = self.uploader.stats() if self.uploader is not None else None
        spool_bytes, disk_used = self.ingest.spool.disk_usage()
        return FleetSnapshot(
            instance_id=self.settings.instance_id,
            started_at=self.started_at,
            devices=len(pool.loops) + len(pool.rejected),
            devices_by_state=pool.devices_by_state(),
            polls_by_outcome=totals,
            polls_by_driver_outcome=stats.driver_outcome_counts(),
            polls_per_s=rates,
            expected_polls_per_s=expected,
            lateness_p50_s=stats.lateness.quantile(0.5),
            lateness_p99_s=stats.lateness.quantile(0.99),
            lateness_max_s=stats.lateness.max,
            skipped_ticks=stats.skipped_ticks,
            backpressure_skips=stats.backpressure_skips,
            in_flight=pool.in_flight,
            buffer_rows=self.ingest.buffer_rows,
            rows_committed=self.ingest.rows_committed,
            copy_batches=self.ingest.copy_batches,
            ingest_lag_s=self.ingest.ingest_lag_s(),
            spool_bytes=spool_bytes,
            segments_pending_upload=up.segments_pending if up else 0,
            upload_failures=up.consecutive_failures if up else 0,
            upload_lag_s=up.upload_lag_s if up else 0.0,
            disk_used_fraction=disk_used,
            disk_warning=(up.disk_warning if up else False)
            or disk_used * 100 >= self.settings.ingest.disk_warn_percent,
            postgres_up=self.ingest.postgres_up,
            redis_up=self.live.up if self.live is not None else False,
            s3_up=(up.consecutive_failures == 0) if up else False,
            polling=not self._stopped,
        )

    def _rates(self, totals: dict[str, int]) -> dict[str, float]:
        now = time.monotonic()
        if not self._samples:
            return {k: 0.0 for k in totals}
        then, old = self._samples[0]
        span = max(now - then, 1e-3)
        return {k: (v - old.get(k, 0)) / span for k, v in totals.items()}

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        # Starting embedded servers blocks for seconds: keep it off the loop.
        self.endpoints = ep = await loop.run_in_executor(
            None, lambda: endpoints.resolve(s, progress=self._progress))
        self._pool = await db.create_pool(ep.database_url, max_size=s.database.pool_max)
        async with self._pool.acquire() as conn:
            applied = await migrate.migrate(conn)
            await migrate.ensure_partitions(conn)
        if applied:
            log.info("applied migrations: %s", ", ".join(applied))
        self.box = sealing.SecretBox(sealing.load_key(s.state_dir))

        spool = Spool(Path(s.state_dir) / "spool", s.instance_id, self._wall_clock)
        loader = PgLoader(self._pool, s.instance_id, spool)
        self.store = ArchiveStore(ep.s3_endpoint_url, ep.bucket, s.s3.region,
                                  s.s3.access_key_id, s.s3.secret_access_key)
        await self.store.start()

        async def delete_segment(name: str) -> None:
            await spool.delete(name)
            with contextlib.suppress(Exception):
                await loader.forget(name)

        self.uploader = Uploader(self.store, spool.directory, s.s3.prefix, loader.is_loaded,
                                 disk_warn_fraction=s.ingest.disk_warn_percent / 100,
                                 delete=delete_segment)
        self.engine = PollingEngine(s.polling, ep.database_url, self.box, _LateSink(),
                                    seed=s.polling.phase_seed or s.instance_id,
                                    wall_clock=self._wall_clock)
        pool = self.engine.pool
        self.live = LiveState(ep.redis_url, pool.targets, self._take_dirty)
        self.ingest = Ingest(s.ingest, spool, loader, self.uploader, self.live,
                             self._wall_clock)
        pool.set_sink(self.ingest)
        await self.ingest.start()
        await self.engine.start()
        self._spawn(self._partition_keeper(), "partition-keeper")
        self._spawn(self._sampler(), "rate-sampler")
        self._spawn(self._heartbeat(), "heartbeat")
        if s.api.enabled:
            from poller.api.app import start_api

            self.api_runner, self.api_port = await start_api(self, s.api.host, s.api.port)
            log.info("API on http://%s:%d", s.api.host, self.api_port)
        log.info("serving %d device(s) as instance %s", len(pool.loops), s.instance_id)

    def reload(self, fresh: Settings) -> list[str]:
        """Apply a re-read configuration (SIGHUP) without losing a reading.

        Live: API tokens, log settings, poll timeout, back-off and auth-failed
        intervals, totals cadence, in-flight cap, resync period, flush size and
        age. Server URLs, the API address, the instance id, the shard and the
        state directory need a restart; they are kept and named in the return
        value.
        (Each device's interval is its registration's: ``update-user``.)"""
        old = self.settings
        fixed = ("database", "redis", "s3", "state_dir", "instance_id")
        needs_restart = [k for k in fixed if getattr(fresh, k) != getattr(old, k)]
        if (fresh.api.host, fresh.api.port, fresh.api.enabled) != \
                (old.api.host, old.api.port, old.api.enabled):
            needs_restart.append("api address")
        if fresh.polling.shard != old.polling.shard:
            needs_restart.append("polling.shard")
        applied = dataclasses.replace(
            fresh, **{k: getattr(old, k) for k in fixed},
            polling=dataclasses.replace(fresh.polling, shard=old.polling.shard),
            api=dataclasses.replace(fresh.api, host=old.api.host, port=old.api.port,
                                    enabled=old.api.enabled))
        self.settings = applied
        if self.engine is not None:
            self.engine.pool.apply_settings(applied.polling)
            self.engine.watcher.resync_interval_s = applied.polling.resync_interval_s
        if self.ingest is not None:
            self.ingest.apply_settings(applied.ingest)
        return needs_restart

    def _take_dirty(self) -> list[Any]:
        assert self.engine is not None
        pool = self.engine.pool
        dirty, pool.dirty = pool.dirty, []
        return dirty

    async def stop(self) -> None:
        """Stop in reverse order within ``ingest.shutdown_grace_s``. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        deadline = time.monotonic() + self.settings.ingest.shutdown_grace_s
        if self.api_runner is not None:
            from poller.api.app import stop_api

            await stop_api(self.api_runner)
            self.api_runner = None
        if self.engine is not None:
            await self.engine.stop(min(self.settings.polling.timeout_s + 0.5,
                                       max(0.1, deadline - time.monotonic())))
        if self.ingest is not None:
            await self.ingest.stop(deadline)
        await cancel_and_wait(self._tasks)
        if self.store is not None:
            await self.store.close()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        log.info("stopped")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _partition_keeper(self) -> None:
        while True:
            await asyncio.sleep(_PARTITION_CHECK_S)
            try:
                async with self.db.acquire() as conn:
                    await migrate.ensure_partitions(conn)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("could not create partitions ahead: %s", exc)

    async def _sampler(self) -> None:
        assert self.engine is not None
        while True:
            now = time.monotonic()
            self._samples.append((now, self.engine.pool.stats.outcome_counts()))
            while self._samples and now - self._samples[0][0] > _RATE_WINDOW_S:
                self._samples.popleft()
            await asyncio.sleep(_SAMPLE_EVERY_S)

    async def _heartbeat(self) -> None:
        while True:
            self._heartbeat_at = time.monotonic()
            await asyncio.sleep(_HEARTBEAT_S)


class _LateSink:
    """Placeholder until the ingest pipeline exists; never receives a reading."""

    accepting = True

    def accept(self, reading: object) -> None:
        raise AssertionError("no reading may arrive before ingest starts")
