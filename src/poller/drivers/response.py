"""Checks every driver makes on a device's HTTP answer before reading it.

The rules: a failure message is short (a device's body is never echoed and
never carries a secret), bodies are size-capped, and XML is parsed by
``defusedxml``, which refuses a DTD or an entity declaration in whatever
encoding the body declares, so entity tricks (billion laughs, external
entities) cannot run.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from poller.drivers.base import Outcome, PollFailure
from poller.http import HttpResponse

MAX_BODY_BYTES = 1 << 20
MAX_MESSAGE_CHARS = 200
_EXCERPT_CHARS = 80
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")


def failure(outcome: Outcome, message: str) -> PollFailure:
    """A PollFailure whose message is capped at MAX_MESSAGE_CHARS."""
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 3] + "..."
    return PollFailure(outcome, message)


def unparseable(message: str) -> PollFailure:
    return failure(Outcome.UNPARSEABLE, message)


def excerpt(text: str, secret: str) -> str:
    """A device-supplied string fit for a message: printable ASCII, short,
    and with ``secret`` blanked (an error page may echo the request)."""
    if secret:
        text = text.replace(secret, "***")
    text = _UNPRINTABLE.sub(" ", text).strip()
    if len(text) > _EXCERPT_CHARS:
        text = text[: _EXCERPT_CHARS - 3] + "..."
    return text


def checked_body(response: HttpResponse) -> bytes:
    """The body of a 2xx answer of sane size; PollFailure otherwise."""
    status = response.status
    if not 200 <= status < 300:
        if status in (401, 403):
            raise failure(Outcome.AUTH_REJECTED, f"HTTP {status}")
        raise failure(Outcome.HTTP_ERROR, f"HTTP {status}")
    body = response.body
    if len(body) > MAX_BODY_BYTES:
        raise unparseable(f"body of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
    return body


def parse_xml(body: bytes) -> ET.Element:
    """The root element of ``body``; PollFailure for DTDs or bad XML.

    >>> parse_xml(b"<Device><Name>meter</Name></Device>")[0].text
    'meter'
    >>> parse_xml('<!DOCTYPE d [<!ENTITY a "b">]><d>&a;</d>'.encode("utf-16"))
    Traceback (most recent call last):
    ...
    poller.drivers.base.PollFailure: XML with a DTD or entity declaration is refused
    """
    if b"!" in body or b"?" in body or b"\0" in body:
        # Anything that could declare: a DTD or entity needs "<!" in a body
        # read as UTF-8; another encoding needs an XML declaration ("<?xml")
        # or NUL bytes (UTF-16/32). defusedxml refuses the declarations in
        # any encoding, but its parser runs in Python (measured at more than
        # twice the time for a plain EAGLE-200 answer), so the plain bodies
        # every poll brings, which can hold none of this, take the C parser
        # below. One byte each: a memchr, where searching b"<!" stops at
        # each of a body's many "<".
        try:
            return SafeET.fromstring(body, forbid_dtd=True)
        except DefusedXmlException:
            raise unparseable("XML with a DTD or entity declaration is refused") from None
        except ET.ParseError as exc:
            raise unparseable(f"malformed XML: {exc}") from None
        except (LookupError, ValueError):  # its Python parser's word for an unknown encoding
            raise unparseable("XML in an encoding that cannot be read") from None
    try:
        return ET.fromstring(body)
    except ET.ParseError as exc:
        raise unparseable(f"malformed XML: {exc}") from None


def local_name(tag: str) -> str:
    """Tag without an ``{namespace}`` prefix."""
    return tag.rpartition("}")[2]


def element_text(element: ET.Element) -> str:
    """The text of ``element`` and of its children, stripped. Not deeper:
    ``itertext`` recurses, and a hostile body may nest thousands deep."""
    parts = [element.text or ""]
    parts.extend(child.text or "" for child in element)
    return " ".join(part.strip() for part in parts if part and not part.isspace())
