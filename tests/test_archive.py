"""The S3 archive and the uploader against a real SeaweedFS."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import orjson
import pytest

from poller.archive.naming import (
    archive_key,
    is_segment_name,
    parse_archive_key,
    parse_segment_name,
)
from poller.archive.s3 import MIB, ArchiveError, ArchiveStore, ArchiveUnavailable, UploadResult
from poller.archive.uploader import MARKER_SUFFIX, Uploader
from poller.clock import FakeClock, settle
from poller.reading import Reading
from tests.stackfix import RunningStack

H0 = 1_709_276_400  # 2024-03-01T07:00Z
_prefixes = itertools.count(1)


# -- servers ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def make_store(stack: RunningStack, *, connect_timeout_s: float = 2.0,
               multipart_threshold_bytes: int = 64 * MIB,
               part_size_bytes: int = 16 * MIB) -> ArchiveStore:
    # One attempt per call: the uploader's own back-off is what is tested.
    return ArchiveStore(stack.info.s3_endpoint_url, stack.info.bucket, "us-east-1", "", "",
                        max_attempts=1, connect_timeout_s=connect_timeout_s,
                        read_timeout_s=10.0, multipart_threshold_bytes=multipart_threshold_bytes,
                        part_size_bytes=part_size_bytes)


@pytest.fixture
async def store(stack: RunningStack) -> AsyncIterator[ArchiveStore]:
    store = make_store(stack)
    await store.start()
    await store.ensure_bucket()
    yield store
    await store.close()


@pytest.fixture
def prefix() -> str:
    """A key prefix of its own per test, so tests never see each other's objects."""
    return f"t{next(_prefixes)}-{os.getpid()}"


# -- segment files ----------------------------------------------------------


def readings(hour: int, n: int, first_id: int = 1) -> list[Reading]:
    return [Reading(first_id + i, hour + 6.0 * i, hour + 6.0 * i - 0.5, hour + 6.0 * i + 0.25,
                    100.0 + i, 5000.5 + i, None, 0.12 if i % 2 else None, f"dev-{first_id + i}")
            for i in range(n)]


