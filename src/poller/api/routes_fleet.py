"""``GET /api/fleet``: the fleet snapshot as JSON (what ``poller check`` reads)."""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web

from poller.api.auth import Access, requires
from poller.api.errors import json_response
from poller.api.keys import VIEW
from poller.api.view import FleetSnapshot

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
    return json_response(fleet_json(request.app[VIEW].fleet()))
