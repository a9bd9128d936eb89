"""Bearer-token access control.

Three levels: ``public`` (/metrics, /healthz, /readyz: no secret behind
them), ``read`` and ``write``. The admin token grants both read and write; the
read token grants read. With no token configured at all the API is open, which
:func:`poller.api.app.start_api` allows on loopback only. With only a read
token configured, writes are refused: nobody holds a token that grants them.

Browsers are the other way in: a page on any site can make the browser send a
form POST to 127.0.0.1 (cross-site request forgery), and a name the attacker
controls can be made to resolve to 127.0.0.1 after the page loaded (DNS
rebinding), after which the page reads answers too. So a write must say
``Content-Type: application/json`` (which no form can, and which a browser
sends cross-site only after a CORS preflight this API never grants), and
writes, and every read of an open API, must carry a ``Host`` naming the
address the API is bound to: a rebound name does not.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from poller.api.errors import ApiError, Handler
from poller.config import ApiSettings


class Access(enum.Enum):
    PUBLIC = "public"
    READ = "read"
    WRITE = "write"


ACCESS_KEY = "poller_access"
"""Attribute set on a handler by :func:`requires`."""
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="poller"'}


def requires(access: Access) -> Callable[[Handler], Handler]:
    """Mark a handler with the access level it needs (default: write)."""
    def mark(handler: Handler) -> Handler:
        setattr(handler, ACCESS_KEY, access)
        return handler
    return mark


_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})
_JSON = "application/json"
_BODY_TYPES = frozenset({_JSON, "application/x-ndjson"})
"""What a write may carry: types a browser sends cross-site only after a
CORS preflight (NDJSON: ``POST /api/users:import``)."""
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name in a ``Host`` header, lower case, without port or brackets.

    >>> host_name("Poller.example:8640"), host_name("[::1]:8640"), host_name("127.0.0.1")
    ('poller.example', '::1', '127.0.0.1')
    """
    text = header.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        return text[1:end] if end > 0 else ""
    if text.count(":") == 1:
        text = text.partition(":")[0]
    return text.rstrip(".")


def host_matches(header: str | None, bound_host: str) -> bool:
    """Does ``header`` (the request's Host) name the API bound to ``bound_host``?

    A wildcard bind (0.0.0.0, ::) answers to any name: it needs a token, which
    a browser never attaches by itself. A loopback bind answers to localhost
    and loopback addresses; any other to the configured name or address.

    >>> host_matches("localhost:8640", "127.0.0.1"), host_matches("evil.example", "127.0.0.1")
    (True, False)
    """
    bound = bound_host.strip("[]").lower().rstrip(".")
    if bound in _WILDCARD_HOSTS:
        return True
    if not header:
        return False
    name = host_name(header)
    if name == bound:
        return True
    return is_loopback(bound) and is_loopback(name)


def _access(request: web.Request) -> Access:
    target = getattr(request.match_info.route, "handler", None)
    access: Access = getattr(target, ACCESS_KEY, Access.WRITE)
    return access


def make_origin_middleware(settings: Callable[[], ApiSettings], bound_host: str) -> Middleware:
    """Refuse what only a browser led by another site would send: a write
    without ``Content-Type: application/json`` (415), and a write, or a read of
    an open API, whose ``Host`` does not name ``bound_host`` (421)."""

    @web.middleware
    async def origin_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.match_info.http_exception:
            return await handler(request)
        access = _access(request)
        if access is Access.PUBLIC:
            return await handler(request)
        api = settings()
        if (access is Access.WRITE or not (api.admin_token or api.read_token)) and \
                not host_matches(request.headers.get("Host"), bound_host):
            raise ApiError(421, "misdirected_request", "the Host header does not name this "
                           f"API, which is bound to {bound_host!r}: address it by that name "
                           "(a request for another name is refused as a DNS-rebinding guard)")
        # A write without a body (DELETE) needs no type: a browser sends a
        # DELETE cross-site only after a preflight, which this API never grants.
        if access is Access.WRITE and request.content_type not in _BODY_TYPES and \
                (request.body_exists or request.method in _BODY_METHODS):
            raise ApiError(415, "unsupported_media_type",
                           f"writes take a JSON body with Content-Type: {_JSON}")
        return await handler(request)

    return origin_middleware


def _same(given: bytes, token: str) -> bool:
    return bool(token) and hmac.compare_digest(given, token.encode("utf-8"))


def _bearer(request: web.Request) -> bytes | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip().encode("utf-8", "surrogateescape")


def make_auth_middleware(settings: ApiSettings | Callable[[], ApiSettings]) -> Middleware:
    """``settings`` may be a callable: tokens are then read per request, so a
    configuration reload (SIGHUP) changes them without a restart."""
    current = settings if callable(settings) else (lambda: settings)

    @web.middleware
    async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        api = current()
        admin, reader = api.admin_token, api.read_token
        open_api = not (admin or reader)
        # Unmatched routes fall through to the router's 404/405 (as JSON).
        access = _access(request)
        if access is Access.PUBLIC or open_api or request.match_info.http_exception:
            return await handler(request)
        given = _bearer(request)
        if given is None:
            raise ApiError(401, "unauthorized", "a bearer token is required "
                           "(Authorization: Bearer <token>)", _CHALLENGE)
        is_admin = _same(given, admin)
        is_reader = _same(given, reader)
        if not (is_admin or is_reader):
            raise ApiError(401, "unauthorized", "the bearer token is not valid", _CHALLENGE)
        if access is Access.WRITE and not is_admin:
            raise ApiError(403, "forbidden", "this token may only read; writes need the "
                           "admin token" + ("" if admin else " (none is configured: set "
                                            "api.admin_token)"))
        return await handler(request)

    return auth_middleware
