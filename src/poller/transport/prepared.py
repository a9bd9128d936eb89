"""An :class:`HttpRequest` turned into wire bytes once, for reuse on every poll."""

from __future__ import annotations

import re
import sys
from urllib.parse import urlsplit

from poller.http import HttpRequest

_DEFAULT_PORTS = {"http": 80, "https": 443}
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Framing belongs to the transport: it always sends its own Content-Length and
# asks for keep-alive, so a caller's copies would only conflict.
_OWNED_HEADERS = frozenset({"content-length", "connection"})
# HEAD answers carry a Content-Length but no body, which the response parser
# cannot be told about; CONNECT and TRACE have no use here.
_UNSUPPORTED_METHODS = frozenset({"HEAD", "CONNECT", "TRACE"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class PreparedRequest:
    """The bytes of one request and where to send them.

    ``key`` names the connection pool (scheme, host and port). The request is
    ``start + headers + end``, written to the socket in one piece: ``start``
    (request line and Host) and ``end`` (framing headers and body) are shared
    by every request to the same place with the same body, so a fleet polling
    one cloud keeps only its own headers per device (the rest, most of a
    request, once), for one concatenation per send.
    """

    __slots__ = ("end", "headers", "host", "key", "port", "start", "tls")

    def __init__(self, key: str, host: str, port: int, tls: bool, start: bytes, headers: bytes,
                 end: bytes) -> None:
        self.key = key
        self.host = host
        self.port = port
        self.tls = tls
        self.start = start
        self.headers = headers
        self.end = end

    @property
    def raw(self) -> bytes:
        """The whole request."""
        return self.start + self.headers + self.end

    def __repr__(self) -> str:
        method = self.raw.split(b" ", 1)[0].decode("ascii")
        return f"PreparedRequest({method} {self.key}, {len(self.raw)} bytes)"


_PORTS: dict[int, int] = {}
_SHARED: dict[bytes, bytes] = {}
_SHARED_MAX = 4096
"""Distinct shared parts remembered; past it the memo starts afresh (parts
already handed out stay shared), so devices with their own URLs and bodies
cannot grow it without bound."""


def _shared(part: bytes) -> bytes:
    """One object for equal request parts (``sys.intern`` for bytes)."""
    found = _SHARED.get(part)
    if found is None:
        if len(_SHARED) >= _SHARED_MAX:
            _SHARED.clear()
        found = _SHARED[part] = part
    return found


def prepare(request: HttpRequest) -> PreparedRequest:
    """Serialise ``request`` to HTTP/1.1 bytes; raise ValueError if it cannot be sent.

    Adds ``Host`` (unless given), ``Content-Length`` (for a body or a
    POST/PUT/PATCH) and ``Connection: keep-alive``; drops the caller's
    ``Content-Length`` and ``Connection``; rejects ``Transfer-Encoding``.

    >>> p = prepare(HttpRequest("GET", "http://10.0.0.5:8080/cgi?x=1", ()))
    >>> p.raw
    b'GET /cgi?x=1 HTTP/1.1\\r\\nHost: 10.0.0.5:8080\\r\\nConnection: keep-alive\\r\\n\\r\\n'
    """
    method = request.method
    if not _TOKEN.fullmatch(method) or method != method.upper():
        raise ValueError(f"invalid HTTP method {method!r}")
    if method in _UNSUPPORTED_METHODS:
        raise ValueError(f"HTTP method {method} is not supported by this transport")
    parts = urlsplit(request.url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"unsupported URL scheme {parts.scheme!r} (http or https)")
    host = parts.hostname
    if not host:
        raise ValueError("URL has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in the URL are not supported; send a header")
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError as exc:
        raise ValueError(f"invalid port in URL: {exc}") from None
    port = _PORTS.setdefault(port, port)  # one int object per port, not per device
    target = parts.path or "/"
    if parts.query:
        target = f"{target}?{parts.query}"
    if not target.isascii() or any(c in target for c in " \r\n\t"):
        raise ValueError("URL path and query must be ASCII without spaces (percent-encode)")
    netloc = f"[{host}]" if ":" in host else host
    if port != _DEFAULT_PORTS[scheme]:
        netloc = f"{netloc}:{port}"

    start = [f"{method} {target} HTTP/1.1"]
    lines: list[str] = []
    has_host = False
    for name, value in request.headers:
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"invalid header name {name!r}")
        if "\r" in value or "\n" in value:
            raise ValueError(f"header {name} has a line break in its value")
        lower = name.lower()
        if lower == "transfer-encoding":
            raise ValueError("Transfer-Encoding is not supported; bodies are sent whole")
        if lower in _OWNED_HEADERS:
            continue
        has_host = has_host or lower == "host"
        lines.append(f"{name}: {value}\r\n")
    if not has_host:
        start.append(f"Host: {netloc}")
    body = request.body
    end = []
    if body or method in _BODY_METHODS:
        end.append(f"Content-Length: {len(body)}")
    end.append("Connection: keep-alive\r\n\r\n")
    try:
        head = ("\r\n".join(start) + "\r\n").encode("latin-1")
        own = "".join(lines).encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError("header values must be Latin-1 text") from None
    # Interned: a fleet behind one cloud host shares these strings instead
    # of holding two copies per device (190 B a device, measured).
    key = sys.intern(f"{scheme}://{netloc}")
    return PreparedRequest(key, sys.intern(host), port, scheme == "https", _shared(head), own,
                           _shared("\r\n".join(end).encode("ascii") + body))
