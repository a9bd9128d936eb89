"""Segments the spool let go before Postgres loaded them, read back from S3.

Past the spool's high-water mark the uploader removes a segment that S3
holds verified even though Postgres has not loaded it: it renames the
segment's ``.uploaded`` marker to ``NAME.evicted`` and deletes the file
(:mod:`poller.archive.uploader`). That record (key, size, ETag) is all the
loader needs. The uploader sends a closed segment as it is, byte for byte,
so the object holds the same gzip members at the same offsets as the file
did, and the segment's checkpoint in ``ingest_checkpoints`` (a byte offset)
applies to the object unchanged: a load from S3 resumes where the loads
from disk stopped, in the same transactions that move the checkpoint, so a
member loads exactly once whichever copy it is read from.

Objects are read with the archive reader ``poller replay`` uses
(:class:`~poller.archive.replay.ArchiveReader`), streamed: a segment is never
held whole in memory, nor written back to the disk it left. Once the
checkpoint covers a whole object, its record and its checkpoint go::

    fetch = EvictedSegments(store, spool.directory, "poller-a")
    loader.archived = fetch            # PgLoader.catch_up then loads them too
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import zlib
from collections.abc import AsyncGenerator, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import orjson

from poller.archive.replay import ArchiveReader
from poller.archive.s3 import ArchiveError, ArchiveUnavailable
from poller.archive.uploader import EVICTED_SUFFIX
from poller.ingest.pgload import LoaderError
from poller.segment import parse_segment_name

if TYPE_CHECKING:
    from poller.ingest.pgload import PgLoader

log = logging.getLogger(__name__)

# A chunk of the object that takes longer than this to arrive means the
# event loop is gone or stuck: the reading thread gives up instead of hanging.
_CHUNK_TIMEOUT_S = 300.0


class Evicted(NamedTuple):
    """One segment's record: where S3 has it and how long it is."""

    name: str
    key: str
    size: int
    order: tuple[int, int]
    """(hour, seq): oldest first."""


class EvictedSegments:
    """The segments of ``instance`` that left ``spool_dir`` unloaded.

    ``read_raw_members`` has the signature of
    :meth:`~poller.ingest.spool.Spool.read_raw_members`, so the loader reads
    an evicted segment as it reads one on disk; :meth:`catch_up` loads them
    all (the loader calls it at the end of its own catch-up).
    """

    def __init__(self, store: ArchiveReader, spool_dir: Path | str, instance: str) -> None:
        if not instance:
            raise ValueError("instance must not be empty")
        self._store = store
        self._dir = Path(spool_dir)
        self._instance = instance
        self._loop: asyncio.AbstractEventLoop | None = None
        self.rows_loaded = 0
        """Readings loaded from S3 since start."""
        self.segments_loaded = 0
        self.segments_failed = 0
        """Objects S3 refused or that were damaged (each try counts)."""

    def __repr__(self) -> str:
        return f"EvictedSegments({str(self._dir)!r}, {self._instance!r})"

    def pending(self) -> list[Evicted]:
        """The records of segments still to load, oldest first.

        A record beside a segment still on disk (a crash between the record
        and the delete) is not listed: the disk's copy loads first."""
        found: list[Evicted] = []
        try:
            entries = list(os.scandir(self._dir))
        except FileNotFoundError:
            return []
        names = {e.name for e in entries}
        for entry in entries:
            name = entry.name[: -len(EVICTED_SUFFIX)]
            if not self._is_record(entry.name) or name in names:
                continue
            record = self._read_record(name)
            if record is not None:
                found.append(record)
        found.sort(key=lambda r: r.order)
        return found

    def count(self) -> int:
        """Records in the directory (by name alone: cheap enough for /metrics)."""
        try:
            with os.scandir(self._dir) as entries:
                return sum(1 for e in entries if self._is_record(e.name))
        except FileNotFoundError:
            return 0

    def _is_record(self, file_name: str) -> bool:
        if not file_name.endswith(EVICTED_SUFFIX):
            return False
        try:
            segment = parse_segment_name(file_name[: -len(EVICTED_SUFFIX)])
        except ValueError:
            return False
        return segment.instance == self._instance

    def _read_record(self, name: str) -> Evicted | None:
        path = self._dir / (name + EVICTED_SUFFIX)
        try:
            doc = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except orjson.JSONDecodeError:
            doc = None
        if not (isinstance(doc, dict) and isinstance(doc.get("key"), str)
                and isinstance(doc.get("size"), int)):
            # The marker was verified when written; a damaged one is a bug
            # or a tampered directory: say so and leave it for an operator.
            log.error("archive: %s is not an eviction record; %s is not loaded from S3 "
                      "(poller replay can)", path.name, name)
            return None
        parsed = parse_segment_name(name)
        return Evicted(name, doc["key"], doc["size"], (parsed.hour_epoch, parsed.seq))

    # -- loading -------------------------------------------------------------

    async def catch_up(self, loader: PgLoader) -> int:
        """Load every evicted segment past its checkpoint; return rows inserted.

        Raises :class:`ArchiveUnavailable` (after loading what it could)
        while S3 cannot be reached, and :class:`LoaderUnavailable` while
        Postgres cannot: the records stay for the next try."""
        self._loop = asyncio.get_running_loop()
        records = await asyncio.to_thread(self.pending)
        if not records:
            return 0
        done = await loader.checkpoints()
        total = 0
        for rec in records:
            at = done.get(rec.name, 0)
            if at < rec.size:
                try:
                    inserted = await loader.load_segment(rec.name, at)
                except ArchiveUnavailable:
                    raise
                except ArchiveError as exc:
                    self.segments_failed += 1
                    log.error("archive: %s cannot be loaded from S3 (%s); the record stays "
                              "and it is tried again at the next catch-up", rec.name, exc)
                    continue
                except LoaderError as exc:
                    log.error("loader: %s refused, left in S3: %s", rec.name, exc)
                    continue
                except FileNotFoundError:
                    continue  # loaded and settled by a load running beside this one
                total += inserted
                self.rows_loaded += inserted
            await self._settle(loader, rec)
        if total:
            log.info("loaded %d reading(s) of %d segment(s) from S3", total, len(records))
        return total

    async def _settle(self, loader: PgLoader, rec: Evicted) -> None:
        # The record first: a crash in between leaves a checkpoint of a
        # segment nobody names, which is harmless.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._dir / (rec.name + EVICTED_SUFFIX))
        self.segments_loaded += 1
        await loader.forget(rec.name)

    def read_raw_members(self, segment: str, from_offset: int = 0
                         ) -> Generator[tuple[int, bytes], None, None]:
        """Yield ``(end_offset, ndjson)`` for each member of the archived
        segment past ``from_offset`` (a member boundary), as the spool does.

        Blocking: iterate it on a worker thread, never on the event loop (the
        object streams on the loop). ``FileNotFoundError`` when no record names
        the segment; :class:`ArchiveError` for a damaged or missing object.
        """
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            # On a worker thread (a batch sorted out line by line): the loop
            # of the load that led here.
            if self._loop is None:
                raise RuntimeError("EvictedSegments: no event loop seen yet") from None
        loop = self._loop
        record = self._read_record(segment)
        if record is None:
            raise FileNotFoundError(f"no evicted segment {segment!r} in {self._dir}")
        return split_members(_chunks_via(loop, self._store.stream(record.key)),
                             from_offset, record.size, record.key)


