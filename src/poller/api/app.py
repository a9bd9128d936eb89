"""The API's aiohttp application: factory, start and stop.

The API runs in the service's own event loop. ``start_api`` binds and returns
the port actually bound (0 picks a free one); ``stop_api`` is idempotent.
"""

from __future__ import annotations

import ipaddress

from aiohttp import web

from poller.api import metrics, openapi, routes_devices, routes_event, routes_fleet, routes_health
from poller.api.auth import Access, make_auth_middleware, requires
from poller.api.errors import error_middleware, json_response
from poller.api.keys import VIEW
from poller.api.view import ServiceView
from poller.errors import ConfigError

MAX_BODY_BYTES = 64 * 1024
SHUTDOWN_TIMEOUT_S = 5.0
OPENAPI_DOC = web.AppKey("openapi_doc", dict)


@requires(Access.READ)
async def get_openapi(request: web.Request) -> web.Response:
    return json_response(request.app[OPENAPI_DOC])


def make_app(view: ServiceView) -> web.Application:
    """The application, without binding anything (tests use it directly)."""
    app = web.Application(
        middlewares=[error_middleware, make_auth_middleware(lambda: view.settings.api)],
        client_max_size=MAX_BODY_BYTES,
    )
    app[VIEW] = view
    app[OPENAPI_DOC] = openapi.document()
    app[routes_health.METRICS_REGISTRY] = metrics.make_registry(view)
    for module in (routes_event, routes_devices, routes_fleet, routes_health):
        app.add_routes(module.routes)
    app.router.add_get("/api/openapi.json", get_openapi)
    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def start_api(view: ServiceView, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Bind the API; returns the runner (for :func:`stop_api`) and the bound port.

    Refuses a non-loopback ``host`` when no token is configured: an open API
    lets anyone register devices."""
    api = view.settings.api
    if not (api.admin_token or api.read_token) and not is_loopback(host):
        raise ConfigError("api.host", "with no api.admin_token or api.read_token the API "
                          f"binds only to loopback (127.0.0.1, ::1), got {host!r}")
    runner = web.AppRunner(make_app(view), access_log=None,
                           shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    bound = port
    for address in runner.addresses:
        if isinstance(address, tuple):
            bound = int(address[1])
            break
    return runner, bound


async def stop_api(runner: web.AppRunner) -> None:
    """Stop accepting, finish requests in flight (bounded), close. Idempotent."""
    await runner.cleanup()
