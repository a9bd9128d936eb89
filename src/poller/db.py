"""PostgreSQL connections with errors a person can act on, and the service's
database: a pool that answers only while this process holds its instance lock.

One instance id is one process, across hosts: ``serve`` holds a session
advisory lock keyed on its instance id (:func:`instance_lock_key`) on a
connection of its own for as long as it runs, and records who holds it in
``poller_instances`` (host, pid, start time; the connection's
``application_name`` says the same in ``pg_stat_activity``). A second
``serve`` with the same id is refused with the holder's name. When the lock's
connection drops (a Postgres restart), the lock is taken again once Postgres
answers; until then nothing is loaded, so two processes never write one
instance's checkpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import socket
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Protocol, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from poller import migrate
from poller.clock import Clock, LoopClock
from poller.endpoints import redact_url
from poller.errors import PollerError
from poller.tasks import FatalTaskError

log = logging.getLogger("poller.db")
_RETRY_BASE_S = 0.5
_RETRY_MAX_S = 30.0
_LOCK_CHECK_S = 5.0
"""How often the lock's connection is asked whether it is still alive: a
dropped socket is noticed at once, a silent one within this."""

# Errors that mean "the server is not there (now)", not "it refused this".
_GONE: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError)  # the server shutting down or starting
# Named, not `except (*_GONE, ...)` in place: mypy cannot type a starred except tuple.
_GONE_OR_REFUSED: tuple[type[BaseException], ...] = (*_GONE, asyncpg.PostgresError)

Conn: TypeAlias = asyncpg.Connection | PoolConnectionProxy
"""A connection as the code receives it: its own (:func:`connect`) or lent by
a pool, a proxy that forwards every Connection method (the stubs do not make
it a Connection)."""


class ConnectionSource(Protocol):
    """What lends Postgres connections: an asyncpg pool, or the service's gate
    in front of one (:meth:`Database.acquire`), which raises
    :class:`DatabaseNotReady` (a ``ConnectionError``) while Postgres is not ready."""

    def acquire(self, *, timeout: float | None = None) -> AbstractAsyncContextManager[Conn]: ...


class DatabaseUnavailable(PollerError):
    pass


class DatabaseNotReady(ConnectionError):
    """Postgres is unreachable, or this process does not hold its instance
    lock (yet): nothing may be read or written through the service's pool."""


class InstanceLocked(FatalTaskError):
    """Another process holds this instance id's lock."""


def instance_lock_key(instance_id: str) -> int:
    """The advisory lock key of an instance id: a stable signed 64-bit hash.

    >>> instance_lock_key("poller-1") == instance_lock_key("poller-1")
    True
    >>> -2**63 <= instance_lock_key("poller-1") < 2**63
    True
    """
    digest = hashlib.blake2b(f"poller-instance:{instance_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def connect(url: str, *, timeout_s: float = 10.0,
                  application_name: str | None = None) -> asyncpg.Connection:
    settings = {"application_name": application_name[:63]} if application_name else None
    try:
        conn: asyncpg.Connection = await asyncpg.connect(url, timeout=timeout_s,
                                                         server_settings=settings)
    except (OSError, TimeoutError, asyncpg.PostgresError,
            asyncpg.InterfaceError) as exc:
        raise DatabaseUnavailable(f"cannot reach PostgreSQL at {redact_url(url)}: "
                                  f"{type(exc).__name__}: {exc}") from None
    return conn


async def create_pool(url: str, *, max_size: int, timeout_s: float = 10.0,
                      statement_timeout_s: float | None = None) -> asyncpg.Pool:
    """A pool; with ``statement_timeout_s`` the server cancels any query of
    its connections that runs longer."""
    settings = None if statement_timeout_s is None else \
        {"statement_timeout": str(max(1, round(statement_timeout_s * 1000)))}
    try:
        pool: asyncpg.Pool = await asyncpg.create_pool(
            url, min_size=1, max_size=max_size, timeout=timeout_s, server_settings=settings)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DatabaseUnavailable(f"cannot reach PostgreSQL at {redact_url(url)}: "
                                  f"{type(exc).__name__}: {exc}") from None
    return pool


_HOLDER_SQL = """
SELECT a.pid, a.application_name, host(a.client_addr) AS client_addr
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid = $1 AND l.objid = $2"""
_RECORD_SQL = """
INSERT INTO poller_instances (instance_id, host, pid, started_at, backend_pid, locked_at)
VALUES ($1, $2, $3, $4, pg_backend_pid(), now())
ON CONFLICT (instance_id) DO UPDATE SET host = EXCLUDED.host, pid = EXCLUDED.pid,
    started_at = EXCLUDED.started_at, backend_pid = EXCLUDED.backend_pid,
    locked_at = EXCLUDED.locked_at"""


