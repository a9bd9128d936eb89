"""The disk is bounded and S3 is the durable log.

On a small real file system (a tmpfs of a few MB mounted by the test; we run
as root) and with the spool's ceiling, against a Postgres and a SeaweedFS of
this module's own that the tests stop and start:

(a) S3 up, Postgres down: past the high-water mark segments verified in S3
    leave the disk unloaded; the spool stays under its ceiling, no tick is
    skipped; Postgres back, every reading is loaded once, some from S3.
(b) S3 and Postgres down: the ceiling is reached, ticks are skipped, counted
    and logged once, the service runs on; S3 back, space frees and polling
    resumes; every reading polled is loaded once.
(c) ENOSPC on the tmpfs: a spool error, counted; the readings wait in memory
    and nothing acknowledged is lost.

Beside them, at the level of the parts: the checkpoint's byte offsets apply
to the archived object (a half-loaded segment finishes from S3, exactly
once), the spool's ceiling and its errors, the shedding of loaded segments
while S3 is away, and the supervision of ingest's tasks (restarted with
back-off and counted; ten failures in a row are fatal), on a clock the test
moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gzip
import logging
import os
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from poller import sealing
from poller.api.view import FleetSnapshot
from poller.archive.fetch import EvictedSegments, split_members
from poller.archive.naming import archive_key
from poller.archive.s3 import ArchiveError, ArchiveStore
from poller.archive.uploader import EVICTED_SUFFIX, Uploader
from poller.clock import FakeClock, settle
from poller.config import IngestSettings, PollingSettings
from poller.ingest.pgload import PgLoader
from poller.ingest.pipeline import Ingest
from poller.ingest.spool import Pressure, Spool, SpoolError, SpoolFull, SpoolPosition
from poller.migrate import migrate
from poller.netpolicy import DEFAULT_DENIED_NETWORKS, LOOPBACK_NETWORKS, NetPolicy
from poller.polling.memsink import MemorySink
from poller.polling.pool import DevicePool
from poller.polling.sync import RegistryWatcher
from poller.reading import PlainReading, Reading
from poller.registry import Registry
from poller.service import Service
from poller.simulator.main import Simulator, SimulatorConfig
from poller.stack import EmbeddedStack, StackInfo, create_database
from poller.tasks import Supervisor
from poller.transport import FastHttpClient
from tests.apiview import migrated_pool
from tests.rows import make_rows
from tests.servicefix import (
    archived,
    diff,
    loaded,
    register,
    served,
    service_env,
    settings_of,
    wait_for,
)
from tests.stackfix import RunningStack

SEED = 13
H0 = 1_893_452_400  # 2029-12-31T23:00Z


# -- servers and a small file system ------------------------------------------------


@dataclass(frozen=True)
class OwnStack:
    """A Postgres and a SeaweedFS this module may stop (Valkey is the session's)."""

    stack: EmbeddedStack
    info: StackInfo

    def stop(self, *names: str) -> None:
        for name in names:
            self.stack.stop_component(name)

    def start(self, *names: str) -> None:
        for name in names:
            self.stack.start_component(name)

    def up(self) -> None:
        """Both running again, whatever a failed test left."""
        status = self.stack.status()
        for name in ("postgres", "s3"):
            if not status[name].running:
                self.stack.start_component(name)


@pytest.fixture(scope="module")
def own(stack: RunningStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnStack]:
    own = EmbeddedStack(tmp_path_factory.mktemp("own-pg-s3"), redis_url=stack.info.redis_url,
                        progress=print)
    try:
        yield OwnStack(own, own.up())
    finally:
        own.down()


@contextlib.contextmanager
def small_fs(path: Path, size: str) -> Iterator[bool]:
    """A tmpfs of ``size`` mounted on ``path``; True when mounted. Where a
    mount is impossible (not root), the directory is left as it is and the
    tests rely on the ceiling alone (they say so in their assertions)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                           str(path)], capture_output=True, text=True, check=False)
    mounted = done.returncode == 0
    if not mounted:
        print(f"no tmpfs on {path} ({done.stderr.strip()}): the ceiling alone")
    try:
        yield mounted
    finally:
        if mounted and subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)  # still busy: detach


@dataclass
class Run:
    service: Service
    sim: Simulator
    settings_env: dict[str, str]
    db_url: str
    mounted: bool

    @property
    def fleet(self) -> FleetSnapshot:
        assert self.service.view is not None
        return self.service.view.fleet()


@contextlib.asynccontextmanager
async def serving(own: OwnStack, tmp_path: Path, instance: str, fs_size: str,
                  devices: int, interval_s: float, **env: str) -> AsyncIterator[Run]:
    """A Service polling a simulated fleet, its spool on a tmpfs of
    ``fs_size``; stopped (with both servers up again) on the way out."""
    own.up()
    db_url = create_database(own.info.database_url, f"t_{uuid.uuid4().hex[:16]}")
    sim = Simulator(SimulatorConfig(devices=devices, seed=SEED, record_served=True))
    await sim.start()
    state = tmp_path / "state"
    full_env = service_env(own.info, db_url, state, instance, **env)
    settings = settings_of(full_env)
    await register(settings, sim, SEED, interval_s)
    with small_fs(state / "spool", fs_size) as mounted:
        service = Service(settings)
        try:
            await service.start()
            yield Run(service, sim, full_env, db_url, mounted)
        finally:
            await asyncio.to_thread(own.up)
            await service.stop()
            await sim.stop()


async def _watch(run: Run, until: float, samples: list[tuple[int, int, float]]) -> None:
    """Sample (spool bytes, ceiling, disk use) every 50 ms until ``until``."""
    while time.monotonic() < until:
        f = run.fleet
        samples.append((f.spool_bytes, f.spool_ceiling_bytes, f.disk_used_fraction))
        await asyncio.sleep(0.05)


async def _assert_all_once(run: Run, own: OwnStack, at_least: int = 1000) -> None:
    want = served(run.sim)
    assert sum(want.values()) > at_least
    got = await loaded(run.db_url)
    archive = await archived(settings_of(run.settings_env), own.info)
    # (A poll the simulator answered after its deadline is served, not
    # stored: the outcomes say so if it happens.)
    outcomes = run.fleet.polls_by_outcome
    assert got == want, f"{diff(want, got)}; outcomes {outcomes}"  # each reading once
    assert archive == want, diff(want, archive)


# -- (a), (b), (c): the whole service on a small disk -----------------------------


async def test_s3_up_postgres_down_evicts_verified_segments_and_loads_them_from_s3(
        own: OwnStack, tmp_path: Path) -> None:
    # 200 devices every second write some 5 KB/s; the spool may fill the
    # 160 KiB tmpfs to 50 % (a ceiling near 70 KB: the lock, sequence and
    # marker files take pages too), evicting past half of that. The loader's
    # queue in memory (buffer_max_rows) overflows within seconds, so the
    # evicted segments must come back from S3.
    async with serving(own, tmp_path, "evict", "160k", 200, 1.0,
                       POLLER_INGEST_SPOOL_MAX_PERCENT="50",
                       POLLER_INGEST_SPOOL_HIGH_WATER_PERCENT="50",
                       POLLER_INGEST_BUFFER_MAX_ROWS="600") as run:
        await asyncio.sleep(1.0)
        await asyncio.to_thread(own.stop, "postgres")
        samples: list[tuple[int, int, float]] = []
        watching = asyncio.create_task(_watch(run, time.monotonic() + 90, samples))
        try:
            await wait_for(lambda: run.fleet.segments_evicted >= 2, 90,
                           "two segments evicted while Postgres is down")
        finally:
            watching.cancel()
        fleet = run.fleet
        assert not fleet.postgres_up and fleet.s3_up
        assert fleet.backpressure_skips == 0 and not fleet.spool_full  # S3 took them
        assert fleet.segments_awaiting_archive_load >= 1
        assert all(used <= ceiling for used, ceiling, _ in samples), max(samples)
        if run.mounted:
            # The percent is of the real file system: never past half of it
            # (give or take the pages of a member being written).
            assert max(disk for _, _, disk in samples) <= 0.53
        spool_dir = Path(run.settings_env["POLLER_STATE_DIR"]) / "spool"
        assert any(p.name.endswith(EVICTED_SUFFIX) for p in spool_dir.iterdir())

        await asyncio.to_thread(own.start, "postgres")
        await wait_for(lambda: run.fleet.segments_awaiting_archive_load == 0
                       and run.fleet.rows_loaded_from_archive > 0, 90,
                       "the evicted segments loaded from S3")
        fleet = run.fleet
        assert fleet.task_restarts == {k: 0 for k in fleet.task_restarts}
    await _assert_all_once(run, own)
    assert not any(p.name.endswith(EVICTED_SUFFIX) for p in spool_dir.iterdir())


async def test_s3_and_postgres_down_skip_ticks_at_the_ceiling_until_s3_returns(
        own: OwnStack, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="poller")
    # 200 devices every second: some 5 KB/s against a ceiling of 30 KB.
    async with serving(own, tmp_path, "ceiling", "1m", 200, 1.0,
                       POLLER_INGEST_SPOOL_MAX_BYTES=str(30_000),
                       POLLER_INGEST_BUFFER_MAX_ROWS="400",
                       POLLER_INGEST_BATCH_ROWS="100") as run:
        await asyncio.sleep(1.0)
        # Postgres first: a segment it loaded while S3 is away could be
        # deleted unarchived at the ceiling (counted; not this test's case).
        await asyncio.to_thread(own.stop, "postgres", "s3")
        samples: list[tuple[int, int, float]] = []
        watching = asyncio.create_task(_watch(run, time.monotonic() + 90, samples))
        try:
            await wait_for(lambda: run.fleet.backpressure_skips > 0, 60, "ticks skipped")
            # (An upload hanging on the stopped S3 fails after its timeouts.)
            await wait_for(lambda: not run.fleet.s3_up, 60, "the uploader sees S3 down")
            assert run.fleet.spool_full and not run.fleet.postgres_up
            skipped = run.fleet.backpressure_skips
            await asyncio.sleep(1.0)
            fleet = run.fleet
            assert fleet.backpressure_skips > skipped  # still skipping, counted
            assert fleet.buffer_rows >= 400  # the readings taken are held
            assert not run.service.failed.is_set()  # no exception: it runs on
            assert fleet.task_restarts == {k: 0 for k in fleet.task_restarts}
            assert sum("storage full" in r.getMessage() for r in caplog.records) == 1

            await asyncio.to_thread(own.start, "s3")
            # The uploader's back-off ends, S3 takes the segments, the spool
            # frees space, the buffer drains and the loops poll again.
            await wait_for(lambda: not run.fleet.spool_full
                           and run.fleet.buffer_rows < 400, 60, "space freed")
        finally:
            watching.cancel()
        resumed = run.fleet.backpressure_skips
        polled = len(run.sim.served())
        await asyncio.sleep(1.0)
        assert run.fleet.backpressure_skips == resumed and len(run.sim.served()) > polled + 100
        assert run.fleet.segments_evicted > 0  # Postgres is still down
        assert run.fleet.segments_unarchived == 0
        assert "ticks are polled again" in caplog.text
        assert all(used <= ceiling <= 30_000 for used, ceiling, _ in samples), max(samples)

        await asyncio.to_thread(own.start, "postgres")
        await wait_for(lambda: run.fleet.segments_awaiting_archive_load == 0
                       and run.fleet.rows_loaded_from_archive > 0, 90, "loaded from S3")
    await _assert_all_once(run, own)


async def test_enospc_is_a_counted_spool_error_and_loses_nothing(
        own: OwnStack, tmp_path: Path) -> None:
    # No ceiling of our own: the file system alone says when it is full.
    async with serving(own, tmp_path, "enospc", "1m", 120, 1.0,
                       POLLER_INGEST_SPOOL_MAX_PERCENT="100") as run:
        spool_dir = Path(run.settings_env["POLLER_STATE_DIR"]) / "spool"
        await asyncio.sleep(2.0)
        ballast = spool_dir / "ballast"
        if run.mounted:
            _fill(ballast)  # every byte left: the next write meets ENOSPC
        else:
            # (No tmpfs here: the ceiling alone refuses; no ENOSPC to count.)
            assert run.service.ingest is not None
            run.service.ingest.spool.max_bytes = run.service.ingest.spool.pending_bytes
        try:
            await wait_for(lambda: run.fleet.spool_full, 30, "the spool refuses writes")
            errors = run.fleet.spool_errors
            if run.mounted:
                assert errors > 0  # ENOSPC, counted as a spool error
            await wait_for(lambda: run.fleet.buffer_rows > 100, 30, "readings held in memory")
            await asyncio.sleep(1.5)
            assert run.fleet.spool_full and run.fleet.buffer_rows > 200  # all held
            assert not run.service.failed.is_set()
            fleet = run.fleet
            assert fleet.task_restarts == {k: 0 for k in fleet.task_restarts}
        finally:
            ballast.unlink(missing_ok=True)
            if run.service.ingest is not None:
                run.service.ingest.spool.max_bytes = 0
        await wait_for(lambda: not run.fleet.spool_full and run.fleet.buffer_rows < 100, 30,
                       "writes again")
        await asyncio.sleep(1.0)
    await _assert_all_once(run, own, at_least=400)


def _fill(path: Path) -> None:
    """Write ``path`` until the file system has not a byte left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 9):
            block = b"\xff" * size
            while True:
                try:
                    os.write(fd, block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)


