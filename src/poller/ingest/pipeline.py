"""The path of a reading after its poll: buffer, spool, Postgres, S3.

``accept()`` appends to an in-memory list (the hot path). A flusher moves
the list to the spool by size or age; once the spool has fsynced it, the
batch is durable and goes on to the Postgres loader. The loader keeps a
bounded queue in memory: past it, or after an outage, it drops the in-memory
copies and catches up from the spool, whose checkpoints make every load
idempotent. Hour segments close after their hour (plus a grace) and at
shutdown; the uploader sends them to S3 and deletes one only when S3 has it
and Postgres has loaded it.

The disk is bounded and S3 is the durable log. Past the spool's high-water
mark the flusher closes the open hour early and kicks the uploader, which
then removes segments S3 holds even before Postgres loads them (the loader
reads those from S3). The spool refuses a batch at its ceiling
(:class:`~poller.ingest.spool.SpoolFull`) or on any ``OSError`` (a
:class:`~poller.ingest.spool.SpoolError`, counted): the batch returns to the
buffer, nothing is written twice or lost, and the flusher retries (a full
spool as soon as it has room for the batch, an I/O error with back-off).
Memory stays bounded: the buffer stops accepting at ``buffer_max_rows``
and the loops skip ticks, counted as back-pressure and logged once, rather
than lose readings. With S3 or Postgres taking segments off the disk that
does not happen; it takes both away and the ceiling reached.

The flusher, the loader and the live-state writer run under a
:class:`~poller.tasks.Supervisor` (a child of the service's): restarted with
back-off and counted when they fail; ten failures in a row make the process
exit for systemd to restart it.

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
from collections.abc import Sequence

from poller.archive.s3 import ArchiveUnavailable
from poller.archive.uploader import Uploader
from poller.clock import Clock, LoopClock
from poller.config import IngestSettings
from poller.ingest.failures import Failure, FailureLog
from poller.ingest.livestate import LiveState
from poller.ingest.pgload import LoaderError, LoaderUnavailable, PgLoader
from poller.ingest.spool import Pressure, Spool, SpoolError, SpoolFull, SpoolPosition
from poller.polling.stats import LogHistogram
from poller.reading import RECEIVED_AT, TICK_AT, PlainReading
from poller.tasks import Supervisor

log = logging.getLogger("poller.ingest")
_ROTATE_EVERY_S = 1.0
_RETRY_MAX_S = 30.0
_GIVE_UP_AFTER = 10
"""Unexpected failures in a row after which a storage task cannot go on."""
_EARLY_CLOSE_SHARE = 4
"""Under pressure an open segment closes early once it holds a quarter of the
ceiling (a sixteenth once the spool refused a batch): small enough to leave
room while S3 takes it, large enough that an S3 outage does not make many
small objects."""
_RECEIVED_AT = operator.itemgetter(RECEIVED_AT)


def _hour(tick_at: float) -> int:
    return int(tick_at // 3600) * 3600


class Ingest:
    def __init__(self, settings: IngestSettings, spool: Spool, loader: PgLoader,
                 uploader: Uploader | None, live: LiveState | None,
                 clock: Clock | None = None, *, supervisor: Supervisor | None = None,
                 failures: FailureLog | None = None) -> None:
        self.settings = settings
        self.spool = spool
        self.loader = loader
        self.uploader = uploader
        self.live = live
        self._clock = clock if clock is not None else LoopClock()
        self._buffer: list[PlainReading] = []
        self._batch_rows = settings.batch_rows
        self._max_rows = settings.buffer_max_rows
        self._bound_spool(settings)
        self.accepting = True
        """False while the buffer is full (the spool cannot write): the loops
        skip ticks. Kept current by every change of the buffer."""
        self._kicked = False
        self._wake = asyncio.Event()
        self._loader_wake = asyncio.Event()
        self._pending: collections.deque[tuple[SpoolPosition, list[PlainReading]]] = \
            collections.deque()
        self._pending_rows = 0
        self._behind = True  # catch up from the spool before anything else
        self._behind_since: float | None = None
        self._supervisor = supervisor if supervisor is not None else \
            Supervisor(clock=self._clock)
        self._stopping = False
        self._stop_event = asyncio.Event()
        self.postgres_up = False
        self._pg_was_down = False
        self._archive_was_down = False
        self.spool_ok = True
        self.spool_full = False
        """The spool refused the last batch for want of room (ceiling or ENOSPC)."""
        self._full_need = 0
        """Bytes the refused member needed: no retry before the spool has them."""
        self._pressure = Pressure.NONE
        self._evictions_seen = 0
        self._skipping = False
        """The buffer is full and the loops skip ticks (logged once per episode)."""
        self._failure_log = failures
        self._failures: list[Failure] = []
        """Failed polls not yet in ``poll_failures`` (see :mod:`.failures`)."""
        self.failures_dropped = 0
        """Failed polls let go because ``buffer_max_rows`` of them waited."""
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
        self._bound_spool(settings)

    def _bound_spool(self, settings: IngestSettings) -> None:
        """The spool's ceiling and high-water mark come from the settings."""
        spool = self.spool
        spool.max_bytes = settings.spool_max_bytes
        spool.max_disk_fraction = settings.spool_max_percent / 100
        spool.high_water_fraction = settings.spool_high_water_percent / 100

    # -- the hot path -----------------------------------------------------------

    def accept(self, reading: PlainReading) -> None:
        buffer = self._buffer
        buffer.append(reading)
        rows = len(buffer)
        if rows >= self._batch_rows and not self._kicked:
            self._kicked = True
            self._wake.set()
        if rows >= self._max_rows:
            self.accepting = False

    def record_failure(self, device_id: int, tick_at: float, outcome: int,
                       failed_at: float) -> None:
        """A poll that ended without a reading (the loops' ``ctx.failed``)."""
        if self._failure_log is None:
            return
        failures = self._failures
        failures.append((device_id, tick_at, outcome, failed_at))
        if len(failures) > self._max_rows:
            # Postgres has been away long: keep the newest, count the rest.
            drop = len(failures) - self._max_rows
            del failures[:drop]
            self.failures_dropped += drop

    # -- figures ----------------------------------------------------------------

    @property
    def buffer_rows(self) -> int:
        return len(self._buffer)

    def ingest_lag_s(self) -> float:
        """Age of the oldest reading received but not yet committed."""
        oldest: float | None = None
        if self._pending:
            oldest = self._pending[0][1][0][RECEIVED_AT] if self._pending[0][1] else None
        if self._behind_since is not None:
            oldest = min(oldest or self._behind_since, self._behind_since)
        if oldest is None and self._buffer:
            oldest = self._buffer[0][RECEIVED_AT]
        return max(0.0, self._clock.wall() - oldest) if oldest is not None else 0.0

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        await self.spool.open()
        await self.loader.start()
        if self.live is not None:
            await self.live.start()
        if self.uploader is not None:
            await self.uploader.start()
        spawn = self._supervisor.spawn
        spawn("ingest-flusher", self._flusher, give_up_after=_GIVE_UP_AFTER)
        spawn("ingest-loader", self._loader_loop, give_up_after=_GIVE_UP_AFTER)
        if self.live is not None:
            spawn("ingest-live-state", self._live_loop)
        self._loader_wake.set()

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
        # write cancelled half-way would lose its batch); what is still
        # running at the deadline is cancelled.
        self._stopping = True
        self._stop_event.set()
        now = self._clock.monotonic
        await self._supervisor.stop(grace_s=max(0.1, deadline - now()))
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
            elif not self.spool_full:
                # An I/O error: back off. A full spool is retried every flush
                # interval (cheaply: see _flush_once), to resume as soon as
                # S3 or Postgres has taken segments off the disk.
                failures += 1
                await self._pause(min(_RETRY_MAX_S, 0.5 * 2**failures))
            if clock.monotonic() >= next_rotate:
                next_rotate = clock.monotonic() + _ROTATE_EVERY_S
                await self._rotate()
            await self._relieve_pressure()

    async def _flush_once(self) -> bool:
        """Move the buffer to the spool; False when the spool refused a batch
        (it stays in the buffer)."""
        todo = len(self._buffer)
        if todo and self.spool_full and not self._has_room():
            self._note_skipping()
            return False
        while todo > 0:
            # After a refusal the buffer may have grown past any one batch:
            # write it in batch-sized members so each fits as room frees.
            step = todo if self.spool_ok else min(todo, self._batch_rows)
            if not await self._append(step):
                self._note_skipping()
                return False
            todo -= step
        return True

    def _note_skipping(self) -> None:
        """Log once when the full buffer makes the loops skip ticks."""
        if not self.accepting and not self._skipping:
            self._skipping = True
            log.warning("storage full: the spool refuses writes and %d reading(s) fill the "
                        "buffer; ticks are skipped (poller_backpressure_skips_total) until it "
                        "takes writes again", len(self._buffer))

    def _has_room(self) -> bool:
        try:
            usage = self.spool.usage()
        except SpoolError:
            return True  # let the write say what is wrong
        return usage.ceiling_bytes - usage.spool_bytes >= self._full_need

    async def _append(self, rows: int) -> bool:
        buffer = self._buffer
        batch = buffer if rows >= len(buffer) else buffer[:rows]
        self._buffer = [] if batch is buffer else buffer[rows:]
        self._kicked = False
        self.accepting = len(self._buffer) < self._max_rows
        try:
            positions = await self.spool.append(batch)
        except SpoolError as exc:
            # Members already durable go on; the rest returns to the front of
            # the buffer so nothing is written twice or lost.
            written = {p.hour for p in exc.written}
            self._queue(exc.written, batch, whole=False)
            self._buffer = [r for r in batch if _hour(r[TICK_AT]) not in written] + self._buffer
            self._refused(exc)
            return False
        except Exception:
            # A bug, before anything was written (the spool encodes every
            # member first): keep the batch; the supervisor restarts the
            # flusher. (Cancelled, the write goes on in the spool's thread.)
            self._buffer = batch + self._buffer
            self.accepting = len(self._buffer) < self._max_rows
            raise
        if not self.spool_ok:
            log.info("spool writes again")
        if self._skipping and self.accepting:
            self._skipping = False
            log.info("the spool takes readings again: ticks are polled again")
        self.spool_ok = True
        self.spool_full = False
        self._full_need = 0
        self._queue(positions, batch)
        return True

    def _refused(self, exc: SpoolError) -> None:
        self.accepting = len(self._buffer) < self._max_rows
        full = isinstance(exc, SpoolFull)
        if self.spool_ok:
            log.error("spool write refused, readings held in memory (%d): %s",
                      len(self._buffer), exc)
        self.spool_ok = False
        self.spool_full = full
        self._full_need = exc.needed_bytes if isinstance(exc, SpoolFull) else 0

    async def _relieve_pressure(self) -> None:
        """Past the high-water mark, close the open hour early (so the
        uploader can take it off the disk) and wake the uploader."""
        if self.uploader is None:
            return
        try:
            usage = self.spool.usage()
        except SpoolError:
            return
        pressure = self.spool.pressure(usage)
        was, self._pressure = self._pressure, pressure
        if pressure is Pressure.NONE:
            if was is not Pressure.NONE:
                log.info("spool below its high-water mark again (%d of %d bytes)",
                         usage.spool_bytes, usage.ceiling_bytes)
            return
        if was is Pressure.NONE:
            log.warning("spool past its high-water mark (%d of %d bytes): segments S3 holds "
                        "leave the disk before Postgres loads them", usage.spool_bytes,
                        usage.ceiling_bytes)
        at_ceiling = self.spool_full or pressure is Pressure.FULL
        share = _EARLY_CLOSE_SHARE * (4 if self.spool_full else 1)
        try:
            closed = await self.spool.close_early(usage.ceiling_bytes // share)
        except SpoolError as exc:
            log.error("closing a segment early failed: %s", exc)
            return
        if closed or was is Pressure.NONE or at_ceiling:
            self.uploader.kick()

    def _queue(self, positions: Sequence[SpoolPosition], batch: list[PlainReading], *,
               whole: bool = True) -> None:
        """``whole``: ``positions`` hold the whole batch (else only the hours
        they name were written)."""
        if not positions:
            return
        if whole and len(positions) == 1:
            groups = {positions[0].hour: batch}
        else:
            groups = collections.defaultdict(list)
            for r in batch:
                groups[_hour(r[TICK_AT])].append(r)
        for pos in positions:
            rows = groups.get(pos.hour, [])
            self._pending.append((pos, rows))
            self._pending_rows += len(rows)
        # Bounded: past this, the spool holds the rows and the loader reads
        # them back once Postgres keeps up again.
        while self._pending_rows > self._max_rows and self._pending:
            _, dropped = self._pending.popleft()
            self._pending_rows -= len(dropped)
            self._fall_behind(dropped[0][RECEIVED_AT] if dropped else None)
        self._loader_wake.set()

    def _fall_behind(self, since: float | None = None) -> None:
        """Drop the in-memory copies: the loader reads the spool from its
        checkpoints next (idempotent, so nothing loads twice)."""
        # A start is behind from the outset but undated: the loader's first
        # call dates it, or a first catch-up that never succeeds would show
        # no lag at all.
        if not self._behind or self._behind_since is None:
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
        # A run (the first, or one after a crash) starts from the
        # checkpoints: the in-memory queue may be half-handled.
        self._fall_behind()
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
            except ArchiveUnavailable as exc:
                # Segments evicted to S3 wait for it; everything else loaded.
                failures += 1
                if not self._archive_was_down:
                    log.warning("segments evicted from the spool wait for S3: %s", exc)
                self._archive_was_down = True
                self._fall_behind()
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
            before = self.loader.rows_loaded
            try:
                caught = await self.loader.catch_up()
            finally:
                # What loaded counts, even when S3 or Postgres stopped it half-way.
                self.rows_committed += self.loader.rows_loaded - before
            self._archive_was_down = False
            self._behind = False
            self._behind_since = None
            if caught:
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
        if self._failures and self._failure_log is not None:
            batch, self._failures = self._failures, []
            try:
                await self._failure_log.write(batch)
            except BaseException:
                self._failures[:0] = batch  # written next time (idempotent)
                raise
        if self.uploader is not None:
            evicted = self.uploader.stats().segments_evicted
            if evicted != self._evictions_seen:
                # Segments left the disk unloaded since the last look. What
                # memory held of them is loaded now; a catch-up loads the
                # rest from S3 and settles their records.
                self._evictions_seen = evicted
                self._fall_behind()

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
