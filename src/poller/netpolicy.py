"""Which addresses a device URL may reach: the guard against server-side
request forgery (a "device" at the cloud metadata service, Redis on loopback).

Two CIDR lists from the configuration decide: ``polling.denied_networks``
(by default loopback, link-local, the unspecified address, multicast and
the cloud metadata addresses) and ``polling.allowed_networks`` (empty by
default: anything not denied). The most specific network that contains an
address decides; a network listed in both lists allows, so listing
``127.0.0.0/8`` in ``allowed_networks`` re-admits loopback (the simulator,
the tests). When ``allowed_networks`` is set it is also an allow-list: an
address in neither list is refused.

    >>> policy = NetPolicy.from_lists(allowed=(), denied=DEFAULT_DENIED_NETWORKS)
    >>> policy.address_refusal(ipaddress.ip_address("169.254.169.254"))
    'address 169.254.169.254 is not allowed by polling.denied_networks (169.254.0.0/16)'
    >>> policy.address_refusal(ipaddress.ip_address("192.168.1.50")) is None
    True
    >>> lab = NetPolicy.from_lists(allowed=LOOPBACK_NETWORKS, denied=DEFAULT_DENIED_NETWORKS)
    >>> lab.address_refusal(ipaddress.ip_address("127.0.0.1")) is None
    True
    >>> lab.address_refusal(ipaddress.ip_address("192.168.1.50"))
    'address 192.168.1.50 is not in polling.allowed_networks'

An IPv4-mapped IPv6 address is judged as the IPv4 address it carries; host
names that only the metadata service answers to are refused by name; the
legacy numeric forms of IPv4 (``2130706433``, ``0x7f.1``, ``127.1``) that the
C resolver maps onto an address are refused as ambiguous:

    >>> policy.address_refusal(ipaddress.ip_address("::ffff:127.0.0.1"))
    'address 127.0.0.1 (::ffff:7f00:1) is not allowed by polling.denied_networks (127.0.0.0/8)'
    >>> policy.host_refusal("Metadata.Google.Internal.", 80)
    "host 'Metadata.Google.Internal.' is a cloud metadata service"
    >>> policy.host_refusal("0x7f.1", 80)
    "host '0x7f.1' is an ambiguous numeric address: write it as a dotted quad such as 192.0.2.10"

The checks here are pure; :func:`allowed_addresses` resolves a name and keeps
the addresses the policy allows, for the transports to connect to.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from poller.config import PollingSettings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOWED_KEY = "polling.allowed_networks"
DENIED_KEY = "polling.denied_networks"

DEFAULT_DENIED_NETWORKS: tuple[str, ...] = (
    "0.0.0.0/8",           # "this host": Linux connects 0.0.0.0 to the local host
    "127.0.0.0/8",         # loopback: Redis, Postgres, the API itself
    "169.254.0.0/16",      # link-local: the cloud metadata service (169.254.169.254)
    "100.100.100.200/32",  # Alibaba Cloud's metadata service
    "224.0.0.0/4",         # multicast
    "255.255.255.255/32",  # limited broadcast
    "::/128",              # unspecified
    "::1/128",             # loopback
    "fe80::/10",           # link-local
    "fd00:ec2::254/128",   # AWS's metadata service over IPv6
    "ff00::/8",            # multicast
)
LOOPBACK_NETWORKS: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
"""What the simulator, the tests, ``make run`` and ``make bench`` allow."""

METADATA_HOST_NAMES = frozenset({
    "metadata", "metadata.google.internal", "metadata.goog",  # Google Cloud
    "instance-data", "instance-data.ec2.internal",            # AWS
})
"""Names that resolve to a metadata service inside a cloud: refused by name,
whatever they resolve to where the check runs."""


class AddressNotAllowed(OSError):
    """A connect the policy refused; an OSError so that every transport
    reports it as the connect failure it is, with this message."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EACCES, message)


def parse_network(text: str) -> IPNetwork:
    """A CIDR network (or a single address); ValueError with the reason.

    >>> parse_network(" 10.0.0.0/8 ")
    IPv4Network('10.0.0.0/8')
    >>> parse_network("192.0.2.7")
    IPv4Network('192.0.2.7/32')
    >>> parse_network("10.0.0.1/8")
    Traceback (most recent call last):
    ...
    ValueError: 10.0.0.1/8 has host bits set (did you mean 10.0.0.0/8?)
    """
    text = text.strip()
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{text!r} is not a network such as 10.0.0.0/8 or "
                             "fd00::/8") from None
        raise ValueError(f"{text} has host bits set (did you mean {loose}?)") from exc


def literal_address(host: str) -> IPAddress | None:
    """``host`` as an IP address if it is one written in standard form.

    >>> literal_address("::1")
    IPv6Address('::1')
    >>> literal_address("2130706433") is None
    True
    """
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def is_ambiguous_numeric(host: str) -> bool:
    """True for an IPv4 address in a legacy form (decimal, octal, hex, fewer
    than four parts) that ``getaddrinfo`` maps onto an address.

    >>> [is_ambiguous_numeric(h) for h in ("2130706433", "0x7f.1", "010.0.0.1", "10.0.0.1",
    ...                                    "device.lan")]
    [True, True, True, False, False]
    """
    if literal_address(host) is not None:
        return False
    try:
        socket.inet_aton(host)
    except (OSError, ValueError):  # ValueError: an embedded NUL
        return False
    return True