# -- the parts -----------------------------------------------------------------------


@pytest.fixture
async def store(own: OwnStack) -> AsyncIterator[ArchiveStore]:
    own.up()
    store = ArchiveStore(own.info.s3_endpoint_url, own.info.bucket, "us-east-1", "", "",
                         max_attempts=1, connect_timeout_s=1.0, read_timeout_s=10.0)
    await store.start()
    await store.ensure_bucket()
    yield store
    await store.close()


@pytest.fixture
async def pool(own: OwnStack) -> AsyncIterator[asyncpg.Pool]:
    own.up()
    pool = await migrated_pool(create_database(own.info.database_url,
                                               f"t_{uuid.uuid4().hex[:16]}"))
    yield pool
    await pool.close()


def _rows(n: int, tick: float, first_id: int) -> list[Reading]:
    return make_rows(n, tick, first_id)


async def test_a_half_loaded_segment_finishes_from_s3_exactly_once(
        tmp_path: Path, store: ArchiveStore, pool: asyncpg.Pool) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    spool = Spool(tmp_path / "spool", "inst", lambda: H0 + 60)
    await spool.open()
    loader = PgLoader(pool, "inst", spool)
    await loader.start()
    try:
        batches = [_rows(40, H0 + 10 * k, 1) for k in range(3)]
        positions = [(await spool.append(b))[0] for b in batches]
        await spool.close_all()
        segment = positions[0].segment
        # Postgres took the first member only; then the disk filled.
        assert await loader.load(positions[0], batches[0]) == 40
        uploader = Uploader(store, spool.directory, prefix, loader.is_loaded,
                            delete=spool.delete, evict=spool.delete, instance="inst",
                            pressure=lambda: Pressure.HIGH)
        assert await uploader.upload_pending() == 1
        assert uploader.stats().segments_evicted == 1
        assert spool.segments() == []  # off the disk, unloaded
        assert sorted(p.name for p in spool.directory.iterdir() if "ndjson" in p.name) == [
            segment + EVICTED_SUFFIX]
        # The object is the file, byte for byte: the checkpoint's offsets hold.
        object_bytes = await store.get(archive_key(prefix, segment))
        assert len(object_bytes) == positions[-1].end_offset

        fetch = EvictedSegments(store, spool.directory, "inst")
        loader.archived = fetch
        assert fetch.count() == 1 and [r.name for r in fetch.pending()] == [segment]
        assert await loader.catch_up() == 80  # the two members Postgres lacked
        assert fetch.rows_loaded == 80 and fetch.count() == 0
        got = await pool.fetchval("SELECT count(*) FROM readings")
        dup = await pool.fetchval("SELECT count(*) FROM (SELECT 1 FROM readings "
                                  "GROUP BY device_id, tick_at HAVING count(*) > 1) x")
        assert (got, dup) == (120, 0)
        # Settled: no record, no checkpoint; a second catch-up loads nothing.
        assert await pool.fetchval("SELECT count(*) FROM ingest_checkpoints") == 0
        assert await loader.catch_up() == 0
        assert await pool.fetchval("SELECT count(*) FROM readings") == 120
    finally:
        await loader.stop()
        await spool.close()


