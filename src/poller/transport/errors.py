"""The three ways an HTTP exchange can fail, shared by every transport.

Drivers and the polling loop map them onto :class:`~poller.drivers.base.Outcome`
without knowing which transport produced them.
"""

from __future__ import annotations


class TransportError(Exception):
    """Base of every transport failure; ``str()`` is a short message."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"


class TransportTimeout(TransportError):
    """The request deadline (connect + send + receive) passed."""


class TransportQueueTimeout(TransportTimeout):
    """The deadline passed while the request still waited for a connection of
    ours: nothing was sent, the device is not at fault (we are overloaded)."""


class TransportConnectError(TransportError):
    """No usable connection: refused, unreachable, DNS, TLS handshake, or the
    server closed the connection before sending any byte of the response."""


class TransportPoolFull(TransportQueueTimeout):
    """Every connection is busy and the bounded queue of waiters is full:
    nothing was sent, and like a wait that ran out it is our overload, not
    the device's fault."""


class TransportProtocolError(TransportError):
    """The response was malformed, cut short or larger than allowed."""