def _longest_match(address: IPAddress, networks: tuple[IPNetwork, ...]) -> IPNetwork | None:
    best: IPNetwork | None = None
    for net in networks:
        if address in net and (best is None or net.prefixlen > best.prefixlen):
            best = net
    return best


@dataclass(frozen=True, slots=True)
class NetPolicy:
    """The allowed and denied networks, and the ``(host, port)`` endpoints the
    operator configured (``polling.cloud_base_url``), which it does not judge."""

    allowed: tuple[IPNetwork, ...]
    denied: tuple[IPNetwork, ...]
    trusted: frozenset[tuple[str, int]] = frozenset()

    @classmethod
    def from_lists(cls, *, allowed: Iterable[str], denied: Iterable[str],
                   trusted: Iterable[tuple[str, int]] = ()) -> NetPolicy:
        return cls(tuple(parse_network(n) for n in allowed),
                   tuple(parse_network(n) for n in denied),
                   frozenset((host.lower(), port) for host, port in trusted))

    @classmethod
    def default(cls) -> NetPolicy:
        """The built-in policy: nothing allowed explicitly, the default denials."""
        return cls.from_lists(allowed=(), denied=DEFAULT_DENIED_NETWORKS)

    @classmethod
    def from_settings(cls, polling: PollingSettings) -> NetPolicy:
        """The configured policy; the cloud API endpoint is the operator's
        choice, not a device's, and is trusted."""
        trusted = []
        parts = urlsplit(polling.cloud_base_url)
        if parts.hostname:
            try:
                port = parts.port or (443 if parts.scheme == "https" else 80)
            except ValueError:  # config validation reports a bad port
                port = 0
            trusted.append((parts.hostname, port))
        return cls.from_lists(allowed=polling.allowed_networks,
                              denied=polling.denied_networks, trusted=trusted)

    def trusts(self, host: str, port: int) -> bool:
        return bool(self.trusted) and (host.lower(), port) in self.trusted

    def address_refusal(self, address: IPAddress) -> str | None:
        """None if a connection to ``address`` is allowed, else why not."""
        judged: IPAddress = address
        shown = str(address)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            # Dialled as IPv6, it reaches the IPv4 address it carries.
            judged = address.ipv4_mapped
            shown = f"{judged} ({address})"
        allow = _longest_match(judged, self.allowed)
        deny = _longest_match(judged, self.denied)
        if deny is not None and (allow is None or allow.prefixlen < deny.prefixlen):
            return f"address {shown} is not allowed by {DENIED_KEY} ({deny})"
        if allow is None and self.allowed:
            return f"address {shown} is not in {ALLOWED_KEY}"
        return None

    def host_refusal(self, host: str, port: int) -> str | None:
        """What can be said of ``host`` without resolving it: None if nothing
        is wrong yet (a name is judged again by the addresses it resolves to)."""
        if self.trusts(host, port):
            return None
        address = literal_address(host)
        if address is not None:
            return self.address_refusal(address)
        if host.lower().rstrip(".") in METADATA_HOST_NAMES:
            return f"host {host!r} is a cloud metadata service"
        if is_ambiguous_numeric(host):
            return (f"host {host!r} is an ambiguous numeric address: write it as a dotted "
                    "quad such as 192.0.2.10")
        return None


async def allowed_addresses(loop: asyncio.AbstractEventLoop, policy: NetPolicy, host: str,
                            port: int) -> list[str]:
    """The addresses of ``host`` that ``policy`` allows, in the resolver's
    order; :class:`AddressNotAllowed` if there is none, ``OSError`` if the
    name does not resolve. For a connect: what it returns is what is dialled."""
    refusal = policy.host_refusal(host, port)
    if refusal is not None:
        raise AddressNotAllowed(refusal)
    if literal_address(host) is not None or policy.trusts(host, port):
        return [host]
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return keep_allowed(policy, host, [str(info[4][0]) for info in infos])


def keep_allowed(policy: NetPolicy, host: str, addresses: Iterable[str]) -> list[str]:
    """The ``addresses`` that ``host`` resolved to which ``policy`` allows, in
    order, each once; :class:`AddressNotAllowed` naming the first refused if
    none is left.

    >>> keep_allowed(NetPolicy.default(), "dual.example", ["127.0.0.1", "192.0.2.8"])
    ['192.0.2.8']
    >>> try:
    ...     keep_allowed(NetPolicy.default(), "localhost", ["127.0.0.1", "::1"])
    ... except AddressNotAllowed as exc:
    ...     print(exc.strerror)                                 # doctest: +ELLIPSIS
    localhost resolved to 127.0.0.1; address 127.0.0.1 is not allowed by ...
    """
    kept: list[str] = []
    first_refusal: str | None = None
    for text in addresses:
        refusal = policy.address_refusal(ipaddress.ip_address(text))
        if refusal is None:
            if text not in kept:
                kept.append(text)
        elif first_refusal is None:
            first_refusal = f"{host} resolved to {text}; {refusal}"
    if not kept:
        raise AddressNotAllowed(first_refusal or f"{host} resolved to no address")
    return kept