async def test_an_evicted_segment_waits_for_s3_and_loads_when_it_returns(
        tmp_path: Path, own: OwnStack, store: ArchiveStore, pool: asyncpg.Pool) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    spool = Spool(tmp_path / "spool", "inst", lambda: H0 + 60)
    await spool.open()
    loader = PgLoader(pool, "inst", spool)
    await loader.start()
    try:
        rows = _rows(30, H0 + 5, 1)
        await spool.append(rows)
        await spool.close_all()
        uploader = Uploader(store, spool.directory, prefix, loader.is_loaded,
                            evict=spool.delete, instance="inst", pressure=lambda: Pressure.HIGH)
        await uploader.upload_pending()
        loader.archived = EvictedSegments(store, spool.directory, "inst")
        later = _rows(10, H0 + 3600 + 5, 100)
        await spool.append(later)  # a segment still on disk loads meanwhile
        await asyncio.to_thread(own.stop, "s3")
        try:
            with pytest.raises(ArchiveError):  # ArchiveUnavailable: tried again later
                await loader.catch_up()
            assert await pool.fetchval("SELECT count(*) FROM readings") == 10
        finally:
            await asyncio.to_thread(own.start, "s3")
        assert await loader.catch_up() == 30
        assert await pool.fetchval("SELECT count(*) FROM readings") == 40
    finally:
        await loader.stop()
        await spool.close()


