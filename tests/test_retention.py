"""Retention against the real stack: raw days leave Postgres only once S3
holds all of them, and come back with ``replay``; the archive's lifecycle
rule against the real SeaweedFS."""

from __future__ import annotations

import calendar
import logging
import os
import subprocess
import sys
import time
import uuid
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from poller import config
from poller.archive import lifecycle
from poller.archive.naming import archive_key
from poller.archive.replay import replay
from poller.archive.s3 import ArchiveError, ArchiveStore
from poller.clock import FakeClock, settle
from poller.config import RetentionSettings
from poller.errors import ConfigError
from poller.ingest.pgload import PgLoader
from poller.ingest.spool import Spool
from poller.migrate import migrate
from poller.reading import Reading
from poller.retention.job import RetentionJob
from poller.retention.policy import RetentionPolicy
from poller.segment import segment_name
from tests.stackfix import RunningStack, fresh_database_url
from tests.test_archive import encode
from tests.test_replay import hour_rows

D0 = date(2031, 3, 1)
DAY_S = 86400


def epoch(day: date, hour: int = 0) -> int:
    return calendar.timegm(day.timetuple()) + hour * 3600


NOW = float(epoch(D0 + timedelta(days=24), 12))
"""2031-03-25 12:00 UTC: every staged day is older than 14 days."""
SETTINGS = RetentionSettings(raw_days=14, minute_days=0, hour_days=0)


@pytest.fixture
def prefix() -> str:
    return f"ret-{uuid.uuid4().hex[:12]}"


async def stage(pool: asyncpg.Pool, store: ArchiveStore, tmp: Path, prefix: str,
                instance: str, hour_epoch: int, rows: list[Reading], *,
                upload: bytes | None = None, uploaded: bool = True) -> str:
    """Load one segment through the real loader (so its checkpoint writes
    the manifest) and put it in S3: as written, as ``upload`` says, or not."""
    name = segment_name(instance, hour_epoch, 1)
    spool_dir = tmp / f"{instance}-{hour_epoch}"
    spool_dir.mkdir()
    body = encode(rows)
    (spool_dir / name).write_bytes(body)
    spool = Spool(spool_dir, instance, lambda: hour_epoch + 7200.0)
    await spool.open()
    loader = PgLoader(pool, instance, spool)
    await loader.start()
    try:
        assert await loader.catch_up() == len(rows)
    finally:
        await loader.stop()
        await spool.close()
    if uploaded:
        obj = tmp / f"{name}.object"
        obj.write_bytes(body if upload is None else upload)
        await store.upload_file(obj, archive_key(prefix, name))
    return name


async def partition_exists(pool: asyncpg.Pool, day: date) -> bool:
    name = f"readings_p{day:%Y%m%d}"
    return await pool.fetchval("SELECT to_regclass($1)", name) is not None


async def rows_of(pool: asyncpg.Pool, day: date) -> list[tuple[Any, ...]]:
    """The day's readings, raw or packed (the daily run packs what it keeps)."""
    return [tuple(r) for r in await pool.fetch(
        "SELECT * FROM readings_span(to_timestamp($1), to_timestamp($2)) "
        "ORDER BY device_id, tick_at", float(epoch(day)), float(epoch(day) + DAY_S))]


