"""Helpers for tests that run a whole Service (or ``poller serve``) against
real servers and a simulated fleet, and then count the readings everywhere."""

from __future__ import annotations

import asyncio
import collections
import gzip
import itertools
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import asyncpg
import orjson

from poller import config, sealing
from poller.archive.s3 import ArchiveStore
from poller.config import Settings
from poller.migrate import migrate
from poller.netpolicy import NetPolicy
from poller.registry import Registry
from poller.simulator.fleet import credentials_for
from poller.simulator.main import Simulator
from poller.stack import StackInfo

Key = tuple[str, int, float]
"""A reading as the simulator served it: cloud id, device time, demand."""
_redis_db = itertools.count(1)

QUICK_SETTLE = {"POLLER_POLLING_TIMEOUT_S": "0.9", "POLLER_INGEST_FLUSH_INTERVAL_S": "0.2"}
"""For ``poller bench`` runs at a 1 s interval: after its window the bench
waits a poll timeout and two flushes for the last readings to land, some 7 s
with the defaults (4 s, 1 s), where a poll at that interval times out after
0.9 s anyway. Give it to the bench (its settings) and to the serves it starts
(the environment they inherit) alike."""


def service_env(info: StackInfo, database_url: str, state_dir: Path, instance_id: str,
                **extra: str) -> dict[str, str]:
    """The environment of a serve against ``database_url`` and the stack's
    Valkey and S3 (a prefix of its own), polling the simulator on loopback."""
    env = {
        "POLLER_STATE_DIR": str(state_dir),
        "POLLER_INSTANCE_ID": instance_id,
        "POLLER_DATABASE_URL": database_url,
        "POLLER_REDIS_URL": f"{info.redis_url.rstrip('/').rsplit('/', 1)[0]}/"
                            f"{next(_redis_db) % 16}",
        "POLLER_S3_ENDPOINT_URL": info.s3_endpoint_url,
        "POLLER_S3_BUCKET": info.bucket,
        "POLLER_S3_PREFIX": f"t{uuid.uuid4().hex[:10]}",
        "POLLER_API_PORT": "0",
        "POLLER_INGEST_FLUSH_INTERVAL_S": "0.2",
        "POLLER_INGEST_SHUTDOWN_GRACE_S": "15",
        "POLLER_POLLING_ALLOWED_NETWORKS": "127.0.0.0/8,::1/128",  # the simulator's
    }
    env.update(extra)
    return env


def settings_of(env: dict[str, str]) -> Settings:
    return config.load(config_path=None, env=env)


async def register(settings: Settings, sim: Simulator, seed: int, interval_s: float) -> None:
    """Migrate the settings' database and register the simulator's fleet."""
    base = f"http://127.0.0.1:{sim.port}"
    conn = await asyncpg.connect(settings.database.url)
    try:
        await migrate(conn)
        box = sealing.SecretBox(sealing.load_key(settings.state_dir))
        entries = []
        for cid in sim.cloud_ids():
            email, password = credentials_for(cid, seed)
            entries.append((cid, email, "eagle-cloud", base, interval_s, password))
        await Registry(conn, box, NetPolicy.from_settings(settings.polling)).upsert_many(entries)
    finally:
        await conn.close()


def served(sim: Simulator) -> collections.Counter[Key]:
    return collections.Counter((s.cloud_id, s.device_at, round(s.demand_w, 3))
                               for s in sim.served() if s.demand_w is not None)


async def loaded(database_url: str) -> collections.Counter[Key]:
    """The readings in Postgres; fails if any (device, tick) is there twice."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT d.cloud_id, r.device_at, r.demand_w FROM readings r "
            "JOIN devices d ON d.id = r.device_id")
        dup = await conn.fetchval(
            "SELECT count(*) FROM (SELECT device_id, tick_at FROM readings "
            "GROUP BY 1, 2 HAVING count(*) > 1) x")
    finally:
        await conn.close()
    assert dup == 0
    return collections.Counter((r["cloud_id"], int(r["device_at"].timestamp()),
                                round(r["demand_w"], 3)) for r in rows)


async def archived(settings: Settings, info: StackInfo) -> collections.Counter[Key]:
    """The readings in the S3 archive under the settings' prefix."""
    s = settings
    store = ArchiveStore(info.s3_endpoint_url, s.s3.bucket, s.s3.region, "", "")
    await store.start()
    try:
        found: collections.Counter[Key] = collections.Counter()
        for key, _ in await store.list_keys(f"{s.s3.prefix}/readings/"):
            for line in gzip.decompress(await store.get(key)).splitlines():
                doc = orjson.loads(line)
                found[(doc["cloud_id"], int(doc["device_at"]), round(doc["demand_w"], 3))] += 1
        return found
    finally:
        await store.close()


async def wait_for(predicate: Callable[[], bool], within_s: float, what: str) -> None:
    """Wait (polling a real server's effect) until ``predicate()`` holds."""
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, f"not within {within_s:g} s: {what}"
        await asyncio.sleep(0.05)


def diff(a: collections.Counter[Key], b: collections.Counter[Key]) -> str:
    return f"missing {sum((a - b).values())}, extra {sum((b - a).values())}"
