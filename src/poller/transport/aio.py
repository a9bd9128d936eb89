"""The same ``fetch`` interface on aiohttp: for the http-json driver, and the
reference the fast transport is tested against.

aiohttp costs several times the CPU per request of
:class:`~poller.transport.fasthttp.FastHttpClient`, so the EAGLE hot path does
not use it. It sends only the caller's headers (no automatic User-Agent,
Accept, Accept-Encoding or Content-Type) and does not decompress, so both
transports put the same request on the wire and return the same response.
"""

from __future__ import annotations

import socket
import ssl
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from poller.http import HttpRequest, HttpResponse
from poller.netpolicy import AddressNotAllowed, NetPolicy, keep_allowed
from poller.transport.errors import (
    TransportConnectError,
    TransportError,
    TransportProtocolError,
    TransportTimeout,
)

_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
_MAX_JUDGED_URLS = 65_536


class PolicyResolver(AbstractResolver):
    """aiohttp's default resolver, keeping only the addresses ``policy``
    allows: the connector dials nothing else. aiohttp asks it on a new
    connection (or when its DNS cache expires), never per request."""

    def __init__(self, policy: NetPolicy) -> None:
        self._policy = policy
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        policy = self._policy
        refusal = policy.host_refusal(host, port)
        if refusal is not None:
            raise AddressNotAllowed(refusal)
        found = await self._inner.resolve(host, port, family)
        if policy.trusts(host, port):
            return found
        kept = set(keep_allowed(policy, host, [result["host"] for result in found]))
        return [result for result in found if result["host"] in kept]

    async def close(self) -> None:
        await self._inner.close()


class AiohttpClient:
    """HTTP client on an aiohttp ``ClientSession`` with explicit limits.

    >>> client = AiohttpClient(max_connections_per_host=32)
    >>> response = await client.fetch(request, timeout_s=5.0)     # doctest: +SKIP
    >>> await client.close()                                      # doctest: +SKIP

    The session is created by the first request, inside the running loop.
    """

    def __init__(
        self,
        *,
        max_connections_per_host: int = 256,
        max_connections: int = 1024,
        max_body_bytes: int = 1 << 20,
        ssl_context: ssl.SSLContext | None = None,
        dns_cache_ttl_s: int = 300,
        net_policy: NetPolicy | None = None,
    ) -> None:
        for name, value in (
            ("max_connections_per_host", max_connections_per_host),
            ("max_connections", max_connections),
            ("max_body_bytes", max_body_bytes),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        self._per_host = max_connections_per_host
        self._max_open = max_connections
        self._max_body = max_body_bytes
        self._ssl = ssl_context
        self._dns_ttl_s = dns_cache_ttl_s
        # Where connections may go (None: anywhere): names are judged by the
        # resolver, addresses written in a URL (which aiohttp dials without
        # asking it) once per URL in fetch().
        self._policy = net_policy
        self._resolver: PolicyResolver | None = None
        self._judged: dict[str, str] = {}
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}
        self._closed = False

    def _open_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("AiohttpClient is closed")
        if self._policy is not None:
            self._resolver = PolicyResolver(self._policy)
        connector = aiohttp.TCPConnector(
            resolver=self._resolver,
            # aiohttp's default total limit is 100; state ours explicitly.
            limit=self._max_open,
            limit_per_host=self._per_host,
            ttl_dns_cache=self._dns_ttl_s,
            ssl=self._ssl if self._ssl is not None else True,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            auto_decompress=False,
            raise_for_status=False,
        )
        return self._session

    def _timeout(self, timeout_s: float) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get(timeout_s)
        if timeout is None:
            if len(self._timeouts) > 64:
                self._timeouts.clear()
            timeout = self._timeouts[timeout_s] = aiohttp.ClientTimeout(total=timeout_s)
        return timeout

    async def fetch(self, request: HttpRequest, timeout_s: float) -> HttpResponse:
        """Send ``request`` and return the response; raise a TransportError."""
        session = self._session or self._open_session()
        if self._policy is not None:
            refusal = self._judged.get(request.url)
            if refusal is None:
                refusal = self._judge(request.url, self._policy)
            if refusal:
                raise TransportConnectError(f"cannot connect to {_where(request)}: {refusal}")
        try:
            async with session.request(
                request.method,
                request.url,
                headers=list(request.headers),
                data=request.body or None,
                timeout=self._timeout(timeout_s),
                allow_redirects=False,
            ) as resp:
                length = resp.content_length
                if length is not None and length > self._max_body:
                    raise TransportProtocolError(
                        f"response body exceeds {self._max_body} bytes")
                chunks: list[bytes] = []
                size = 0
                async for chunk in resp.content.iter_any():
                    size += len(chunk)
                    if size > self._max_body:
                        raise TransportProtocolError(
                            f"response body exceeds {self._max_body} bytes")
                    chunks.append(chunk)
                headers = tuple(
                    (name.decode("latin-1").lower(), value.decode("latin-1"))
                    for name, value in resp.raw_headers
                )
                return HttpResponse(resp.status, headers, b"".join(chunks))
        except TransportError:
            raise
        except TimeoutError as exc:  # aiohttp's own timeout errors subclass it
            raise TransportTimeout(f"no complete response from {_where(request)} in time") \
                from exc
        except aiohttp.ClientConnectorError as exc:
            raise TransportConnectError(
                f"cannot connect to {_where(request)}: {exc.strerror or exc}") from exc
        except aiohttp.ServerDisconnectedError as exc:
            raise TransportConnectError(
                f"{_where(request)} closed the connection before responding") from exc
        except (aiohttp.ClientPayloadError, aiohttp.ClientResponseError) as exc:
            raise TransportProtocolError(f"malformed response: {exc}") from exc
        except aiohttp.ClientConnectionError as exc:
            raise TransportConnectError(f"connection to {_where(request)} failed: {exc}") \
                from exc
        except aiohttp.ClientError as exc:
            raise TransportProtocolError(f"request failed: {exc}") from exc

    def _judge(self, url: str, policy: NetPolicy) -> str:
        """Why ``url`` may not be fetched as written ("" if nothing is wrong
        yet: a name is judged by the addresses the resolver finds)."""
        parts = urlsplit(url)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:  # aiohttp reports the malformed URL
            port = 0
        refusal = policy.host_refusal(parts.hostname or "", port) or ""
        if len(self._judged) >= _MAX_JUDGED_URLS:
            self._judged.clear()
        self._judged[url] = refusal
        return refusal

    async def close(self) -> None:
        """Close the session and its connections. Idempotent."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        resolver, self._resolver = self._resolver, None
        if resolver is not None:  # the connector closes only a resolver of its own
            await resolver.close()


def _where(request: HttpRequest) -> str:
    url = request.url
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.split('/', 1)[0]}" if sep else url
