"""The API's aiohttp application: factory, start and stop.

The API runs in the service's own event loop. ``start_api`` binds and returns
the port actually bound (0 picks a free one); ``stop_api`` is idempotent.
"""

from __future__ import annotations

from aiohttp import web

from poller.api import (
    metrics,
    openapi,
    routes_archive,
    routes_devices,
    routes_event,
    routes_fleet,
    routes_health,
    routes_import,
    routes_ui,
)
from poller.api.auth import (
    Access,
    is_loopback,
    make_auth_middleware,
    make_origin_middleware,
    requires,
)
from poller.api.errors import error_middleware, json_response
from poller.api.keys import VIEW
from poller.api.view import ServiceView
from poller.config import ApiSettings
from poller.errors import ConfigError

MAX_BODY_BYTES = 64 * 1024
SHUTDOWN_TIMEOUT_S = 5.0
OPENAPI_DOC = web.AppKey("openapi_doc", dict)


@requires(Access.READ)
async def get_openapi(request: web.Request) -> web.Response:
    return json_response(request.app[OPENAPI_DOC])


def make_app(view: ServiceView, bound_host: str | None = None) -> web.Application:
    """The application, without binding anything (tests use it directly).

    ``bound_host``: the address the API listens on, which writes (and reads of
    an open API) must name in their Host header; default ``api.host``."""
    def api() -> ApiSettings:
        return view.settings.api

    host = api().host if bound_host is None else bound_host
    app = web.Application(
        # Origin before auth: a request a browser was led to send is refused
        # before it can learn anything, even whether a token is needed.
        middlewares=[error_middleware, make_origin_middleware(api, host),
                     make_auth_middleware(api)],
        client_max_size=MAX_BODY_BYTES,
    )
    app[VIEW] = view
    app[routes_devices.LISTING_COST] = routes_devices.ListingCost()
    app[OPENAPI_DOC] = openapi.document()
    app[routes_health.METRICS_REGISTRY] = metrics.make_registry(view)
    app[routes_ui.STATIC] = routes_ui.load_static()
    for module in (routes_event, routes_devices, routes_fleet, routes_health, routes_ui,
                   routes_import, routes_archive):
        app.add_routes(module.routes)
    app.router.add_get("/api/openapi.json", get_openapi)
    return app


def check_exposure(api: ApiSettings, host: str) -> None:
    """Refuse (ConfigError) an API on a non-loopback ``host`` with no token:
    an open API lets anyone who reaches it register devices. The configuration
    refuses such a file or environment; this holds at bind time and on a
    reload (SIGHUP), which changes the tokens at once but the address only at
    a restart: a new file naming loopback and no token must not open the
    public address still bound."""
    if not (api.admin_token or api.read_token) and not is_loopback(host):
        raise ConfigError("api.host", "with no api.admin_token or api.read_token the API "
                          f"binds only to loopback (127.0.0.1, ::1), got {host!r}")


async def start_api(view: ServiceView, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Bind the API; returns the runner (for :func:`stop_api`) and the bound port.

    Refuses a non-loopback ``host`` when no token is configured: an open API
    lets anyone register devices."""
    check_exposure(view.settings.api, host)
    runner = web.AppRunner(make_app(view, host), access_log=None,
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
