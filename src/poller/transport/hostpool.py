"""One host's keep-alive pool, and a request that waits for a connection.

A :class:`HostPool` is what :class:`~poller.transport.pools.ConnectionPools`
keeps per (scheme, host, port): its idle connections, most recently used
first, how many are open, and the FIFO of requests waiting for one. A
:class:`Pending` is such a request (or one whose connection is being
opened) until it is on a connection.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import TYPE_CHECKING

from poller.transport.connection import HttpConnection, OnDone
from poller.transport.prepared import PreparedRequest

if TYPE_CHECKING:
    from poller.transport.pools import ConnectionPools


class HostPool:
    __slots__ = ("idle", "key", "limit", "n_open", "prepared", "waiters")

    def __init__(self, prepared: PreparedRequest, limit: int) -> None:
        self.key = prepared.key
        self.prepared = prepared
        """Any request to this host: where to connect."""
        self.limit = limit
        self.n_open = 0
        """Connections established or being established."""
        self.idle: dict[HttpConnection, None] = {}
        """Insertion-ordered, so popitem() takes the most recently used."""
        self.waiters: OrderedDict[Pending, None] = OrderedDict()


class Pending:
    """A request not yet on a connection: waiting for one, or connecting.

    Its deadline is an entry in the client's deadline wheel; ``armed`` is
    cleared when the request moves on, so the entry then does nothing."""

    __slots__ = ("armed", "client", "conn", "deadline", "headers", "on_done", "pool", "prepared",
                 "task")

    def __init__(self, client: ConnectionPools, pool: HostPool, prepared: PreparedRequest,
                 headers: bytes, deadline: float, on_done: OnDone) -> None:
        self.client = client
        self.pool = pool
        self.prepared = prepared
        self.headers = headers
        self.deadline = deadline
        self.on_done = on_done
        self.armed = False
        self.task: asyncio.Task[None] | None = None
        self.conn: HttpConnection | None = None

    def fire(self) -> None:
        if self.armed:
            self.armed = False
            self.client._expire(self)
