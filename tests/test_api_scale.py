"""The API at fleet scale: bounded work per request, and its own Postgres pool.

A real ``Service`` polls 20,000 registered devices (the simulator, a closed
port, wrong passwords, disabled and unreadable registrations). Every listing
request is held to its page by counting what it read (registry rows from
Postgres, ids from the pool's state index), not by timing: before, a state
filter walked the whole fleet for every row and stalled polling for minutes.
A slow query on the API's pool is cancelled by its statement timeout while
the loader, on a pool of its own, goes on committing.
"""

from __future__ import annotations

import asyncio
import collections
import doctest
import itertools
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import hypothesis
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from aiohttp import web
from hypothesis import strategies as st

from poller import config, db, migrate, sealing
from poller.api.app import start_api, stop_api
from poller.api.routes_devices import LISTING_COST, SCAN_ROWS, ListingCost
from poller.netpolicy import NetPolicy
from poller.polling import index
from poller.polling.pool import DevicePool
from poller.polling.target import DeviceState
from poller.registry import Registry
from poller.service import Service
from poller.simulator.fleet import credentials_for
from poller.simulator.main import Simulator, SimulatorConfig
from tests.stackfix import RunningStack, fresh_database_url

BULK = 20_000
"""Devices that stay pending: polled once a day, so (almost) never in the test."""
SPECIAL = 5
"""Of each kind below, registered between slices of the bulk so ids interleave."""
SEED = 5
FAST_S = 0.5
_redis_db = itertools.count(12)


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@dataclass
class Fleet:
    service: Service
    runner: web.AppRunner
    """The API over the service's view, started by the test to read its counters."""
    api: str
    http: aiohttp.ClientSession
    kinds: dict[str, list[str]]
    """Cloud ids by what they were registered to be: ok, auth_failed, failing,
    disabled, unpolled, bulk."""

    @property
    def pool(self) -> DevicePool:
        assert self.service.engine is not None
        return self.service.engine.pool

    @property
    def cost(self) -> ListingCost:
        app = self.runner.app
        assert app is not None
        return app[LISTING_COST]

    async def get(self, path: str) -> tuple[dict[str, Any], int, int]:
        """The JSON answer, the registry rows and the index ids it read."""
        rows, visited = self.cost.rows_read, self.pool.index.visited
        async with self.http.get(self.api + path) as resp:
            assert resp.status == 200, await resp.text()
            doc: dict[str, Any] = await resp.json()
        return doc, self.cost.rows_read - rows, self.pool.index.visited - visited

    async def pages(self, query: str, limit: int, max_rows: int,
                    max_visited: int) -> list[dict[str, Any]]:
        """Every page of ``query``, each held to ``max_rows`` / ``max_visited``."""
        found: list[dict[str, Any]] = []
        after = 0
        for _ in range(BULK):
            doc, rows, visited = await self.get(
                f"/api/devices?{query}&limit={limit}&after={after}")
            assert len(doc["devices"]) <= limit
            assert rows <= max_rows, (query, after, rows)
            assert visited <= max_visited, (query, after, visited)
            found += doc["devices"]
            if doc["next_after"] is None:
                return found
            assert doc["next_after"] > after
            after = doc["next_after"]
        raise AssertionError("the cursor never ended")


def _settings(stack: RunningStack, tmp_path: Path, db_url: str, **extra: str) -> config.Settings:
    return config.load(config_path=None, env={
        "POLLER_STATE_DIR": str(tmp_path / "state"),
        "POLLER_INSTANCE_ID": "scale",
        "POLLER_DATABASE_URL": db_url,
        "POLLER_REDIS_URL": f"{stack.info.redis_url.rstrip('/')}/{next(_redis_db) % 16}",
        "POLLER_S3_ENDPOINT_URL": stack.info.s3_endpoint_url,
        "POLLER_S3_BUCKET": stack.info.bucket,
        "POLLER_S3_PREFIX": f"t{uuid.uuid4().hex[:10]}",
        "POLLER_API_PORT": "0",
        "POLLER_INGEST_FLUSH_INTERVAL_S": "0.2",
        "POLLER_POLLING_RESYNC_INTERVAL_S": "3600",
        "POLLER_POLLING_ALLOWED_NETWORKS": "127.0.0.0/8",  # the simulator's
        **extra,
    })


