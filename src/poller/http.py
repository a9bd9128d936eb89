"""An HTTP request and its response as plain values.

Drivers build requests and read responses without doing any I/O; transports
(:mod:`poller.transport`) send the one and return the other. Both sides share
these two types from here, so neither depends on the other to name them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One HTTP request, complete; transports send it as it is."""

    method: str
    url: str
    """Absolute URL: scheme, host, optional port, path and query."""
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""


class HttpResponse(NamedTuple):
    status: int
    headers: Sequence[tuple[str, str]]
    """Header names lower-cased, in the order received."""
    body: bytes
