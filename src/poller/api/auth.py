"""Bearer-token access control.

Three levels: ``public`` (/metrics, /healthz, /readyz: no secret behind
them), ``read`` and ``write``. The admin token grants both read and write; the
read token grants read. With no token configured at all the API is open, which
:func:`poller.api.app.start_api` allows on loopback only. With only a read
token configured, writes are refused: nobody holds a token that grants them.
"""

from __future__ import annotations

import enum
import hmac
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
        route = request.match_info.route
        # Unmatched routes fall through to the router's 404/405 (as JSON).
        target = getattr(route, "handler", None)
        access = getattr(target, ACCESS_KEY, Access.WRITE)
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
