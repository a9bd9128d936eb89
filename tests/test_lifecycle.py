"""A start that fails half-way undoes exactly what it started.

The faults are real: the registry's Postgres refuses a query part-way through
the first resync (a view over the devices table whose secret column raises
after a number of reads), and the API's port is taken by another socket.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import asyncpg
import pytest

from poller import sealing
from poller.migrate import migrate
from poller.netpolicy import NetPolicy
from poller.polling.engine import PollingEngine
from poller.reading import PlainReading
from poller.registry import Registry
from poller.service import Service
from poller.simulator.main import Simulator, SimulatorConfig
from tests.servicefix import (
    diff,
    loaded,
    register,
    served,
    service_env,
    settings_of,
    wait_for,
)
from tests.stackfix import RunningStack, fresh_database_url

DEVICES = 2001
"""More than one slice of a resync (2000 devices a slice): the first slice
starts its loops before the next one fails."""

_FAIL_AFTER_READS = """
CREATE FUNCTION read_secret(s bytea) RETURNS bytea LANGUAGE plpgsql STABLE AS $$
DECLARE n int := coalesce(nullif(current_setting('test.secret_reads', true), ''), '0')::int + 1;
BEGIN
    PERFORM set_config('test.secret_reads', n::text, false);
    IF n > $1 THEN
        RAISE EXCEPTION 'injected: the registry broke after % secrets', n - 1;
    END IF;
    RETURN s;
END $$"""


class _Sink:
    accepting = True

    def __init__(self) -> None:
        self.readings: list[PlainReading] = []

    def accept(self, reading: PlainReading) -> None:
        self.readings.append(reading)


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _other_backends(conn: asyncpg.Connection) -> int:
    n: int = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid()")
    return n


async def test_a_first_resync_that_fails_half_way_leaves_nothing_armed(
        fresh_db: str, tmp_path: Path) -> None:
    settings = settings_of({"POLLER_STATE_DIR": str(tmp_path),
                            "POLLER_POLLING_ALLOWED_NETWORKS": "127.0.0.0/8"})
    box = sealing.SecretBox(sealing.generate_key())
    conn = await asyncpg.connect(fresh_db)
    try:
        await migrate(conn)
        url = f"http://127.0.0.1:{_dead_port()}"
        entries = [(f"{i:06x}", f"owner{i}@example.com", "eagle-cloud", url, 3600.0, "pw")
                   for i in range(DEVICES)]
        await Registry(conn, box, NetPolicy.from_settings(settings.polling)) \
            .upsert_many(entries)
        # The devices table behind a view whose secret column fails from the
        # 2001st row read on: the second slice of the first resync fails.
        columns = [r["column_name"] for r in await conn.fetch(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_name = 'devices' ORDER BY ordinal_position")]
        select = ", ".join("read_secret(sealed_secret) AS sealed_secret"
                           if c == "sealed_secret" else c for c in columns)
        await conn.execute("ALTER TABLE devices RENAME TO devices_stored")
        await conn.execute(_FAIL_AFTER_READS.replace("$1", str(DEVICES - 1)))
        await conn.execute(f"CREATE VIEW devices AS SELECT {select} FROM devices_stored")

        engine = PollingEngine(settings.polling, fresh_db, box, _Sink(), seed="lifecycle")
        with pytest.raises(asyncpg.PostgresError, match="injected: the registry broke"):
            await engine.start()
        pool = engine.pool
        # The first slice's loops were started, then stopped again...
        assert len(pool.dirty) == DEVICES - 1
        assert pool.loops == {} and pool.rejected == {}
        # ...and nothing is armed or open: no timer, no poll, no connection.
        assert len(pool.wheel) == 0 and pool.in_flight == 0
        for _ in range(100):
            if await _other_backends(conn) == 0:
                break
            await asyncio.sleep(0.05)  # the server ends a closed session's backend
        assert await _other_backends(conn) == 0, "the watcher's connection is still open"
        await engine.stop(1.0)  # nothing left to stop: a no-op
    finally:
        await conn.close()


async def test_a_service_start_that_fails_half_way_undoes_what_it_started(
        stack: RunningStack, tmp_path: Path) -> None:
    sim = Simulator(SimulatorConfig(devices=5, seed=3, record_served=True))
    await sim.start()
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = service_env(stack.info, fresh_database_url(stack.info), tmp_path / "state",
                          "lifecycle")
        await register(settings_of(env), sim, seed=3, interval_s=0.2)
        # Everything starts but the API, whose port is in use.
        settings = settings_of({**env, "POLLER_API_PORT": str(taken.getsockname()[1])})
        before = asyncio.all_tasks()
        service = Service(settings)
        with pytest.raises(OSError):
            await service.start()
        left = {t.get_name() for t in asyncio.all_tasks() - before if not t.done()}
        assert left == set(), f"tasks left running: {left}"
        assert service.engine is not None and service.engine.pool.loops == {}
        polls = len(sim.served())
        await asyncio.sleep(0.5)  # the simulator would see polls of a loop left armed
        assert len(sim.served()) == polls
        await service.stop()  # nothing left: a no-op

        # The spool's flock, the instance lock and the pools were released: the
        # same instance starts again on the same state directory.
        again = Service(settings_of(env))
        await again.start()
        try:
            await wait_for(lambda: len(sim.served()) > polls + 10, 20, "polls again")
        finally:
            await again.stop()
        # What either of them polled is in Postgres, once.
        got, want = await loaded(settings.database.url), served(sim)
        assert got == want, diff(want, got)
    finally:
        taken.close()
        await sim.stop()
