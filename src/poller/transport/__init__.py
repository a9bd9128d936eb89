"""HTTP transports: how a driver's :class:`HttpRequest` reaches a device.

Two implementations of one small :class:`Transport` seam:

- :class:`FastHttpClient` (``fasthttp``): asyncio.Protocol + httptools, for
  the EAGLE polling hot path; also offers a callback API with no task or
  future per request.
- :class:`AiohttpClient` (``aio``): aiohttp, for the general http-json driver
  and as the reference the fast one is tested against.

Both raise only :class:`TransportTimeout`, :class:`TransportConnectError` and
:class:`TransportProtocolError` (all :class:`TransportError`).
"""

from __future__ import annotations

from typing import Protocol

from poller.http import HttpRequest, HttpResponse
from poller.transport.aio import AiohttpClient
from poller.transport.errors import (
    TransportConnectError,
    TransportError,
    TransportPoolFull,
    TransportProtocolError,
    TransportQueueTimeout,
    TransportTimeout,
)
from poller.transport.fasthttp import FastHttpClient, TransportStats
from poller.transport.prepared import PreparedRequest, prepare


class Transport(Protocol):
    """Sends one request and returns its response."""

    async def fetch(self, request: HttpRequest, timeout_s: float) -> HttpResponse:
        """Raise TransportTimeout, TransportConnectError or TransportProtocolError."""
        ...

    async def close(self) -> None: ...


__all__ = [
    "AiohttpClient",
    "FastHttpClient",
    "PreparedRequest",
    "Transport",
    "TransportConnectError",
    "TransportError",
    "TransportPoolFull",
    "TransportProtocolError",
    "TransportQueueTimeout",
    "TransportStats",
    "TransportTimeout",
    "prepare",
]
