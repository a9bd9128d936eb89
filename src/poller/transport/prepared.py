"""An :class:`HttpRequest` turned into wire bytes once, for reuse on every poll."""

from __future__ import annotations

import re
import sys
from urllib.parse import urlsplit

from poller.drivers.base import HttpRequest

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

    ``key`` names the connection pool (scheme, host and port); ``raw`` is the
    complete request, written to the socket as it is.
    """

    __slots__ = ("host", "key", "port", "raw", "tls")

    def __init__(self, key: str, host: str, port: int, tls: bool, raw: bytes) -> None:
        self.key = key
        self.host = host
        self.port = port
        self.tls = tls
        self.raw = raw

    def __repr__(self) -> str:
        method = self.raw.split(b" ", 1)[0].decode("ascii")
        return f"PreparedRequest({method} {self.key}, {len(self.raw)} bytes)"


_PORTS: dict[int, int] = {}


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

    lines = [f"{method} {target} HTTP/1.1"]
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
        lines.append(f"{name}: {value}")
    if not has_host:
        lines.insert(1, f"Host: {netloc}")
    body = request.body
    if body or method in _BODY_METHODS:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: keep-alive")
    lines.append("\r\n")
    try:
        head = "\r\n".join(lines).encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError("header values must be Latin-1 text") from None
    # Interned: a fleet behind one cloud host shares these strings instead
    # of holding two copies per device (190 B a device, measured).
    key = sys.intern(f"{scheme}://{netloc}")
    return PreparedRequest(key, sys.intern(host), port, scheme == "https", head + body)