async def test_only_an_archived_day_is_dropped_and_dry_run_changes_nothing(
        pool: asyncpg.Pool, store: ArchiveStore, prefix: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    archived, missing, mismatched, legacy = (D0 + timedelta(days=i) for i in range(4))
    devices = range(1, 5)
    # Two instances wrote the archived day; every segment is in S3 as loaded.
    for instance, hour in (("gw-a", 0), ("gw-a", 1), ("gw-b", 1)):
        await stage(pool, store, tmp_path, prefix, instance, epoch(archived, hour),
                    hour_rows(epoch(archived, hour), devices if instance == "gw-a"
                              else range(5, 7)))
    # One segment of this day never reached S3 (another hour of it did).
    await stage(pool, store, tmp_path, prefix, "gw-a", epoch(missing, 3),
                hour_rows(epoch(missing, 3), devices))
    await stage(pool, store, tmp_path, prefix, "gw-a", epoch(missing, 5),
                hour_rows(epoch(missing, 5), devices), uploaded=False)
    # S3 holds a truncated copy of this one.
    body_rows = hour_rows(epoch(mismatched, 2), devices)
    await stage(pool, store, tmp_path, prefix, "gw-b", epoch(mismatched, 2), body_rows,
                upload=encode(body_rows)[:-7])
    # Rows no segment accounts for (loaded before the manifest existed).
    await pool.execute("SELECT poller_ensure_partitions($1::date, 1)", legacy)
    await pool.execute("INSERT INTO readings (device_id, tick_at, received_at) "
                       "VALUES (1, to_timestamp($1), to_timestamp($1))", float(epoch(legacy, 4)))
    before = {d: await rows_of(pool, d) for d in (archived, missing, mismatched, legacy)}
    assert all(before.values())

    policy = RetentionPolicy(SETTINGS, store, prefix, wall=lambda: NOW)
    async with pool.acquire() as conn:
        dry = await policy.run(conn, apply=False)
    # (Empty partitions the migration made ahead of the real today go too.)
    verdicts = {d.day: (d.drop, d.reasons) for d in dry.decisions if d.day in before}
    assert verdicts == {archived: (True, ()), missing: (False, ("segment_missing",)),
                        mismatched: (False, ("size_mismatch",)),
                        legacy: (False, ("rows_unaccounted",))}
    assert {d: await rows_of(pool, d) for d in before} == before  # the dry run changed nothing
    assert await pool.fetchval("SELECT count(*) FROM retention_dropped") == 0
    assert all(not d.done for d in dry.decisions)

    job = RetentionJob(policy, pool, FakeClock(wall=NOW))
    with caplog.at_level(logging.INFO, logger="poller.retention"):
        report = await job.run_once()
    assert report is not None and report.applied
    assert not await partition_exists(pool, archived)
    for kept in (missing, mismatched, legacy):
        assert await partition_exists(pool, kept) and await rows_of(pool, kept) == before[kept]
    assert report.blocked() == {("raw", "segment_missing"): 1, ("raw", "size_mismatch"): 1,
                                ("raw", "rows_unaccounted"): 1}
    assert [d.day for d in report.decisions if d.done and d.day >= D0] == [archived]
    assert job.dropped_total["raw"] == sum(1 for d in report.decisions if d.done)
    logged = caplog.text
    assert f"dropped raw {archived}" in logged
    assert f"keeping raw day {missing}" in logged and "is not in S3" in logged
    assert f"keeping raw day {mismatched}" in logged and "bytes in S3" in logged
    dropped = await pool.fetchrow("SELECT rows, segments, restored_at FROM retention_dropped "
                                  "WHERE day = $1", archived)
    assert dropped is not None and dropped["segments"] == 3 and dropped["restored_at"] is None

    # The dropped day replays back into a partition of its own, exactly.
    result = await replay(store, prefix, pool, _dt(archived), _dt(archived + timedelta(days=1)))
    assert result.errors == 0 and result.days_restored == (archived,)
    assert await rows_of(pool, archived) == before[archived]
    restored = await pool.fetchval("SELECT restored_at FROM retention_dropped WHERE day = $1",
                                   archived)
    assert restored is not None
    # The replay ran now, the policy lives on the fake clock: put the replay there.
    await pool.execute("UPDATE retention_dropped SET restored_at = to_timestamp($1) "
                       "WHERE day = $2", NOW - 3600, archived)
    # Rollups computed before the drop stand: the replay leaves no bucket of the day to redo.
    if await pool.fetchval("SELECT to_regclass('rollup_dirty')") is not None:
        assert await pool.fetchval(
            "SELECT count(*) FROM rollup_dirty WHERE bucket >= to_timestamp($1) "
            "AND bucket < to_timestamp($2)", float(epoch(archived)),
            float(epoch(archived) + DAY_S)) == 0
    # Held after a replay, then dropped again (the manifest still vouches for it).
    async with pool.acquire() as conn:
        held = await policy.run(conn, apply=True)
        later = RetentionPolicy(SETTINGS, store, prefix, wall=lambda: NOW + 8 * DAY_S)
        again = await later.run(conn, apply=True)
    assert [d.reasons for d in held.decisions if d.day == archived] == [("replay_hold",)]
    assert [d.done for d in again.decisions if d.day == archived] == [True]


def _dt(day: date) -> Any:
    from datetime import UTC, datetime

    return datetime(day.year, day.month, day.day, tzinfo=UTC)


async def test_serve_applies_retention_when_the_fake_clock_passes_the_hour(
        stack: RunningStack, store: ArchiveStore, tmp_path: Path) -> None:
    import aiohttp

    from poller.service import Service
    from tests.servicefix import service_env, settings_of

    db_url = fresh_database_url(stack.info)
    settings = settings_of(service_env(stack.info, db_url, tmp_path / "state", "ret",
                                       POLLER_RETENTION_RUN_AT_HOUR_UTC="3",
                                       # Fake time stands still at the stop: the grace
                                       # runs out on the real clock.
                                       POLLER_INGEST_SHUTDOWN_GRACE_S="1"))
    prefix = settings.s3.prefix
    start = float(int(time.time()))
    today = date.fromtimestamp(start - start % DAY_S)
    old, unarchived = today - timedelta(days=20), today - timedelta(days=19)
    conn = await asyncpg.connect(db_url)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    try:
        await stage(pool, store, tmp_path, prefix, "gw-a", epoch(old, 6),
                    hour_rows(epoch(old, 6), range(1, 3)))
        await stage(pool, store, tmp_path, prefix, "gw-a", epoch(unarchived, 6),
                    hour_rows(epoch(unarchived, 6), range(1, 3)), uploaded=False)
        clock = FakeClock(wall=start)
        service = Service(settings, clock=clock)
        await service.start()
        try:
            assert service.retention is not None and service.retention.runs == 0
            assert await partition_exists(pool, old)
            # 03:00 UTC passes once. One jump: every timer due fires once (the
            # flusher's 0.2 s ticks would otherwise make a day of turns).
            await settle(20)
            clock.advance(DAY_S + 60.0)
            for _ in range(200):  # the run itself talks to the real servers
                if service.retention.runs:
                    break
                await settle(20)
                await _pause()
            assert service.retention.runs == 1
            assert not await partition_exists(pool, old)
            assert await partition_exists(pool, unarchived)
            # The day kept (not in S3) was packed after the drops
            # (retention.compact): every reading moved, none lost.
            start_of, end_of = epoch(unarchived, 0), epoch(unarchived + timedelta(days=1), 0)
            raw_left = await pool.fetchval(
                "SELECT count(*) FROM readings WHERE tick_at >= to_timestamp($1) "
                "AND tick_at < to_timestamp($2)", start_of, end_of)
            packed = await pool.fetchval(
                "SELECT coalesce(sum(n), 0) FROM packed_readings WHERE hour_at >= to_timestamp($1) "
                "AND hour_at < to_timestamp($2)", start_of, end_of)
            staged = len(hour_rows(epoch(unarchived, 6), range(1, 3)))
            assert raw_left == 0 and packed == staged == service.retention.compacted_rows
            base = f"http://127.0.0.1:{service.api_port}"
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{base}/metrics") as reply:
                    text = await reply.text()
                async with http.get(f"{base}/api/archive?days=25") as reply:
                    assert reply.status == 200
                    doc = await reply.json()
                async with http.get(f"{base}/api/archive?days=99") as reply:
                    assert reply.status == 400
            assert ('poller_retention_blocked_days{level="raw",reason="segment_missing"} 1.0'
                    in text)
            assert 'poller_retention_dropped_partitions_total{level="raw"} 1.0' in text
            assert f"poller_retention_packed_readings_total {staged:.1f}" in text
            days = {d["day"]: d for d in doc["days"]}
            assert len(doc["days"]) == 25
            assert days[unarchived.isoformat()] == {
                "day": unarchived.isoformat(), "hours_expected": 1, "hours_uploaded": 0,
                "bytes": 0, "missing": [6], "behind": True}
            assert days[old.isoformat()]["hours_expected"] == 1
            assert days[old.isoformat()]["hours_uploaded"] == 1
            assert days[old.isoformat()]["bytes"] > 0 and not days[old.isoformat()]["behind"]
            raw = next(lv for lv in doc["levels"] if lv["level"] == "raw")
            assert raw["keep_days"] == 14 and raw["oldest"] == unarchived.isoformat()
            assert [lv["level"] for lv in doc["levels"]] == ["raw", "minute", "hour"]
        finally:
            await service.stop()
    finally:
        await pool.close()


async def _pause() -> None:
    import asyncio

    await asyncio.sleep(0.05)  # waiting on the real Postgres and S3, not on time


async def test_lifecycle_rule_on_seaweedfs_show_says_unsupported_and_apply_fails(
        stack: RunningStack) -> None:
    bucket = f"lc-{uuid.uuid4().hex[:12]}"
    store = ArchiveStore(stack.info.s3_endpoint_url, bucket, "us-east-1", "", "", max_attempts=1)
    await store.start()
    try:
        await store.ensure_bucket()
        shown = await lifecycle.state(store, RetentionSettings(), "poller")
        assert shown.current is None and shown.server.startswith("SeaweedFS")
        assert shown.unsupported is not None
        assert any("cannot apply it" in line for line in shown.lines())
        with pytest.raises(ArchiveError, match=r"NotImplemented \(HTTP 501\)"):
            await lifecycle.apply(store, RetentionSettings(), "poller")
        # What it does take: a rule that only expires (which poller never sets by default).
        await store.put_lifecycle([{"ID": "other", "Status": "Enabled",
                                    "Filter": {"Prefix": "tmp/"},
                                    "Expiration": {"Days": 3650}}])
        after = await lifecycle.state(store, RetentionSettings(), "poller")
        assert after.current is not None and [r["ID"] for r in after.current] == ["other"]
        assert after.merged()[-1]["ID"] == lifecycle.RULE_ID  # --apply would keep "other"
    finally:
        await store.close()


def test_cli_archive_lifecycle_and_retention(stack: RunningStack, tmp_path: Path) -> None:
    from tests.servicefix import service_env

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("POLLER_")},
           **service_env(stack.info, fresh_database_url(stack.info), tmp_path, "cli")}
    poller = [sys.executable, "-m", "poller"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*poller, *args], env=env, capture_output=True, text=True,
                              timeout=60, check=False)

    shown = run("archive", "lifecycle", "--show")
    assert shown.returncode == 0, shown.stderr
    assert "GLACIER_IR 30 days after upload; never deleted" in shown.stdout
    assert "this server cannot apply it" in shown.stdout
    applied = run("archive", "lifecycle", "--apply")
    assert applied.returncode == 1
    assert "lifecycle rule not applied" in applied.stderr and "NotImplemented" in applied.stderr
    dry = run("retention")
    assert dry.returncode == 0, dry.stderr
    assert "would drop (dry run: nothing changed" in dry.stdout and "raw     14 days" in dry.stdout


