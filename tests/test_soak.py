"""Memory over hours: the soak's RSS trend arithmetic on synthetic samples,
the heap-snapshot diff on a real tracemalloc snapshot, and the bookkeeping
that must not grow with every hour segment the service has ever written."""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import subprocess
import sys
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from poller import allocator, config, memtrace
from poller.bench.run import add_arguments, run_bench
from poller.bench.soak import (
    GOAL_BYTES_PER_H,
    HOUR_S,
    MB,
    RssPoint,
    hours,
    least_squares_slope,
    rss_trend,
)
from poller.ingest.pgload import LoaderUnavailable, PgLoader
from poller.ingest.spool import Spool
from poller.migrate import migrate
from tests.rows import FakeClock, make_rows
from tests.servicefix import QUICK_SETTLE
from tests.stackfix import RunningStack

MINUTE = 60.0


def _series(rss_at: object, span_h: float = 4.0, every_s: float = MINUTE) -> list[RssPoint]:
    n = int(span_h * HOUR_S / every_s) + 1
    return [RssPoint(i * every_s, int(rss_at(i * every_s))) for i in range(n)]  # type: ignore[operator]


def test_slope_of_a_straight_line_is_exact() -> None:
    points = _series(lambda t: 100 * MB + 2 * MB * t / HOUR_S)
    slope = least_squares_slope(points)
    assert slope == pytest.approx(2 * MB, rel=1e-6)


