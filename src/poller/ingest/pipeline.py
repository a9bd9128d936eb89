"""The path of a reading after its poll: buffer, spool, Postgres, S3.

``accept()`` appends to an in-memory list (the hot path). A flusher moves
the list to the spool by size or age; once the spool has fsynced it, the
batch is durable and goes on to the Postgres loader. The loader keeps a
bounded queue in memory: past it, or after an outage, it drops the in-memory
copies and catches up from the spool, whose checkpoints make every load
idempotent. Hour segments close after their hour (plus a grace) and at
shutdown; the uploader sends them to S3 and deletes one only when S3 has it
and Postgres has loaded it.

Memory stays bounded: when the spool itself cannot write (a full disk), the
buffer stops accepting at ``buffer_max_rows`` and the loops skip ticks,
counted as back-pressure, rather than lose readings.

Time comes from one injected :class:`~poller.clock.Clock`: flush age, hour
rotation, pauses and the shutdown deadline on its monotonic scale; reading
ages (``received_at`` is wall time) and the hour to close on its wall scale.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import operator
import random
from collections.abc import Coroutine, Sequence
from typing import Any

from poller.archive.uploader import Uploader
from poller.clock import Clock, LoopClock
from poller.config import IngestSettings
from poller.ingest.livestate import LiveState
from poller.ingest.pgload import LoaderError, LoaderUnavailable, PgLoader
from poller.ingest.spool import Spool, SpoolError, SpoolPosition
from poller.polling.stats import LogHistogram
from poller.reading import Reading
from poller.tasks import cancel_and_wait

log = logging.getLogger("poller.ingest")
_ROTATE_EVERY_S = 1.0
_RETRY_MAX_S = 30.0
_RECEIVED_AT = operator.itemgetter(Reading._fields.index("received_at"))


def _hour(tick_at: float) -> int:
    return int(tick_at // 3600) * 3600


class Ingest:
    def __init__(self, settings: IngestSettings, spool: Spool, loader: PgLoader,
                 uploader: Uploader | None, live: LiveState | None,
                 clock: Clock | None = None) -> None:
        self.settings = settings
        self.spool = spool
        self.loader = loader
        self.uploader = uploader
        self.live = live
        self._clock = clock if clock is not None else LoopClock()
        self._buffer: list[Reading] = []
        self._batch_rows = settings.batch_rows
        self._max_rows = settings.buffer_max_rows
        self.accepting = True
        """False while the buffer is full (the spool cannot write): the loops
        skip ticks. Kept current by every change of the buffer."""
        self._kicked = False
        self._wake = asyncio.Event()
        self._loader_wake = asyncio.Event()
        self._pending: collections.deque[tuple[SpoolPosition, list[Reading]]] = \
            collections.deque()
        self._pending_rows = 0
        self._behind = True  # catch up from the spool before anything else
        self._behind_since: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._stop_event = asyncio.Event()
        self.postgres_up = False
        self._pg_was_down = False
        self.spool_ok = True
        self.rows_committed = 0
        self.loader_failures = 0
        """Loader steps that failed for a reason other than an outage."""
        self.copy_batches = 0
        self.copy_seconds = LogHistogram()
        self.commit_latency = LogHistogram()

    def apply_settings(self, settings: IngestSettings) -> None:
        """New flush size and age, buffer bound and grace (SIGHUP)."""
        self.settings = settings
        self._batch_rows = settings.batch_rows
        self._max_rows = settings.buffer_max_rows
        self.accepting = len(self._buffer) < self._max_rows

    # -- the hot path -----------------------------------------------------------

    def accept(self, reading: Reading) -> None:
        buffer = self._buffer
        buffer.append(reading)
        rows = len(buffer)
        if rows >= self._batch_rows and not self._kicked:
            self._kicked = True
            self._wake.set()
        if rows >= self._max_rows:
            self.accepting = False

    # -- figures ----------------------------------------------------------------

    @property
    def buffer_rows(self) -> int:
        return len(self._buffer)

    def ingest_lag_s(self) -> float:
        """Age of the oldest reading received but not yet committed."""
        oldest: float | None = None
        if self._pending:
            oldest = self._pending[0][1][0].received_at if self._pending[0][1] else None
        if self._behind_since is not None:
            oldest = min(oldest or self._behind_since, self._behind_since)
        if oldest is None and self._buffer:
            oldest = self._buffer[0].received_at
        return max(0.0, self._clock.wall() - oldest) if oldest is not None else 0.0

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        await self.spool.open()
        await self.loader.start()
        if self.live is not None:
            await self.live.start()
        if self.uploader is not None:
            await self.uploader.start()
        self._spawn(self._flusher(), "ingest-flusher")
        self._spawn(self._loader_loop(), "ingest-loader")
        if self.live is not None:
            self._spawn(self._live_loop(), "ingest-live-state")
        self._loader_wake.set()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", task.get_name(), exc_info=task.exception())

    async def stop(self, deadline: float) -> None:
        """Flush, load, close the hour files and upload them, until ``deadline``
        (the clock's monotonic time). What is not done by then stays in the spool for
        the next start. Order: buffer -> spool -> Postgres -> close segments ->
        S3 -> Redis -> close."""
        if not self.spool.is_open:
            # start() failed before the spool opened (another process holds
            # it): nothing was accepted, nothing to flush or close.
            await self.loader.stop()
            return
        # The flusher and the loader finish the step they are in (a spool
        # write cancelled half-way would lose its batch); the rest is cancelled.
        self._stopping = True
        self._stop_event.set()
        graceful = [t for t in self._tasks if t.get_name() in ("ingest-flusher", "ingest-loader")]
        now = self._clock.monotonic
        if graceful:
            await asyncio.wait(graceful, timeout=max(0.1, deadline - now()))
        await cancel_and_wait(self._tasks)
        while self._buffer and now() < deadline:
            if not await self._flush_once():
                await self._clock.sleep(0.2)
        if self._buffer:
            log.error("shutdown: %d reading(s) could not be written to the spool",
                      len(self._buffer))
        # Leave a third of what remains for the uploads.
        load_until = deadline - (deadline - now()) / 3
        await self._drain_loader(load_until)
        try:
            closed = await self.spool.close_all()
        except SpoolError as exc:
            log.error("shutdown: closing segments failed: %s", exc)
            closed = []
        if self.uploader is not None:
            if closed:
                with contextlib.suppress(Exception):
                    await self.uploader.upload_pending(deadline)
            await self.uploader.stop(timeout_s=max(0.1, deadline - now()))
        if self.live is not None:
            await self.live.flush(final=True)
            await self.live.close()
        await self.loader.stop()
        await self.spool.close()

    # -- buffer -> spool ----------------------------------------------------------

    async def _flusher(self) -> None:
        clock = self._clock
        next_rotate = clock.monotonic() + _ROTATE_EVERY_S
        failures = 0
        while not self._stopping:
            # The stop event too: stop() need not wait out a flush interval.
            await clock.wait(self.settings.flush_interval_s, self._wake, self._stop_event)
            self._wake.clear()
            if self._stopping:
                return
            if await self._flush_once():
                failures = 0
            else:
                failures += 1
                await self._pause(min(_RETRY_MAX_S, 0.5 * 2**failures))
            if clock.monotonic() >= next_rotate:
                next_rotate = clock.monotonic() + _ROTATE_EVERY_S
                await self._rotate()

    async def _flush_once(self) -> bool:
        batch = self._buffer
        if not batch:
            return True
        self._buffer = []
        self._kicked = False
        self.accepting = True
        try:
            positions = await self.spool.append(batch)
        except SpoolError as exc:
            # Members already durable go on; the rest returns to the front of
            # the buffer so nothing is written twice or lost.
            written = {p.hour for p in exc.written}
            self._queue(exc.written, batch)
            self._buffer = [r for r in batch if _hour(r.tick_at) not in written] + self._buffer
            self.accepting = len(self._buffer) < self._max_rows
            if self.spool_ok:
                log.error("spool write failed, readings held in memory (%d): %s",
                          len(self._buffer), exc)
            self.spool_ok = False
            return False
        if not self.spool_ok:
            log.info("spool writes again")
        self.spool_ok = True
        self._queue(positions, batch)
        return True

    def _queue(self, positions: Sequence[SpoolPosition], batch: list[Reading]) -> None:
        if not positions:
            return
        if len(positions) == 1:
            groups = {positions[0].hour: batch}
        else:
            groups = collections.defaultdict(list)
            for r in batch:
                groups[_hour(r.tick_at)].append(r)
        for pos in positions:
            rows = groups.get(pos.hour, [])
            self._pending.append((pos, rows))
            self._pending_rows += len(rows)
        # Bounded: past this, the spool holds the rows and the loader reads
        # them back once Postgres keeps up again.
        while self._pending_rows > self._max_rows and self._pending:
            _, dropped = self._pending.popleft()
            self._pending_rows -= len(dropped)
            self._fall_behind(dropped[0].received_at if dropped else None)
        self._loader_wake.set()

    def _fall_behind(self, since: float | None = None) -> None:
        """Drop the in-memory copies: the loader reads the spool from its
        checkpoints next (idempotent, so nothing loads twice)."""
        if not self._behind:
            self._behind = True
            self._behind_since = since if since is not None else self._clock.wall()
        self._pending.clear()
        self._pending_rows = 0

    async def _rotate(self) -> None:
        try:
            closed = await self.spool.rotate(self._clock.wall())
        except SpoolError as exc:
            log.error("closing an hour segment failed: %s", exc)
            return
        if closed and self.uploader is not None:
            self.uploader.kick()

    # -- spool -> Postgres ----------------------------------------------------------

    async def _pause(self, seconds: float) -> None:
        """Sleep, but not past the start of a shutdown."""
        await self._clock.wait(seconds, self._stop_event)

    async def _loader_loop(self) -> None:
        failures = 0
        while not self._stopping:
            if not self._pending and not self._behind:
                await self._clock.wait(1.0, self._loader_wake)
                self._loader_wake.clear()
                if self._stopping:
                    return
            try:
                await self._load_available()
                failures = 0
            except LoaderUnavailable as exc:
                failures += 1
                if self.postgres_up or failures == 1:
                    log.warning("postgres unavailable, readings wait in the spool: %s", exc)
                self.postgres_up = False
                self._pg_was_down = True
                await self._pause(min(_RETRY_MAX_S, 0.5 * 2**min(failures, 8))
                                  * (0.5 + random.random() / 2))
            except Exception:
                # Anything else (a refused catch-up chunk, a file that went
                # away, a bug) must not end loading for the life of the
                # process: the spool holds every reading, so start again
                # from its checkpoints after a pause.
                failures += 1
                log.exception("loader step failed; catching up from the spool in a moment")
                self.loader_failures += 1
                self._fall_behind()
                await self._pause(min(_RETRY_MAX_S, 0.5 * 2**min(failures, 8)))

    async def _load_available(self) -> None:
        if self._behind:
            behind_since = self._behind_since
            # Everything in memory is also on disk: catch-up covers it.
            self._pending.clear()
            self._pending_rows = 0
            started = self._clock.monotonic()
            caught = await self.loader.catch_up()
            self._behind = False
            self._behind_since = None
            if caught:
                self.rows_committed += caught
                log.info("loader caught up %d reading(s) in %.1f s", caught,
                         self._clock.monotonic() - started)
            if behind_since is not None or self._pg_was_down:
                log.info("postgres loading again")
            self._pg_was_down = False
            self.postgres_up = True
        while self._pending:
            entry = self._pending[0]
            pos, rows = entry
            started = self._clock.monotonic()
            try:
                inserted = await self.loader.load(pos, rows)
            except LoaderError as exc:
                # Data Postgres refuses (not an outage): it stays in the spool
                # and the archive; say so loudly and go on with the rest.
                log.error("postgres refused %d reading(s) of %s: %s", len(rows), pos.segment,
                          exc)
                inserted = 0
            now = self._clock.wall()
            if self._pending and self._pending[0] is entry:
                # (Not so when the queue overflowed meanwhile and was dropped.)
                self._pending.popleft()
                self._pending_rows -= len(rows)
            self.postgres_up = True
            self.rows_committed += inserted
            self.copy_batches += 1
            self.copy_seconds.record(self._clock.monotonic() - started)
            self.commit_latency.record_ages(now, list(map(_RECEIVED_AT, rows)))

    async def _drain_loader(self, until: float) -> None:
        now = self._clock.monotonic
        while (self._pending or self._behind) and now() < until:
            try:
                await asyncio.wait_for(self._load_available(), max(0.1, until - now()))
            except (LoaderUnavailable, TimeoutError):
                log.warning("shutdown: postgres did not take every reading; the spool keeps "
                            "them for the next start")
                return

    # -- Redis -------------------------------------------------------------------------

    async def _live_loop(self) -> None:
        assert self.live is not None
        while not self._stopping:
            await self._pause(self.settings.flush_interval_s)
            if self._stopping:
                return  # stop() writes the final state itself
            try:
                await self.live.flush()  # Redis trouble is handled inside
            except Exception:
                # A bug must not stop live state for the life of the process.
                log.exception("live-state write failed; retrying next flush")
