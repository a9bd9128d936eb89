"""Keep-alive connection pools across hosts: caps, waiters, deadlines.

One :class:`~poller.transport.hostpool.HostPool` of connections per (scheme,
host, port), with a per-host and a global connection cap. Idle connections
are reused last-in-first-out, so a burst reuses the warm ones and the rest
age out when servers close them. A connection goes back to its pool only
after a complete response that allows keep-alive.

When no idle connection is free and a cap is reached, the request waits in
its host's FIFO of waiters. The waiters are bounded, in all
(``max_waiters``) and, if asked, per host (``waiters_per_connection`` times
the host's connection cap: the pollers' requests beyond could not be served
in time anyway); beyond either a
request is refused at once, before anything is allocated for it (``start``
returns False; ``fetch`` raises :class:`TransportPoolFull`, a kind of
:class:`TransportQueueTimeout`: nothing was sent), so overload shows up as
skipped requests that cost next to nothing, never as a queue that grows
without limit. When only the global cap blocks a host, the least
recently used idle connection of another host is closed to make room.

A request waits for a connection at most ``queue_share`` of the time it had
left when it began to wait, then fails with :class:`TransportQueueTimeout`
before anything is sent: under overload a FIFO of requests with deadlines
otherwise serves only requests about to expire, each sent to time out on the
wire. New connections are capped at ``max_connects_per_s`` (a token bucket
of a second's worth, all hosts together); a request that would connect beyond
it waits like one blocked by a cap, so failures cannot turn into a storm of
reconnects that costs more than the polls.

Each request has one deadline covering waiting, connecting (TLS included),
sending and receiving: an instant on the client's clock's monotonic scale
(:mod:`poller.clock`; the device loops compute it on the same clock). It
fires at most ``deadline_resolution_s`` late:
never a loop timer per request, which under overload, with thousands waiting,
became the largest cost in the profile. A request waiting or connecting is an
entry in a timing wheel of that resolution; a request on a connection is
found by a sweep of the open connections at that period (one comparison per
connection, where an entry per request cost two Python calls for answers
that almost always come first). On timeout the connection is kept
``keep_after_timeout_s`` more to read the late answer and be reused (see
:mod:`poller.transport.connection`), then closed if it has not come.

If the server closes a reused connection before any byte of the response
arrived (an idle keep-alive race), the request is retried once on a fresh
connection. That is safe only because the polling requests are idempotent
reads: the server has not answered, and repeating a read changes nothing.

:class:`ConnectionPools` is the connections' owner (their callbacks land
here); opening a connection is :class:`~poller.transport.dial.Dialer`'s, the
public API :class:`~poller.transport.fasthttp.FastHttpClient`'s.
"""

from __future__ import annotations

import asyncio
import math
import ssl
from collections import OrderedDict

from poller.clock import Clock, TimerHandle
from poller.http import HttpResponse
from poller.netpolicy import NetPolicy
from poller.transport.connection import HttpConnection, OnDone
from poller.transport.errors import (
    TransportConnectError,
    TransportQueueTimeout,
    TransportTimeout,
)
from poller.transport.hostpool import HostPool, Pending
from poller.transport.prepared import PreparedRequest
from poller.wheel import TimingWheel


