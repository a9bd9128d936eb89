"""The spool: durable hourly gzip segments, torn-tail repair, rotation by clock."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poller.ingest.spool import Spool, SpoolError, SpoolPosition
from poller.reading import Reading
from poller.segment import OPEN_SUFFIX, decode_readings, encode_readings, parse_segment_name
from tests.rows import FakeClock, make_rows

H0 = 1_763_884_800  # 2025-11-23T08:00:00Z, an hour boundary


async def opened(directory: Path, clock: FakeClock, instance: str = "inst-1.a") -> Spool:
    spool = Spool(directory, instance, clock)
    await spool.open()
    return spool


def read_all(spool: Spool, name: str) -> list[Reading]:
    return [r for _, rows in spool.read_members(name) for r in rows]


async def test_append_splits_by_hour_and_files_are_plain_gzip(tmp_path: Path) -> None:
    clock = FakeClock(H0 + 3599)
    spool = await opened(tmp_path, clock)
    late = make_rows(3, H0 - 10, first_id=100)
    now = make_rows(4, H0 + 5)
    positions = await spool.append(late + now)
    assert [(p.hour, p.rows, p.start_offset) for p in positions] == [
        (H0 - 3600, 3, 0), (H0, 4, 0)]
    more = make_rows(2, H0 + 6, first_id=50)
    (p2,) = await spool.append(more)
    assert p2.segment == positions[1].segment and p2.start_offset == positions[1].end_offset
    names = sorted(os.listdir(tmp_path))
    assert names == ["inst-1.a-20251123T07-000001.ndjson.gz.open",
                     "inst-1.a-20251123T08-000002.ndjson.gz.open", "inst-1.a.lock",
                     "inst-1.a.seq"]
    # Each member is a complete gzip member: the whole file reads with gzip.open and zcat.
    path = tmp_path / names[1]
    with gzip.open(path, "rb") as fh:
        assert decode_readings(fh.read()) == now + more
    zcat = shutil.which("zcat")
    assert zcat is not None
    out = subprocess.run([zcat], stdin=path.open("rb"), capture_output=True, check=True).stdout
    assert decode_readings(out) == now + more
    # Member boundaries are where append said.
    raw = path.read_bytes()
    assert len(raw) == p2.end_offset
    first = zlib.decompressobj(31)
    first.decompress(raw)
    assert len(raw) - len(first.unused_data) == positions[1].end_offset
    assert read_all(spool, positions[1].segment) == now + more
    assert [e for e, _ in spool.read_members(positions[1].segment, positions[1].end_offset)] \
        == [p2.end_offset]
    await spool.close()
    closed = sorted(os.listdir(tmp_path))
    assert not any(n.endswith(OPEN_SUFFIX) for n in closed)
    with gzip.open(tmp_path / positions[1].segment, "rb") as fh:
        assert decode_readings(fh.read()) == now + more


async def test_rotation_by_clock_and_late_readings_open_a_new_segment(tmp_path: Path) -> None:
    clock = FakeClock(H0 + 10)
    spool = await opened(tmp_path, clock)
    (p1,) = await spool.append(make_rows(2, H0 + 1))
    assert await spool.rotate() == []
    clock.now = H0 + 3600 + 29.9  # within the grace period: still open
    assert await spool.rotate() == []
    (late1,) = await spool.append(make_rows(1, H0 + 3599, first_id=7))
    assert late1.segment == p1.segment
    clock.now = H0 + 3600 + 30
    closed = await spool.rotate()
    assert [c.name for c in closed] == [p1.segment]
    assert closed[0].size == late1.end_offset and closed[0].closed
    assert (tmp_path / p1.segment).exists()
    assert not (tmp_path / (p1.segment + OPEN_SUFFIX)).exists()
    # A reading for the closed hour goes to a new segment, seq moved on.
    (late2,) = await spool.append(make_rows(1, H0 + 3000, first_id=9))
    assert late2.segment != p1.segment and late2.start_offset == 0
    assert parse_segment_name(late2.segment)[1:3] == (H0, 2)
    assert (tmp_path / p1.segment).stat().st_size == late1.end_offset
    await spool.rotate()
    assert [s.name for s in spool.closed_segments()] == [p1.segment, late2.segment]
    assert spool.segments() == spool.closed_segments()
    await spool.close()


async def test_seq_survives_reopen_and_deletion(tmp_path: Path) -> None:
    clock = FakeClock(H0 + 10)
    spool = await opened(tmp_path, clock)
    (a,) = await spool.append(make_rows(1, H0))
    await spool.close()
    spool = await opened(tmp_path, clock)
    # close() closed the hour: the same hour continues in a new segment.
    (b,) = await spool.append(make_rows(1, H0 + 1, first_id=2))
    assert parse_segment_name(b.segment)[1:3] == (H0, 2)
    await spool.close_all()
    await spool.delete(a.segment)
    await spool.delete(b.segment)
    assert spool.closed_segments() == [] and spool.pending_bytes == 0
    await spool.close()
    # Every segment is gone; the state file still carries the sequence on.
    spool = await opened(tmp_path, clock)
    (c,) = await spool.append(make_rows(1, H0 + 2, first_id=3))
    assert parse_segment_name(c.segment).seq == 3
    await spool.close()
    # A lost state file: the files present still win.
    (tmp_path / "inst-1.a.seq").unlink()
    spool = await opened(tmp_path, clock)
    (d,) = await spool.append(make_rows(1, H0 + 3, first_id=4))
    assert parse_segment_name(d.segment).seq == 4
    await spool.close()
    # The state file all instances shared before each had its own is still
    # read (after an upgrade numbers never go back), and never written.
    (tmp_path / "seq").write_text("40\n")
    spool = await opened(tmp_path, clock)
    (e,) = await spool.append(make_rows(1, H0 + 4, first_id=5))
    assert parse_segment_name(e.segment).seq == 40
    await spool.close()
    assert (tmp_path / "seq").read_text() == "40\n"
    assert (tmp_path / "inst-1.a.seq").read_text() == "41\n"


async def test_open_closes_stale_open_files_and_keeps_current_ones(tmp_path: Path) -> None:
    clock = FakeClock(H0 + 3500)
    spool = await opened(tmp_path, clock)
    old, cur = await spool.append(make_rows(2, H0 - 100) + make_rows(2, H0 + 1, first_id=5))
    # Simulate kill -9: no close(); the worker thread stops and the lock goes
    # with the process (its file descriptors close).
    assert spool._executor is not None
    spool._executor.shutdown()
    spool._unlock()
    clock.now = H0 + 3600 + 5
    again = await opened(tmp_path, clock)
    assert [s.name for s in again.closed_segments()] == [old.segment]
    assert [(s.name, s.closed) for s in again.segments()] == [
        (old.segment, True), (cur.segment, False)]
    (nxt,) = await again.append(make_rows(1, H0 + 2, first_id=9))
    assert nxt.segment == cur.segment and nxt.start_offset == cur.end_offset
    await again.close()


def _member(rows: list[Reading]) -> bytes:
    return gzip.compress(encode_readings(rows), 3, mtime=0)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(members=st.integers(min_value=1, max_value=4), cut=st.floats(0.0, 1.0),
       garbage=st.binary(max_size=40), mode=st.sampled_from(["cut", "garbage", "both"]))
def test_torn_tail_is_cut_and_earlier_members_kept(
        tmp_path_factory: pytest.TempPathFactory, members: int, cut: float, garbage: bytes,
        mode: str) -> None:
    directory = tmp_path_factory.mktemp("torn")
    name = f"inst-{time.strftime('%Y%m%dT%H', time.gmtime(H0))}-000001.ndjson.gz"
    batches = [make_rows(3, H0 + i, first_id=10 * i) for i in range(members)]
    blobs = [_member(b) for b in batches]
    intact = b"".join(blobs[:-1])
    last = blobs[-1]
    if mode == "garbage":
        # The last member is whole; garbage follows it.
        intact += last
        tail = garbage or b"\x00"
        kept = batches
    else:
        tail = last[: int(cut * (len(last) - 1))] + (garbage if mode == "both" else b"")
        kept = batches[:-1]
    (directory / (name + OPEN_SUFFIX)).write_bytes(intact + tail)

    async def check() -> None:
        spool = await opened(directory, FakeClock(H0 + 60), instance="inst")
        cut_bytes = spool.cut_bytes
        assert spool.segment(name) is not None
        rows = read_all(spool, name)
        await spool.close()
        expected = [r for b in kept for r in b]
        if tail.startswith(b"\x1f\x8b") and len(tail) >= len(last):
            return  # garbage that happens to complete a member: nothing to assert
        assert rows == expected
        assert cut_bytes == len(tail)
        path = directory / name
        if expected:
            assert path.read_bytes() == intact
            with gzip.open(path, "rb") as fh:
                assert decode_readings(fh.read()) == expected
        else:
            assert not path.exists()  # nothing intact: the empty file is dropped at close

    asyncio.run(check())


async def test_second_writer_of_a_spool_is_refused_until_the_first_is_gone(
        tmp_path: Path) -> None:
    first = await opened(tmp_path, FakeClock(H0))
    await first.append(make_rows(2, H0 + 1))
    second = Spool(tmp_path, "inst-1.a", FakeClock(H0))
    with pytest.raises(SpoolError, match=rf"in use by process {os.getpid()} with instance "
                       r"id 'inst-1.a': one poller per spool"):
        await second.open()
    # The refused spool touched nothing and can be retried; another instance
    # id in the same directory is a different writer and is allowed.
    other = await opened(tmp_path, FakeClock(H0), instance="inst-2")
    await other.close()
    await first.close()
    await second.open()
    assert [s.name for s in second.segments()] == ["inst-1.a-20251123T08-000001.ndjson.gz"]
    await second.close()


def test_spool_lock_dies_with_its_process(tmp_path: Path) -> None:
    """kill -9 releases the lock: the next start is never blocked by a corpse."""
    code = ("import asyncio, sys, time\n"
            "from pathlib import Path\n"
            "from poller.ingest.spool import Spool\n"
            "async def main():\n"
            "    await Spool(Path(sys.argv[1]), 'inst-1.a').open()\n"
            "    print('open', flush=True)\n"
            "    time.sleep(60)\n"
            "asyncio.run(main())\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"

        async def try_open() -> None:
            await opened(tmp_path, FakeClock(H0))

        with pytest.raises(SpoolError, match=rf"in use by process {holder.pid} "):
            asyncio.run(try_open())
    finally:
        holder.kill()
        holder.wait()

    async def reopen() -> None:
        spool = await opened(tmp_path, FakeClock(H0))
        await spool.close()

    asyncio.run(reopen())


async def test_disk_usage_and_pending_bytes(tmp_path: Path) -> None:
    spool = await opened(tmp_path, FakeClock(H0))
    assert spool.pending_bytes == 0
    (p,) = await spool.append(make_rows(10, H0))
    spool_bytes, used = spool.disk_usage()
    assert spool_bytes == p.end_offset == spool.pending_bytes
    assert 0.0 < used <= 1.0
    with pytest.raises(Exception, match="still open"):
        await spool.delete(p.segment)
    await spool.close()
    await spool.close()  # idempotent


async def test_append_cost_per_row(tmp_path: Path) -> None:
    spool = await opened(tmp_path, FakeClock(H0))
    rows = make_rows(20_000, H0 + 1)
    started = time.perf_counter()
    for _ in range(5):
        await spool.append(rows)
    append_s = time.perf_counter() - started
    (seg,) = spool.segments()
    started = time.perf_counter()
    read = sum(len(r) for _, r in spool.read_members(seg.name))
    read_s = time.perf_counter() - started
    assert read == 100_000
    print(f"\nspool append: {append_s / 1e5 * 1e9:.0f} ns/row "
          f"({seg.size / 1e5:.1f} bytes/row on disk); read back: {read_s / 1e5 * 1e9:.0f} ns/row")
    await spool.close()


def test_spool_position_is_a_plain_tuple() -> None:
    pos = SpoolPosition("s", 10, H0, 3)
    assert pos.start_offset == -1 and pos[:4] == ("s", 10, H0, 3)


def test_members_are_found_across_read_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from poller.ingest import spool as spool_mod

    monkeypatch.setattr(spool_mod, "_READ_CHUNK", 7)
    batches = [make_rows(n, H0 + n) for n in (1, 5, 40)]
    blobs = [_member(b) for b in batches]
    data = b"".join(blobs) + blobs[0][:-3]
    ends = list(itertools.accumulate(len(b) for b in blobs))
    found = list(spool_mod.walk_members(io.BytesIO(data), 0, len(data), want_data=True))
    assert [e for e, _ in found] == ends
    assert [decode_readings(p) for _, p in found] == batches
    # Starting at a boundary and stopping at a limit inside a member.
    later = list(spool_mod.walk_members(io.BytesIO(data), ends[0], ends[2] - 1, want_data=False))
    assert [e for e, _ in later] == [ends[1]]