def test_retention_settings_are_validated() -> None:
    defaults = config.load(config_path=None, env={}).retention
    assert (defaults.raw_days, defaults.minute_days, defaults.hour_days) == (14, 90, 0)
    for env, key in (({"POLLER_RETENTION_MINUTE_DAYS": "3"}, "retention.minute_days"),
                     ({"POLLER_RETENTION_RAW_DAYS": "0"}, "retention.minute_days"),
                     ({"POLLER_RETENTION_HOUR_DAYS": "30"}, "retention.hour_days"),
                     ({"POLLER_RETENTION_RAW_DAYS": "-1"}, "retention.raw_days"),
                     ({"POLLER_RETENTION_ARCHIVE_STORAGE_CLASS": "cold"},
                      "retention.archive_storage_class"),
                     ({"POLLER_RETENTION_ARCHIVE_STORAGE_CLASS": "standard_ia",
                       "POLLER_RETENTION_ARCHIVE_COLD_AFTER_DAYS": "7"},
                      "retention.archive_cold_after_days"),
                     ({"POLLER_RETENTION_ARCHIVE_EXPIRE_DAYS": "10"},
                      "retention.archive_expire_days")):
        with pytest.raises(ConfigError) as caught:
            config.load(config_path=None, env=env)
        assert caught.value.key == key, (env, caught.value)
    forever = config.load(config_path=None, env={"POLLER_RETENTION_RAW_DAYS": "0",
                                                  "POLLER_RETENTION_MINUTE_DAYS": "0"})
    assert forever.retention.raw_days == 0


@pytest.mark.parametrize("name", ["poller.retention.manifest", "poller.retention.job",
                                  "poller.archive.lifecycle"])
def test_docstring_examples(name: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0, f"{result.failed} failed in {name}"
