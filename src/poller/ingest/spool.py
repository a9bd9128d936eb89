"""The durable local spool: hourly gzip segments of NDJSON readings.

A batch counts as durable once :meth:`Spool.append` returns: each UTC hour it
touches got one complete gzip member appended to that hour's open segment
and the file was fsynced. A crash can leave at most a torn trailing member,
which :meth:`Spool.open` cuts off; every earlier member survives. Members are
plain gzip members, so a whole segment reads with ``zcat``.

Segment files are ``{instance}-{YYYYMMDDTHH}-{seq:06d}.ndjson.gz``, with the
suffix ``.open`` while written. The name without ``.open`` identifies a
segment for its whole life (checkpoints, archive keys). ``seq`` is global and
never reused, so a reading that arrives for an hour already closed goes to a
new segment instead of reopening a finished file.

File work runs on one worker thread owned by the spool, which also orders
every write; the event loop only awaits it.

One process writes an instance's segments: :meth:`Spool.open` takes an
exclusive ``flock`` on ``{instance}.lock`` in the directory and holds it until
:meth:`Spool.close` (or the process's death, even by kill -9). A second
``poller serve`` on the same state directory and instance id is refused: two
writers would each close, upload and delete the other's segments. Instances
with different ids may share a directory: each has its own lock, its own
sequence file ``{instance}.seq`` and touches only segments named for it.

The spool has a hard ceiling (``ingest.spool_max_bytes``, and
``ingest.spool_max_percent`` of its file system as ``df`` counts): a batch
that would pass it is refused with :class:`SpoolFull`, as a full disk
(ENOSPC) refuses one. Above the high-water mark (:meth:`Spool.pressure`) the
service lets segments S3 holds leave the disk before Postgres loads them
(see :mod:`poller.archive.fetch`). Every ``OSError`` of the spool's files
comes out as a :class:`SpoolError` and is counted in ``io_errors``.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import fcntl
import gzip
import logging
import os
import sys
import threading
import time
import zlib
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, TypeVar

from poller.errors import PollerError
from poller.reading import PlainReading, Reading
from poller.segment import (
    OPEN_SUFFIX,
    decode_readings,
    encode_readings,
    hour_label,
    is_instance_id,
    parse_segment_name,
    segment_name,
)

log = logging.getLogger(__name__)

HOUR_S = 3600
SEQ_FILE = "seq"
"""The sequence file every instance shared before each got its own
(``{instance}.seq``); still read, so numbers never go back after an upgrade."""
# Level 3 costs about as much CPU as level 1 here and writes smaller files.
COMPRESS_LEVEL = 3
_READ_CHUNK = 1 << 20
_T = TypeVar("_T")


class SpoolError(PollerError):
    """The spool could not write or read its files (disk full, I/O error)."""

    def __init__(self, message: str, written: Sequence[SpoolPosition] = ()) -> None:
        super().__init__(message)
        self.written: tuple[SpoolPosition, ...] = tuple(written)
        """Members of the failed batch that were made durable before the failure."""


class SpoolFull(SpoolError):
    """The batch would pass the spool's ceiling or the disk is full (ENOSPC):
    nothing after ``written`` was written. Retry once space frees."""

    def __init__(self, message: str, written: Sequence[SpoolPosition] = (),
                 needed_bytes: int = 0) -> None:
        super().__init__(message, written)
        self.needed_bytes = needed_bytes
        """Size of the member that did not fit."""


class Pressure(enum.IntEnum):
    """How close the spool is to its ceiling."""

    NONE = 0
    HIGH = 1
    """At or past the high-water mark: segments S3 holds may leave unloaded."""
    FULL = 2
    """Within :data:`FULL_FRACTION` of the ceiling: the next batches may not fit."""


FULL_FRACTION = 0.9


class SpoolUsage(NamedTuple):
    spool_bytes: int
    ceiling_bytes: int
    """What the spool may hold now: the least of ``max_bytes`` and what keeps
    its file system under ``max_disk_fraction`` in use (as ``df`` counts)."""
    disk_used_fraction: float


class SpoolPosition(NamedTuple):
    """Where one appended member lies: ``segment`` bytes up to ``end_offset``."""

    segment: str
    end_offset: int
    hour: int
    """Start of the member's UTC hour, Unix seconds."""
    rows: int
    start_offset: int = -1
    """Where the member begins; -1 when unknown. A loader uses it to notice a
    member it never saw (its checkpoint then lies before ``start_offset``)."""