def test_members_split_from_chunks_resume_at_an_offset_and_damage_is_an_error() -> None:
    members = [gzip.compress(f"line {i}\n".encode() * (i + 1), mtime=0) for i in range(4)]
    blob = b"".join(members)
    ends = [sum(len(m) for m in members[:i + 1]) for i in range(4)]
    for chunk in (1, 7, 64, len(blob)):
        chunks = [blob[i:i + chunk] for i in range(0, len(blob), chunk)]
        got = list(split_members(iter(chunks), ends[1], len(blob), "k"))
        assert got == [(ends[2], b"line 2\n" * 3), (ends[3], b"line 3\n" * 4)]
    with pytest.raises(ArchiveError, match="bytes of whole members"):
        list(split_members(iter([blob[:-3]]), 0, len(blob), "k"))  # truncated
    with pytest.raises(ArchiveError, match="bad gzip data"):
        list(split_members(iter([blob[:ends[0]] + b"\x00" * 40]), 0, ends[0] + 40, "k"))


async def test_the_spool_refuses_a_batch_past_its_ceiling_and_writes_none_of_it(
        tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", "inst", lambda: H0 + 60, max_bytes=4000,
                  high_water_fraction=0.5)
    await spool.open()
    try:
        first = await spool.append(_rows(20, H0 + 1, 1))
        size = first[0].end_offset
        assert spool.usage().ceiling_bytes == 4000 and spool.pressure() is Pressure.NONE
        big = _rows(400, H0 + 2, 1000) + _rows(5, H0 + 3601, 1)  # two hours
        with pytest.raises(SpoolFull) as refused:
            await spool.append(big)
        assert refused.value.needed_bytes > 4000 - size and refused.value.written == ()
        assert spool.pending_bytes == size  # nothing of it written
        assert spool.io_errors == 0  # a ceiling, not an I/O error
        while spool.pressure() is Pressure.NONE:
            await spool.append(_rows(20, H0 + 5, 1))
        assert spool.pending_bytes >= 2000 and spool.pressure() in (Pressure.HIGH,
                                                                    Pressure.FULL)
        closed = await spool.close_early(1)
        assert [c.name for c in closed] == [first[0].segment]
        # The hour goes on in a new segment.
        again = await spool.append(_rows(1, H0 + 6, 1))
        assert again[0].segment != first[0].segment and again[0].start_offset == 0
    finally:
        await spool.close()


