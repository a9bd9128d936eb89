"""Background upload of closed spool segments to the archive.

The uploader works off the spool directory alone: every closed segment file
(see :mod:`poller.archive.naming`) is uploaded oldest first, verified, and
marked with a ``NAME.uploaded`` file beside it, so a restart does not upload
it again. A segment file is deleted only once it is uploaded *and* the caller's
``may_delete(name)`` says Postgres has loaded it; until then it stays and is
checked again on every pass. Nothing else is ever deleted, with two
exceptions for a spool at its limits (``pressure``, see
:class:`~poller.ingest.spool.Pressure`):

* past the high-water mark, a segment S3 holds verified is *evicted*
  unloaded: its marker is renamed ``NAME.evicted`` (a rename needs no free
  block) and the file deleted, keeping its checkpoint; the loader reads it
  back from S3 (:mod:`poller.archive.fetch`);
* only with ``shed_unarchived`` (``ingest.shed_unarchived``, off by
  default): at the ceiling while S3 cannot be reached, a segment Postgres
  has loaded is deleted although S3 does not have it, oldest first, counted
  and named in the log. Off, the spool stays full until S3 returns and the
  polling loops skip ticks (counted): nothing leaves the disk before S3 has
  it.

The loop runs under a :class:`~poller.tasks.Supervisor` (the service's,
when given): an unexpected error restarts it with back-off, counted.

Lifecycle (``delete=spool.delete`` lets the spool remove its own files and
keep its bookkeeping; without it the uploader unlinks them)::

    uploader = Uploader(store, spool.directory, "poller", loader.is_loaded,
                        delete=spool.delete)
    await uploader.start()
    ...                                   # spool calls uploader.kick() per closed segment
    # at shutdown, once the spool has closed its hour files:
    await uploader.upload_pending(clock.monotonic() + grace_s)  # waits for a pass running
    await uploader.stop()                 # then the loop ends

Time comes from the injected :class:`~poller.clock.Clock`: back-off, rechecks
and deadlines on its monotonic scale; upload times and the age of a pending
segment (from its file's mtime) on its wall scale.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import orjson

from poller.archive.naming import SEGMENT_SUFFIX, SegmentName, archive_key, parse_segment_name
from poller.archive.s3 import ArchiveError, ArchiveUnavailable, UploadResult
from poller.clock import Clock, LoopClock
from poller.errors import PollerError
from poller.ingest.spool import Pressure
from poller.tasks import Supervisor

log = logging.getLogger(__name__)

MARKER_SUFFIX = ".uploaded"
EVICTED_SUFFIX = ".evicted"
"""A segment's marker once the segment left the spool unloaded."""
_MARKER_TMP_SUFFIX = MARKER_SUFFIX + ".tmp"
# An unexpected error this many times in a row: the process restarts.
_GIVE_UP_AFTER = 10


class SegmentStore(Protocol):
    """What the uploader needs of the archive (``ArchiveStore`` is one)."""

    async def upload_file(self, path: Path | str, key: str) -> UploadResult: ...


@dataclass(frozen=True, slots=True)
class UploaderStats:
    segments_pending: int
    """Closed segments not yet uploaded."""
    bytes_pending: int
    segments_awaiting_delete: int
    """Uploaded, kept until Postgres has loaded them."""
    uploads_total: int
    last_success_at: float | None
    consecutive_failures: int
    last_error: str | None
    upload_lag_s: float
    """Age of the oldest pending closed segment (0 when none waits)."""
    disk_used_fraction: float
    disk_warning: bool
    segments_evicted: int = 0
    """Segments removed from the spool verified in S3 but not loaded, since start."""
    segments_unarchived: int = 0
    """Segments removed at the ceiling with S3 failing, loaded but not archived."""


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Segment(NamedTuple):
    order: tuple[int, int, str]
    name: str
    size: int
    mtime: float


