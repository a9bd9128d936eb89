"""Shards: n instances on one registry poll every device exactly once, and the
bench reports them as one poller."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
import pytest

from poller import migrate, sealing
from poller.bench.measure import Histogram, Scrape
from poller.bench.serves import merge_fleets, merge_scrapes
from poller.config import EVERY_DEVICE, PollingSettings, Shard, as_dict, load, parse_shard
from poller.errors import ConfigError
from poller.netpolicy import DEFAULT_DENIED_NETWORKS, LOOPBACK_NETWORKS, NetPolicy
from poller.polling.memsink import MemorySink
from poller.polling.pool import DevicePool
from poller.polling.sync import RegistryWatcher
from poller.registry import Registry
from poller.transport import FastHttpClient


@pytest.mark.parametrize("raw", ["2/2", "1/0", "-1/2", "a/b", "1", "1/2/3", " / "])
def test_bad_shards_are_refused_with_the_key(raw: str) -> None:
    with pytest.raises(ConfigError, match=r"polling\.shard"):
        load(env={"POLLER_POLLING_SHARD": raw}, config_path=None)


def test_shard_parses_once_and_shows_as_written() -> None:
    assert parse_shard("polling.shard", " 3/4 ") == Shard(3, 4)
    settings = load(env={"POLLER_POLLING_SHARD": "1/4"}, config_path=None)
    assert settings.polling.shard == Shard(1, 4)
    assert [i for i in range(10) if settings.polling.shard.owns(i)] == [1, 5, 9]
    assert as_dict(settings)["polling"]["shard"] == "1/4"
    unsharded = load(env={}, config_path=None)
    assert unsharded.polling.shard is None
    assert as_dict(unsharded)["polling"]["shard"] == ""
    assert all(EVERY_DEVICE.owns(i) for i in range(10))


async def _until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_two_shards_split_the_registry_and_its_changes(fresh_db: str) -> None:
    key = sealing.generate_key()
    conn = await asyncpg.connect(fresh_db)
    await migrate.migrate(conn)
    # Devices on loopback: allowed explicitly, as the tests' configuration does.
    loopback = NetPolicy.from_lists(allowed=LOOPBACK_NETWORKS, denied=DEFAULT_DENIED_NETWORKS)
    reg = Registry(conn, sealing.SecretBox(key), loopback)
    ids = []
    for i in range(10):
        rec = await reg.add(f"00aa{i:02x}", email="o@example.com", driver="eagle-cloud",
                            url="http://127.0.0.1:9", interval_s=60, options={}, secret="pw")
        ids.append(rec.id)
    clients, pools, watchers = [], [], []
    try:
        for k in range(2):
            client = FastHttpClient()
            pool = DevicePool(PollingSettings(), MemorySink(), {"eagle-cloud": client},
                              seed="s")
            await pool.start()
            watcher = RegistryWatcher(fresh_db, sealing.SecretBox(key), pool, 60.0,
                                      shard=Shard(k, 2))
            await watcher.start()
            clients.append(client)
            pools.append(pool)
            watchers.append(watcher)
        owned = [set(p.loops) for p in pools]
        assert owned[0] | owned[1] == set(ids)
        assert not owned[0] & owned[1]
        for k in range(2):
            assert owned[k] and all(i % 2 == k for i in owned[k])
        # A device registered while serving reaches exactly one shard.
        new = await reg.add("00bb01", email="o@example.com", driver="eagle-cloud",
                            url="http://127.0.0.1:9", interval_s=60, options={}, secret="pw")
        mine = pools[new.id % 2]
        await _until(lambda: new.id in mine.loops)
        assert new.id not in pools[1 - new.id % 2].loops
        await reg.remove("00bb01")
        await _until(lambda: new.id not in mine.loops)
    finally:
        for watcher in watchers:
            await watcher.stop()
        for pool in pools:
            await pool.stop(1.0)
        for client in clients:
            await client.close()
        await conn.close()


def test_shard_scrapes_and_fleets_merge_as_one_poller() -> None:
    ok = ("poller_polls_total", (("outcome", "ok"),))
    bounds = (0.01, 0.1, float("inf"))
    a = Scrape({ok: 10.0}, {"lateness": Histogram(bounds, (1.0, 4.0, 5.0))})
    b = Scrape({ok: 5.0}, {"lateness": Histogram(bounds, (2.0, 2.0, 3.0))})
    merged = merge_scrapes([a, b])
    assert merged.total("poller_polls_total", outcome="ok") == 15.0
    assert merged.histograms["lateness"].cumulative == (3.0, 6.0, 8.0)
    fleet = merge_fleets([
        {"devices": 3, "polls_by_outcome": {"ok": 7}, "lateness_max_s": 0.2},
        {"devices": 4, "polls_by_outcome": {"ok": 1, "timeout": 2}, "lateness_max_s": 0.5}])
    assert fleet == {"devices": 7, "polls_by_outcome": {"ok": 8, "timeout": 2},
                     "lateness_max_s": 0.5}