class ConnectionPools:
    """The pools of every host and their shared caps; owner of the connections.

    Opening a connection (:meth:`_open`, :meth:`_abandon_connect`) is left to
    the subclass, :class:`~poller.transport.dial.Dialer`."""

    def __init__(
        self,
        *,
        max_connections_per_host: int,
        max_connections: int,
        max_waiters: int,
        max_body_bytes: int,
        max_head_bytes: int,
        ssl_context: ssl.SSLContext | None,
        deadline_resolution_s: float,
        clock: Clock,
        net_policy: NetPolicy | None,
        keep_after_timeout_s: float = 0.0,
        max_connects_per_s: float = 0.0,
        queue_share: float = 0.5,
        waiters_per_connection: int | None = None,
    ) -> None:
        self._deadline_res = deadline_resolution_s
        self._waiters_per_conn = waiters_per_connection if waiters_per_connection else 1 << 40
        self._keep_s = keep_after_timeout_s
        self._queue_share = queue_share
        self._connect_rate = max_connects_per_s
        self._tokens = max_connects_per_s  # a second's worth to start with
        self._tokens_at = -math.inf
        self._refill: TimerHandle | None = None
        # Hosts whose waiters could connect but for the connect rate cap.
        self._rate_starved: OrderedDict[HostPool, None] = OrderedDict()
        self._clock = clock
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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pools: dict[str, HostPool] = {}
        # Idle connections of all hosts, oldest first: eviction order when the
        # global cap blocks a host that has no connection of its own.
        self._idle_lru: OrderedDict[HttpConnection, None] = OrderedDict()
        # Hosts whose waiters could open a connection if the global cap allowed.
        self._starved: OrderedDict[HostPool, None] = OrderedDict()
        self._conns: set[HttpConnection] = set()
        self._connecting: set[Pending] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._n_open = 0
        self._n_waiters = 0
        self._started = 0
        self._done = 0
        self._opened = 0
        self._kept = 0
        """Connections kept open after a missed deadline to read the late answer."""
        self._deferred = 0
        """Connects put off by the connect rate cap."""
        self._refused = 0
        """Requests turned away at once: the waiters' queue was full."""
        self._closed = False

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
        pending = Pending(self, pool, prepared, headers, deadline, on_done)
        self._arm_deadline(pending)
        self._take_slot(pool)
        self._open(pool, pending)

    # -- the pools -----------------------------------------------------------

    def _bind(self) -> asyncio.AbstractEventLoop:
        self._loop = asyncio.get_running_loop()
        self._deadlines = TimingWheel(self._clock, self._deadline_res)
        return self._loop

    def _new_pool(self, prepared: PreparedRequest) -> HostPool:
        if self._loop is None:
            self._bind()
        if prepared.tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        pool = HostPool(prepared, self._per_host)
        self._pools[prepared.key] = pool
        return pool

    def _start_slow(
        self, pool: HostPool, prepared: PreparedRequest, headers: bytes, deadline: float,
        on_done: OnDone,
    ) -> bool:
        """Connect for the request or queue it; False if it is refused at
        once (the queue is full: ``on_done`` will not be called)."""
        if pool.n_open < pool.limit:
            if self._n_open >= self._max_open and self._idle_lru and not self._starved:
                # Only the global cap blocks: retire the stalest idle connection.
                self.discard(next(iter(self._idle_lru)))
            if self._n_open < self._max_open and not pool.waiters and \
                    self._may_connect(pool):
                pending = Pending(self, pool, prepared, headers, deadline, on_done)
                self._arm_deadline(pending)
                self._take_slot(pool)
                self._open(pool, pending)
                return True
        if self._n_waiters >= self._max_waiters or \
                len(pool.waiters) >= pool.limit * self._waiters_per_conn:
            self._refused += 1
            return False
        pending = Pending(self, pool, prepared, headers, deadline, on_done)
        # Wait for a connection no more than a share of the time left: what
        # is sent has time to be answered (see the module docstring).
        now = self._now()
        self._arm(pending, now + (deadline - now) * self._queue_share)
        pool.waiters[pending] = None
        self._n_waiters += 1
        if pool.n_open < pool.limit and pool not in self._rate_starved:
            self._starved[pool] = None
        return True

    def _take_slot(self, pool: HostPool) -> None:
        pool.n_open += 1
        self._n_open += 1

    def _forget(self, conn: HttpConnection) -> HostPool:
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

    def _slot_freed(self, pool: HostPool) -> None:
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

    def _connect_waiter(self, pool: HostPool) -> None:
        if not self._may_connect(pool):
            return
        pending = self._pop_waiter(pool)
        if pending is not None:
            self._take_slot(pool)
            self._open(pool, pending)

    # -- the connect rate cap ------------------------------------------------

    def _may_connect(self, pool: HostPool) -> bool:
        """Take a token for a new connection to ``pool``; without one, the
        pool's waiters connect when the bucket refills."""
        rate = self._connect_rate
        if rate <= 0:
            return True
        now = self._now()
        tokens = min(rate, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return True
        self._tokens = tokens
        self._deferred += 1
        self._rate_starved[pool] = None
        if self._refill is None and not self._closed:
            self._refill = self._clock.call_later((1.0 - tokens) / rate, self._refilled)
        return False

    def _refilled(self) -> None:
        """Connect the waiters the cap held back, as far as tokens allow."""
        self._refill = None
        starved = self._rate_starved
        while starved and not self._closed:
            pool = next(iter(starved))
            if not pool.waiters or pool.n_open >= pool.limit or self._n_open >= self._max_open:
                del starved[pool]  # served meanwhile, or a cap holds it now
                continue
            if not self._may_connect(pool):
                return  # the next refill goes on from here
            pending = self._pop_waiter(pool)
            if pending is not None:
                self._take_slot(pool)
                self._open(pool, pending)

    def _pop_waiter(self, pool: HostPool) -> Pending | None:
        """The first waiter with time left to be served, or None.

        A waiter whose deadline is less than a deadline slot away fails with
        TransportQueueTimeout here: sending it now would charge the device
        with a timeout that our queue caused."""
        waiters = pool.waiters
        soon = self._now() + self._deadline_res
        found: Pending | None = None
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

    # -- deadlines -----------------------------------------------------------

    def _arm_deadline(self, pending: Pending) -> None:
        self._arm(pending, pending.deadline)

    def _arm(self, pending: Pending, when: float) -> None:
        assert self._deadlines is not None
        pending.armed = True
        self._deadlines.add(when, pending)

    @staticmethod
    def _disarm(pending: Pending) -> None:
        pending.armed = False

    def _expire(self, pending: Pending) -> None:
        pool = pending.pool
        if pending.task is not None:
            if pending.deadline > self._now():
                # Armed when it began to wait (a share of its time); it has
                # been connecting since: its own deadline holds now.
                self._arm_deadline(pending)
                return
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

    def _sweep(self) -> None:
        """Fail the exchanges past their deadline; again while connections are open."""
        now = self._now()
        conns = self._conns
        keep_until = now + self._keep_s if self._keep_s > 0 else None
        for conn in [c for c in conns if c.deadline <= now]:
            if conn.expire(keep_until):
                self._kept += 1
        if conns and not self._closed:
            self._sweeper = self._clock.call_later(self._deadline_res, self._sweep)
        else:
            self._sweeper = None

    # -- connecting (see poller.transport.dial) ------------------------------

    def _open(self, pool: HostPool, pending: Pending) -> None:
        """Connect for ``pending``; its slot is already taken."""
        raise NotImplementedError

    def _abandon_connect(self, pending: Pending) -> None:
        """Stop connecting for ``pending`` (deadline or close); frees its slot."""
        raise NotImplementedError
