"""The simulator's HTTP/1.1 connection: httptools parsing, ordered answers.

Keep-alive and pipelining: requests on a connection are answered strictly in
order. An answer that is not ready yet (``slow``) or never will be (``hang``)
holds back the ones behind it in a small per-connection queue; while nothing
is pending, answers are written straight away with one ``write`` each.

A poller sends a device the same request bytes on every poll, each in one
write, so most reads are one whole request seen before: a read that is
exactly the bytes of a request whose route the gateway learned (see
gateway.Route) is answered from that route without parsing it. A route is
learned from a read that began between requests, held exactly one request
and left the connection kept alive: feeding those bytes to the parser again
would give the same request and leave it in the same state.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections import deque
from collections.abc import Callable
from time import time
from typing import cast

import httptools

from poller.simulator import responses
from poller.simulator.control import PREFIX, ControlApi
from poller.simulator.gateway import DROP, HANG, RESET, SEND, SLOW, Gateway, Reply, Route

_LINGER_RST = struct.pack("ii", 1, 0)
_HEADER_SLOTS = {b"cloud-id": 0, b"user": 1, b"password": 2, b"authorization": 3}
# The spellings clients send, so most headers cost one lookup and no lower().
_HEADER_SLOTS.update({b"Cloud-ID": 0, b"Cloud-Id": 0, b"User": 1, b"Password": 2})
_HEADER_SLOTS[b"Authorization"] = 3
_SKIP = {b"Host", b"Content-Length", b"Content-Type", b"Accept", b"Connection",
         b"User-Agent", b"Accept-Encoding"}
_BAD_REQUEST = responses.build(400, responses.TEXT, b"Bad Request\n", False, True)


_DETACHED = httptools.HttpRequestParser(object())
"""The parser of a lost connection: it refers to no protocol."""


class _Pending:
    __slots__ = ("ready", "reply")

    def __init__(self, reply: Reply, ready: bool) -> None:
        self.reply = reply
        self.ready = ready


class HttpConnection(asyncio.Protocol):
    """One client connection to the simulator."""

    __slots__ = (
        "_began",
        "_between",
        "_body",
        "_clock",
        "_connections",
        "_control",
        "_dead",
        "_gateway",
        "_headers",
        "_hung",
        "_learned",
        "_parser",
        "_queue",
        "_slow_delay_s",
        "_timers",
        "_transport",
        "_url",
    )

    def __init__(
        self, gateway: Gateway, control: ControlApi, connections: set[HttpConnection],
        slow_delay_s: float, clock: Callable[[], float] = time,
    ) -> None:
        self._gateway = gateway
        self._clock = clock
        """Wall time, Unix seconds (a harness moves it on instead of waiting)."""
        self._control = control
        self._connections = connections
        self._slow_delay_s = slow_delay_s
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: list[bytes | None] = [None, None, None, None]
        self._body = b""
        self._queue: deque[_Pending] = deque()
        self._timers: dict[_Pending, asyncio.TimerHandle] = {}
        self._hung = False
        self._dead = False
        self._between = True
        """The parser is between requests of a kept-alive connection."""
        self._began = 0
        """Requests begun in the read being parsed."""
        self._learned: Route | None = None
        """The route of the read's request, to learn if it was the only one."""

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)
        self._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._dead = True
        self._connections.discard(self)
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._queue.clear()
        # Parser and transport refer back to this protocol: break the cycles
        # so a closed connection is freed at once, not by the cyclic GC.
        self._parser = _DETACHED
        self._transport = None

    def data_received(self, data: bytes) -> None:
        if self._dead:
            return
        gateway = self._gateway
        fresh = self._between and not self._hung
        if fresh:
            route = gateway.routes.get(data)
            if route is not None:
                self._dispatch(gateway.answer(route, self._clock()))
                return
        self._began = 0
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._end_with(_BAD_REQUEST)
            return
        except httptools.HttpParserUpgrade:
            self._end_with(_BAD_REQUEST)
            return
        finally:
            learned, self._learned = self._learned, None
        if learned is not None and fresh and self._began == 1 and self._between:
            gateway.learn(data, learned)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._between = False
        self._began += 1
        self._url = b""
        self._headers = [None, None, None, None]
        self._body = b""

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        slot = _HEADER_SLOTS.get(name)
        if slot is None:
            if name in _SKIP:
                return
            slot = _HEADER_SLOTS.get(name.lower())
            if slot is None:
                return
        self._headers[slot] = value

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        parser = self._parser
        keep_alive = parser.should_keep_alive()
        self._between = keep_alive
        if self._hung or self._dead:
            return
        method = parser.get_method()
        body = self._body
        url = self._url
        if url.startswith(PREFIX):
            status, payload = self._control.handle(method, url, body)
            data = responses.build(status, responses.JSON, payload, False, not keep_alive)
            self._dispatch((SEND, data, not keep_alive, None))
            return
        h = self._headers
        path = url.partition(b"?")[0]
        now = self._clock()
        gateway = self._gateway
        route = gateway.resolve(method, path, h[0], h[1], h[2], h[3], body, keep_alive, now)
        self._learned = route
        self._dispatch(gateway.answer(route, now))

    # answering in order

    def _dispatch(self, reply: Reply) -> None:
        action = reply[0]
        if action == SEND and not self._queue:
            self._perform(reply)
            return
        if action == HANG:
            self._hung = True
            self._queue.append(_Pending(reply, False))
            return
        if action == SLOW:
            pending = _Pending(reply, False)
            self._queue.append(pending)
            loop = asyncio.get_running_loop()
            self._timers[pending] = loop.call_later(self._slow_delay_s, self._release, pending)
            return
        self._queue.append(_Pending(reply, True))
        self._flush()

    def _release(self, pending: _Pending) -> None:
        pending.ready = True
        self._timers.pop(pending, None)
        self._flush()

    def _flush(self) -> None:
        queue = self._queue
        while queue and queue[0].ready and not self._dead:
            self._perform(queue.popleft().reply)

    def _perform(self, reply: Reply) -> None:
        transport = self._transport
        if transport is None or self._dead:
            return
        action, data, close, served = reply
        if action == RESET:
            self._abort_with_rst(transport)
            return
        if action == DROP:
            self._dead = True
            transport.close()
            return
        transport.write(data)
        if served is not None:
            self._gateway.records.add_served(served)
        if close:
            self._dead = True
            transport.close()

    def _end_with(self, data: bytes) -> None:
        transport = self._transport
        self._dead = True
        if transport is not None:
            transport.write(data)
            transport.close()

    def _abort_with_rst(self, transport: asyncio.Transport) -> None:
        self._dead = True
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # The peer may be gone already; abort() closes the socket anyway.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        transport.abort()

    def close(self) -> None:
        """Close at shutdown, dropping anything still queued."""
        self._dead = True
        if self._transport is not None:
            self._transport.abort()
