"""The reading buffer: flushed by age and hour files closed on the injected
clock (a FakeClock the tests move); when the spool cannot write, readings stay
in memory, none lost or doubled, and the loops skip ticks once it is full."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

from poller.clock import FakeClock
from poller.config import IngestSettings
from poller.ingest.pgload import PgLoader
from poller.ingest.pipeline import Ingest
from poller.ingest.spool import Spool, SpoolError, SpoolPosition
from poller.reading import PlainReading, Reading
from tests.rows import make_rows


class _DiskSpool(Spool):
    """A real spool whose disk can be made to refuse every write."""

    full = False

    async def append(self, batch: Sequence[PlainReading]) -> list[SpoolPosition]:
        if self.full:
            raise SpoolError("spool: no space left on device")
        return await super().append(batch)


async def test_full_spool_holds_readings_and_stops_accepting_at_the_bound(
        tmp_path: Path) -> None:
    spool = _DiskSpool(tmp_path / "spool", "t", time.time)
    await spool.open()
    # The loader is never started: this test stops at the spool.
    loader = PgLoader("postgresql://127.0.0.1:1/unused", "t", spool)
    ingest = Ingest(IngestSettings(batch_rows=2, buffer_max_rows=3), spool, loader, None, None)
    rows = make_rows(4, 1_700_000_000.0)
    try:
        spool.full = True
        ingest.accept(rows[0])
        ingest.accept(rows[1])
        assert ingest.accepting
        assert not await ingest._flush_once()
        assert ingest.buffer_rows == 2 and ingest.accepting and not ingest.spool_ok
        ingest.accept(rows[2])
        assert not ingest.accepting  # at buffer_max_rows: loops skip ticks
        assert not await ingest._flush_once()
        assert ingest.buffer_rows == 3 and not ingest.accepting

        spool.full = False
        assert await ingest._flush_once()
        assert ingest.buffer_rows == 0 and ingest.accepting and ingest.spool_ok
        ingest.accept(rows[3])
        assert await ingest._flush_once()
        stored = [r for seg in spool.segments() for _, batch in spool.read_members(seg.name)
                  for r in batch]
        assert sorted(stored) == sorted(rows)  # every reading, each once
    finally:
        await spool.close()


async def test_a_start_refused_by_a_held_spool_stops_cleanly(tmp_path: Path) -> None:
    holder = Spool(tmp_path / "spool", "t", time.time)
    await holder.open()
    try:
        spool = Spool(tmp_path / "spool", "t", time.time)
        loader = PgLoader("postgresql://127.0.0.1:1/unused", "t", spool)
        ingest = Ingest(IngestSettings(), spool, loader, None, None)
        with pytest.raises(SpoolError, match="one poller per spool"):
            await ingest.start()
        await ingest.stop(time.monotonic() + 5)  # no second error hides the first
        assert not spool.is_open
    finally:
        await holder.close()


H0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z, an hour boundary
UNREACHABLE = "postgresql://127.0.0.1:1/unused"


async def _eventually(cond: Callable[[], bool], what: str) -> None:
    """Wait, in real time, for the spool's writer thread (real disk I/O)."""
    deadline = time.monotonic() + 10
    while not cond():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.005)


@pytest.fixture
async def clocked(tmp_path: Path) -> AsyncIterator[tuple[Ingest, Spool, FakeClock]]:
    """Ingest on a FakeClock that starts ten seconds before the end of hour H0;
    Postgres is out of reach (the loader waits, the spool keeps everything)."""
    clock = FakeClock(wall=H0 + 3590.0)
    spool = Spool(tmp_path / "spool", "t", clock.wall)
    loader = PgLoader(UNREACHABLE, "t", spool, timeout_s=2.0)
    ingest = Ingest(IngestSettings(batch_rows=1000, flush_interval_s=2.0), spool, loader,
                    None, None, clock)
    await ingest.start()
    try:
        yield ingest, spool, clock
    finally:
        await ingest.stop(clock.monotonic() + 5)


def _stored(spool: Spool) -> list[Reading]:
    return [r for seg in spool.segments() for _, batch in spool.read_members(seg.name)
            for r in batch]


async def test_a_batch_below_the_size_is_flushed_by_age(
        clocked: tuple[Ingest, Spool, FakeClock]) -> None:
    ingest, spool, clock = clocked
    rows = make_rows(3, H0 + 3580.0)
    for r in rows:
        ingest.accept(r)
    await clock.run(1.9)
    assert ingest.buffer_rows == 3  # younger than flush_interval_s: still in memory
    assert _stored(spool) == []
    await clock.run(0.2)
    assert ingest.buffer_rows == 0  # taken by the flusher at two seconds
    await _eventually(lambda: len(_stored(spool)) == 3, "the batch never reached the spool")
    assert sorted(_stored(spool)) == sorted(rows)


async def test_an_hour_file_closes_after_its_hour_and_the_grace(
        clocked: tuple[Ingest, Spool, FakeClock]) -> None:
    ingest, spool, clock = clocked
    for r in make_rows(2, H0 + 3580.0):
        ingest.accept(r)
    await clock.run(2.0)
    await _eventually(lambda: len(spool.segments()) == 1, "no segment opened")
    [segment] = spool.segments()
    assert segment.hour == H0 and not segment.closed
    await clock.run(8.0 + 29.0)  # the hour is over; 29 s of its 30 s grace
    # (The spool's one writer thread runs this after any rotation under way.)
    assert await spool.rotate(clock.wall()) == []
    assert not spool.segments()[0].closed
    # Past the grace, the flusher's next rotation closes it. The flusher set
    # its timer when its last flush (real disk, on the writer thread) ended,
    # which may be after the clock moved on: step the clock until it fires,
    # within a flush interval and a rotation period of fake time.
    for _ in range(12):
        if spool.segments()[0].closed:
            break
        await clock.run(0.25)
        await asyncio.sleep(0.01)  # the writer thread: real disk I/O
    await _eventually(lambda: spool.segments()[0].closed, "the hour file stayed open")
    assert [s.name for s in spool.closed_segments()] == [segment.name]