def encode(rows: list[Reading], members: int = 2) -> bytes:
    """NDJSON lines in ``members`` concatenated gzip members, as the spool writes."""
    lines = [orjson.dumps(r._asdict()) + b"\n" for r in rows]
    step = max(1, -(-len(lines) // members))
    return b"".join(gzip.compress(b"".join(lines[i:i + step]))
                    for i in range(0, len(lines), step))


def write_segment(spool: Path, hour: int, seq: int, rows: list[Reading] | None = None,
                  instance: str = "gw-a") -> str:
    label = time.strftime("%Y%m%dT%H", time.gmtime(hour))
    name = f"{instance}-{label}-{seq:06d}.ndjson.gz"
    (spool / name).write_bytes(encode(rows if rows is not None else readings(hour, 20)))
    return name


class Recording:
    """The real store, remembering which keys were uploaded, in order."""

    def __init__(self, inner: ArchiveStore) -> None:
        self.inner = inner
        self.keys: list[str] = []

    async def upload_file(self, path: Path | str, key: str) -> UploadResult:
        result = await self.inner.upload_file(path, key)
        self.keys.append(key)
        return result


async def wait_for(cond: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


# -- naming -----------------------------------------------------------------


def test_segment_names_map_to_hive_keys() -> None:
    name = "gw-east-1-20240301T07-000042.ndjson.gz"
    seg = parse_segment_name(name)
    assert seg == ("gw-east-1", H0, 42)
    key = archive_key("poller/", name)
    assert key == "poller/readings/date=2024-03-01/hour=07/gw-east-1-000042.ndjson.gz"
    assert parse_archive_key(key) == seg
    assert archive_key("", name).startswith("readings/date=2024-03-01/")
    # seq outgrows six digits after a million segments; it must keep working.
    assert parse_segment_name("gw-20240301T07-1234567.ndjson.gz").seq == 1234567
    for other in (name + ".open", name + MARKER_SUFFIX, "gw-20240301T7-000001.ndjson.gz",
                  "gw-20241301T07-000001.ndjson.gz", "seq", "-20240301T07-000001.ndjson.gz"):
        assert not is_segment_name(other), other
    with pytest.raises(ValueError):
        parse_archive_key("poller/readings/date=2024-03-01/gw-000001.ndjson.gz")


# -- the store --------------------------------------------------------------


async def test_upload_verifies_and_reupload_overwrites(store: ArchiveStore, prefix: str,
                                                       tmp_path: Path) -> None:
    name = write_segment(tmp_path, H0, 7)
    key = archive_key(prefix, name)
    first = await store.upload_file(tmp_path / name, key)
    assert first.key == key and first.parts == 1
    assert first.size == (tmp_path / name).stat().st_size
    # A retry after, say, a lost answer: same key, still one object.
    second = await store.upload_file(tmp_path / name, key)
    assert second == first
    assert await store.list_keys(prefix + "/") == [(key, first.size)]
    assert await store.get(key) == (tmp_path / name).read_bytes()


async def test_large_file_goes_in_verified_parts(stack: RunningStack, prefix: str,
                                                 tmp_path: Path) -> None:
    path = tmp_path / "big"
    path.write_bytes(os.urandom(11 * MIB + 123))
    async with make_store(stack, multipart_threshold_bytes=5 * MIB,
                          part_size_bytes=5 * MIB) as store:
        result = await store.upload_file(path, f"{prefix}/big")
        assert result.parts == 3
        assert result.etag.endswith("-3")
        assert await store.get(f"{prefix}/big") == path.read_bytes()
        chunks = [c async for c in store.stream(f"{prefix}/big", chunk_bytes=MIB)]
        assert all(len(c) <= MIB for c in chunks) and sum(map(len, chunks)) == result.size


async def test_errors_are_typed_and_keep_secrets_out(stack: RunningStack, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    secret = "s3cr3t-never-shown"
    down = ArchiveStore(f"http://127.0.0.1:{_free_port()}", "b-down", "us-east-1", "AKIDEXAMPLE",
                        secret, max_attempts=1, connect_timeout_s=1.0)
    async with down:
        with pytest.raises(ArchiveUnavailable) as unavailable:
            await down.upload_file(path, "k")
    assert secret not in str(unavailable.value) and "AKIDEXAMPLE" not in str(unavailable.value)
    async with ArchiveStore(stack.info.s3_endpoint_url, "no-such-bucket-here", "us-east-1",
                            "", "", max_attempts=1) as store:
        with pytest.raises(ArchiveError) as refused:
            await store.upload_file(path, "k")
        assert not isinstance(refused.value, ArchiveUnavailable)
        assert "(HTTP 4" in str(refused.value)
    with pytest.raises(RuntimeError, match="start"):
        await make_store(stack).list_keys("")


# -- the uploader -----------------------------------------------------------


async def test_uploads_oldest_first_and_not_twice(store: ArchiveStore, prefix: str,
                                                  tmp_path: Path) -> None:
    # Written newest first, as after an outage the directory order means nothing.
    names = [write_segment(tmp_path, H0 + 7200, 9), write_segment(tmp_path, H0 + 3600, 5),
             write_segment(tmp_path, H0, 8), write_segment(tmp_path, H0, 3)]
    (tmp_path / "gw-a-20240301T10-000010.ndjson.gz.open").write_bytes(b"still written")
    (tmp_path / "spool.seq").write_text("11\n")
    spy = Recording(store)
    loaded: set[str] = set()
    uploader = Uploader(spy, tmp_path, prefix, loaded.__contains__)
    assert await uploader.upload_pending() == 4
    expected = [archive_key(prefix, n) for n in sorted(names, key=parse_segment_name_order)]
    assert spy.keys == expected
    assert sorted(k for k, _ in await store.list_keys(prefix + "/")) == sorted(expected)
    # Not loaded into Postgres yet: every file stays, marked as uploaded.
    assert all((tmp_path / n).exists() and (tmp_path / (n + MARKER_SUFFIX)).exists()
               for n in names)
    stats = uploader.stats()
    assert (stats.segments_pending, stats.segments_awaiting_delete) == (0, 4)
    # A restarted uploader trusts the markers.
    again = Recording(store)
    assert await Uploader(again, tmp_path, prefix, loaded.__contains__).upload_pending() == 0
    assert again.keys == []
    # Once loaded, the next pass deletes segment and marker, and nothing else.
    loaded.update(names[:2])
    assert await uploader.upload_pending() == 0
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([names[2], names[2] + MARKER_SUFFIX, names[3],
                           names[3] + MARKER_SUFFIX,
                           "gw-a-20240301T10-000010.ndjson.gz.open", "spool.seq"])
    assert uploader.stats().segments_awaiting_delete == 2
    assert spy.keys == expected


def parse_segment_name_order(name: str) -> tuple[int, int]:
    seg = parse_segment_name(name)
    return seg.hour_epoch, seg.seq


async def test_outage_retries_with_backoff_then_catches_up(stack: RunningStack, prefix: str,
                                                           tmp_path: Path) -> None:
    store = make_store(stack, connect_timeout_s=0.5)
    await store.start()
    await store.ensure_bucket()
    states: list[int] = []
    clock = FakeClock(wall=time.time())  # file mtimes are real: lag stays sane
    uploader = Uploader(store, tmp_path, prefix, lambda name: True,
                        backoff_base_s=1.0, backoff_max_s=4.0, idle_recheck_s=60,
                        on_state=lambda s: states.append(s.consecutive_failures), clock=clock)
    try:
        stack.stack.stop_component("s3")
        names = [write_segment(tmp_path, H0 + 3600 * h, h + 1) for h in range(3)]
        await uploader.start()
        for failures, ceiling in enumerate((1.0, 2.0, 4.0, 4.0), start=1):
            # Each failure (against the real, stopped S3) is followed by a
            # wait on the clock: half the ceiling plus up to half more,
            # the ceiling doubling to the cap. Nothing is tried before it.
            def backing_off(f: int = failures) -> bool:
                return uploader.stats().consecutive_failures == f and clock.next_at() is not None

            await wait_for(backing_off)
            wake = clock.next_at()
            assert wake is not None
            assert ceiling / 2 <= wake - clock.monotonic() <= ceiling
            clock.advance(wake - clock.monotonic() - 0.01)
            await settle()
            assert uploader.stats().consecutive_failures == failures  # not yet
            if failures < 4:
                clock.advance(0.01)
        stats = uploader.stats()
        assert stats.segments_pending == 3 and stats.last_success_at is None
        assert stats.bytes_pending == sum((tmp_path / n).stat().st_size for n in names)
        assert stats.upload_lag_s >= 0 and stats.last_error is not None
        assert "cannot reach" in stats.last_error
        assert states[:4] == [1, 2, 3, 4]
        assert all((tmp_path / n).exists() for n in names)
        assert not any(p.name.endswith(MARKER_SUFFIX) for p in tmp_path.iterdir())
        stack.stack.start_component("s3")
        clock.advance(0.01)  # the fourth back-off ends: S3 answers again
        await wait_for(lambda: uploader.stats().segments_pending == 0, timeout_s=20)
        stats = uploader.stats()
        assert stats.consecutive_failures == 0 and stats.last_success_at is not None
        assert stats.upload_lag_s == 0
        assert sorted(k for k, _ in await store.list_keys(prefix + "/")) == sorted(
            archive_key(prefix, n) for n in names)
        await wait_for(lambda: not any(tmp_path.iterdir()))
        # A segment closed later is picked up on a kick, long before idle_recheck_s.
        late = write_segment(tmp_path, H0 + 4 * 3600, 9)
        uploader.kick()
        await wait_for(lambda: not (tmp_path / late).exists())
    finally:
        if not _answers(stack.info.s3_endpoint_url):
            stack.stack.start_component("s3")
        await uploader.stop()
        await uploader.stop()
        await store.close()


def _answers(endpoint_url: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint_url + "/", timeout=1):
            return True
    except (OSError, urllib.error.URLError):
        return False


async def test_deadline_and_stats(store: ArchiveStore, prefix: str, tmp_path: Path) -> None:
    clock = FakeClock(wall=2_000_000_000.0)
    name = write_segment(tmp_path, H0, 1)
    os.utime(tmp_path / name, (clock.wall() - 90, clock.wall() - 90))
    uploader = Uploader(store, tmp_path, prefix, lambda n: False, clock=clock)
    # A deadline (monotonic) already passed: nothing starts.
    assert await uploader.upload_pending(deadline=clock.monotonic() - 1) == 0
    stats = uploader.stats()
    assert stats.segments_pending == 1 and stats.upload_lag_s == pytest.approx(90)
    clock.advance(10)
    assert uploader.stats().upload_lag_s == pytest.approx(100)  # wall age of the file
    assert await uploader.upload_pending(deadline=clock.monotonic() + 60) == 1
    stats = uploader.stats()
    assert stats.last_success_at == clock.wall() and stats.uploads_total == 1
    assert stats.upload_lag_s == 0 and stats.segments_awaiting_delete == 1


async def test_disk_warning_is_logged_once_per_change(store: ArchiveStore, prefix: str,
                                                      tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    uploader = Uploader(store, tmp_path, prefix, lambda n: True, disk_warn_fraction=1e-9)
    caplog.set_level(logging.WARNING, logger="poller.archive.uploader")
    for _ in range(3):
        await uploader.upload_pending()
    stats = uploader.stats()
    assert stats.disk_warning and 0 < stats.disk_used_fraction <= 1
    assert sum("spool disk" in r.getMessage() for r in caplog.records) == 1


async def test_lifecycle_misuse(store: ArchiveStore, prefix: str, tmp_path: Path) -> None:
    uploader = Uploader(store, tmp_path, prefix, lambda n: True)
    await uploader.stop()  # never started: nothing to do
    await uploader.start()
    with pytest.raises(RuntimeError, match="twice"):
        await uploader.start()
    await uploader.stop()
    with pytest.raises(ValueError):
        Uploader(store, tmp_path, prefix, lambda n: True, backoff_base_s=0)


async def test_torn_marker_means_upload_again(store: ArchiveStore, prefix: str,
                                              tmp_path: Path) -> None:
    name = write_segment(tmp_path, H0, 1)
    (tmp_path / (name + MARKER_SUFFIX)).write_bytes(b"")  # a crash mid-write
    (tmp_path / (name + MARKER_SUFFIX + ".tmp")).write_bytes(b"{")
    (tmp_path / ("gw-a-20240301T05-000001.ndjson.gz" + MARKER_SUFFIX)).write_bytes(b"{}")
    spy = Recording(store)
    assert await Uploader(spy, tmp_path, prefix, lambda n: False).upload_pending() == 1
    assert spy.keys == [archive_key(prefix, name)]
    # The stale marker (its segment is gone) and the temporary file are cleaned up.
    assert sorted(p.name for p in tmp_path.iterdir()) == [name, name + MARKER_SUFFIX]
