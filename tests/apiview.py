"""A real ServiceView for the API tests, and the API served from a thread.

The view is backed by a real Postgres database (migrated, of its own) and the
stack's real Valkey; only the fleet numbers and histograms are fixed. The API
runs in its own event loop on a thread so that tests (and Hypothesis) can be
plain synchronous functions that talk HTTP to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import asyncpg
import orjson
import redis.asyncio as aioredis
from aiohttp import web

from poller.api.app import start_api, stop_api
from poller.api.view import FleetSnapshot
from poller.config import Settings, load
from poller.migrate import migrate
from poller.polling.stats import LogHistogram
from poller.retention.job import RetentionJob
from poller.sealing import SecretBox, generate_key

T = TypeVar("T")
ADMIN_TOKEN = "admin-token-0123456789abcdef"
READ_TOKEN = "read-token-0123456789abcdef"
REDIS_DB = 11  # a database of its own on the shared Valkey


def fixed_snapshot(**changes: Any) -> FleetSnapshot:
    snap = FleetSnapshot(
        instance_id="test", started_at=1_700_000_000.0, devices=3,
        devices_by_state={"ok": 2, "failing": 1},
        polls_by_outcome={"ok": 90, "timeout": 10},
        polls_by_driver_outcome={("eagle-cloud", "ok"): 90, ("eagle-cloud", "timeout"): 10},
        polls_per_s={"ok": 0.45, "timeout": 0.05}, expected_polls_per_s=0.5,
        lateness_p50_s=0.002, lateness_p99_s=0.03, lateness_max_s=0.2,
        skipped_ticks=1, backpressure_skips=0, in_flight=2, buffer_rows=5,
        rows_committed=85, copy_batches=9, ingest_lag_s=1.5, spool_bytes=4096,
        segments_pending_upload=1, upload_failures=0, upload_lag_s=0.0,
        disk_used_fraction=0.4, disk_warning=False, postgres_up=True, redis_up=True,
        s3_up=True, polling=True)
    return replace(snap, **changes)


def histogram(*seconds: float) -> LogHistogram:
    hist = LogHistogram()
    for s in seconds:
        hist.record(s)
    return hist


@dataclass
class FakeFleetView:
    """ServiceView over real Postgres and Valkey, with fixed fleet numbers."""

    settings: Settings
    box: SecretBox
    pool: asyncpg.Pool
    redis_client: aioredis.Redis | None
    snapshot: FleetSnapshot = field(default_factory=fixed_snapshot)
    statuses: dict[str, dict[str, Any]] = field(default_factory=dict)
    """In-memory status by cloud id, as the pool would give it."""
    status_ids: dict[str, int] = field(default_factory=dict)
    """Device id of each cloud id in ``statuses``."""
    responsive: bool = True
    broken: bool = False
    """fleet() raises: for the last-resort error path."""
    retention: RetentionJob | None = None
    """The daily retention job (``GET /api/archive`` reads its archive client);
    a test attaches one over the stack's real S3."""

    @property
    def db(self) -> asyncpg.Pool:
        return self.pool

    @property
    def redis(self) -> aioredis.Redis | None:
        return self.redis_client

    def fleet(self) -> FleetSnapshot:
        if self.broken:
            raise RuntimeError("fleet snapshot failed")
        return self.snapshot

    def lateness(self) -> LogHistogram:
        return histogram(0.0005, 0.002, 0.002, 0.03, 0.2)

    def copy_latency(self) -> LogHistogram:
        return histogram(0.01, 0.02, 0.5)

    def commit_latency(self) -> LogHistogram:
        return histogram(1.2, 1.4, 2.0)

    def device_status(self, cloud_id: str) -> dict[str, Any] | None:
        return self.statuses.get(cloud_id)

    def has_status(self, device_id: int) -> bool:
        return device_id in self.status_ids.values()

    def device_ids_in_state(self, state: str, after_id: int, limit: int) -> list[int]:
        return sorted(self.status_ids[cid] for cid, status in self.statuses.items()
                      if status.get("state") == state and self.status_ids[cid] > after_id
                      )[:limit]

    def most_failing(self, limit: int) -> list[int]:
        failing = [(status.get("consecutive_failures", 0), self.status_ids[cid])
                   for cid, status in self.statuses.items()
                   if status.get("state") in ("failing", "auth_failed")]
        return [i for _, i in sorted(failing, key=lambda f: -f[0])[:limit]]

    def loop_responsive(self) -> bool:
        return self.responsive


def settings_with(admin: str = "", read: str = "") -> Settings:
    # Test devices live on loopback, allowed here by configuration.
    return load(config_path=None, env={},
                overrides={"api.admin_token": admin, "api.read_token": read,
                           "polling.allowed_networks": "127.0.0.0/8,::1/128"})


async def migrated_pool(database_url: str) -> asyncpg.Pool:
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    assert pool is not None
    return pool


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


class ApiServer:
    """The API on 127.0.0.1:0, served by an event loop on a thread of its own."""

    def __init__(self, database_url: str, redis_url: str, settings: Settings) -> None:
        self._database_url = database_url
        self._redis_url = redis_url
        self._settings = settings
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.view: FakeFleetView | None = None

    def start(self) -> ApiServer:
        self._thread.start()
        self.run(self._start())
        return self

    async def _start(self) -> None:
        pool = await migrated_pool(self._database_url)
        client = aioredis.from_url(self._redis_url, db=REDIS_DB, socket_timeout=2.0)
        self.view = FakeFleetView(self._settings, SecretBox(generate_key()), pool, client)
        self._runner, self.port = await start_api(self.view, "127.0.0.1", 0)

    def stop(self) -> None:
        self.run(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _stop(self) -> None:
        if self._runner is not None:
            await stop_api(self._runner)
        if self.view is not None:
            await self.view.pool.close()
            if self.view.redis_client is not None:
                await self.view.redis_client.aclose()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        """Run ``coro`` on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def request(self, method: str, path: str, *, token: str | None = None,
                body: bytes | None = None, json: Any = None,
                headers: dict[str, str] | None = None) -> Reply:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        if json is not None:
            body = orjson.dumps(json)
        if body is not None:
            # What every API client sends with a body; a test of the 415 names its own.
            sent.setdefault("Content-Type", "application/json")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=sent)
            resp = conn.getresponse()
            return Reply(resp.status, {k: v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()


def dead_redis_url() -> str:
    """A Redis URL on which nothing listens (a real connection failure)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"



@contextlib.contextmanager
def api_server(database_url: str, redis_url: str, admin: str = ADMIN_TOKEN,
               read: str = READ_TOKEN) -> Iterator[ApiServer]:
    """An :class:`ApiServer` over its own database, stopped however the block ends."""
    srv = ApiServer(database_url, redis_url, settings_with(admin, read)).start()
    try:
        yield srv
    finally:
        srv.stop()