async def test_an_oserror_in_the_spool_is_a_counted_spool_error(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", "inst", lambda: H0 + 60)
    await spool.open()
    try:
        await spool.append(_rows(3, H0 + 1, 1))
        # A directory where the sequence file goes: replacing it fails as an
        # I/O error would (file modes would not stop root).
        (spool.directory / "inst.seq").unlink()
        (spool.directory / "inst.seq").mkdir()
        with pytest.raises(SpoolError) as caught:
            await spool.append(_rows(3, H0 + 3601, 1))  # a new hour: a new segment
        assert isinstance(caught.value.__cause__, OSError)
        assert caught.value.written == () and spool.io_errors == 1
        (spool.directory / "inst.seq").rmdir()
        rows = _rows(3, H0 + 3602, 1)
        assert (await spool.append(rows))[0].rows == 3  # retried, it goes in
    finally:
        await spool.close()


@pytest.mark.parametrize("shed", [False, True], ids=["keep-until-archived", "shed"])
async def test_loaded_segments_leave_unarchived_at_the_ceiling_only_when_asked(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, shed: bool) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens: S3 cannot be reached
    away = ArchiveStore(f"http://127.0.0.1:{port}", "b", "us-east-1", "", "", max_attempts=1,
                        connect_timeout_s=0.5)
    await away.start()
    spool = Spool(tmp_path / "spool", "inst", lambda: H0 + 7200)
    await spool.open()
    clock = FakeClock()
    try:
        names = []
        for h in range(3):
            names.append((await spool.append(_rows(50, H0 + 3600 * h, 1)))[0].segment)
        await spool.close_all()
        spool.max_bytes = spool.pending_bytes  # at the ceiling
        assert spool.pressure() is Pressure.FULL
        loaded_names = set(names[:2])  # Postgres took the two oldest
        uploader = Uploader(away, spool.directory, "p", loaded_names.__contains__,
                            delete=spool.delete, evict=spool.delete, instance="inst",
                            pressure=spool.pressure, clock=clock, shed_unarchived=shed)
        await uploader.start()
        if not shed:
            # The default: nothing leaves the disk before S3 has it.
            await wait_for(lambda: uploader.stats().consecutive_failures >= 1, 10,
                           "an upload to the unreachable S3 failed")
            await settle()
            assert uploader.stats().segments_unarchived == 0
            assert [s.name for s in spool.segments()] == names
            assert spool.pressure() is Pressure.FULL
            await uploader.stop()
            return
        await wait_for(lambda: uploader.stats().segments_unarchived >= 1, 10,
                       "a loaded segment deleted")
        await settle()
        # Oldest first, and only until below the ceiling's last tenth.
        assert uploader.stats().segments_unarchived == 1
        assert [s.name for s in spool.segments()] == names[1:]
        assert spool.pressure() < Pressure.FULL
        assert f"deleted {names[0]}, loaded into PostgreSQL but never archived" in caplog.text
        await uploader.stop()
    finally:
        await spool.close()
        await away.close()


class _FlakySpool(Spool):
    """A real spool whose ``append`` raises what no code expects (a bug),
    ``fail`` times."""

    fail = 0

    async def append(self, batch: Sequence[PlainReading]) -> list[SpoolPosition]:
        if self.fail:
            self.fail -= 1
            raise RuntimeError("a bug in the spool")
        return await super().append(batch)


async def _ingest_on(tmp_path: Path, clock: FakeClock, sup: Supervisor) -> Ingest:
    spool = _FlakySpool(tmp_path / "spool", "t", clock.wall)
    loader = PgLoader("postgresql://127.0.0.1:1/unused", "t", spool, timeout_s=0.5)
    ingest = Ingest(IngestSettings(batch_rows=1000, flush_interval_s=1.0), spool, loader,
                    None, None, clock, supervisor=sup)
    await ingest.start()
    return ingest


def _stored(spool: Spool) -> list[Reading]:
    return [r for seg in spool.segments() for _, batch in spool.read_members(seg.name)
            for r in batch]


async def test_a_failing_flusher_is_restarted_counted_and_keeps_its_batch(
        tmp_path: Path) -> None:
    clock = FakeClock(wall=H0 + 100)
    root = Supervisor(clock=clock)
    ingest = await _ingest_on(tmp_path, clock, root.child())
    spool = ingest.spool
    assert isinstance(spool, _FlakySpool)
    try:
        rows = make_rows(5, H0 + 90)
        spool.fail = 2
        for r in rows:
            ingest.accept(r)
        await clock.run(1.0)  # the flush meets the bug: the flusher dies, the batch stays
        assert root.restarts["ingest-flusher"] == 1 and ingest.buffer_rows == 5
        await clock.run(2.0)  # restarted after its back-off; fails once more
        assert root.restarts["ingest-flusher"] == 2
        for _ in range(20):
            await clock.run(2.0)
            if ingest.buffer_rows == 0:
                break
        await wait_for(lambda: len(_stored(spool)) == 5, 10, "the batch reached the spool")
        assert sorted(_stored(spool)) == sorted(rows)  # each once
        assert not root.failed.is_set()
    finally:
        await ingest.stop(clock.monotonic() + 5)


async def test_a_flusher_failing_ten_times_in_a_row_is_fatal(tmp_path: Path) -> None:
    clock = FakeClock(wall=H0 + 100)
    root = Supervisor(clock=clock)
    ingest = await _ingest_on(tmp_path, clock, root.child())
    spool = ingest.spool
    assert isinstance(spool, _FlakySpool)
    try:
        spool.fail = 1000
        ingest.accept(make_rows(1, H0 + 90)[0])
        for _ in range(40):
            await clock.run(60.0)
            if root.failed.is_set():
                break
        assert root.failed.is_set()  # serve stops and exits non-zero on this
        assert root.failure is not None
        assert "ingest-flusher failed 10 times in a row" in str(root.failure)
        assert root.restarts["ingest-flusher"] == 9
        assert ingest.buffer_rows == 1  # still held
    finally:
        spool.fail = 0
        await ingest.stop(clock.monotonic() + 5)


async def test_a_registry_watcher_that_fails_is_restarted_counted_and_resyncs(
        fresh_db: str) -> None:
    key = sealing.generate_key()
    conn = await asyncpg.connect(fresh_db)
    try:
        await migrate(conn)
        loopback = NetPolicy.from_lists(allowed=LOOPBACK_NETWORKS,
                                        denied=DEFAULT_DENIED_NETWORKS)
        await Registry(conn, sealing.SecretBox(key), loopback).upsert_many(
            [(f"{0xd00000 + i:06x}", "o@example.com", "eagle-cloud", "http://127.0.0.1:9",
              60.0, "pw") for i in range(3)])
        clock = FakeClock(wall=float(int(time.time())), monotonic=500.0)
        client = FastHttpClient(clock=clock)
        pool = DevicePool(PollingSettings(), MemorySink(), {"eagle-cloud": client}, seed="s",
                          clock=clock)
        await pool.start()
        calls: list[int] = []

        async def snapshot(_: object) -> None:
            calls.append(len(calls))
            if len(calls) == 2:
                raise RuntimeError("the snapshot cannot be written (a bug)")

        root = Supervisor(clock=clock)
        watcher = RegistryWatcher(fresh_db, sealing.SecretBox(key), pool, 60.0,
                                  on_resync=snapshot, clock=clock, supervisor=root.child())
        try:
            await watcher.start()
            assert calls == [0] and watcher.resyncs == 1
            await conn.execute("UPDATE devices SET interval_s = 30, updated_at = now() "
                               "WHERE cloud_id = 'd00001'")
            # Exactly to the periodic resync (its snapshot fails): the
            # restart's back-off (0.5 to 1 s) is then still ahead.
            await clock.run(60.0)
            await wait_for(lambda: root.restarts["registry-watcher"] == 1, 10,
                           "the watcher restarted")
            assert watcher.resyncs == 2 and len(calls) == 2
            await clock.run(1.0)  # its back-off over, it resyncs at once
            await wait_for(lambda: watcher.resyncs == 3 and len(calls) == 3, 10,
                           "a resync after the restart")
            target = pool.target_by_cloud_id("d00001")
            assert target is not None and target.record.interval_s == 30.0
            assert not root.failed.is_set()
        finally:
            await watcher.stop()
            await pool.stop(1.0)
            await client.close()
    finally:
        await conn.close()