def _chunks_via(loop: asyncio.AbstractEventLoop, stream: AsyncGenerator[bytes, None]
                ) -> Generator[bytes, None, None]:
    """The chunks of an async stream, for a worker thread: each is awaited
    on ``loop`` while the thread waits."""

    async def next_chunk() -> bytes:
        return await anext(stream, b"")

    try:
        while True:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                pass
            else:
                raise RuntimeError("archived members must be read on a worker thread")
            future = asyncio.run_coroutine_threadsafe(next_chunk(), loop)
            try:
                chunk = future.result(_CHUNK_TIMEOUT_S)
            except TimeoutError:
                future.cancel()
                raise ArchiveUnavailable(f"S3 sent nothing for {_CHUNK_TIMEOUT_S:.0f} s") \
                    from None
            if not chunk:
                return
            yield chunk
    finally:
        # Not awaited: the generator may be closed on the loop's own thread.
        if not loop.is_closed():
            asyncio.run_coroutine_threadsafe(stream.aclose(), loop)


def split_members(chunks: Iterator[bytes], start: int, size: int, key: str
                  ) -> Generator[tuple[int, bytes], None, None]:
    """``(end_offset, payload)`` of each gzip member of an object of ``size``
    bytes arriving in ``chunks``, from byte ``start`` (a member boundary) on.

    >>> import gzip
    >>> blob = gzip.compress(b"a\\n") + gzip.compress(b"b\\nc\\n")
    >>> first = len(gzip.compress(b"a\\n"))
    >>> [(end == len(blob), data) for end, data in split_members(iter([blob[:5], blob[5:]]),
    ...                                                            first, len(blob), "k")]
    [(True, b'b\\nc\\n')]

    Raises :class:`ArchiveError` on damage, or when the object is not
    ``size`` bytes long (the members before it are yielded).
    """
    pos = 0
    decomp: zlib._Decompress | None = None
    parts: list[bytes] = []
    for chunk in chunks:
        if pos + len(chunk) <= start:
            pos += len(chunk)  # loaded already: not even decompressed
            continue
        data = chunk[start - pos:] if pos < start else chunk
        pos = max(pos, start)
        while data:
            if decomp is None:
                decomp = zlib.decompressobj(31)
                parts = []
            try:
                parts.append(decomp.decompress(data))
            except zlib.error as exc:
                raise ArchiveError(f"S3 object {key}: bad gzip data after byte {pos}: "
                                   f"{exc}") from None
            if not decomp.eof:
                pos += len(data)
                break
            rest = decomp.unused_data
            pos += len(data) - len(rest)
            yield pos, b"".join(parts)
            decomp = None
            data = rest
    if decomp is not None or pos != size:
        raise ArchiveError(f"S3 object {key}: {pos} bytes of whole members where the "
                           f"segment had {size}")
