"""Opening a connection: dialled by address when a network policy applies.

A request that found no idle connection and got a slot connects in a task of
its own; its deadline stays an entry in the deadline wheel (see
:mod:`poller.transport.pools`), which cancels the task when it passes.
"""

from __future__ import annotations

import asyncio

from poller.netpolicy import allowed_addresses
from poller.transport.connection import HttpConnection
from poller.transport.errors import TransportConnectError
from poller.transport.hostpool import HostPool, Pending
from poller.transport.pools import ConnectionPools


class Dialer(ConnectionPools):
    """Opens the pools' connections (TLS, network policy) and gives up on them."""

    def _open(self, pool: HostPool, pending: Pending) -> None:
        """Connect for ``pending``; its slot is already taken."""
        loop = self._loop
        assert loop is not None and self._deadlines is not None
        conn = HttpConnection(self, pool.key, self._max_body, self._max_head)
        pending.conn = conn
        task = loop.create_task(self._connect(pool, pending, conn))
        pending.task = task
        self._connecting.add(pending)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _abandon_connect(self, pending: Pending) -> None:
        """Stop connecting for ``pending`` (deadline or close); frees its slot."""
        self._disarm(pending)
        self._connecting.discard(pending)
        task = pending.task
        if task is not None:
            pending.task = None  # see _connect: no way back from the task to it
            task.cancel()
        pool = pending.pool
        pool.n_open -= 1
        self._n_open -= 1
        conn = pending.conn
        if conn is not None:
            conn.dead = True
            conn.abort()
            if conn.transport is None:  # never connected: no connection_lost to come
                conn.detach()

    async def _connect(self, pool: HostPool, pending: Pending, conn: HttpConnection) -> None:
        loop = self._loop
        assert loop is not None
        target = pool.prepared
        tls = self._ssl if target.tls else None
        policy = self._policy
        try:
            if policy is None:
                await loop.create_connection(
                    lambda: conn,
                    target.host,
                    target.port,
                    ssl=tls,
                    server_hostname=target.host if tls is not None else None,
                )
            else:
                # Resolved here and dialled by address: what the policy
                # judges is what is connected, whatever the name said at
                # registration. A refusal is an OSError like any other.
                # No exception kept in a local: it would hold this frame in a
                # cycle through its traceback (see the cancel below).
                addresses = await allowed_addresses(loop, policy, target.host, target.port)
                last = len(addresses) - 1
                for i, address in enumerate(addresses):
                    try:
                        await loop.create_connection(
                            lambda: conn, address, target.port, ssl=tls,
                            server_hostname=target.host if tls is not None else None)
                        break
                    except OSError:
                        if i == last:
                            raise
        except asyncio.CancelledError:
            # The deadline passed or close() ran; the socket may exist already.
            conn.abort()
            # Ended here, not re-raised: the cancel's traceback would keep
            # this frame, whose locals lead back to the task (pending.task):
            # a reference cycle of some thirty objects per abandoned connect,
            # only the cyclic GC frees them, and under overload that is
            # thousands a second (measured: it made the collector a quarter
            # of the CPU at 100k devices). Nobody needs the task cancelled:
            # whoever cancelled it settled the request (_abandon_connect),
            # and close() gathers the tasks whatever their outcome.
            return
        except OSError as exc:  # refused, unreachable, DNS, TLS (SSLError is an OSError)
            conn.detach()
            self._connecting.discard(pending)
            self._disarm(pending)
            pool.n_open -= 1
            self._n_open -= 1
            reason = exc.strerror or str(exc) or type(exc).__name__
            self.deliver(pending.on_done, TransportConnectError(
                f"cannot connect to {pool.key}: {reason}"))
            self._slot_freed(pool)
            return
        self._connecting.discard(pending)
        self._disarm(pending)
        self._opened += 1
        self._conns.add(conn)
        if self._sweeper is None:
            self._sweeper = self._clock.call_later(self._deadline_res, self._sweep)
        conn.send(pending.prepared, pending.headers, pending.deadline, pending.on_done)
