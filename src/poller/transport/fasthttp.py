"""The lean HTTP/1.1 client for the polling hot path: its public face.

Keep-alive pools per (scheme, host, port), a per-host and a global
connection cap, a bounded queue of waiters, and one deadline per request
that is never a loop timer of its own. Where each part lives:

- :mod:`poller.transport.hostpool`: one host's pool and a waiting request;
- :mod:`poller.transport.pools`: the pools, their caps and waiters, the
  deadlines (a timing wheel and a sweep), what a connection calls back;
- :mod:`poller.transport.dial`: opening a connection (TLS, network policy);
- :mod:`poller.transport.connection`: one connection, its send and its parse;
- here: :class:`FastHttpClient`, the requests' way in.

Two interfaces share one core: :meth:`FastHttpClient.start` calls back with
the response or the error and allocates no task or future;
:meth:`FastHttpClient.fetch` is the coroutine wrapper.
"""

from __future__ import annotations

import asyncio
import ssl
from functools import partial
from typing import NamedTuple

from poller.clock import Clock, LoopClock
from poller.http import HttpRequest, HttpResponse
from poller.netpolicy import NetPolicy
from poller.transport.connection import OnDone
from poller.transport.dial import Dialer
from poller.transport.errors import TransportConnectError, TransportPoolFull
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
    timeouts_kept: int = 0
    """Connections kept open after a missed deadline to read the late answer."""
    refused: int = 0
    """Requests turned away at once because the waiters' queue was full."""
    connects_deferred: int = 0
    """Connects put off by the connect rate cap."""


def _settle(fut: asyncio.Future[HttpResponse], result: HttpResponse | BaseException) -> None:
    if fut.done():  # the awaiting fetch was cancelled
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)


class FastHttpClient(Dialer):
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
        keep_after_timeout_s: float = 0.0,
        max_connects_per_s: float = 0.0,
        queue_share: float = 0.5,
        waiters_per_connection: int | None = None,
    ) -> None:
        for name, value in (
            ("max_connections_per_host", max_connections_per_host),
            ("max_connections", max_connections),
            ("max_body_bytes", max_body_bytes),
            ("max_head_bytes", max_head_bytes),
            ("prepared_cache_size", prepared_cache_size),
            ("waiters_per_connection", waiters_per_connection or 1),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if max_waiters < 0:
            raise ValueError(f"max_waiters must not be negative, got {max_waiters}")
        if deadline_resolution_s <= 0:
            raise ValueError(f"deadline_resolution_s must be positive, got "
                             f"{deadline_resolution_s}")
        if keep_after_timeout_s < 0 or max_connects_per_s < 0:
            raise ValueError("keep_after_timeout_s and max_connects_per_s must not be negative")
        if not 0 < queue_share <= 1:
            raise ValueError(f"queue_share must be in (0, 1], got {queue_share}")
        super().__init__(
            max_connections_per_host=max_connections_per_host,
            max_connections=max_connections,
            max_waiters=max_waiters,
            max_body_bytes=max_body_bytes,
            max_head_bytes=max_head_bytes,
            ssl_context=ssl_context,
            deadline_resolution_s=deadline_resolution_s,
            clock=clock if clock is not None else LoopClock(),
            net_policy=net_policy,
            keep_after_timeout_s=keep_after_timeout_s,
            max_connects_per_s=max_connects_per_s,
            queue_share=queue_share,
            waiters_per_connection=waiters_per_connection,
        )
        self._cache_size = prepared_cache_size
        self._prepared_cache: dict[int, tuple[HttpRequest, PreparedRequest]] = {}
        self._templates: dict[tuple[str, bytes, bytes], PreparedRequest] = {}

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
        if not self.start(prepared, self._now() + timeout_s, partial(_settle, fut)):
            raise TransportPoolFull(f"{self._n_waiters} requests already wait for a "
                                    f"connection ({prepared.key})")
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
              headers: bytes | None = None) -> bool:
        """Send ``prepared`` (with ``headers`` in place of its own, if given);
        call ``on_done`` with the response or the error. False: refused at
        once, every connection busy and the waiters' queue full (our
        overload; nothing was sent and ``on_done`` is not called).

        ``deadline`` is a monotonic instant of the client's clock. ``on_done`` is called exactly
        once, never from inside ``start()``, and must not raise. Errors are
        :class:`TransportTimeout` (including :class:`TransportQueueTimeout`:
        nothing was sent), :class:`TransportConnectError` and
        :class:`TransportProtocolError`.
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
            return True
        if self._start_slow(pool, prepared, headers, deadline, on_done):
            return True
        self._started -= 1
        return False

    def stats(self) -> TransportStats:
        return TransportStats(
            open_connections=len(self._conns),
            connecting=len(self._connecting),
            idle=len(self._idle_lru),
            in_flight=self._started - self._done,
            waiters=self._n_waiters,
            requests_done=self._done,
            connections_opened=self._opened,
            timeouts_kept=self._kept,
            refused=self._refused,
            connects_deferred=self._deferred,
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
        self._rate_starved.clear()
        if self._refill is not None:
            self._refill.cancel()
            self._refill = None
        if self._deadlines is not None:
            self._deadlines.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
