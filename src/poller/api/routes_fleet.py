"""``GET /api/fleet``: the fleet snapshot as JSON (what ``poller check`` reads);
``GET /api/fleet/demand``: the fleet's demand per minute or more, from ``fleet_1m``."""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from poller.api.auth import Access, requires
from poller.api.errors import bad_request, json_response
from poller.api.keys import VIEW
from poller.api.params import check_query, query_int, query_time
from poller.api.view import FleetSnapshot
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


MAX_POINTS = 10_000
MAX_RANGE = timedelta(days=366)


@routes.get("/api/fleet/demand")
@requires(Access.READ)
async def get_fleet_demand(request: web.Request) -> web.Response:
    """Total demand and devices by outcome per ``step`` (a multiple of 60 s)."""
    view = request.app[VIEW]
    check_query(request, frozenset({"from", "to", "step"}))
    now = datetime.now(UTC).replace(microsecond=0)
    to = query_time(request, "to", now)
    start = query_time(request, "from", to - timedelta(days=1))
    step = query_int(request, "step", 60, 60, int(MAX_RANGE.total_seconds()))
    if step % 60:
        raise bad_request("query parameter 'step': the fleet's demand is kept per minute; "
                          "expected a multiple of 60", "bad_step")
    if start >= to:
        raise bad_request("'from' must be before 'to'", "bad_range")
    if to - start > MAX_RANGE:
        raise bad_request("the range from 'from' to 'to' may span at most 366 days",
                          "bad_range")
    points = math.ceil((to - start).total_seconds() / step)
    if points > MAX_POINTS:
        raise bad_request(f"{points} points requested; at most {MAX_POINTS} per request "
                          "(raise 'step' or narrow the range)", "too_many_points")
    async with view.db.acquire() as conn:
        series = await fleet_series(conn, start, to, step)
    return json_response({"from": series.start.isoformat(), "to": series.end.isoformat(),
                          "step_s": step, "level": series.level, "points": series.points})
