"""Unauthenticated operational endpoints: /metrics, /healthz, /readyz.

They need no token so that a scraper or a load balancer can use them; none
returns a secret or device data, only fleet-wide numbers and check results.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
from aiohttp import web
from prometheus_client import CollectorRegistry

from poller.api import metrics
from poller.api.auth import Access, requires
from poller.api.errors import json_response
from poller.api.keys import VIEW
from poller.api.view import ServiceView

routes = web.RouteTableDef()

METRICS_REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)
READY_DB_TIMEOUT_S = 2.0
READY_MAX_INGEST_LAG_S = 30.0


@routes.get("/metrics")
@requires(Access.PUBLIC)
async def get_metrics(request: web.Request) -> web.Response:
    body = metrics.render(request.app[METRICS_REGISTRY])
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})


@routes.get("/healthz")
@requires(Access.PUBLIC)
async def get_healthz(request: web.Request) -> web.Response:
    # Answering at all shows the process is alive; the heartbeat shows the
    # loop is not starved by something that blocks it in between.
    if request.app[VIEW].loop_responsive():
        return json_response({"status": "ok"})
    return json_response({"status": "fail", "failed": ["event_loop"]}, 503)


async def _postgres_check(view: ServiceView) -> tuple[bool, str]:
    try:
        async with asyncio.timeout(READY_DB_TIMEOUT_S), view.db.acquire() as conn:
            await conn.fetchval("SELECT 1")
    except TimeoutError:
        return False, f"no answer to SELECT 1 within {READY_DB_TIMEOUT_S:g} s"
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        return False, f"unreachable ({type(exc).__name__})"
    return True, "SELECT 1 answered"


@routes.get("/readyz")
@requires(Access.PUBLIC)
async def get_readyz(request: web.Request) -> web.Response:
    view = request.app[VIEW]
    snap = view.fleet()
    db_ok, db_detail = await _postgres_check(view)
    lag_ok = snap.ingest_lag_s <= READY_MAX_INGEST_LAG_S
    checks: dict[str, dict[str, Any]] = {
        "postgres": {"ok": db_ok, "detail": db_detail},
        "polling": {"ok": snap.polling,
                    "detail": "polling runs" if snap.polling else "polling is not running"},
        "ingest_lag": {"ok": lag_ok,
                       "detail": f"{snap.ingest_lag_s:.1f} s (limit "
                                 f"{READY_MAX_INGEST_LAG_S:g} s)"},
    }
    failed = [name for name, check in checks.items() if not check["ok"]]
    return json_response({"status": "fail" if failed else "ok", "failed": failed,
                          "checks": checks}, 503 if failed else 200)
