"""JSON error bodies, and the middleware that guarantees every failure has one.

Every response that is not a success carries ``{"error": {"code", "message"}}``.
Handlers raise :class:`ApiError`; the middleware also turns aiohttp's own
HTTP errors (unknown route, oversized body) and a dependency being down into
that shape. Anything else is a bug: it is logged with its traceback and
answered with a JSON 500 that says nothing about the cause.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson
from aiohttp import web
from redis.exceptions import RedisError

from poller.errors import ConflictError, NotFoundError, UsageError

log = logging.getLogger("poller.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# aiohttp's status -> our error code, for errors raised by the framework itself.
_HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type",
}


class ApiError(Exception):
    """A request the API refuses, with the HTTP status and a stable error code."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.code!r}, {self.message!r})"


def bad_request(message: str, code: str = "bad_request") -> ApiError:
    return ApiError(400, code, message)


def json_response(data: Any, status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    body = orjson.dumps(data, default=str, option=orjson.OPT_NON_STR_KEYS)
    return web.Response(body=body, status=status, content_type="application/json",
                        headers=headers)


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> web.Response:
    return json_response({"error": {"code": code, "message": message}}, status, headers)


def from_domain(exc: UsageError) -> ApiError:
    """Map a registry error to its HTTP form; the message is already user-facing."""
    if isinstance(exc, NotFoundError):
        return ApiError(404, "not_found", str(exc))
    if isinstance(exc, ConflictError):
        return ApiError(409, "conflict", str(exc))
    return ApiError(400, "invalid", str(exc))


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.headers)
    except UsageError as exc:
        api = from_domain(exc)
        return error_response(api.status, api.code, api.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, code, exc.reason, headers)
    except asyncpg.DataError as exc:
        # A value Postgres refuses (out of range, bad encoding) that slipped
        # past our checks: the client's input, not our failure.
        return error_response(400, "invalid", f"value refused by the database: "
                              f"{type(exc).__name__}")
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        log.warning("%s %s: database unavailable (%s)", request.method, request.path,
                    type(exc).__name__)
        return error_response(503, "unavailable", "the database is not reachable; retry later")
    except RedisError as exc:
        log.warning("%s %s: redis unavailable (%s)", request.method, request.path,
                    type(exc).__name__)
        return error_response(503, "unavailable", "live state is not reachable; retry later")
    except Exception:
        # The request path only: the query string may carry anything.
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return error_response(500, "internal", "internal error (logged)")