class Uploader:
    """Uploads closed segments from ``spool_dir``; see the module docstring."""

    def __init__(
        self,
        store: SegmentStore,
        spool_dir: Path | str,
        prefix: str,
        may_delete: Callable[[str], bool],
        *,
        clock: Clock | None = None,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 300.0,
        idle_recheck_s: float = 30.0,
        disk_warn_fraction: float = 0.85,
        on_state: Callable[[UploaderStats], None] | None = None,
        delete: Callable[[str], Awaitable[None]] | None = None,
        instance: str | None = None,
        pressure: Callable[[], Pressure] | None = None,
        evict: Callable[[str], Awaitable[None]] | None = None,
        supervisor: Supervisor | None = None,
        shed_unarchived: bool = False,
    ) -> None:
        if backoff_base_s <= 0 or backoff_max_s < backoff_base_s:
            raise ValueError("need 0 < backoff_base_s <= backoff_max_s")
        if idle_recheck_s <= 0:
            raise ValueError("idle_recheck_s must be positive")
        if not 0 < disk_warn_fraction <= 1:
            raise ValueError("disk_warn_fraction must be in (0, 1]")
        self._store = store
        self._dir = Path(spool_dir)
        self._prefix = prefix
        self._may_delete = may_delete
        self._clock = clock if clock is not None else LoopClock()
        self._backoff_base_s = backoff_base_s
        self._backoff_max_s = backoff_max_s
        self._idle_recheck_s = idle_recheck_s
        self._disk_warn_fraction = disk_warn_fraction
        self._on_state = on_state
        self._delete = delete
        # Instances may share a spool directory: each touches only its own files.
        self._instance = instance
        self._pressure = pressure
        self._evict = evict
        """Removes a segment file and nothing else (its checkpoint stays)."""
        self._shed = shed_unarchived
        self._supervisor = supervisor if supervisor is not None else \
            Supervisor(clock=self._clock)
        self._lock = asyncio.Lock()
        self._kicked = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._started = False
        self._stopped = False
        self._evicted_total = 0
        self._unarchived_total = 0
        # Stats, refreshed by every pass.
        self._pending = 0
        self._bytes_pending = 0
        self._awaiting_delete = 0
        self._oldest_pending_mtime: float | None = None
        self._uploads_total = 0
        self._last_success_at: float | None = None
        self._failures = 0
        self._last_error: str | None = None
        self._disk_used = 0.0
        self._disk_warning = False

    def __repr__(self) -> str:
        return (f"Uploader({str(self._dir)!r}, pending={self._pending}, "
                f"failures={self._failures})")

    async def start(self) -> None:
        """Start the background loop; it makes a first pass at once."""
        if self._started:
            raise RuntimeError("Uploader.start() called twice; an Uploader runs once")
        self._started = True
        self._dir.mkdir(parents=True, exist_ok=True)
        self._supervisor.spawn("archive-uploader", self._run, give_up_after=_GIVE_UP_AFTER)

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the loop, letting an upload in progress finish for up to ``timeout_s``.

        An upload cut short leaves no marker, so the segment is uploaded again
        next time (to the same key). Idempotent.
        """
        self._stop_requested.set()
        if not self._started or self._stopped:
            return
        self._stopped = True
        await self._supervisor.stop(grace_s=timeout_s)

    def kick(self) -> None:
        """Wake the loop now (a segment was closed)."""
        self._kicked.set()

    async def upload_pending(self, deadline: float | None = None) -> int:
        """Upload every closed segment, oldest first; return how many were uploaded.

        ``deadline`` is a monotonic instant of the uploader's clock after which
        no upload starts and one in progress is abandoned. Deletes what may be deleted.
        Raises :class:`ArchiveError` (or ``OSError`` for the spool) at the
        first failure; what was uploaded before it stays recorded.
        """
        async with self._lock:
            return await self._pass(deadline, interruptible=False)

    def stats(self) -> UploaderStats:
        """A snapshot of the state as of the last pass."""
        lag = 0.0
        if self._oldest_pending_mtime is not None:
            lag = max(0.0, self._clock.wall() - self._oldest_pending_mtime)
        return UploaderStats(
            segments_pending=self._pending,
            bytes_pending=self._bytes_pending,
            segments_awaiting_delete=self._awaiting_delete,
            uploads_total=self._uploads_total,
            last_success_at=self._last_success_at,
            consecutive_failures=self._failures,
            last_error=self._last_error,
            upload_lag_s=lag,
            disk_used_fraction=self._disk_used,
            disk_warning=self._disk_warning,
            segments_evicted=self._evicted_total,
            segments_unarchived=self._unarchived_total,
        )

    async def _run(self) -> None:
        while not self._stop_requested.is_set():
            self._kicked.clear()
            try:
                async with self._lock:
                    await self._pass(None, interruptible=True)
            except (PollerError, OSError) as exc:
                # Archive failures are recorded by _pass; a spool that cannot
                # delete (SpoolError) is retried the same way.
                if not isinstance(exc, (ArchiveError, OSError)):
                    log.warning("archive uploader: %s; retrying with back-off", exc)
                if self._shed and isinstance(exc, ArchiveUnavailable):
                    # S3 itself is away (not a refused request, not our disk).
                    await self._shed_unarchived()
                # Kicks do not cut a back-off short.
                await self._clock.wait(self._backoff_delay(), self._stop_requested)
                continue
            await self._clock.wait(self._idle_recheck_s, self._kicked, self._stop_requested)

    def _backoff_delay(self) -> float:
        exponent = min(self._failures - 1, 32)
        ceiling = min(self._backoff_max_s, self._backoff_base_s * 2.0 ** exponent)
        # Equal jitter: instances that failed together do not retry together.
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    async def _pass(self, deadline: float | None, *, interruptible: bool) -> int:
        uploaded = 0
        try:
            segments = self._scan()
            pending = {s.name for s in segments if not self._is_uploaded(s)}
            self._note_pending(pending, segments)
            self._check_disk()
            for seg in segments:
                if seg.name in pending:
                    if interruptible and self._stop_requested.is_set():
                        break
                    if not await self._upload(seg, deadline):
                        break
                    uploaded += 1
                    pending.discard(seg.name)
                    self._note_pending(pending, segments)
                await self._delete_if_loaded(seg)
            self._note_pending(pending, self._scan())
        except (ArchiveError, OSError) as exc:
            self._note_failure(exc)
            raise
        finally:
            if self._on_state is not None:
                self._on_state(self.stats())
        return uploaded

    async def _upload(self, seg: _Segment, deadline: float | None) -> bool:
        """Upload and mark one segment; False when the deadline cut it off."""
        key = archive_key(self._prefix, seg.name)
        remaining = None if deadline is None else deadline - self._clock.monotonic()
        if remaining is not None and remaining <= 0:
            return False
        try:
            async with asyncio.timeout(remaining) as budget:
                result = await self._store.upload_file(self._dir / seg.name, key)
        except TimeoutError:
            if budget.expired():
                log.warning("archive upload of %s abandoned at the deadline", seg.name)
                return False
            raise
        self._write_marker(seg, result)
        self._uploads_total += 1
        self._last_success_at = self._clock.wall()
        if self._failures:
            log.info("archive uploads resumed after %d failures", self._failures)
        self._failures = 0
        self._last_error = None
        log.debug("archived %s as %s (%d bytes)", seg.name, key, result.size)
        return True

    def _scan(self) -> list[_Segment]:
        """Closed segments, oldest first; drops markers whose segment is gone."""
        segments: list[_Segment] = []
        markers: list[str] = []
        with os.scandir(self._dir) as entries:
            for entry in entries:
                name = entry.name
                if not self._mine(name):
                    continue
                if name.endswith(MARKER_SUFFIX):
                    markers.append(name)
                    continue
                if name.endswith(_MARKER_TMP_SUFFIX):
                    # Left by a crash while writing a marker; the marker never counted.
                    with contextlib.suppress(FileNotFoundError):
                        entry_path = self._dir / name
                        entry_path.unlink()
                    continue
                try:
                    parsed: SegmentName = parse_segment_name(name)
                    st = entry.stat()
                except (ValueError, FileNotFoundError):
                    continue
                order = (parsed.hour_epoch, parsed.seq, parsed.instance)
                segments.append(_Segment(order, name, st.st_size, st.st_mtime))
        names = {s.name for s in segments}
        for marker in markers:
            if marker[: -len(MARKER_SUFFIX)] not in names:
                # The segment was deleted after its upload; the marker is stale.
                with contextlib.suppress(FileNotFoundError):
                    (self._dir / marker).unlink()
        segments.sort()
        return segments

    def _mine(self, name: str) -> bool:
        if self._instance is None:
            return True
        # Markers and their temporaries are the segment's name plus a suffix.
        segment = name.split(SEGMENT_SUFFIX, 1)[0] + SEGMENT_SUFFIX
        try:
            return parse_segment_name(segment).instance == self._instance
        except ValueError:
            return False

    def _is_uploaded(self, seg: _Segment) -> bool:
        try:
            doc = orjson.loads((self._dir / (seg.name + MARKER_SUFFIX)).read_bytes())
        except FileNotFoundError:
            return False
        except orjson.JSONDecodeError:
            return False  # torn write at a crash: upload again, it is harmless
        return isinstance(doc, dict) and doc.get("size") == seg.size

    def _write_marker(self, seg: _Segment, result: UploadResult) -> None:
        marker = self._dir / (seg.name + MARKER_SUFFIX)
        tmp = self._dir / (seg.name + _MARKER_TMP_SUFFIX)
        tmp.write_bytes(orjson.dumps(
            {"key": result.key, "size": result.size, "etag": result.etag,
             "parts": result.parts, "uploaded_at": self._clock.wall()}))
        os.replace(tmp, marker)

    async def _delete_if_loaded(self, seg: _Segment) -> None:
        """Delete an uploaded segment Postgres has loaded; past the spool's
        high-water mark, evict it unloaded."""
        if self._may_delete(seg.name):
            await self._remove(seg)
        elif self._evict is not None and self._pressure is not None \
                and self._pressure() >= Pressure.HIGH:
            await self._evict_unloaded(seg)

    async def _remove(self, seg: _Segment) -> None:
        # Segment first: a crash in between leaves a stale marker, which the
        # next scan removes, never a segment that looks not uploaded.
        if self._delete is not None:
            await self._delete(seg.name)
        else:
            with contextlib.suppress(FileNotFoundError):
                (self._dir / seg.name).unlink()
        for suffix in (MARKER_SUFFIX, EVICTED_SUFFIX):
            # (An eviction record is left beside a segment by a crash
            # between the record and the delete.)
            with contextlib.suppress(FileNotFoundError):
                (self._dir / (seg.name + suffix)).unlink()

    async def _evict_unloaded(self, seg: _Segment) -> None:
        assert self._evict is not None
        # The record (the marker: key, size, ETag) is durable before the
        # segment goes, so the loader always knows to read it from S3. A
        # rename needs no free block: it works on a full disk.
        os.replace(self._dir / (seg.name + MARKER_SUFFIX), self._dir / (seg.name + EVICTED_SUFFIX))
        _fsync_dir(self._dir)
        await self._evict(seg.name)
        self._evicted_total += 1
        log.info("spool past its high-water mark: %s left the disk before Postgres loaded "
                 "it; it will be loaded from S3", seg.name)

    async def _shed_unarchived(self) -> None:
        """At the ceiling with S3 failing: delete segments Postgres has
        loaded though S3 has not got them, oldest first, until below it."""
        pressure = self._pressure
        if pressure is None:
            return
        try:
            for seg in self._scan():
                if pressure() < Pressure.FULL:
                    return
                if self._is_uploaded(seg) or not self._may_delete(seg.name):
                    continue
                await self._remove(seg)
                self._unarchived_total += 1
                log.error("spool at its ceiling and S3 unavailable: deleted %s, loaded into "
                          "PostgreSQL but never archived (the archive misses its readings)",
                          seg.name)
        except (PollerError, OSError) as exc:
            log.warning("could not make room in the spool: %s", exc)

    def _note_pending(self, pending: set[str], segments: list[_Segment]) -> None:
        waiting = [s for s in segments if s.name in pending]
        self._pending = len(waiting)
        self._bytes_pending = sum(s.size for s in waiting)
        self._awaiting_delete = len(segments) - len(waiting)
        self._oldest_pending_mtime = min((s.mtime for s in waiting), default=None)

    def _note_failure(self, exc: BaseException) -> None:
        self._failures += 1
        self._last_error = str(exc) or type(exc).__name__
        if self._failures == 1:
            log.warning("archive upload failed, retrying with back-off: %s", self._last_error)
        else:
            log.debug("archive upload failed (%d in a row): %s", self._failures,
                      self._last_error)

    def _check_disk(self) -> None:
        usage = shutil.disk_usage(self._dir)
        # Like df: the share of the space available to us that is used.
        self._disk_used = usage.used / max(1, usage.used + usage.free)
        warn = self._disk_used >= self._disk_warn_fraction
        if warn != self._disk_warning:
            self._disk_warning = warn
            if warn:
                log.warning("spool disk %.0f%% full (warning at %.0f%%); %d segments wait "
                            "for upload", self._disk_used * 100,
                            self._disk_warn_fraction * 100, self._pending)
            else:
                log.info("spool disk back to %.0f%% full", self._disk_used * 100)
