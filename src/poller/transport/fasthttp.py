"""The lean HTTP/1.1 client for the polling hot path.

Keep-alive pools per (scheme, host, port) of :class:`HttpConnection`s, with a
per-host and a global connection cap. Idle connections are reused
last-in-first-out, so a burst reuses the warm ones and the rest age out when
servers close them. A connection goes back to its pool only after a complete
response that allows keep-alive.

When no idle connection is free and a cap is reached, the request waits in
its host's FIFO of waiters. The total number of waiters is bounded
(``max_waiters``); beyond it a request fails at once with
:class:`TransportPoolFull`, so overload shows up as errors, never as a queue
that grows without limit. When only the global cap blocks a host, the least
recently used idle connection of another host is closed to make room.

Each request has one deadline covering waiting, connecting (TLS included),
sending and receiving: an instant on the client's clock's monotonic scale
(:mod:`poller.clock`; the device loops compute it on the same clock). It
fires at most ``deadline_resolution_s`` late:
never a loop timer per request, which under overload, with thousands waiting,
became the largest cost in the profile. A request waiting or connecting is an
entry in a timing wheel of that resolution; a request on a connection is
found by a sweep of the open connections at that period (one comparison per
connection, where an entry per request cost two Python calls for answers
that almost always come first). On timeout the connection is closed, never
reused.

If the server closes a reused connection before any byte of the response
arrived (an idle keep-alive race), the request is retried once on a fresh
connection. That is safe only because the polling requests are idempotent
reads: the server has not answered, and repeating a read changes nothing.

Two interfaces share one core: :meth:`FastHttpClient.start` calls back with
the response or the error and allocates no task or future;
:meth:`FastHttpClient.fetch` is the coroutine wrapper.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import OrderedDict
from functools import partial
from typing import NamedTuple

from poller.clock import Clock, LoopClock, TimerHandle
from poller.drivers.base import HttpRequest, HttpResponse
from poller.netpolicy import NetPolicy, allowed_addresses
from poller.polling.wheel import TimingWheel
from poller.transport.connection import HttpConnection, OnDone
from poller.transport.errors import (
    TransportConnectError,
    TransportPoolFull,
    TransportQueueTimeout,
    TransportTimeout,
)
from poller.transport.prepared import PreparedRequest, prepare


class TransportStats(NamedTuple):
    open_connections: int
    """Established connections, idle or busy."""
    connecting: int
    idle: int
    in_flight: int
    """Requests started and not yet answered, waiters included."""
    waiters: int
    requests_done: int
    connections_opened: int


class _HostPool:
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
        self.waiters: OrderedDict[_Pending, None] = OrderedDict()


class _Pending:
    """A request not yet on a connection: waiting for one, or connecting.

    Its deadline is an entry in the client's deadline wheel; ``armed`` is
    cleared when the request moves on, so the entry then does nothing."""

    __slots__ = ("armed", "client", "conn", "deadline", "headers", "on_done", "pool", "prepared",
                 "task")

    def __init__(self, client: FastHttpClient, pool: _HostPool, prepared: PreparedRequest,
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


def _settle(fut: asyncio.Future[HttpResponse], result: HttpResponse | BaseException) -> None:
    if fut.done():  # the awaiting fetch was cancelled
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)


class FastHttpClient:
    """HTTP/1.1 keep-alive client on asyncio.Protocol and httptools.

    >>> client = FastHttpClient(max_connections_per_host=64)
    >>> req = HttpRequest("GET", "http://127.0.0.1:8080/status", ())
    >>> response = await client.fetch(req, timeout_s=5.0)         # doctest: +SKIP
    >>> prepared = client.prepared(req)
    >>> client.start(prepared, clock.monotonic() + 5.0, on_done)  # doctest: +SKIP
    >>> await client.close()                                      # doctest: +SKIP

    Bind it to one event loop: the first request does. Deadlines and the
    sweep run on ``clock`` (default: a :class:`~poller.clock.LoopClock`).
    """

    def __init__(
        self,
        *,
        max_connections_per_host: int = 256,
        max_connections: int = 1024,
        max_waiters: int = 100_000,
        max_body_bytes: int = 1 << 20,
        max_head_bytes: int = 64 << 10,
        ssl_context: ssl.SSLContext | None = None,
        prepared_cache_size: int = 1024,
        deadline_resolution_s: float = 0.05,
        clock: Clock | None = None,
        net_policy: NetPolicy | None = None,
    ) -> None:
        for name, value in (
            ("max_connections_per_host", max_connections_per_host),
            ("max_connections", max_connections),
            ("max_body_bytes", max_body_bytes),
            ("max_head_bytes", max_head_bytes),
            ("prepared_cache_size", prepared_cache_size),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if max_waiters < 0:
            raise ValueError(f"max_waiters must not be negative, got {max_waiters}")
        if deadline_resolution_s <= 0:
            raise ValueError(f"deadline_resolution_s must be positive, got "
                             f"{deadline_resolution_s}")
        self._deadline_res = deadline_resolution_s
        self._clock = clock if clock is not None else LoopClock()
        self._now = self._clock.monotonic
        self._deadlines: TimingWheel | None = None
        self._sweeper: TimerHandle | None = None
        self._per_host = max_connections_per_host
        self._max_open = max_connections
        self._max_waiters = max_waiters
        self._max_body = max_body_bytes
        self._max_head = max_head_bytes
        self._ssl = ssl_context
        # Where connections may go (None: anywhere). Checked on each connect,
        # never on a request over a kept-alive connection.
        self._policy = net_policy
        self._cache_size = prepared_cache_size
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pools: dict[str, _HostPool] = {}
        # Idle connections of all hosts, oldest first: eviction order when the
        # global cap blocks a host that has no connection of its own.
        self._idle_lru: OrderedDict[HttpConnection, None] = OrderedDict()
        # Hosts whose waiters could open a connection if the global cap allowed.
        self._starved: OrderedDict[_HostPool, None] = OrderedDict()
        self._conns: set[HttpConnection] = set()
        self._connecting: set[_Pending] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._prepared_cache: dict[int, tuple[HttpRequest, PreparedRequest]] = {}
        self._templates: dict[tuple[str, bytes, bytes], PreparedRequest] = {}
        self._n_open = 0
        self._n_waiters = 0
        self._started = 0
        self._done = 0
        self._opened = 0
        self._closed = False

    # -- public API ----------------------------------------------------------

    def prepared(self, request: HttpRequest) -> PreparedRequest:
        """``prepare(request)``, cached by the identity of ``request``."""
        cache = self._prepared_cache
        found = cache.get(id(request))
        # The entry holds the request itself, so its id cannot be reused by
        # another object while the entry exists.
        if found is not None and found[0] is request:
            return found[1]
        prepared = prepare(request)
        if len(cache) >= self._cache_size:
            cache.clear()
        cache[id(request)] = (request, prepared)
        return prepared

    async def fetch(
        self, request: HttpRequest | PreparedRequest, timeout_s: float
    ) -> HttpResponse:
        """Send ``request`` and return the response; raise a TransportError.

        Cancelling the caller does not cancel the exchange: it ends at its
        response or deadline, and the connection is reused as usual.
        """
        prepared = request if isinstance(request, PreparedRequest) else self.prepared(request)
        loop = self._loop or self._bind()
        fut: asyncio.Future[HttpResponse] = loop.create_future()
        self.start(prepared, self._now() + timeout_s, partial(_settle, fut))
        try:
            return await fut
        finally:
            del fut  # an error's traceback keeps this frame: no way back to fut

    def shared(self, prepared: PreparedRequest) -> tuple[PreparedRequest, bytes]:
        """``(template, headers)``: what ``prepared`` shares with every request
        to the same place with the same body, and its own header lines.

        ``start(template, ..., headers=headers)`` sends ``prepared``. A caller
        that sends one request for ever (a device loop) keeps the two instead
        of its own PreparedRequest: 80 B a device."""
        key = (prepared.key, prepared.start, prepared.end)
        template = self._templates.get(key)
        if template is None:
            if len(self._templates) >= self._cache_size:
                self._templates.clear()
            template = self._templates[key] = PreparedRequest(
                prepared.key, prepared.host, prepared.port, prepared.tls, prepared.start, b"",
                prepared.end)
        return template, prepared.headers

    def start(self, prepared: PreparedRequest, deadline: float, on_done: OnDone,
              headers: bytes | None = None) -> None:
        """Send ``prepared`` (with ``headers`` in place of its own, if given);
        call ``on_done`` with the response or the error.

        ``deadline`` is a monotonic instant of the client's clock. ``on_done`` is called exactly
        once, never from inside ``start()``, and must not raise. Errors are
        :class:`TransportTimeout`, :class:`TransportConnectError` (including
        :class:`TransportPoolFull`) and :class:`TransportProtocolError`.
        """
        if self._closed:
            raise RuntimeError("FastHttpClient is closed")
        self._started += 1
        if headers is None:
            headers = prepared.headers
        pool = self._pools.get(prepared.key)
        if pool is None:
            pool = self._new_pool(prepared)
        idle = pool.idle
        if idle:
            conn = idle.popitem()[0]
            del self._idle_lru[conn]
            conn.send(prepared, headers, deadline, on_done)
            return
        self._start_slow(pool, prepared, headers, deadline, on_done)

    def stats(self) -> TransportStats:
        return TransportStats(
            open_connections=len(self._conns),
            connecting=len(self._connecting),
            idle=len(self._idle_lru),
            in_flight=self._started - self._done,
            waiters=self._n_waiters,
            requests_done=self._done,
            connections_opened=self._opened,
        )

    async def close(self) -> None:
        """Fail everything pending with TransportConnectError and close all
        connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        closed = TransportConnectError("transport closed")
        for pool in self._pools.values():
            while pool.waiters:
                pending = pool.waiters.popitem(last=False)[0]
                self._n_waiters -= 1
                self._disarm(pending)
                self.deliver(pending.on_done, closed)
        for pending in list(self._connecting):
            self._abandon_connect(pending)
            self.deliver(pending.on_done, closed)
        for conn in list(self._conns):
            if conn.busy:
                conn.fail(closed)
            else:
                self.discard(conn)
        self._starved.clear()
        if self._deadlines is not None:
            self._deadlines.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- ConnectionOwner -----------------------------------------------------

    def deliver(self, on_done: OnDone, result: HttpResponse | BaseException) -> None:
        self._done += 1
        try:
            on_done(result)
        except Exception as exc:  # a broken callback must not break the connection
            loop = self._loop
            assert loop is not None
            loop.call_exception_handler({
                "message": "FastHttpClient on_done callback raised",
                "exception": exc,
            })

    def release(self, conn: HttpConnection, reusable: bool) -> None:
        if not reusable or self._closed:
            self.discard(conn)
            return
        pool = self._pools[conn.pool_key]
        pending = self._pop_waiter(pool) if pool.waiters else None
        if pending is not None:
            self._disarm(pending)
            conn.send(pending.prepared, pending.headers, pending.deadline, pending.on_done)
            return
        if self._starved:
            # Another host is blocked by the global cap: give it this slot.
            self.discard(conn)
            return
        pool.idle[conn] = None
        self._idle_lru[conn] = None

    def discard(self, conn: HttpConnection) -> None:
        if conn.dead:
            conn.abort()
            return
        pool = self._forget(conn)
        self._slot_freed(pool)

    def retry(
        self, conn: HttpConnection, prepared: PreparedRequest, headers: bytes, deadline: float,
        on_done: OnDone,
    ) -> None:
        pool = self._forget(conn)
        if self._closed:
            self.deliver(on_done, TransportConnectError("transport closed"))
            return
        # The retry inherits the dead connection's slot, so no waiter can
        # take it in between.
        pending = _Pending(self, pool, prepared, headers, deadline, on_done)
        self._arm_deadline(pending)
        self._take_slot(pool)
        self._open(pool, pending)

    # -- pool internals ------------------------------------------------------

    def _bind(self) -> asyncio.AbstractEventLoop:
        self._loop = asyncio.get_running_loop()
        self._deadlines = TimingWheel(self._clock, self._deadline_res)
        return self._loop

    def _new_pool(self, prepared: PreparedRequest) -> _HostPool:
        if self._loop is None:
            self._bind()
        if prepared.tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        pool = _HostPool(prepared, self._per_host)
        self._pools[prepared.key] = pool
        return pool

    def _start_slow(
        self, pool: _HostPool, prepared: PreparedRequest, headers: bytes, deadline: float,
        on_done: OnDone,
    ) -> None:
        loop = self._loop
        assert loop is not None
        if pool.n_open < pool.limit:
            if self._n_open >= self._max_open and self._idle_lru and not self._starved:
                # Only the global cap blocks: retire the stalest idle connection.
                self.discard(next(iter(self._idle_lru)))
            if self._n_open < self._max_open and not pool.waiters:
                pending = _Pending(self, pool, prepared, headers, deadline, on_done)
                self._arm_deadline(pending)
                self._take_slot(pool)
                self._open(pool, pending)
                return
        if self._n_waiters >= self._max_waiters:
            err = TransportPoolFull(f"{self._n_waiters} requests already wait for a connection")
            loop.call_soon(self.deliver, on_done, err)
            return
        pending = _Pending(self, pool, prepared, headers, deadline, on_done)
        self._arm_deadline(pending)
        pool.waiters[pending] = None
        self._n_waiters += 1
        if pool.n_open < pool.limit:
            self._starved[pool] = None

    def _take_slot(self, pool: _HostPool) -> None:
        pool.n_open += 1
        self._n_open += 1

    def _forget(self, conn: HttpConnection) -> _HostPool:
        """Close ``conn`` and free its slot without handing the slot on."""
        conn.dead = True
        pool = self._pools[conn.pool_key]
        if conn in pool.idle:
            del pool.idle[conn]
            del self._idle_lru[conn]
        self._conns.discard(conn)
        pool.n_open -= 1
        self._n_open -= 1
        conn.abort()
        return pool

    def _slot_freed(self, pool: _HostPool) -> None:
        if self._closed:
            return
        if pool.waiters and pool.n_open < pool.limit and self._n_open < self._max_open:
            self._connect_waiter(pool)
            return
        starved = self._starved
        while starved and self._n_open < self._max_open:
            other = next(iter(starved))
            if not other.waiters or other.n_open >= other.limit:
                del starved[other]
                continue
            self._connect_waiter(other)

    def _connect_waiter(self, pool: _HostPool) -> None:
        pending = self._pop_waiter(pool)
        if pending is not None:
            self._take_slot(pool)
            self._open(pool, pending)

    def _pop_waiter(self, pool: _HostPool) -> _Pending | None:
        """The first waiter with time left to be served, or None.

        A waiter whose deadline is less than a deadline slot away fails with
        TransportQueueTimeout here: sending it now would charge the device
        with a timeout that our queue caused."""
        waiters = pool.waiters
        soon = self._now() + self._deadline_res
        found: _Pending | None = None
        while waiters:
            pending = waiters.popitem(last=False)[0]
            self._n_waiters -= 1
            if pending.deadline > soon:
                found = pending
                break
            self._disarm(pending)
            self.deliver(pending.on_done, TransportQueueTimeout(
                f"deadline too close after waiting for a connection to {pool.key}"))
        if not waiters:
            self._starved.pop(pool, None)
        return found

    def _arm_deadline(self, pending: _Pending) -> None:
        assert self._deadlines is not None
        pending.armed = True
        self._deadlines.add(pending.deadline, pending)

    @staticmethod
    def _disarm(pending: _Pending) -> None:
        pending.armed = False

    def _expire(self, pending: _Pending) -> None:
        pool = pending.pool
        if pending.task is not None:
            self._abandon_connect(pending)
            self._slot_freed(pool)
            self.deliver(pending.on_done,
                         TransportTimeout(f"deadline passed connecting to {pool.key}"))
            return
        del pool.waiters[pending]
        self._n_waiters -= 1
        if not pool.waiters:
            self._starved.pop(pool, None)
        self.deliver(pending.on_done, TransportQueueTimeout(
            f"deadline passed waiting for a connection to {pool.key}"))

    def _open(self, pool: _HostPool, pending: _Pending) -> None:
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

    def _abandon_connect(self, pending: _Pending) -> None:
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

    async def _connect(self, pool: _HostPool, pending: _Pending, conn: HttpConnection) -> None:
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
            # The cancel's traceback keeps this frame, whose locals lead back
            # to the task (pending.task): a reference cycle of some thirty
            # objects per abandoned connect, only the cyclic GC frees them,
            # and under overload that is thousands a second (measured: it
            # made the collector a quarter of the CPU at 100k devices).
            del pool, pending, conn
            raise
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

    def _sweep(self) -> None:
        """Fail the exchanges past their deadline; again while connections are open."""
        now = self._now()
        conns = self._conns
        for conn in [c for c in conns if c.deadline <= now]:
            conn.expire()
        if conns and not self._closed:
            self._sweeper = self._clock.call_later(self._deadline_res, self._sweep)
        else:
            self._sweeper = None
