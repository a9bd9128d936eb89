"""PostgreSQL connections with errors a person can act on."""

from __future__ import annotations

import asyncpg

from poller.endpoints import redact_url
from poller.errors import PollerError


class DatabaseUnavailable(PollerError):
    pass


async def connect(url: str, *, timeout_s: float = 10.0) -> asyncpg.Connection:
    try:
        conn: asyncpg.Connection = await asyncpg.connect(url, timeout=timeout_s)
    except (OSError, TimeoutError, asyncpg.PostgresError,
            asyncpg.InterfaceError) as exc:
        raise DatabaseUnavailable(f"cannot reach PostgreSQL at {redact_url(url)}: "
                                  f"{type(exc).__name__}: {exc}") from None
    return conn


async def create_pool(url: str, *, max_size: int, timeout_s: float = 10.0) -> asyncpg.Pool:
    try:
        pool: asyncpg.Pool = await asyncpg.create_pool(
            url, min_size=1, max_size=max_size, timeout=timeout_s)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DatabaseUnavailable(f"cannot reach PostgreSQL at {redact_url(url)}: "
                                  f"{type(exc).__name__}: {exc}") from None
    return pool