async def _register(settings: config.Settings, sim_url: str) -> dict[str, list[str]]:
    """The fleet, its kinds interleaved in id order."""
    box = sealing.SecretBox(sealing.load_key(settings.state_dir))
    stranger = sealing.SecretBox(sealing.generate_key())  # secrets serve cannot open
    dead = _dead_url()
    kinds: dict[str, list[str]] = collections.defaultdict(list)
    index = itertools.count()
    conn = await db.connect(settings.database.url)
    try:
        await migrate.migrate(conn)
        policy = NetPolicy.from_settings(settings.polling)
        registry = Registry(conn, box, policy)
        slice_size = BULK // SPECIAL
        for _ in range(SPECIAL):
            entries = []
            for kind, url, interval, good in (
                    ("bulk", sim_url, 86400.0, True), ("ok", sim_url, FAST_S, True),
                    ("auth_failed", sim_url, FAST_S, False), ("failing", dead, FAST_S, True),
                    ("disabled", sim_url, FAST_S, True)):
                for _ in range(slice_size if kind == "bulk" else 1):
                    cid = f"{0xF00000 + next(index):06x}"
                    email, password = credentials_for(cid, SEED)
                    entries.append((cid, email, "eagle-cloud", url, interval,
                                    password if good else "wrong-password"))
                    kinds[kind].append(cid)
            await registry.upsert_many(entries)
            cid = f"{0xF00000 + next(index):06x}"
            email, password = credentials_for(cid, SEED)
            await Registry(conn, stranger, policy).upsert_many(
                [(cid, email, "eagle-cloud", sim_url, FAST_S, password)])
            kinds["unpolled"].append(cid)
        for cid in kinds["disabled"]:
            await registry.update(cid, enabled=False)
    finally:
        await conn.close()
    return dict(kinds)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(stack: RunningStack, tmp_path_factory: pytest.TempPathFactory,
                ) -> AsyncIterator[Fleet]:
    tmp_path = tmp_path_factory.mktemp("scale")
    settings = _settings(stack, tmp_path, fresh_database_url(stack.info))
    sim = Simulator(SimulatorConfig(devices=BULK + 10 * SPECIAL, seed=SEED))
    sim_url = f"http://127.0.0.1:{await sim.start()}"
    kinds = await _register(settings, sim_url)
    service = Service(settings)
    await service.start()
    try:
        assert service.engine is not None and service.view is not None
        counts = service.engine.pool.state_counts
        deadline = time.monotonic() + 20.0
        while not (counts[DeviceState.AUTH_FAILED] == SPECIAL
                   and counts[DeviceState.FAILING] == SPECIAL
                   and counts[DeviceState.OK] >= SPECIAL):
            assert time.monotonic() < deadline, dict(counts)
            await asyncio.sleep(0.1)  # real polls of the simulator and a closed port
        runner, port = await start_api(service.view, "127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as http:
                yield Fleet(service, runner, f"http://127.0.0.1:{port}", http, kinds)
        finally:
            await stop_api(runner)
    finally:
        await service.stop()
        await sim.stop()
        client = aioredis.from_url(settings.redis.url)
        await client.flushdb()
        await client.aclose()


on_fleet_loop = pytest.mark.asyncio(loop_scope="module")
"""Tests on the fleet fixture share its event loop."""


def _cloud_ids(devices: list[dict[str, Any]]) -> list[str]:
    return [d["cloud_id"] for d in devices]


@on_fleet_loop
async def test_a_filter_matching_few_reads_only_what_it_returns(fleet: Fleet) -> None:
    doc, rows, visited = await fleet.get("/api/devices?state=auth_failed&limit=100")
    assert _cloud_ids(doc["devices"]) == fleet.kinds["auth_failed"]
    assert all(d["status"]["last_outcome"] == "auth_rejected" for d in doc["devices"])
    assert doc["next_after"] is None
    assert rows == SPECIAL and visited == SPECIAL  # not 20,000


@on_fleet_loop
async def test_state_filters_page_by_cursor(fleet: Fleet) -> None:
    failing = await fleet.pages("state=failing", 2, max_rows=2, max_visited=3)
    assert _cloud_ids(failing) == fleet.kinds["failing"]
    assert {d["state"] for d in failing} == {"failing"}
    ok = await fleet.pages("state=ok", 3, max_rows=3, max_visited=4)
    assert set(fleet.kinds["ok"]) <= set(_cloud_ids(ok))


@on_fleet_loop
async def test_a_dense_state_pages_through_the_fleet_in_id_order(fleet: Fleet) -> None:
    before = {t.record.id for t in fleet.pool.targets() if t.state is DeviceState.PENDING}
    pending = await fleet.pages("state=pending", 1000, max_rows=1000, max_visited=1001)
    after = {t.record.id for t in fleet.pool.targets() if t.state is DeviceState.PENDING}
    ids = [d["id"] for d in pending]
    assert ids == sorted(set(ids))
    assert {d["state"] for d in pending} == {"pending"}
    # A bulk device may be polled (once a day) while the pages are read.
    assert before & after <= set(ids) <= before | after
    assert len(ids) > BULK * 0.99


@on_fleet_loop
async def test_states_only_postgres_knows_read_a_bounded_scan(fleet: Fleet) -> None:
    per_page = SCAN_ROWS + 3
    disabled = await fleet.pages("state=disabled", 3, max_rows=per_page, max_visited=0)
    assert _cloud_ids(disabled) == fleet.kinds["disabled"]
    assert {d["state"] for d in disabled} == {"disabled"}
    unpolled = await fleet.pages("state=unpolled", 100, max_rows=SCAN_ROWS + 100,
                                 max_visited=0)
    assert _cloud_ids(unpolled) == fleet.kinds["unpolled"]
    assert all(d["status"] is None and d["enabled"] for d in unpolled)


@on_fleet_loop
async def test_unfiltered_pages_and_one_device_cost_their_size(fleet: Fleet) -> None:
    doc, rows, visited = await fleet.get("/api/devices?limit=1000")
    assert len(doc["devices"]) == 1000 and rows == 1001 and visited == 0
    assert doc["next_after"] == doc["devices"][-1]["id"]
    every = await fleet.pages("", 1000, max_rows=1001, max_visited=0)
    assert len(every) == BULK + 5 * SPECIAL
    by_kind = {cid: kind for kind, cids in fleet.kinds.items() for cid in cids}
    states = collections.Counter((by_kind[d["cloud_id"]], d["state"]) for d in every)
    for kind in ("ok", "auth_failed", "failing", "disabled", "unpolled"):
        assert states[(kind, kind)] == SPECIAL, states
    cid = fleet.kinds["auth_failed"][2]
    async with fleet.http.get(f"{fleet.api}/api/devices/{cid}") as resp:
        one = await resp.json()
    assert one["state"] == "auth_failed" and one["status"]["cloud_id"] == cid


@on_fleet_loop
async def test_the_state_index_matches_the_targets(fleet: Fleet) -> None:
    pool = fleet.pool
    for state in DeviceState:
        truth = sorted(t.record.id for t in pool.targets() if t.state is state)
        assert pool.index.count(state) == len(truth) == pool.state_counts[state]
        assert pool.index.page(state, 0, BULK * 2) == truth
        if len(truth) > 2:
            assert pool.index.page(state, truth[1], 1) == [truth[2]]
    for target in pool.targets()[:100]:
        assert pool.target_by_cloud_id(target.cloud_id) is target
    assert pool.target_by_cloud_id(fleet.kinds["unpolled"][0]) is None


@on_fleet_loop
async def test_the_api_pool_has_a_statement_timeout_the_loader_has_not(
        stack: RunningStack, tmp_path: Path) -> None:
    settings = _settings(stack, tmp_path, fresh_database_url(stack.info),
                         POLLER_API_STATEMENT_TIMEOUT_S="0.3", POLLER_API_POOL_MAX="2")
    sim = Simulator(SimulatorConfig(devices=20, seed=SEED))
    sim_url = f"http://127.0.0.1:{await sim.start()}"
    box = sealing.SecretBox(sealing.load_key(settings.state_dir))
    conn = await db.connect(settings.database.url)
    try:
        await migrate.migrate(conn)
        entries = []
        for cid in sim.cloud_ids():
            email, password = credentials_for(cid, SEED)
            entries.append((cid, email, "eagle-cloud", sim_url, 0.2, password))
        await Registry(conn, box, NetPolicy.from_settings(settings.polling)).upsert_many(entries)
    finally:
        await conn.close()
    service = Service(settings)
    await service.start()
    try:
        assert service.ingest is not None and service.view is not None
        api_db = service.view.db
        async with api_db.acquire() as api_conn:
            assert await api_conn.fetchval("SHOW statement_timeout") == "300ms"
            with pytest.raises(asyncpg.QueryCanceledError, match="statement timeout"):
                await api_conn.execute("SELECT pg_sleep(30)")

        async def hog() -> int:
            cancelled = 0
            async with api_db.acquire() as hogged:
                while time.monotonic() < until:
                    try:
                        await hogged.execute("SELECT pg_sleep(30)")
                    except asyncpg.QueryCanceledError:
                        cancelled += 1
            return cancelled

        # Every API connection busy in slow queries: the loader goes on.
        committed = service.ingest.rows_committed
        until = time.monotonic() + 2.0
        cancelled = await asyncio.gather(hog(), hog())
        assert min(cancelled) >= 2
        assert service.ingest.rows_committed - committed >= 20 * 5
        assert service.view.fleet().postgres_up
        assert service.ingest.loader_failures == 0
        assert service.database is not None
        async with service.database.waiting.acquire(timeout=5.0) as loader_conn:
            assert await loader_conn.fetchval("SHOW statement_timeout") == "0"
    finally:
        await service.stop()
        await sim.stop()


def test_sorted_ids_match_a_set_under_any_changes() -> None:
    assert doctest.testmod(index).failed == 0

    @hypothesis.given(st.lists(st.tuples(st.booleans(), st.integers(0, 3000)), max_size=3000),
           st.integers(0, 3000), st.integers(1, 700))
    @hypothesis.settings(max_examples=60, deadline=None)
    def check(changes: list[tuple[bool, int]], after: int, limit: int) -> None:
        ids, truth = index.SortedIds(), set[int]()
        for add, value in changes:
            if add:
                ids.add(value)
                truth.add(value)
            else:
                ids.remove(value)
                truth.discard(value)
        assert len(ids) == len(truth)
        assert ids.page(-1, len(truth) + 1) == sorted(truth)
        assert ids.page(after, limit) == sorted(v for v in truth if v > after)[:limit]

    check()