class InstanceLock:
    """The session advisory lock of one instance id, on a connection of its own."""

    def __init__(self, url: str, instance_id: str, *, timeout_s: float = 10.0,
                 host: str | None = None, pid: int | None = None,
                 started_at: float | None = None) -> None:
        self._url = url
        self.instance_id = instance_id
        self.key = instance_lock_key(instance_id)
        self._timeout_s = timeout_s
        self.host = host or socket.gethostname()
        self.pid = os.getpid() if pid is None else pid
        self.started_at = time.time() if started_at is None else started_at
        self._conn: asyncpg.Connection | None = None
        self._lost = asyncio.Event()

    @property
    def application_name(self) -> str:
        return f"poller {self.instance_id} {self.host}:{self.pid}"

    @property
    def held(self) -> bool:
        return self._conn is not None and not self._lost.is_set()

    async def take(self) -> None:
        """Take the lock or raise: :class:`InstanceLocked` naming the holder,
        :class:`DatabaseUnavailable` when Postgres does not answer."""
        if self.held:
            return
        await self.release()
        conn = await connect(self._url, timeout_s=self._timeout_s,
                             application_name=self.application_name)
        try:
            got = await conn.fetchval("SELECT pg_try_advisory_lock($1)", self.key,
                                      timeout=self._timeout_s)
            if not got:
                raise InstanceLocked(await self._refusal(conn))
            await conn.execute(_RECORD_SQL, self.instance_id, self.host, self.pid,
                               datetime.fromtimestamp(self.started_at, UTC),
                               timeout=self._timeout_s)
        except BaseException as exc:
            conn.terminate()
            if isinstance(exc, _GONE):
                raise DatabaseUnavailable(f"PostgreSQL went away while taking the instance "
                                          f"lock: {type(exc).__name__}: {exc}") from None
            raise
        self._lost.clear()
        conn.add_termination_listener(self._on_lost)
        self._conn = conn

    def _on_lost(self, conn: object) -> None:
        self._lost.set()

    async def wait_lost(self, check_every_s: float = _LOCK_CHECK_S) -> None:
        """Return once the lock's connection is gone (the lock with it)."""
        while self.held:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), check_every_s)
            conn = self._conn
            if self._lost.is_set() or conn is None:
                break
            try:
                await conn.fetchval("SELECT 1", timeout=check_every_s)
            except _GONE_OR_REFUSED:
                self._lost.set()
        await self.release()

    async def release(self) -> None:
        """Close the lock's connection, which releases the lock. Idempotent."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.is_closed():
            return
        try:
            await asyncio.wait_for(conn.close(), 2.0)
        except _GONE_OR_REFUSED:
            conn.terminate()

    async def _refusal(self, conn: asyncpg.Connection) -> str:
        """Who holds the lock, in words, read from Postgres itself."""
        unsigned = self.key & 0xFFFF_FFFF_FFFF_FFFF
        who = "another process"
        try:
            holder = await conn.fetchrow(_HOLDER_SQL, unsigned >> 32, unsigned & 0xFFFF_FFFF,
                                         timeout=self._timeout_s)
            row = await conn.fetchrow(
                "SELECT host, pid, started_at, backend_pid FROM poller_instances "
                "WHERE instance_id = $1", self.instance_id, timeout=self._timeout_s)
        except asyncpg.UndefinedTableError:
            holder = row = None
        if holder is not None and row is not None and row["backend_pid"] == holder["pid"]:
            who = (f"host {row['host']} pid {row['pid']} (running since "
                   f"{row['started_at'].isoformat(timespec='seconds')})")
        elif holder is not None:
            name = holder["application_name"] or "no application_name"
            where = holder["client_addr"] or "a local socket"
            who = f"{name!r} from {where} (Postgres backend pid {holder['pid']})"
        return (f"instance id {self.instance_id!r} is in use by {who}: one process per "
                "instance id (give this one its own instance_id)")


class Database:
    """The service's Postgres: pools behind a gate.

    :meth:`acquire` hands out connections only while the pool is open, the
    schema migrated and the instance lock held (:attr:`ready`); otherwise it
    raises :class:`DatabaseNotReady` (a ``ConnectionError``) at once, which
    callers already treat as "Postgres is down". :attr:`waiting` is the same
    pool for the loader: its ``acquire(timeout=...)`` waits up to ``timeout``
    for the gate to open, so loading resumes the moment it does. With
    ``api_max_size``, :attr:`api` is a second, small pool behind the same
    gate whose statements time out after ``api_statement_timeout_s``, so the
    loader never waits behind an API request.

    :meth:`open` makes one attempt; :meth:`keep` (a background task) makes
    them until one succeeds, then watches the lock and takes it again after
    a Postgres restart.
    """

    def __init__(self, url: str, instance_id: str, *, max_size: int,
                 api_max_size: int = 0, api_statement_timeout_s: float | None = None,
                 timeout_s: float = 10.0, started_at: float | None = None,
                 clock: Clock | None = None) -> None:
        self.url = url
        self._max_size = max_size
        self._api_max_size = api_max_size
        self._api_statement_timeout_s = api_statement_timeout_s
        self._timeout_s = timeout_s
        self._clock = clock if clock is not None else LoopClock()
        self.lock = InstanceLock(url, instance_id, timeout_s=timeout_s, started_at=started_at)
        self._pool: asyncpg.Pool | None = None
        self._api_pool: asyncpg.Pool | None = None
        self.ready = False
        self._closing = False
        self._wake = asyncio.Event()
        """Set while ready or closing: what a waiting acquire waits for."""
        self.waiting = _WaitingPool(self)
        self.api = _ApiPool(self)

    async def open(self) -> list[str]:
        """Connect, migrate and take the instance lock; return the migrations
        applied. Raises :class:`DatabaseUnavailable` (try again later),
        :class:`InstanceLocked`, or a migration error."""
        applied: list[str] = []
        if self._pool is None:
            pool = await create_pool(self.url, max_size=self._max_size,
                                     timeout_s=self._timeout_s)
            try:
                async with pool.acquire(timeout=self._timeout_s) as conn:
                    applied = await migrate.migrate(conn)
                    await migrate.ensure_partitions(conn)
            except BaseException as exc:
                pool.terminate()
                if isinstance(exc, _GONE):
                    raise DatabaseUnavailable(f"PostgreSQL went away while migrating: "
                                              f"{type(exc).__name__}: {exc}") from None
                raise
            self._pool = pool
        if self._api_max_size and self._api_pool is None:
            self._api_pool = await create_pool(
                self.url, max_size=self._api_max_size, timeout_s=self._timeout_s,
                statement_timeout_s=self._api_statement_timeout_s)
        await self.lock.take()
        self._set_ready(True)
        return applied

    async def keep(self) -> None:
        """Open when possible, and again whenever the instance lock is lost.

        Runs until cancelled; raises :class:`InstanceLocked` (fatal) when
        another process took the instance id meanwhile."""
        failures = 0
        waited = False
        while not self._closing:
            if not self.ready:
                try:
                    applied = await self.open()
                except DatabaseUnavailable as exc:
                    failures += 1
                    delay = min(_RETRY_MAX_S, _RETRY_BASE_S * 2 ** min(failures - 1, 16))
                    (log.warning if failures == 1 else log.debug)(
                        "%s; trying again (next in %.1f s)", exc, delay)
                    await self._clock.sleep(delay * (0.5 + random.random() / 2))
                    waited = True
                    continue
                except migrate.MigrationError as exc:
                    raise FatalTaskError(str(exc)) from exc
                if waited:
                    log.info("PostgreSQL answers: %sinstance lock held, loading goes on",
                             f"applied {', '.join(applied)}; " if applied else "")
                failures = 0
                waited = False
            await self.lock.wait_lost()
            if self._closing:
                return
            self._set_ready(False)
            waited = True
            log.warning("lost the instance lock's connection to PostgreSQL; loading waits "
                        "until the lock is held again")

    def _set_ready(self, ready: bool) -> None:
        self.ready = ready
        if ready or self._closing:
            self._wake.set()
        else:
            self._wake.clear()

    def _ready_pool(self, pool: asyncpg.Pool | None) -> asyncpg.Pool:
        if not self.ready or pool is None:
            raise DatabaseNotReady(f"PostgreSQL at {redact_url(self.url)} is not ready "
                                   "(unreachable, or the instance lock is not held)")
        return pool

    @contextlib.asynccontextmanager
    async def acquire(self, *, timeout: float | None = None) -> AsyncIterator[Conn]:
        """A connection from the pool; :class:`DatabaseNotReady` at once if the
        gate is closed."""
        async with self._ready_pool(self._pool).acquire(timeout=timeout) as conn:
            yield conn

    async def wait_ready(self, timeout_s: float | None) -> None:
        """Wait until the gate opens (or the database closes); TimeoutError after
        ``timeout_s``."""
        async with asyncio.timeout(timeout_s):
            while not self.ready and not self._closing:
                await self._wake.wait()

    def begin_close(self) -> None:
        """From now on a waiting acquire does not wait (a shutdown must not
        sit out the loader's timeout while Postgres is down); the pools still
        serve while ready, for the last COPY."""
        self._closing = True
        self._wake.set()

    async def close(self) -> None:
        """Release the lock and close the pools. Idempotent."""
        self.begin_close()
        self._set_ready(False)
        await self.lock.release()
        for pool in (self._api_pool, self._pool):
            if pool is not None:
                await pool.close()
        self._pool = self._api_pool = None


class _WaitingPool:
    """The database as the loader's pool: an acquire waits for the gate."""

    def __init__(self, database: Database) -> None:
        self._db = database

    @contextlib.asynccontextmanager
    async def acquire(self, *, timeout: float | None = None) -> AsyncIterator[Conn]:
        started = time.monotonic()
        await self._db.wait_ready(timeout)
        left = None if timeout is None else max(0.1, timeout - (time.monotonic() - started))
        async with self._db.acquire(timeout=left) as conn:
            yield conn

    async def close(self) -> None:
        """The database closes itself; the loader must not."""


class _ApiPool:
    """The API's pool behind the gate (the main pool when none is configured)."""

    def __init__(self, database: Database) -> None:
        self._db = database

    @contextlib.asynccontextmanager
    async def acquire(self, *, timeout: float | None = None) -> AsyncIterator[Conn]:
        db = self._db
        pool = db._ready_pool(db._api_pool if db._api_max_size else db._pool)
        async with pool.acquire(timeout=timeout) as conn:
            yield conn
