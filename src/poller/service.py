"""The composition root of ``poller serve``.

Parts start in dependency order and stop in reverse. Today: resolve the
servers, migrate, keep partitions ahead. Later parts plug in here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg

from poller import db, endpoints, migrate
from poller.config import Settings

log = logging.getLogger("poller.service")
_PARTITION_CHECK_S = 3600.0


class Service:
    def __init__(self, settings: Settings, progress: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self._progress = progress
        self._pool: asyncpg.Pool | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.endpoints: endpoints.Endpoints | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # Starting embedded servers blocks for seconds: keep it off the loop.
        self.endpoints = await loop.run_in_executor(
            None, lambda: endpoints.resolve(self.settings, progress=self._progress))
        self._pool = await db.create_pool(self.endpoints.database_url,
                                          max_size=self.settings.database.pool_max)
        async with self._pool.acquire() as conn:
            applied = await migrate.migrate(conn)
            await migrate.ensure_partitions(conn)
        if applied:
            log.info("applied migrations: %s", ", ".join(applied))
        self._spawn(self._partition_keeper())
        log.info("serving (instance %s)", self.settings.instance_id)

    async def stop(self) -> None:
        # Reverse order of start: background tasks, then the pool.
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        log.info("stopped")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _partition_keeper(self) -> None:
        assert self._pool is not None
        while True:
            await asyncio.sleep(_PARTITION_CHECK_S)
            try:
                async with self._pool.acquire() as conn:
                    await migrate.ensure_partitions(conn)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("could not create partitions ahead: %s", exc)
