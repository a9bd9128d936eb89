"""``serve`` starts, polls and spools while Postgres is down, and loads every
reading once when it returns; the registry snapshot it starts from keeps
secrets sealed.

The outage is real: a Postgres of this module's own is stopped and started
(never the session stack's, which other tests share).
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from poller import db, sealing, snapshot
from poller.config import Shard
from poller.db import instance_lock_key
from poller.migrate import migrate
from poller.netpolicy import NetPolicy
from poller.registry import Registry
from poller.service import Service
from poller.simulator.main import Simulator, SimulatorConfig
from poller.stack import EmbeddedStack, StackInfo, create_database
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

SEED = 11
DEVICES = 10
INTERVAL_S = 0.25
_HOLDER_SQL = """
SELECT a.pid, a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.classid = $1 AND l.objid = $2"""


@dataclass(frozen=True)
class OwnPostgres:
    stack: EmbeddedStack
    info: StackInfo

    def stop(self) -> None:
        self.stack.stop_component("postgres")

    def start(self) -> None:
        self.stack.start_component("postgres")


@pytest.fixture(scope="module")
def own_pg(stack: RunningStack, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[OwnPostgres]:
    """A PostgreSQL for this module alone (Valkey and S3 are the session's)."""
    own = EmbeddedStack(tmp_path_factory.mktemp("own-pg"), redis_url=stack.info.redis_url,
                        s3_endpoint_url=stack.info.s3_endpoint_url, progress=print)
    try:
        yield OwnPostgres(own, own.up())
    finally:
        own.down()


async def _lock_holder(database_url: str, instance_id: str) -> tuple[int, str] | None:
    unsigned = instance_lock_key(instance_id) & 0xFFFF_FFFF_FFFF_FFFF
    try:
        conn = await asyncpg.connect(database_url)
    except (OSError, asyncpg.PostgresError):
        return None  # still starting
    try:
        row = await conn.fetchrow(_HOLDER_SQL, unsigned >> 32, unsigned & 0xFFFF_FFFF)
    finally:
        await conn.close()
    return None if row is None else (row["pid"], row["application_name"])


async def _wait_holder(database_url: str, instance_id: str, within_s: float,
                       not_pid: int | None = None) -> tuple[int, str]:
    for _ in range(int(within_s / 0.2)):
        holder = await _lock_holder(database_url, instance_id)
        if holder is not None and holder[0] != not_pid:
            return holder
        await asyncio.sleep(0.2)
    raise AssertionError(f"no process took the lock of {instance_id!r} in {within_s:g} s")


async def test_serve_starts_and_keeps_polling_through_a_postgres_outage(
        own_pg: OwnPostgres, stack: RunningStack, tmp_path: Path) -> None:
    db_url = create_database(own_pg.info.database_url, f"t_{uuid.uuid4().hex[:16]}")
    sim = Simulator(SimulatorConfig(devices=DEVICES, seed=SEED, record_served=True))
    await sim.start()
    env = service_env(stack.info, db_url, tmp_path / "state", "outage",
                      POLLER_POLLING_RESYNC_INTERVAL_S="2")
    settings = settings_of(env)
    await register(settings, sim, SEED, INTERVAL_S)
    snapshot_path = snapshot.path_for(settings.state_dir, "outage")

    # A first run with Postgres up leaves the registry snapshot behind.
    first = Service(settings)
    await first.start()
    try:
        await wait_for(snapshot_path.exists, 10, "the registry snapshot")
    finally:
        await first.stop()

    await asyncio.to_thread(own_pg.stop)
    pg_down = True
    service = Service(settings)
    try:
        await service.start()  # does not need Postgres
        assert service.view is not None and service.database is not None
        assert service.ingest is not None
        fleet = service.view.fleet()
        assert fleet.devices == DEVICES and not fleet.postgres_up
        polled = len(sim.served())
        await wait_for(lambda: len(sim.served()) > polled + DEVICES * 4, 30,
                       "polls while Postgres is down")
        await wait_for(lambda: service.ingest is not None
                       and service.ingest.spool.pending_bytes > 0, 10, "readings spooled")
        assert not service.database.ready and service.ingest.rows_committed == 0

        await asyncio.to_thread(own_pg.start)
        pg_down = False
        holder, name = await _wait_holder(db_url, "outage", 60)
        assert name == f"poller outage {socket.gethostname()}:{os.getpid()}"
        await wait_for(lambda: service.ingest is not None
                       and service.ingest.rows_committed > 0, 60, "the spool loads")

        # Postgres restarts under the running serve: the lock is taken again.
        await asyncio.to_thread(own_pg.stop)
        pg_down = True
        await asyncio.to_thread(own_pg.start)
        pg_down = False
        _, name = await _wait_holder(db_url, "outage", 60, not_pid=holder)
        assert name.startswith("poller outage ")
        await wait_for(lambda: service.database is not None and service.database.ready, 30,
                       "the gate opens again")
        committed = service.ingest.rows_committed
        await wait_for(lambda: service.ingest is not None
                       and service.ingest.rows_committed > committed, 30, "loading goes on")
    finally:
        if pg_down:
            await asyncio.to_thread(own_pg.start)
        await service.stop()
        await sim.stop()
    want = served(sim)
    got = await loaded(db_url)
    assert got == want, diff(want, got)  # every reading once, none lost
    archive = await archived(settings, stack.info)
    assert archive == want, diff(want, archive)


async def test_without_a_snapshot_an_unreachable_postgres_fails_the_start_clearly(
        stack: RunningStack, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = service_env(stack.info, f"postgresql://poller@127.0.0.1:{port}/nowhere",
                      tmp_path / "state", "no-snapshot")
    before = asyncio.all_tasks()
    service = Service(settings_of(env))
    with pytest.raises(db.DatabaseUnavailable) as caught:
        await service.start()
    message = str(caught.value)
    assert f"cannot reach PostgreSQL at postgresql://poller@127.0.0.1:{port}/nowhere" in message
    assert "no registry snapshot at" in message and "registry-no-snapshot.json" in message
    assert {t.get_name() for t in asyncio.all_tasks() - before if not t.done()} == set()


async def test_the_snapshot_holds_what_specs_reads_with_secrets_sealed(
        fresh_db: str, tmp_path: Path) -> None:
    settings = settings_of({"POLLER_STATE_DIR": str(tmp_path),
                            "POLLER_POLLING_ALLOWED_NETWORKS": "127.0.0.0/8"})
    box = sealing.SecretBox(sealing.generate_key())
    passwords = {f"{i:06x}": f"secret-password-{i}" for i in range(1, 7)}
    conn = await asyncpg.connect(fresh_db)
    try:
        await migrate(conn)
        reg = Registry(conn, box, NetPolicy.from_settings(settings.polling))
        for cid, password in passwords.items():
            await reg.add(cid, email=f"{cid}@example.com", driver="eagle-cloud",
                          url="http://127.0.0.1:9", interval_s=6.0, options={},
                          secret=password)
        await reg.update("000002", interval_s=30.0)
        await reg.update("000003", enabled=False)
        await reg.remove("000004")
        path = tmp_path / "registry.json"
        for shard in (Shard(0, 1), Shard(1, 2)):
            written = await snapshot.save(conn, box, path, shard)
            specs, _ = snapshot.load(path, box, shard)
            wanted = {i: v for i, v in (await reg.specs()).items() if i % shard.n == shard.k}
            assert written == len(wanted) and specs == wanted
    finally:
        await conn.close()
    data = path.read_bytes()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not any(p.encode() in data for p in passwords.values())
    assert not (tmp_path / "registry.json.tmp").exists()
    with pytest.raises(snapshot.SnapshotError, match="shard 1/2, this instance polls 0/1"):
        snapshot.load(path, box, Shard(0, 1))
    # Another key opens nothing: every device is skipped (and logged), as
    # Registry.specs does.
    assert snapshot.load(path, sealing.SecretBox(sealing.generate_key()), Shard(1, 2))[0] == {}
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(snapshot.SnapshotError, match="malformed registry snapshot"):
        snapshot.load(path, box, Shard(1, 2))
