"""The reading buffer when the spool cannot write: readings stay in memory,
none lost or doubled, and the loops are told to skip ticks once it is full."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from poller.config import IngestSettings
from poller.ingest.pgload import PgLoader
from poller.ingest.pipeline import Ingest
from poller.ingest.spool import Spool, SpoolError, SpoolPosition
from poller.reading import Reading
from tests.rows import make_rows


class _DiskSpool(Spool):
    """A real spool whose disk can be made to refuse every write."""

    full = False

    async def append(self, batch: Sequence[Reading]) -> list[SpoolPosition]:
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
