"""HTTP response bytes with status line and headers built once per shape.

A :class:`Form` is a whole response as one ``%``-template: the head, the
length still to fill in and a body with ``%s`` where the values go; the
gateway renders its usual answers from forms with one formatting call.

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


class Form:
    """A response with a body template: ``render(values)`` formats them in.

    ``body`` is the template: ``%s`` where each value goes and no other
    ``%`` (the static text of every answer is free of it), so the
    Content-Length is the template's fixed text plus the values' lengths.
    """

    __slots__ = ("_body", "_fixed", "_template")

    def __init__(self, status: int, content_type: bytes, body: bytes, legacy: bool,
                 close: bool) -> None:
        markers = body.count(b"%s")
        if body.count(b"%") != markers:
            raise ValueError("a form's body has no '%' but its %s markers")
        self._body = body
        self._fixed = len(body) - 2 * markers
        self._template = b"%s%%d\r\n\r\n%s" % (_head(status, content_type, legacy, close), body)

    def render(self, values: tuple[bytes, ...]) -> bytes:
        """The response with ``values`` in the body's markers, in order."""
        length = self._fixed
        for value in values:
            length += len(value)
        return self._template % (length, *values)

    def body(self, values: tuple[bytes, ...]) -> bytes:
        """The body alone, with ``values`` in its markers."""
        return self._body % values
