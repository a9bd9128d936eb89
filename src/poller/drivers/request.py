"""Validation of what a driver puts into a request, done once per session.

Transports send an HttpRequest as it is, so anything from the registry that
ends up in a URL or a header is checked here: no CR/LF header injection, no
characters a header cannot carry, absolute http(s) URLs only.
"""

from __future__ import annotations

import re
import sys
from urllib.parse import urlsplit

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_URL_FORBIDDEN = re.compile(r"[\x00-\x20\x7f]")


def header_value(label: str, value: str, *, required: bool = True) -> str:
    """``value`` if it can go into an HTTP header as it is; ValueError
    naming ``label`` (never echoing the value: it may be a secret)."""
    if required and not value:
        raise ValueError(f"{label} is required")
    if _CONTROL.search(value):
        raise ValueError(f"{label} contains control characters")
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"{label} contains characters an HTTP header cannot carry") from None
    return value


def base_url(url: str, label: str) -> str:
    """An absolute http(s) URL without its trailing slashes."""
    if _URL_FORBIDDEN.search(url):
        raise ValueError(f"{label} contains blanks or control characters")
    # The URL is never echoed: its user-info part may hold a password.
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        raise ValueError(f"{label} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{label} must be an absolute http:// or https:// URL")
    if parts.fragment:
        raise ValueError(f"{label} must not have a #fragment")
    return url.rstrip("/")


def endpoint_url(base: str, path: str, label: str) -> str:
    """``base`` + ``path``, unless ``base`` already ends with ``path``.

    Interned: devices behind one endpoint share the string."""
    base = base_url(base, label)
    if urlsplit(base).query:
        raise ValueError(f"{label} must not have a query; it is a base URL")
    return sys.intern(base if base.endswith(path) else base + path)