def test_slope_sees_through_a_sawtooth() -> None:
    # A flush buffer comes and goes every 5 minutes (+-3 MB) over a 0.4 MB/h leak.
    def rss(t: float) -> float:
        return 110 * MB + 0.4 * MB * t / HOUR_S + (3 * MB if (t // 300) % 2 else -3 * MB)

    slope = least_squares_slope(_series(rss))
    assert slope is not None and slope == pytest.approx(0.4 * MB, abs=0.15 * MB)


def test_slope_needs_two_times() -> None:
    assert least_squares_slope([]) is None
    assert least_squares_slope([RssPoint(5.0, 1)]) is None
    assert least_squares_slope([RssPoint(5.0, 1), RssPoint(5.0, 9)]) is None


def test_the_first_hour_is_left_out() -> None:
    # 30 MB of warm-up growth in the first hour, flat afterwards.
    points = _series(lambda t: 100 * MB + 30 * MB * min(t, HOUR_S) / HOUR_S)
    trend = rss_trend(points, HOUR_S)
    assert trend.points == 3 * 60 + 1
    assert trend.span_s == 3 * HOUR_S
    assert trend.slope_bytes_per_h == pytest.approx(0.0, abs=1.0)
    assert trend.rss_at_settle_bytes == trend.rss_at_end_bytes == 130 * MB
    assert trend.verdict == "flat"
    # Taken from the start, the warm-up would read as a leak.
    assert rss_trend(points, 0.0).verdict != "flat"


def test_a_steady_leak_is_growing_in_both_halves() -> None:
    trend = rss_trend(_series(lambda t: 113.5 * MB + 2 * MB * t / HOUR_S), HOUR_S)
    assert trend.verdict == "growing"
    assert trend.slope_bytes_per_h == pytest.approx(2 * MB, rel=1e-6)
    assert trend.first_half_bytes_per_h == pytest.approx(2 * MB, rel=1e-6)
    assert trend.last_half_bytes_per_h == pytest.approx(2 * MB, rel=1e-6)


def test_growth_that_levels_off_is_told_apart() -> None:
    # Approaches +12 MB with a 1 h time constant: still growing after the
    # first hour, but far slower in the last half than in the first.
    trend = rss_trend(_series(lambda t: 100 * MB + 12 * MB * (1 - math.exp(-t / HOUR_S))),
                      HOUR_S)
    assert trend.slope_bytes_per_h is not None and trend.slope_bytes_per_h > GOAL_BYTES_PER_H
    assert trend.first_half_bytes_per_h is not None
    assert trend.last_half_bytes_per_h is not None
    assert trend.last_half_bytes_per_h < trend.first_half_bytes_per_h / 2
    assert trend.verdict == "levelling off"


def test_too_few_samples_after_the_settle_span() -> None:
    points = _series(lambda t: 100 * MB + t, span_h=1.02)
    trend = rss_trend(points, HOUR_S)
    assert trend.verdict == "too short" and trend.points == 2
    assert trend.first_half_bytes_per_h is None


def test_hours_must_be_a_positive_number() -> None:
    assert hours("1.5") == 1.5
    for bad in ("0", "-2", "inf", "nan", "soon"):
        with pytest.raises(argparse.ArgumentTypeError):
            hours(bad)


# -- heap snapshots -------------------------------------------------------------------

def _grow(into: list[bytes], n: int) -> None:
    for _ in range(n):
        into.append(bytes(1000))  # the line the diff must name


def test_snapshot_diff_names_the_growing_line(tmp_path: Path) -> None:
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start(4)
    kept: list[bytes] = []
    try:
        old = memtrace.dump_snapshot(tmp_path)
        _grow(kept, 2000)
        new = memtrace.dump_snapshot(tmp_path, clock=2e9)  # another second: another name
    finally:
        if not was_tracing:
            tracemalloc.stop()
    assert old != new and old.suffix == new.suffix == memtrace.SUFFIX
    assert not list(tmp_path.glob("*.tmp"))
    found = memtrace.growers(tracemalloc.Snapshot.load(str(old)),
                             tracemalloc.Snapshot.load(str(new)))
    assert found, "nothing grew"
    top = found[0]
    line = _grow.__code__.co_firstlineno + 2
    assert top.where == f"{__file__}:{line}"
    assert top.size_diff_bytes >= 2000 * 1000 and top.count_diff >= 2000
    assert all(a.size_diff_bytes >= b.size_diff_bytes for a, b in itertools.pairwise(found))
    text = memtrace.render(found)
    assert f"test_soak.py:{line}" in text


def test_memtrace_command_refuses_a_file_that_is_not_a_snapshot(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]
                                                               ) -> None:
    junk = tmp_path / "junk.tracemalloc"
    junk.write_bytes(b"not a pickle")
    assert memtrace.main([str(junk), str(junk)]) == 2
    assert "cannot read a snapshot" in capsys.readouterr().err


def test_sigusr2_without_tracing_writes_a_census(tmp_path: Path) -> None:
    was_tracing = tracemalloc.is_tracing()
    if was_tracing:  # (the suite run under PYTHONTRACEMALLOC)
        tracemalloc.stop()
    # Atomic values only: a dict the cyclic GC does not track, found through
    # the poller object that holds it (the constructors touch no server).
    loader = PgLoader("postgresql://nowhere.invalid/x", "inst", Spool(tmp_path, "inst"))
    loader._loaded.update((f"census-marker-{i}", i) for i in range(50_000))
    try:
        written = memtrace.on_signal(tmp_path)
    finally:
        if was_tracing:
            tracemalloc.start()
    assert [p.parent for p in written] == [memtrace.snapshot_dir(tmp_path)]
    assert written[0].name.endswith(memtrace.CENSUS_SUFFIX)
    doc = json.loads(written[0].read_text())
    assert doc["allocated_blocks"] > 50_000 and doc["gc_objects"] > 1000
    assert doc["types"]["builtins.dict"] > 100
    assert {"type": "dict", "len": 50_000, "hint": "PgLoader._loaded"} in doc["largest"], \
        doc["largest"][:3]
    assert doc["proc"]["VmRSS"] > 1_000_000
    if doc["malloc"] is not None:  # glibc
        assert doc["malloc"]["in_use"] > 0


def test_census_diff_names_the_type_that_grew(tmp_path: Path) -> None:
    class Leaked:
        pass

    old = memtrace.census()
    kept = [Leaked() for _ in range(3000)]
    # Frozen objects (poller.heap) count too, and stay frozen afterwards.
    gc.freeze()
    frozen = gc.get_freeze_count()
    walked = [Leaked() for _ in range(2000)]  # made after the freeze: walked
    try:
        new = memtrace.census()
        name = f"{__name__}.{Leaked.__qualname__}"
        assert new["walked_by_full_gc"].get(name) == len(walked), new["walked_by_full_gc"]
        # Frozen again after the walk; the collection in between may free
        # frozen garbage, so the count can fall, but never below what lives.
        assert frozen >= len(kept) and gc.get_freeze_count() >= len(kept)
    finally:
        gc.unfreeze()
    found = memtrace.census_growers(old, new)
    names = [g.where for g in found]
    assert f"{__name__}.{Leaked.__qualname__}" in names
    grown = next(g for g in found if g.where.endswith("Leaked"))
    assert grown.count_diff == len(kept) + len(walked)
    text = memtrace.render_census(old, new)
    assert "Leaked" in text and "python blocks" in text


# -- the soak mode, end to end (short) ----------------------------------------------

def test_soak_mode_reports_rss_slope_and_heap_census(stack: RunningStack, fresh_db: str,
                                                     tmp_path: Path, capsys: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in QUICK_SETTLE.items():  # the bench and its serve alike
        monkeypatch.setenv(name, value)
    settings = config.load(config_path=None, env={
        "POLLER_DATABASE_URL": fresh_db,
        "POLLER_REDIS_URL": stack.info.redis_url,
        "POLLER_S3_ENDPOINT_URL": stack.info.s3_endpoint_url,
        "POLLER_S3_BUCKET": stack.info.bucket,
        "POLLER_S3_PREFIX": f"soak-{uuid.uuid4().hex[:8]}",
        **QUICK_SETTLE,
    })
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "soak.json"
    # 8 s of soak: RSS every half second, the slope after 2 s, a census every 2.4 s.
    args = parser.parse_args([
        "--devices", "30", "--interval", "1", "--warmup", "1", "--json", str(out),
        "--soak-hours", str(8 / 3600), "--soak-settle", "2", "--soak-rss-every", "0.5",
        "--soak-snapshots", "0.04"])
    args.state_dir = str(tmp_path / "state")
    assert run_bench(settings, args) == 0

    doc = json.loads(out.read_text())
    run = doc["run"]
    assert run["devices"] == 30 and run["completed_polls"] > 0
    assert 0 < run["ticks_stored"] <= run["ticks_scheduled"]
    assert isinstance(run["skipped_ticks"], int)
    rss = doc["rss"]
    assert len(rss) >= 10 and all(p["rss_bytes"] > 1_000_000 for p in rss)
    assert [p["t_s"] for p in rss] == sorted(p["t_s"] for p in rss)
    trend = doc["trend"]
    assert trend["settle_s"] == 2 and trend["points"] >= 4
    assert isinstance(trend["slope_bytes_per_h"], float)
    assert trend["verdict"] in ("flat", "levelling off", "growing")
    # The slope is the least-squares line through the samples after settle.
    used = [RssPoint(p["t_s"], p["rss_bytes"]) for p in rss if p["t_s"] >= 2]
    assert trend["slope_bytes_per_h"] == pytest.approx(least_squares_slope(used))
    censuses = [Path(p) for p in doc["snapshots"]]
    assert len(censuses) >= 3 and all(p.is_file() for p in censuses)
    assert all(p.name.endswith(memtrace.CENSUS_SUFFIX) for p in censuses)
    assert doc["census"] and "python blocks" in doc["census"]
    text = capsys.readouterr().out
    assert "== RSS of poller serve ==" in text and "slope after settle" in text
    assert "== heap census ==" in text


# -- per-segment bookkeeping ---------------------------------------------------------

H0 = 1_893_452_400  # 2029-12-31T23:00Z


async def test_a_deleted_segment_leaves_no_bookkeeping_behind(stack: RunningStack,
                                                              fresh_db: str,
                                                              tmp_path: Path) -> None:
    conn = await asyncpg.connect(fresh_db)
    try:
        await migrate(conn)
        # What a forget() that met an outage leaves: the row of a segment
        # deleted long ago. It must not come back into memory at a catch-up.
        await conn.execute(
            "INSERT INTO ingest_checkpoints (instance_id, segment, end_offset, rows, "
            "updated_at) VALUES ('inst', 'inst-20000101T00-000001.ndjson.gz', 10, 1, now())")
    finally:
        await conn.close()
    spool = Spool(tmp_path / "spool", "inst", FakeClock(H0 + 60))
    await spool.open()
    pool = await asyncpg.create_pool(fresh_db, min_size=1, max_size=2)
    loader = PgLoader(pool, "inst", spool)
    await loader.start()
    try:
        await spool.append(make_rows(20, H0 + 6))
        assert await loader.catch_up() == 20
        [closed] = await spool.close_all()
        assert loader.is_loaded(closed.name)
        assert loader._loaded == {closed.name: closed.size}

        await spool.delete(closed.name)
        await pool.close()  # Postgres out of reach when the segment goes
        with pytest.raises(LoaderUnavailable):
            await loader.forget(closed.name)
        assert loader._loaded == {}
        assert spool.segment(closed.name) is None and spool.segments() == []
    finally:
        await pool.close()
        await spool.close()

    # A later life of the process: both stale rows are read, neither is kept.
    spool = Spool(tmp_path / "spool", "inst", FakeClock(H0 + 7200))
    await spool.open()
    again = PgLoader(fresh_db, "inst", spool)
    await again.start()
    try:
        found = await again.checkpoints()
        assert set(found) == {"inst-20000101T00-000001.ndjson.gz", closed.name}
        assert again._loaded == {}
        assert await again.catch_up() == 0 and again._loaded == {}
    finally:
        await again.stop()
        await spool.close()


# -- the allocator's policy -----------------------------------------------------------

_MALLOC_PROBE = """
import json
from poller import allocator
size = 6 << 20
out = {"applied": allocator.apply(allocator.MallocPolicy()), "rounds": []}
for _ in range(2):
    before = allocator.stats()
    block = bytearray(size)
    during = allocator.stats()
    del block
    after = allocator.stats()
    out["rounds"].append([before["mmapped"], during["mmapped"], after["mmapped"]])
out["trimmed"] = allocator.trim()
print(json.dumps(out))
"""


def test_malloc_policy_keeps_big_buffers_out_of_the_heaps() -> None:
    # A fresh interpreter: glibc serves a big request from a free chunk of a heap
    # before it considers mmap, so in this long-lived process (hundreds of MB
    # freed by earlier tests) the answer would depend on what ran before.
    if allocator.stats() is None:
        pytest.fail("the suite runs on glibc (Debian): mallinfo2 must be there")
    probe = subprocess.run([sys.executable, "-c", _MALLOC_PROBE], check=True,
                           capture_output=True, text=True, timeout=60)
    out = json.loads(probe.stdout)
    assert out["applied"] is True
    size = 6 << 20
    # glibc left to itself maps the first such block, raises its threshold when
    # it is freed, and carves the second out of a heap, where it can stay: with
    # the threshold fixed, each is mapped and unmapped.
    assert len(out["rounds"]) == 2
    for before, during, after in out["rounds"]:
        assert during >= before + size
        assert after < before + size
    assert isinstance(out["trimmed"], bool)
