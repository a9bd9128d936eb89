"""HTTP response bytes with status line and headers built once per shape.

A "legacy" answer imitates the old cloud front end: ``HTTP/1.0``,
``Content-Type: text/html; charset=UTF-8`` whatever the body, and
``Connection: close`` (the connection is closed after it).
"""

from __future__ import annotations

from http import HTTPStatus

XML = b"text/xml"
JSON = b"application/json"
TEXT = b"text/plain"
HTML = b"text/html"
_LEGACY_TYPE = b"text/html; charset=UTF-8"

_heads: dict[tuple[int, bytes, bool, bool], bytes] = {}


def _head(status: int, content_type: bytes, legacy: bool, close: bool) -> bytes:
    key = (status, content_type, legacy, close)
    head = _heads.get(key)
    if head is None:
        reason = HTTPStatus(status).phrase.encode()
        version = b"HTTP/1.0" if legacy else b"HTTP/1.1"
        lines = [b"%s %d %s" % (version, status, reason), b"Server: poller-sim"]
        lines.append(b"Content-Type: " + (_LEGACY_TYPE if legacy else content_type))
        if status == 401:
            lines.append(b'WWW-Authenticate: Basic realm="EAGLE"')
        if legacy or close:
            lines.append(b"Connection: close")
        lines.append(b"Content-Length: ")
        head = _heads[key] = b"\r\n".join(lines)
    return head


def build(status: int, content_type: bytes, body: bytes, legacy: bool, close: bool) -> bytes:
    """One complete response, ready for a single ``transport.write``."""
    return b"%s%d\r\n\r\n%s" % (_head(status, content_type, legacy, close), len(body), body)
