"""``GET /api/fleet``: the fleet snapshot as JSON (what ``poller check`` reads);
``GET /api/fleet/demand``: the fleet's demand per minute or more, from ``fleet_1m``."""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web

from poller.api.auth import Access, requires
from poller.api.errors import bad_request, json_response
from poller.api.keys import VIEW
from poller.api.params import check_query, query_int, query_series
from poller.api.routes_devices import device_json
from poller.api.view import FleetSnapshot
from poller.registry import Registry
from poller.rollups.query import fleet_series

routes = web.RouteTableDef()


def fleet_json(snap: FleetSnapshot) -> dict[str, Any]:
    doc = {f.name: getattr(snap, f.name) for f in dataclasses.fields(snap)}
    by_driver: dict[str, dict[str, int]] = {}
    for (driver, outcome), n in snap.polls_by_driver_outcome.items():
        by_driver.setdefault(driver, {})[outcome] = n
    doc["polls_by_driver_outcome"] = by_driver
    return doc


@routes.get("/api/fleet")
@requires(Access.READ)
async def get_fleet(request: web.Request) -> web.Response:
    view = request.app[VIEW]
    doc = fleet_json(view.fleet())
    cluster = getattr(view, "cluster", None)  # poller.cluster.membership.Membership
    doc["cluster"] = cluster.status() if cluster is not None else {"enabled": False}
    return json_response(doc)


@routes.get("/api/fleet/demand")
@requires(Access.READ)
async def get_fleet_demand(request: web.Request) -> web.Response:
    """Total demand and devices by outcome per ``step`` (a multiple of 60 s)."""
    view = request.app[VIEW]
    start, to, step = query_series(request, min_step_s=60)
    if step % 60:
        raise bad_request("query parameter 'step': the fleet's demand is kept per minute; "
                          "expected a multiple of 60", "bad_step")
    async with view.db.acquire() as conn:
        series = await fleet_series(conn, start, to, step)
    return json_response({"from": series.start.isoformat(), "to": series.end.isoformat(),
                          "step_s": step, "level": series.level, "points": series.points})


MOST_FAILING_MAX = 100


@routes.get("/api/fleet/failing")
@requires(Access.READ)
async def get_most_failing(request: web.Request) -> web.Response:
    """The devices failing longest (most failures in a row), most first, with
    their status and last error: what the dashboard's Fleet page lists."""
    check_query(request, frozenset({"limit"}))
    limit = query_int(request, "limit", 10, 1, MOST_FAILING_MAX)
    view = request.app[VIEW]
    ids = view.most_failing(limit)
    async with view.db.acquire() as conn:
        records = {r.id: r for r in await Registry(conn, view.box).by_ids(ids)} if ids else {}
    return json_response({"devices": [device_json(view, records[i]) for i in ids
                                      if i in records]})
