"""One keep-alive HTTP/1.1 client connection: an asyncio.Protocol that sends a
prepared request and parses the answer with httptools.

The connection holds the state of at most one exchange in its own slots, so
a request on an idle connection allocates nothing here but the response.
Deadlines are not one loop timer per request (uvloop allocates, arms, stops
and closes a libuv timer for each, a measurable share of a request): the
connection keeps its exchange's ``deadline`` and the owner sweeps its open
connections a few times a second for those past it. Its owner (the client's
pool) decides what happens to the connection after the exchange; the
connection only reports.

A missed deadline fails the exchange at once but need not cost the
connection: :meth:`HttpConnection.expire` may keep it open for a grace
period to read the late answer, which is then dropped, and the connection
goes back to its pool as after any complete answer (HTTP/1.1 allows it: the
stream is in step once the answer is read whole). Under overload most
deadlines are missed by the poller's own delay, with the answer already on
its way; closing each such connection turned every missed deadline into a
reconnect, which costs more than the poll (a reconnect storm).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast, overload

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpResponseParser,
)

from poller.http import HttpResponse
from poller.transport.errors import (
    TransportConnectError,
    TransportError,
    TransportProtocolError,
    TransportTimeout,
)
from poller.transport.prepared import PreparedRequest

OnDone = Callable[[HttpResponse | BaseException], None]

_FRAMING_HEADERS = (b"content-length", b"transfer-encoding")
_new_tuple = tuple.__new__  # NamedTuple(...) runs a Python-level __new__


class ResponseHeaders(Sequence[tuple[str, str]]):
    """A response's headers as received, decoded when read.

    No poll reads them (the drivers look at the status and the body), and
    decoding and lower-casing each one as it arrived was a measurable cost
    per response (on the simulator's answers): the pairs are kept as bytes
    and turned into ``(lower-cased name, value)`` on access."""

    __slots__ = ("_raw",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._raw = raw

    def __len__(self) -> int:
        return len(self._raw)

    @overload
    def __getitem__(self, index: int) -> tuple[str, str]: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[tuple[str, str], ...]: ...

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return tuple(_decoded(pair) for pair in self._raw[index])
        return _decoded(self._raw[index])

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"ResponseHeaders({list(self)!r})"


def _decoded(pair: tuple[bytes, bytes]) -> tuple[str, str]:
    return pair[0].decode("latin-1").lower(), pair[1].decode("latin-1")


_DETACHED = HttpResponseParser(object())
"""The parser of a lost connection: it refers to no protocol."""


def _late(result: HttpResponse | BaseException) -> None:
    """Where the late answer of an exchange that timed out goes: nowhere."""


class ConnectionOwner(Protocol):
    """What a connection calls back into: the client that pools it."""

    def deliver(self, on_done: OnDone, result: HttpResponse | BaseException) -> None: ...

    def release(self, conn: HttpConnection, reusable: bool) -> None: ...

    def discard(self, conn: HttpConnection) -> None: ...

    def retry(self, conn: HttpConnection, prepared: PreparedRequest, headers: bytes,
              deadline: float, on_done: OnDone) -> None: ...


class HttpConnection(asyncio.Protocol):
    """A pooled connection to ``pool_key``; see the module docstring."""

    __slots__ = (
        "_body",
        "_body_len",
        "_complete",
        "_extra",
        "_got_bytes",
        "_head_len",
        "_headers",
        "_headers_done",
        "_keep_alive",
        "_max_body",
        "_max_head",
        "_on_done",
        "_owner",
        "_parser",
        "_prepared",
        "_sent_headers",
        "_status",
        "dead",
        "deadline",
        "pool_key",
        "transport",
        "used",
    )

    def __init__(
        self,
        owner: ConnectionOwner,
        pool_key: str,
        max_body_bytes: int,
        max_head_bytes: int,
    ) -> None:
        self._owner = owner
        self.pool_key = pool_key
        self._max_body = max_body_bytes
        self._max_head = max_head_bytes
        self._parser = HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.dead = False
        self.used = 0
        """Responses completed on this connection."""
        self._on_done: OnDone | None = None
        self._prepared: PreparedRequest | None = None
        self._sent_headers = b""
        self.deadline = math.inf
        """Monotonic instant (the owner's clock) by which the exchange must end
        (or, once it timed out, by which its late answer must have been read);
        inf when idle."""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        self._status = 0
        self._headers.clear()
        self._body.clear()
        self._body_len = 0
        self._head_len = 0
        self._headers_done = False
        self._complete = False
        self._extra = False
        self._got_bytes = False
        self._keep_alive = False

    # -- driven by the owner -------------------------------------------------

    def send(self, prepared: PreparedRequest, headers: bytes, deadline: float,
             on_done: OnDone) -> None:
        """Start one exchange of ``prepared`` with ``headers`` as its own
        header lines; ``on_done`` gets the response or the error."""
        self._reset_exchange()
        self._prepared = prepared
        self._sent_headers = headers
        self._on_done = on_done
        self.deadline = deadline
        transport = self.transport
        assert transport is not None  # only open connections are handed out
        transport.write(prepared.start + headers + prepared.end)

    def abort(self) -> None:
        """Drop the socket now; any exchange is failed by the owner first."""
        transport = self.transport
        if transport is not None:
            transport.abort()

    def fail(self, exc: TransportError) -> None:
        """End the current exchange with ``exc`` and give up the connection."""
        on_done = self._on_done
        if on_done is None:
            return
        self._end_exchange()
        self._owner.discard(self)
        if on_done is not _late:  # a late answer's exchange ended already
            self._owner.deliver(on_done, exc)

    @property
    def busy(self) -> bool:
        return self._on_done is not None

    @property
    def draining(self) -> bool:
        """The exchange timed out and the connection waits to read its late
        answer (see :meth:`expire`)."""
        return self._on_done is _late

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        if self.dead:  # the connect was abandoned while it completed
            self.transport.abort()
            self.detach()  # uvloop may not call connection_lost for it

    def data_received(self, data: bytes) -> None:
        if self._on_done is None:
            # Bytes nobody asked for: the stream is out of step, never reuse it.
            self._owner.discard(self)
            return
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, TransportError):
                self.fail(cause)
            else:
                self.fail(TransportProtocolError(f"malformed response: {exc}"))
            return
        except HttpParserError as exc:
            if self._complete:
                # Garbage after a complete answer: keep the answer, drop the connection.
                self._extra = True
                self._finish()
            else:
                self.fail(TransportProtocolError(f"malformed response: {exc}"))
            return
        except HttpParserUpgrade:
            self.fail(TransportProtocolError("unexpected protocol upgrade"))
            return
        if self._complete:
            self._finish()
        elif not self._headers_done:
            self._head_len += len(data)
            if self._head_len > self._max_head:
                self.fail(TransportProtocolError(
                    f"response head exceeds {self._max_head} bytes"))

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost finishes the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._lost(exc)
        finally:
            self.detach()

    def detach(self) -> None:
        """Drop the parser and the transport, which refer back to this
        protocol: left in place, every closed (or never opened) connection was
        a reference cycle of a dozen objects only the cyclic GC could free,
        thousands a second with HTTP/1.0 or offline devices, or under
        overload. For a connection that is lost or will never be used."""
        self._parser = _DETACHED
        self.transport = None

    def _lost(self, exc: Exception | None) -> None:
        on_done = self._on_done
        if on_done is None or on_done is _late:
            # Idle, or the exchange was failed already (a timeout) and its
            # late answer is not worth a retry.
            self._end_exchange()
            self._owner.discard(self)
            return
        if self._headers_done and exc is None and not self._framed():
            # HTTP/1.0 or Connection: close without a length: the body ends here.
            self._keep_alive = False
            self._finish()
            return
        prepared = self._prepared
        assert prepared is not None
        deadline = self.deadline
        self._end_exchange()
        if not self._got_bytes and self.used > 0:
            # A reused connection the server closed while idle, before we could
            # notice: nothing of the answer arrived, so the server did not act
            # on this request; our requests are idempotent reads, so one retry
            # on a fresh connection is safe.
            self._owner.retry(self, prepared, self._sent_headers, deadline, on_done)
            return
        self._owner.discard(self)
        where = prepared.key
        if not self._got_bytes:
            err: TransportError = TransportConnectError(
                f"{where} closed the connection before responding")
        else:
            err = TransportProtocolError(f"{where} closed the connection mid-response")
        self._owner.deliver(on_done, err)

    # -- httptools callbacks -------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            self._extra = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        size = self._body_len + len(body)
        if size > self._max_body:
            raise TransportProtocolError(f"response body exceeds {self._max_body} bytes")
        self._body_len = size
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._status < 200:
            # 1xx interim answer: the real one follows on the same stream.
            self._headers.clear()
            self._headers_done = False
            return
        if not self._complete:
            self._complete = True
            self._keep_alive = self._parser.should_keep_alive()

    # -- internals -----------------------------------------------------------

    def _framed(self) -> bool:
        return any(name.lower() in _FRAMING_HEADERS for name, _ in self._headers)

    def _end_exchange(self) -> None:
        self._on_done = None
        self._prepared = None
        self.deadline = math.inf

    def _finish(self) -> None:
        on_done = self._on_done
        assert on_done is not None
        chunks = self._body
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        response = _new_tuple(HttpResponse, (self._status, ResponseHeaders(self._headers), body))
        self._headers = []  # handed to the response
        reusable = self._keep_alive and not self._extra
        self._end_exchange()
        self.used += 1
        # Hand the connection back before the callback runs, so a callback
        # that starts the next request can reuse it at once.
        self._owner.release(self, reusable)
        if on_done is not _late:  # a late answer: its exchange ended already
            self._owner.deliver(on_done, response)

    def expire(self, keep_until: float | None = None) -> bool:
        """The exchange's deadline has passed (the owner's sweep says so): fail
        it with :class:`TransportTimeout`. With ``keep_until`` (an instant on
        the owner's clock) the connection stays open until then to read the
        late answer and be reused; without it, or if this is the late answer's
        deadline passing, the connection is given up. True if it was kept."""
        prepared = self._prepared
        if prepared is None:
            return False
        on_done = self._on_done
        if keep_until is None or on_done is _late or on_done is None:
            self.fail(TransportTimeout(f"no complete response from {prepared.key} in time"))
            return False
        self._on_done = _late
        self.deadline = keep_until
        self._owner.deliver(on_done, TransportTimeout(
            f"no complete response from {prepared.key} in time"))
        return True
