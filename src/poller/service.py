"""The composition root of ``poller serve``.

Start order (each part needs the ones before it):
  servers (configured or embedded) -> sealing key -> Postgres (pools,
  migrations, the instance lock; or, while Postgres is down, the registry
  snapshot) -> S3 client -> ingest (spool, loader, uploader, Redis live
  state) -> cluster membership (``[cluster]``: the join gives the first
  view) -> polling (transports, device pool, registry watcher) ->
  supervised background tasks -> HTTP API -> READY.

Each part's teardown is pushed on one ``AsyncExitStack`` as the part starts,
so a start that fails half-way undoes exactly what it did, in reverse, and
``stop()`` runs the same teardowns. The stop order is therefore the start
order reversed, and it is the order in which no reading can be lost:
  API -> background tasks -> hand the devices to the other cluster members
  (``[cluster]``: they poll them before this one stops) -> stop polling (polls
  in flight finish) -> leave the cluster store -> flush
  the buffer -> COPY -> close the hour files -> upload (those four inside
  ``Ingest.stop``) -> S3 client -> close the Postgres pools (and release the
  instance lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg

from poller import db, endpoints, heap, migrate, sealing, snapshot
from poller.archive.fetch import EvictedSegments
from poller.archive.s3 import ArchiveStore
from poller.archive.uploader import Uploader
from poller.clock import Clock, LoopClock
from poller.cluster.membership import Membership
from poller.config import Settings, Shard
from poller.fleetview import FleetView
from poller.ingest.failures import FailureLog
from poller.ingest.livestate import LiveState
from poller.ingest.pgload import PgLoader
from poller.ingest.pipeline import Ingest
from poller.ingest.spool import Spool
from poller.polling.engine import PollingEngine
from poller.registry import registry_key
from poller.retention.job import RetentionJob
from poller.retention.policy import RetentionPolicy
from poller.rollups.worker import RollupWorker, mark_minutes
from poller.tasks import FatalTaskError, Supervisor

log = logging.getLogger("poller.service")
_PARTITION_CHECK_S = 3600.0


class Service:
    """One running poller. ``start()``/``stop()`` for embedding and tests.

    ``view`` is what the API reads (:class:`poller.fleetview.FleetView`);
    ``failed`` is set when a background task cannot go on (``failure`` says
    why): the owner then stops the service and exits non-zero.
    """

    def __init__(self, settings: Settings, progress: Callable[[str], None] | None = None,
                 *, clock: Clock | None = None) -> None:
        self.settings = settings
        self._progress = progress
        self.clock = clock if clock is not None else LoopClock()
        """The one clock every part reads (poller.clock), handed to each."""
        self.started_at = self.clock.wall()
        self.endpoints: endpoints.Endpoints | None = None
        self.box: sealing.SecretBox
        self.database: db.Database | None = None
        self.ingest: Ingest | None = None
        self.engine: PollingEngine | None = None
        self.uploader: Uploader | None = None
        self.live: LiveState | None = None
        self.view: FleetView | None = None
        self.retention: RetentionJob | None = None
        self.rollups: RollupWorker | None = None
        self.membership: Membership | None = None
        self.supervisor = Supervisor(clock=self.clock)
        self.api_port: int | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._started = False
        self._deadline = 0.0
        """When the stop under way must be done (the clock's monotonic time)."""

    @property
    def failed(self) -> asyncio.Event:
        return self.supervisor.failed

    @property
    def failure(self) -> FatalTaskError | None:
        return self.supervisor.failure

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Start every part in order; on any failure, stop what started and raise."""
        if self._started:
            raise RuntimeError("Service.start() called twice; a Service runs once")
        self._started = True
        stack = contextlib.AsyncExitStack()
        self._stack = stack
        try:
            await self._start_parts(stack)
        except BaseException:
            self._stack = None
            await self._unwind(stack)
            raise

    async def _start_parts(self, stack: contextlib.AsyncExitStack) -> None:
        # Each teardown is pushed as its part starts (before it, where the
        # part's stop also undoes a half-done start); see the module docstring.
        s = self.settings
        loop = asyncio.get_running_loop()
        stack.enter_context(heap.watching_pauses())
        # Starting embedded servers blocks for seconds: keep it off the loop.
        self.endpoints = ep = await loop.run_in_executor(
            None, lambda: endpoints.resolve(s, progress=self._progress))

        self.database = database = db.Database(
            ep.database_url, s.instance_id, max_size=s.database.pool_max,
            api_max_size=s.api.pool_max if s.api.enabled else 0,
            api_statement_timeout_s=s.api.statement_timeout_s,
            started_at=self.started_at, clock=self.clock)
        stack.push_async_callback(database.close)  # last: pools, then the lock
        offline = await self._open_database(database)
        self.box = sealing.SecretBox(await self._sealing_key(database, offline is not None))

        store = await stack.enter_async_context(ArchiveStore(
            ep.s3_endpoint_url, ep.bucket, s.s3.region, s.s3.access_key_id,
            s.s3.secret_access_key))
        spool = Spool(Path(s.state_dir) / "spool", s.instance_id, self.clock.wall)
        # The loader's pool is the database's gate: it loads only while this
        # process holds the instance lock, and waits (not fails) otherwise.
        loader = PgLoader(database.waiting, s.instance_id, spool)
        # Segments the uploader evicts unloaded (spool past its high-water
        # mark) load from S3, under the same checkpoints.
        loader.archived = evicted = EvictedSegments(store, spool.directory, s.instance_id)
        # Rollups: each load marks the minutes it touched, in its transaction;
        # the worker (spawned below) recomputes them once settled.
        failure_log = None
        if s.rollups.enabled:
            loader.mark_dirty = mark_minutes
            failure_log = FailureLog(database.waiting, mark_minutes)
            self.rollups = RollupWorker(database.waiting, s.rollups, self.clock)

        async def delete_segment(name: str) -> None:
            await spool.delete(name)
            with contextlib.suppress(Exception):
                await loader.forget(name)

        self.uploader = Uploader(store, spool.directory, s.s3.prefix, loader.is_loaded,
                                 disk_warn_fraction=s.ingest.disk_warn_percent / 100,
                                 delete=delete_segment, clock=self.clock,
                                 instance=s.instance_id, pressure=spool.pressure,
                                 evict=spool.delete, supervisor=self.supervisor.child(),
                                 shed_unarchived=s.ingest.shed_unarchived)
        snapshot_path = snapshot.path_for(s.state_dir, s.instance_id)
        if s.cluster.enabled:
            self.membership = Membership(
                s.cluster, s.instance_id, ep.redis_url, self.clock, state_dir=Path(s.state_dir),
                supervisor=self.supervisor.child(), started_at=self.started_at)
        # In a cluster every member gives a device the same phase, so a device
        # that moves keeps its ticks (a tick polled by two members is one row).
        seed = s.polling.phase_seed or (s.cluster.name if s.cluster.enabled else s.instance_id)
        self.engine = engine = PollingEngine(
            s.polling, ep.database_url, self.box, _LateSink(),
            seed=seed, clock=self.clock,
            snapshot_path=snapshot_path, supervisor=self.supervisor.child(),
            fence=self.membership.lease.valid if self.membership is not None else None)
        initial = None
        if offline is not None:
            initial = await self._from_snapshot(offline, snapshot_path, engine.shard)
        pool = engine.pool
        self.live = LiveState(ep.redis_url, pool.targets, self._take_dirty,
                              write_stopped=self.membership is None)
        # Ingest's and the uploader's tasks stop at their places in the stop
        # order, not with the others: children of the supervisor.
        self.ingest = ingest = Ingest(s.ingest, spool, loader, self.uploader, self.live,
                                      self.clock, supervisor=self.supervisor.child(),
                                      failures=failure_log)
        pool.set_sink(ingest)
        self.view = view = FleetView(
            s, self.box, database.api, engine, ingest, self.uploader, self.live,
            self.supervisor, started_at=self.started_at,
            postgres_ready=lambda: database.ready, clock=self.clock, evicted=evicted)

        stack.push_async_callback(self._stop_ingest)  # flush -> COPY -> close hour -> upload
        await ingest.start()
        if self.membership is not None:
            # Join before polling starts: the first view decides what to poll.
            view.cluster = self.membership
            stack.push_async_callback(self.membership.close)
            await self.membership.start()
            self.membership.attach(engine.watcher, engine.pool)
        stack.push_async_callback(self._stop_polling)
        await engine.start(initial)
        if self.membership is not None:
            # Unwound before polling stops: the others take the devices first.
            stack.push_async_callback(self._leave_cluster)

        stack.push_async_callback(self.supervisor.stop)
        self.supervisor.spawn("database", database.keep)
        self.supervisor.spawn("partition-keeper", self._partition_keeper)
        # Daily, at retention.run_at_hour_utc: raw days leave only once S3 has them.
        self.retention = RetentionJob(
            RetentionPolicy(s.retention, store, s.s3.prefix, wall=self.clock.wall),
            database, self.clock)
        view.retention = self.retention
        self.supervisor.spawn("retention", self.retention.run)
        self.supervisor.spawn("rate-sampler", view.sample_rates)
        self.supervisor.spawn("heartbeat", view.heartbeat)
        if self.rollups is not None:
            self.supervisor.spawn("rollups", self.rollups.run)
        if s.api.enabled:
            from poller.api.app import start_api, stop_api

            runner, self.api_port = await start_api(view, s.api.host, s.api.port)
            stack.push_async_callback(stop_api, runner)
            log.info("API on http://%s:%d (dashboard at /ui/)", s.api.host, self.api_port)
            if self.membership is not None:
                self.membership.api_url = f"http://{s.api.host}:{self.api_port}"
        log.info("serving %d device(s) as instance %s", len(pool.loops), s.instance_id)

    async def _open_database(self, database: db.Database) -> db.DatabaseUnavailable | None:
        """Open the database; the error when Postgres is unreachable (the
        start goes on from the registry snapshot), None when open."""
        try:
            applied = await database.open()
        except db.DatabaseUnavailable as exc:
            return exc
        if applied:
            log.info("applied migrations: %s", ", ".join(applied))
        return None

    async def _sealing_key(self, database: db.Database, offline: bool) -> bytes:
        """The key; never a new one while sealed credentials exist: in the
        registry, or (Postgres down) in the snapshot polling starts from."""
        s = self.settings
        if offline:
            sealed = int(snapshot.path_for(s.state_dir, s.instance_id).exists())
            return sealing.load_key(s.state_dir, sealed=sealed)
        async with database.acquire() as conn:
            return await registry_key(conn, s.state_dir)

    async def _from_snapshot(self, unreachable: db.DatabaseUnavailable, path: Path,
                             shard: Shard) -> snapshot.Specs:
        try:
            specs, written_at = await asyncio.to_thread(snapshot.load, path, self.box, shard)
        except snapshot.SnapshotError as exc:
            raise db.DatabaseUnavailable(f"{unreachable}; and {exc}") from None
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(written_at))
        log.warning("%s: polling %d device(s) from the registry snapshot of %s; readings "
                    "wait in the spool and load once PostgreSQL answers", unreachable,
                    len(specs), when)
        return specs

    def reload(self, fresh: Settings) -> list[str]:
        """Apply a re-read configuration (SIGHUP) without losing a reading.

        Live: API tokens, log settings, poll timeout, back-off and auth-failed
        intervals, totals cadence, in-flight cap, resync period, flush size and
        age. Server URLs, the API address, the instance id, the shard, the
        network policy and the state directory need a restart; they are kept
        and named in the return value.
        (Each device's interval is its registration's: ``update-user``.)
        Refused (ConfigError, nothing applied) if it would leave the API open
        on the non-loopback address it is bound to."""
        old = self.settings
        if old.api.enabled:
            from poller.api.app import check_exposure

            check_exposure(fresh.api, old.api.host)
        fixed = ("database", "redis", "s3", "state_dir", "instance_id", "cluster")
        needs_restart = [k for k in fixed if getattr(fresh, k) != getattr(old, k)]
        if (fresh.api.host, fresh.api.port, fresh.api.enabled) != \
                (old.api.host, old.api.port, old.api.enabled):
            needs_restart.append("api address")
        if (fresh.api.pool_max, fresh.api.statement_timeout_s) != \
                (old.api.pool_max, old.api.statement_timeout_s):
            needs_restart.append("api pool")
        if fresh.polling.shard != old.polling.shard:
            needs_restart.append("polling.shard")
        # The transports hold the network policy, and connections kept alive
        # under the old one would outlive a change: a restart applies it.
        networks = ("allowed_networks", "denied_networks")
        needs_restart.extend(f"polling.{k}" for k in networks
                             if getattr(fresh.polling, k) != getattr(old.polling, k))
        applied = dataclasses.replace(
            fresh, **{k: getattr(old, k) for k in fixed},
            polling=dataclasses.replace(fresh.polling, shard=old.polling.shard,
                                        **{k: getattr(old.polling, k) for k in networks}),
            api=dataclasses.replace(fresh.api, host=old.api.host, port=old.api.port,
                                    enabled=old.api.enabled, pool_max=old.api.pool_max,
                                    statement_timeout_s=old.api.statement_timeout_s))
        self.settings = applied
        if self.view is not None:
            self.view.settings = applied
        if self.engine is not None:
            self.engine.pool.apply_settings(applied.polling)
            self.engine.watcher.resync_interval_s = applied.polling.resync_interval_s
        if self.ingest is not None:
            self.ingest.apply_settings(applied.ingest)
        return needs_restart

    def _take_dirty(self) -> list[Any]:
        assert self.engine is not None
        return self.engine.pool.dirty.drain()

    async def stop(self) -> None:
        """Stop in reverse order within ``ingest.shutdown_grace_s``. Idempotent."""
        stack, self._stack = self._stack, None
        if stack is None:
            return
        await self._unwind(stack)
        log.info("stopped")

    async def _unwind(self, stack: contextlib.AsyncExitStack) -> None:
        self._deadline = self.clock.monotonic() + self.settings.ingest.shutdown_grace_s
        if self.view is not None:
            self.view.polling = False
        if self.database is not None:
            self.database.begin_close()
        await stack.aclose()

    async def _stop_polling(self) -> None:
        assert self.engine is not None
        await self.engine.stop(min(self.settings.polling.timeout_s + 0.5,
                                   max(0.1, self._deadline - self.clock.monotonic())))

    async def _leave_cluster(self) -> None:
        assert self.membership is not None
        # Leave time to stop polling within the grace period after the handoff.
        await self.membership.leave(self._deadline - self.settings.polling.timeout_s - 0.5)

    async def _stop_ingest(self) -> None:
        assert self.ingest is not None
        await self.ingest.stop(self._deadline)

    async def _partition_keeper(self) -> None:
        assert self.database is not None
        while True:
            await self.clock.sleep(_PARTITION_CHECK_S)
            try:
                async with self.database.acquire() as conn:
                    await migrate.ensure_partitions(conn)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("could not create partitions ahead: %s", exc)


class _LateSink:
    """Placeholder until the ingest pipeline exists; never receives a reading."""

    accepting = True

    def accept(self, reading: object) -> None:
        raise AssertionError("no reading may arrive before ingest starts")
