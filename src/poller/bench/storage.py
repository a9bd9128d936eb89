"""What the bench asks of the stores: the registry trimmed to the fleet under
test, readings stored per tick window, and archive bytes.

The bench owns its state directory, so trimming the registry is its right:
devices of an earlier, larger run would otherwise point at a simulator that
is gone and be polled (and fail) in this one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from poller import db
from poller.archive.naming import parse_archive_key
from poller.archive.s3 import ArchiveError, ArchiveStore
from poller.config import Settings
from poller.registry import CHANNEL, RESYNC_ALL
from poller.segment import parse_segment_name
from poller.simulator.fleet import cloud_id_for


def trim_registry(database_url: str, devices: int) -> int:
    """Remove (as ``poller remove-user`` does) every live device that is not
    one of the first ``devices`` simulated ones; returns how many."""
    async def run() -> int:
        conn = await db.connect(database_url)
        try:
            keep = [cloud_id_for(i) for i in range(devices)]
            status = await conn.execute(
                """UPDATE devices SET removed_at = now(), updated_at = now(),
                          enabled = false, sealed_secret = NULL
                   WHERE removed_at IS NULL AND NOT (cloud_id = ANY($1::text[]))""", keep)
            if not status.endswith(" 0"):
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, RESYNC_ALL)
            return int(status.split()[-1])
        finally:
            await conn.close()

    return asyncio.run(run())


def readings_between(database_url: str, start: float, end: float) -> int:
    """Readings stored with a tick time in ``[start, end)`` (Unix seconds)."""
    async def run() -> int:
        conn = await db.connect(database_url)
        try:
            count = await conn.fetchval(
                "SELECT count(*) FROM readings WHERE tick_at >= $1 AND tick_at < $2",
                datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC))
            return int(count)
        finally:
            await conn.close()

    return asyncio.run(run())


def archive_bytes(settings: Settings, spools: Sequence[Path],
                  s3_endpoint_url: str | None) -> int:
    """Bytes of every archive segment of these spool directories, open or
    closed, in a spool or on S3; a segment in both counts once."""
    sizes: dict[tuple[str, int], int] = {}
    for spool in spools:
        if not spool.is_dir():
            continue
        for path in spool.iterdir():
            try:
                parsed = parse_segment_name(path.name, open_ok=True)
            except ValueError:
                continue
            with contextlib.suppress(FileNotFoundError):
                sizes[(parsed.instance, parsed.seq)] = path.stat().st_size

    async def listing() -> list[tuple[str, int]]:
        s3 = settings.s3
        store = ArchiveStore(s3_endpoint_url, s3.bucket, s3.region, s3.access_key_id,
                             s3.secret_access_key, max_attempts=1)
        await store.start()
        try:
            return await store.list_keys(s3.prefix.strip("/") + "/")
        finally:
            await store.close()

    # An unreachable S3 leaves the spool's share: segments stay there until
    # uploaded, so nothing is missed but a segment uploaded and deleted.
    with contextlib.suppress(ArchiveError, OSError):
        for key, size in asyncio.run(listing()):
            try:
                seg = parse_archive_key(key)
            except ValueError:
                continue
            ident = (seg.instance, seg.seq)
            sizes[ident] = max(sizes.get(ident, 0), size)
    return sum(sizes.values())