class SegmentInfo(NamedTuple):
    name: str
    hour: int
    seq: int
    size: int
    """Bytes known durable (open segment) or the file size (closed segment)."""
    closed: bool


class _OpenSegment:
    __slots__ = ("fd", "hour", "name", "seq", "size")

    def __init__(self, name: str, hour: int, seq: int, fd: int, size: int) -> None:
        self.name = name
        self.hour = hour
        self.seq = seq
        self.fd = fd
        self.size = size

    def info(self) -> SegmentInfo:
        return SegmentInfo(self.name, self.hour, self.seq, self.size, False)


def walk_members(fh: BinaryIO, start: int, limit: int,
                 want_data: bool) -> Iterator[tuple[int, bytes]]:
    """Yield ``(end_offset, payload)`` for each intact gzip member in
    ``[start, limit)``; stop silently at the first incomplete or corrupt one."""
    fh.seek(start)
    pos = start
    pending = b""
    decomp: Any = None
    parts: list[bytes] = []
    while True:
        if not pending:
            # Everything read so far was consumed: the file cursor is at pos.
            want = min(_READ_CHUNK, limit - pos)
            pending = fh.read(want) if want > 0 else b""
            if not pending:
                return
        if decomp is None:
            decomp = zlib.decompressobj(31)
            parts = []
        try:
            out = decomp.decompress(pending)
        except zlib.error:
            return
        consumed = len(pending) - len(decomp.unused_data)
        pos += consumed
        if want_data:
            parts.append(out)
        if decomp.eof:
            yield pos, b"".join(parts)
            pending = decomp.unused_data
            decomp = None
        else:
            pending = b""


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class Spool:
    """Hourly segment files under ``directory``, written by one instance.

    >>> spool = Spool(Path("var/spool"), "poller-a")   # doctest: +SKIP
    >>> await spool.open()                               # doctest: +SKIP
    >>> positions = await spool.append(batch)            # durable from here
    >>> await spool.rotate()                             # hourly housekeeping
    >>> await spool.close()

    ``clock`` reads wall time (Unix seconds): the service passes its clock's
    ``wall`` (:mod:`poller.clock`). It decides which hours are over.
    """

    def __init__(self, directory: Path, instance_id: str,
                 clock: Callable[[], float] = time.time, *, grace_s: float = 30.0,
                 max_bytes: int = 0, max_disk_fraction: float = 1.0,
                 high_water_fraction: float = 0.5) -> None:
        if not is_instance_id(instance_id):
            # Segment names carry it, and only this rule parses back.
            raise ValueError("instance_id must be 1-63 of A-Z a-z 0-9 _ . - (a letter or "
                             f"digit first), got {instance_id!r}")
        if grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {grace_s!r}")
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 (0: no byte ceiling), got {max_bytes!r}")
        if not 0 < max_disk_fraction <= 1 or not 0 < high_water_fraction <= 1:
            raise ValueError("max_disk_fraction and high_water_fraction must be in (0, 1]")
        self.directory = Path(directory)
        self.instance_id = instance_id
        self.grace_s = grace_s
        self.max_bytes = max_bytes
        """Hard ceiling of the segment files' bytes; 0: none."""
        self.max_disk_fraction = max_disk_fraction
        """The spool writes nothing that takes its file system past this share
        in use; 1.0: the disk itself decides (ENOSPC)."""
        self.high_water_fraction = high_water_fraction
        self._clock = clock
        self._lock = threading.Lock()
        self._open: dict[int, _OpenSegment] = {}
        self._closed: dict[str, SegmentInfo] = {}
        self._next_seq = 1
        self._executor: ThreadPoolExecutor | None = None
        self._lock_fd: int | None = None
        self.cut_bytes = 0
        """Bytes of torn tails cut at the last :meth:`open`."""
        self.io_errors = 0
        """Operations on the spool's files that failed with an ``OSError``."""

    # -- lifecycle ---------------------------------------------------------

    async def open(self) -> None:
        """Create the directory, repair ``.open`` files a crash left, load state."""
        if self._executor is not None:
            raise RuntimeError("Spool.open() called twice")
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="spool")
        try:
            await self._run(self._open_sync)
        except BaseException:
            self._executor.shutdown(wait=True)
            self._executor = None
            self._unlock()
            raise

    @property
    def is_open(self) -> bool:
        return self._executor is not None

    async def close(self) -> None:
        """Close every open segment and stop the worker thread. Idempotent."""
        if self._executor is None:
            return
        try:
            await self._run(self._close_all_sync)
        finally:
            self._executor.shutdown(wait=True)
            self._executor = None
            self._unlock()

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._executor is None:
            raise RuntimeError("the spool is not open: call await spool.open() first")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except OSError as exc:
            # EIO, EROFS, ENOSPC on a close, a rename or an unlink: the
            # caller retries later; a crash would only lose the buffer.
            self.io_errors += 1
            raise SpoolError(f"spool {self.directory}: {exc}") from exc

    # -- writing -----------------------------------------------------------

    async def append(self, batch: Sequence[PlainReading]) -> list[SpoolPosition]:
        """Append ``batch`` durably: one gzip member per UTC hour it touches.

        Returns one position per member, in hour order. Raises SpoolError when
        the disk refuses; ``SpoolError.written`` lists the members already made
        durable, the rest of the batch was not written at all.
        """
        if not batch:
            return []
        return await self._run(self._append_sync, batch)

    async def rotate(self, now: float | None = None) -> list[SegmentInfo]:
        """Close the segments of every hour H with ``now >= H + 1h + grace_s``."""
        at = self._clock() if now is None else now
        return await self._run(self._rotate_sync, at)

    async def close_hour(self, hour: int) -> SegmentInfo | None:
        return await self._run(self._close_hour_sync, hour)

    async def close_all(self) -> list[SegmentInfo]:
        return await self._run(self._close_all_sync)

    async def close_early(self, min_bytes: int) -> list[SegmentInfo]:
        """Close every open segment holding at least ``min_bytes`` (and at
        least one member) before its hour is over: under disk pressure a
        closed segment can go to S3 and leave the disk. Later readings of its
        hour start a new segment."""
        return await self._run(self._close_early_sync, max(1, min_bytes))

    async def delete(self, segment: str) -> None:
        """Remove a closed segment (the caller decided it is archived and loaded).

        Fits the archive uploader's ``delete`` hook. Refuses an open segment."""
        await self._run(self._delete_sync, segment)

    # -- reading -----------------------------------------------------------

    def segments(self) -> list[SegmentInfo]:
        """Every segment, open and closed, oldest first (hour, then seq)."""
        with self._lock:
            found = list(self._closed.values()) + [s.info() for s in self._open.values()]
        found.sort(key=lambda s: (s.hour, s.seq))
        return found

    def closed_segments(self) -> list[SegmentInfo]:
        with self._lock:
            found = list(self._closed.values())
        found.sort(key=lambda s: (s.hour, s.seq))
        return found

    def segment(self, name: str) -> SegmentInfo | None:
        with self._lock:
            info = self._closed.get(name)
            if info is not None:
                return info
            for seg in self._open.values():
                if seg.name == name:
                    return seg.info()
        return None

    def path_of(self, segment: str, *, closed: bool = True) -> Path:
        return self.directory / (segment if closed else segment + OPEN_SUFFIX)

    @property
    def pending_bytes(self) -> int:
        """Bytes held in segment files (not yet deleted)."""
        with self._lock:
            return (sum(s.size for s in self._closed.values())
                    + sum(s.size for s in self._open.values()))

    def disk_usage(self) -> tuple[int, float]:
        """``(spool_bytes, fraction of the file system in use)``, as ``df`` counts."""
        usage = self.usage()
        return usage.spool_bytes, usage.disk_used_fraction

    def usage(self) -> SpoolUsage:
        """The spool's bytes, its ceiling now and its disk's use (one ``statvfs``).

        Raises :class:`SpoolError` when the file system cannot be asked."""
        return self._usage(enforced=False)

    def pressure(self, usage: SpoolUsage | None = None) -> Pressure:
        """Where the spool stands against its ceiling (``usage``: one just read)."""
        if usage is None:
            usage = self.usage()
        if usage.spool_bytes <= 0:
            return Pressure.NONE
        if usage.spool_bytes >= FULL_FRACTION * usage.ceiling_bytes:
            return Pressure.FULL
        if usage.spool_bytes >= self.high_water_fraction * usage.ceiling_bytes:
            return Pressure.HIGH
        return Pressure.NONE

    def _usage(self, *, enforced: bool) -> SpoolUsage:
        """``enforced``: the ceiling append keeps to, where a disk allowed to
        fill (``max_disk_fraction`` 1.0) is left to the kernel's ENOSPC;
        otherwise the ceiling as reported, the full disk included."""
        spool_bytes = self.pending_bytes
        try:
            st = os.statvfs(self.directory)
        except OSError as exc:
            self.io_errors += 1
            raise SpoolError(f"spool {self.directory}: {exc}") from exc
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        avail = st.f_bavail * st.f_frsize
        total = used + avail
        ceiling = sys.maxsize
        if self.max_disk_fraction < 1.0 or not enforced:
            # Room left before the disk is max_disk_fraction full; the spool's
            # own bytes are in ``used`` already.
            ceiling = spool_bytes + max(0, int(self.max_disk_fraction * total) - used)
        if self.max_bytes:
            ceiling = min(ceiling, self.max_bytes)
        return SpoolUsage(spool_bytes, ceiling, used / total if total else 1.0)

    def read_members(self, segment: str, from_offset: int = 0
                     ) -> Generator[tuple[int, list[Reading]], None, None]:
        """Yield ``(end_offset, readings)`` for each intact member after ``from_offset``.

        Blocking file I/O: run it on a worker thread. ``from_offset`` must be a
        member boundary (0 or an ``end_offset``). Works on open and closed
        segments; an open one is read only up to what is durable.
        """
        with closing(self.read_raw_members(segment, from_offset)) as members:
            for end, payload in members:
                yield end, decode_readings(payload)

    def read_raw_members(self, segment: str, from_offset: int = 0
                         ) -> Generator[tuple[int, bytes], None, None]:
        """As :meth:`read_members`, with each member's NDJSON left undecoded."""
        info = self.segment(segment)
        if info is None:
            raise FileNotFoundError(f"no segment {segment!r} in {self.directory}")
        with self._open_for_read(segment) as fh:
            limit = info.size if not info.closed else os.fstat(fh.fileno()).st_size
            yield from walk_members(fh, from_offset, limit, want_data=True)

    def _open_for_read(self, segment: str) -> BinaryIO:
        # The writer may rename ``.open`` to the final name at any moment.
        for path in (self.path_of(segment), self.path_of(segment, closed=False),
                     self.path_of(segment)):
            try:
                return path.open("rb")
            except FileNotFoundError:
                continue
        raise FileNotFoundError(f"segment {segment!r} vanished from {self.directory}")

    # -- worker thread -----------------------------------------------------

    def _lock_directory(self) -> None:
        path = self.directory / f"{self.instance_id}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise SpoolError(
                f"spool {self.directory} is in use by {who} with instance id "
                f"{self.instance_id!r}: one poller per spool (give each its own "
                "state_dir or instance_id)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # releases the flock

    def _open_sync(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_directory()
        max_seq = 0
        open_files: list[tuple[int, int, str]] = []
        for entry in os.scandir(self.directory):
            try:
                _, hour, seq = parsed = parse_segment_name(entry.name, open_ok=True)
            except ValueError:
                continue  # not a segment (a lock, a marker, a stray file)
            if parsed.instance != self.instance_id:
                continue
            max_seq = max(max_seq, seq)
            if entry.name.endswith(OPEN_SUFFIX):
                open_files.append((hour, seq, entry.name[: -len(OPEN_SUFFIX)]))
            else:
                self._closed[entry.name] = SegmentInfo(
                    entry.name, hour, seq, entry.stat().st_size, True)
        self._next_seq = max(max_seq + 1, self._read_seq_file())
        now = self._clock()
        open_files.sort()
        for hour, seq, name in open_files:
            size = self._repair(name)
            fd = os.open(self.path_of(name, closed=False), os.O_WRONLY | os.O_APPEND)
            seg = _OpenSegment(name, hour, seq, fd, size)
            previous = self._open.get(hour)
            if previous is not None:
                # Two open files of one hour (a failed write started a new one):
                # keep appending to the newest only.
                self._close_segment(previous)
            self._open[hour] = seg
            if now >= hour + HOUR_S + self.grace_s:
                self._close_hour_sync(hour)

    def _repair(self, name: str) -> int:
        path = self.path_of(name, closed=False)
        with path.open("r+b") as fh:
            size = os.fstat(fh.fileno()).st_size
            good = 0
            for end, _ in walk_members(fh, 0, size, want_data=False):
                good = end
            if good < size:
                fh.truncate(good)
                fh.flush()
                os.fsync(fh.fileno())
                self.cut_bytes += size - good
                log.warning("spool: cut a torn tail of %d bytes from %s (kept %d bytes of "
                            "intact members)", size - good, path.name, good,
                            extra={"segment": name, "cut_bytes": size - good})
        return good

    @property
    def _seq_name(self) -> str:
        return f"{self.instance_id}.seq"

    def _read_seq_file(self) -> int:
        return max(self._read_seq(self._seq_name), self._read_seq(SEQ_FILE))

    def _read_seq(self, name: str) -> int:
        try:
            text = (self.directory / name).read_text("ascii").strip()
        except FileNotFoundError:
            return 1
        try:
            return max(1, int(text))
        except ValueError:
            log.warning("spool: ignoring a malformed %s file: %r", name, text[:40])
            return 1

    def _write_seq_file(self, next_seq: int) -> None:
        tmp = self.directory / (self._seq_name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, f"{next_seq}\n".encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.directory / self._seq_name)

    def _new_segment(self, hour: int) -> _OpenSegment:
        seq = self._next_seq
        # The state file moves first: a crash in between leaves a gap in the
        # numbers, never a number used twice.
        self._write_seq_file(seq + 1)
        self._next_seq = seq + 1
        name = segment_name(self.instance_id, hour, seq)
        fd = os.open(self.path_of(name, closed=False),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        _fsync_dir(self.directory)
        seg = _OpenSegment(name, hour, seq, fd, 0)
        with self._lock:
            self._open[hour] = seg
        return seg

    def _append_sync(self, batch: Sequence[PlainReading]) -> list[SpoolPosition]:
        by_hour: dict[int, list[PlainReading]] = {}
        for reading in batch:
            hour = int(reading[1] // HOUR_S) * HOUR_S
            rows = by_hour.get(hour)
            if rows is None:
                by_hour[hour] = [reading]
            else:
                rows.append(reading)
        # Every member is made before any is written: a failure to encode
        # then leaves the whole batch unwritten, never a part of it.
        members = [(hour, len(by_hour[hour]),
                    gzip.compress(encode_readings(by_hour[hour]), COMPRESS_LEVEL, mtime=0))
                   for hour in sorted(by_hour)]
        room = self._usage(enforced=True).ceiling_bytes - self.pending_bytes
        positions: list[SpoolPosition] = []
        for hour, n_rows, member in members:
            if len(member) > room:
                raise SpoolFull(f"spool: {len(member)} bytes of hour {hour_label(hour)} would "
                                f"pass the ceiling of {self.directory} ({max(0, room)} bytes "
                                "left)", positions, len(member))
            try:
                seg = self._open.get(hour) or self._new_segment(hour)
                start = seg.size
                self._write_member(seg, member)
            except OSError as exc:
                self.io_errors += 1
                message = (f"spool: cannot append {n_rows} readings of hour {hour_label(hour)} "
                           f"in {self.directory}: {exc}")
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise SpoolFull(message, positions, len(member)) from exc
                raise SpoolError(message, positions) from exc
            room -= len(member)
            positions.append(SpoolPosition(seg.name, seg.size, hour, n_rows, start))
        return positions

    def _write_member(self, seg: _OpenSegment, member: bytes) -> None:
        start = seg.size
        try:
            _write_all(seg.fd, member)
            os.fdatasync(seg.fd)
        except OSError:
            try:
                os.ftruncate(seg.fd, start)
                os.fdatasync(seg.fd)
            except OSError:
                # The tail stays torn: stop appending to this file. Restart
                # repair cuts the tail; the next batch of the hour starts a
                # new segment.
                with self._lock:
                    del self._open[seg.hour]
                os.close(seg.fd)
            raise
        seg.size = start + len(member)

    def _rotate_sync(self, now: float) -> list[SegmentInfo]:
        due = [h for h in self._open if now >= h + HOUR_S + self.grace_s]
        closed: list[SegmentInfo] = []
        for hour in sorted(due):
            info = self._close_hour_sync(hour)
            if info is not None:
                closed.append(info)
        return closed

    def _close_hour_sync(self, hour: int) -> SegmentInfo | None:
        seg = self._open.get(hour)
        if seg is None:
            return None
        return self._close_segment(seg)

    def _close_segment(self, seg: _OpenSegment) -> SegmentInfo | None:
        os.fsync(seg.fd)
        os.close(seg.fd)
        src = self.path_of(seg.name, closed=False)
        info: SegmentInfo | None = None
        if seg.size == 0:
            # Nothing was ever made durable in it: nothing to archive or load.
            src.unlink()
        else:
            os.rename(src, self.path_of(seg.name))
            info = SegmentInfo(seg.name, seg.hour, seg.seq, seg.size, True)
        _fsync_dir(self.directory)
        with self._lock:
            if self._open.get(seg.hour) is seg:
                del self._open[seg.hour]
            if info is not None:
                self._closed[info.name] = info
        log.info("spool: closed %s (%d bytes)", seg.name, seg.size)
        return info

    def _close_early_sync(self, min_bytes: int) -> list[SegmentInfo]:
        closed: list[SegmentInfo] = []
        for hour in sorted(self._open):
            seg = self._open[hour]
            if seg.size >= min_bytes:
                info = self._close_segment(seg)
                if info is not None:
                    closed.append(info)
        return closed

    def _close_all_sync(self) -> list[SegmentInfo]:
        closed: list[SegmentInfo] = []
        for hour in sorted(self._open):
            info = self._close_hour_sync(hour)
            if info is not None:
                closed.append(info)
        return closed

    def _delete_sync(self, segment: str) -> None:
        try:
            mine = parse_segment_name(segment).instance == self.instance_id
        except ValueError:
            mine = False
        if not mine:
            raise SpoolError(f"spool: {segment} is not a segment of instance "
                             f"{self.instance_id!r}; left alone")
        with self._lock:
            if any(s.name == segment for s in self._open.values()):
                raise SpoolError(f"spool: {segment} is still open; close it before deleting")
        # A segment someone else already removed is simply gone.
        self.path_of(segment).unlink(missing_ok=True)
        _fsync_dir(self.directory)
        with self._lock:
            self._closed.pop(segment, None)
