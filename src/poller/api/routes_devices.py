"""Device registry endpoints: create/update, remove, list, get, readings."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from redis.exceptions import RedisError

from poller import keys
from poller.api.auth import Access, requires
from poller.api.errors import bad_request, json_response
from poller.api.keys import VIEW
from poller.api.params import (
    MAX_SERIES_POINTS,
    check_query,
    cloud_id,
    json_object,
    query_int,
    query_series,
    typed,
)
from poller.api.view import ServiceView
from poller.db import Conn
from poller.drivers import DRIVERS
from poller.errors import NotFoundError
from poller.netpolicy import NetPolicy
from poller.polling.target import DeviceState
from poller.registry import DeviceRecord, Registry
from poller.rollups.query import device_series, settled_before

routes = web.RouteTableDef()


@dataclass(slots=True)
class ListingCost:
    """What ``GET /api/devices`` did, in total. The work per request is
    counted, not timed, so a test can hold it to the page size: a filter used
    to walk the whole fleet for every row."""

    requests: int = 0
    rows_read: int = 0
    """Registry rows read from Postgres."""


LISTING_COST = web.AppKey("listing_cost", ListingCost)

MAX_POINTS = MAX_SERIES_POINTS
PAGE_DEFAULT, PAGE_MAX = 100, 1000
DEVICE_STATES = ("pending", "ok", "failing", "auth_failed", "stopped", "disabled", "unpolled")
POOL_STATES = frozenset(s.value for s in DeviceState)
"""States the polling pool keeps, indexed; the others only Postgres knows."""
SCAN_ROWS = 5000
"""Registry rows a ``disabled`` or ``unpolled`` page reads at most."""
_YIELD_EVERY = 250
_REDIS_TIMEOUT_S = 1.0
USER_FIELDS = frozenset({"email", "driver", "url", "interval_s", "enabled", "password",
                         "fields", "options"})

_SCAN_SQL = """
SELECT id, enabled FROM devices WHERE removed_at IS NULL AND id > $1 ORDER BY id LIMIT $2
"""
SEARCH_MAX_CHARS = 64
# Search (q: a cloud id prefix or a piece of the email, any case) and driver
# are Postgres predicates; $3/$4 are NULL when not asked for. Without an index
# on lower(email) this reads the table (~100,000 rows in tens of ms), bounded
# by the API pool's statement timeout; a page stays O(limit) in the service.
_MATCH_SQL = """
removed_at IS NULL AND ($3::text IS NULL OR cloud_id ILIKE $3 || '%' ESCAPE '\\'
                        OR email ILIKE '%' || $3 || '%' ESCAPE '\\')
AND ($4::text IS NULL OR driver = $4)
"""
_FIND_SQL = {
    "asc": f"SELECT id FROM devices WHERE id > $1 AND {_MATCH_SQL} ORDER BY id LIMIT $2",
    "desc": f"SELECT id FROM devices WHERE id < $1 AND {_MATCH_SQL} ORDER BY id DESC LIMIT $2",
}
# $2 is unused (always NULL): it keeps the match's parameters at $3 and $4.
_AMONG_SQL = f"SELECT id FROM devices WHERE id = ANY($1::bigint[]) AND $2::int IS NULL " \
    f"AND {_MATCH_SQL} ORDER BY id"
_SCAN_MATCH_SQL = f"SELECT id, enabled FROM devices WHERE id > $1 AND {_MATCH_SQL} " \
    "ORDER BY id LIMIT $2"


def device_json(view: ServiceView, record: DeviceRecord) -> dict[str, Any]:
    """The record (never a secret) with its live status."""
    doc = record.to_json()
    status = view.device_status(record.cloud_id)
    doc["status"] = status
    doc["state"] = _state(record, status)
    return doc


async def with_cluster_status(view: ServiceView, docs: list[dict[str, Any]]) -> None:
    """In a cluster, the status of a device another member polls, from the
    live state every member writes to Redis (``keys.STATE``): one HMGET for
    the lot. Outside a cluster, or with Redis away, the documents stay as
    they are (a device this process does not poll is ``unpolled``)."""
    if getattr(view, "cluster", None) is None or view.redis is None:
        return
    missing = [d for d in docs if d["status"] is None and d["enabled"]]
    if not missing:
        return
    try:
        async with asyncio.timeout(_REDIS_TIMEOUT_S):
            raws = await view.redis.hmget(keys.STATE, [d["cloud_id"] for d in missing])
    except (RedisError, OSError, TimeoutError):
        return
    for doc, raw in zip(missing, raws, strict=True):
        try:
            status = orjson.loads(raw) if raw is not None else None
        except orjson.JSONDecodeError:
            continue
        if isinstance(status, dict):
            doc["status"] = status
            doc["state"] = str(status.get("state", doc["state"]))
            doc["status_source"] = "cluster"


def _state(record: DeviceRecord, status: dict[str, Any] | None) -> str:
    if status is not None and isinstance(status.get("state"), str):
        return str(status["state"])
    return "unpolled" if record.enabled else "disabled"


def _user_request(body: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(body) - USER_FIELDS)
    if unknown:
        raise bad_request(f"unknown field(s): {', '.join(unknown)} (known: "
                          f"{', '.join(sorted(USER_FIELDS))})", "unknown_field")
    out: dict[str, Any] = {
        "email": typed(body, "email", (str,), "a string"),
        "driver": typed(body, "driver", (str,), "a string"),
        "interval_s": typed(body, "interval_s", (int, float), "a number of seconds"),
        "enabled": typed(body, "enabled", (bool,), "true or false"),
        "secret": typed(body, "password", (str,), "a string"),
    }
    url = typed(body, "url", (str,), "a string or null")
    out["url"] = url
    out["clear_url"] = "url" in body and not url
    options = typed(body, "options", (dict,), "an object")
    fields = typed(body, "fields", (dict,), "an object")
    if fields is not None:
        options = {**(options or {}), "fields": fields}
    out["options"] = options
    if out["interval_s"] is not None:
        out["interval_s"] = float(out["interval_s"])
    return out


@routes.post("/api/user/{cloud_id}")
@requires(Access.WRITE)
async def put_user(request: web.Request) -> web.Response:
    view = request.app[VIEW]
    cid = cloud_id(request)
    req = _user_request(await json_object(request))
    async with view.db.acquire() as conn:
        registry = Registry(conn, view.box, NetPolicy.from_settings(view.settings.polling))
        try:
            await registry.get(cid)
        except NotFoundError:
            missing = [name for name, key in (("driver", "driver"), ("password", "secret"))
                       if req[key] is None]
            if missing:
                raise bad_request(f"a new device needs {' and '.join(missing)}",
                                  "missing_field") from None
            record = await registry.add(
                cid, email=req["email"] or "", driver=req["driver"], url=req["url"],
                interval_s=(req["interval_s"] if req["interval_s"] is not None
                            else view.settings.polling.interval_s),
                options=req["options"] or {}, secret=req["secret"],
                enabled=True if req["enabled"] is None else req["enabled"])
            return json_response(device_json(view, record), 201)
        record = await registry.update(
            cid, email=req["email"], driver=req["driver"], url=req["url"] or None,
            clear_url=req["clear_url"], interval_s=req["interval_s"], enabled=req["enabled"],
            options=req["options"], secret=req["secret"])
    return json_response(device_json(view, record))


@routes.delete("/api/user/{cloud_id}")
@requires(Access.WRITE)
async def delete_user(request: web.Request) -> web.Response:
    view = request.app[VIEW]
    cid = cloud_id(request)
    async with view.db.acquire() as conn:
        record = await Registry(conn, view.box).remove(cid)
    return json_response({"removed": record.cloud_id, "id": record.id})


@routes.get("/api/devices")
@requires(Access.READ)
async def list_devices(request: web.Request) -> web.Response:
    """A page of devices in id order. Work per request is bounded whatever the
    fleet: no filter and the pool's states cost O(page) (the pool indexes its
    targets by state), ``disabled`` and ``unpolled`` (known only to Postgres)
    read at most ``SCAN_ROWS`` rows, so their page may hold fewer than
    ``limit`` devices, even none: go on while ``next_after`` is not null."""
    view = request.app[VIEW]
    check_query(request, frozenset({"limit", "after", "state", "q", "driver", "order"}))
    limit = query_int(request, "limit", PAGE_DEFAULT, 1, PAGE_MAX)
    after = query_int(request, "after", 0, 0, 2**63 - 1)
    state = request.query.get("state")
    if state is not None and state not in DEVICE_STATES:
        raise bad_request(f"query parameter 'state': expected one of {', '.join(DEVICE_STATES)}")
    match = _match(request)
    order = request.query.get("order", "asc")
    if order not in _FIND_SQL:
        raise bad_request("query parameter 'order': expected asc or desc (by id)")
    if order == "desc" and state is not None:
        raise bad_request("query parameter 'order': desc is not available with a state "
                          "filter (those pages go up in id)")
    cost = request.app[LISTING_COST]
    cost.requests += 1
    async with view.db.acquire() as conn:
        registry = Registry(conn, view.box)
        if state is None and (match is not None or order == "desc"):
            q, driver = match or (None, None)
            ids = [r["id"] for r in await conn.fetch(
                _FIND_SQL[order], after or (2**63 - 1 if order == "desc" else 0),
                limit + 1, q, driver)]
            more = len(ids) > limit
            del ids[limit:]
            records = await registry.by_ids(ids) if ids else []
            if order == "desc":
                records.reverse()
            cost.rows_read += len(records)
            next_after = ids[-1] if more else None
        elif state is None:
            records = await registry.listing(limit=limit + 1, after_id=after)
            cost.rows_read += len(records)
            more = len(records) > limit
            del records[limit:]
            next_after = records[-1].id if more else None
        elif state in POOL_STATES:
            ids = view.device_ids_in_state(state, after, limit + 1)
            more = len(ids) > limit
            del ids[limit:]
            next_after = ids[-1] if more else None
            if ids and match is not None:
                ids = [r["id"] for r in await conn.fetch(_AMONG_SQL, ids, None, *match)]
            records = await registry.by_ids(ids) if ids else []
            cost.rows_read += len(records)
        else:
            records, next_after = await _scan_unpolled(view, conn, registry, state, after,
                                                       limit, cost, match)
    found = []
    for i, record in enumerate(records):
        doc = device_json(view, record)
        # A device may have changed state while its record was read.
        if state is None or doc["state"] == state:
            found.append(doc)
        if i % _YIELD_EVERY == _YIELD_EVERY - 1:
            await asyncio.sleep(0)  # a page of 1000 is ~10 ms of work: let polls in
    if state is None:  # (a state filter reads this member's own index)
        await with_cluster_status(view, found)
    return json_response({"devices": found, "next_after": next_after})


async def _scan_unpolled(view: ServiceView, conn: Conn, registry: Registry,
                         state: str, after: int, limit: int, cost: ListingCost,
                         match: tuple[str | None, str | None] | None = None,
                         ) -> tuple[list[DeviceRecord], int | None]:
    """``disabled`` or ``unpolled`` devices after ``after``: registered, not in
    the pool, and disabled or not. At most ``SCAN_ROWS`` rows read."""
    want_enabled = state == "unpolled"
    if match is None:
        rows = await conn.fetch(_SCAN_SQL, after, SCAN_ROWS)
    else:
        rows = await conn.fetch(_SCAN_MATCH_SQL, after, SCAN_ROWS, *match)
    cost.rows_read += len(rows)
    ids: list[int] = []
    next_after = None
    for row in rows:
        device_id = row["id"]
        if row["enabled"] is want_enabled and not view.has_status(device_id):
            if len(ids) == limit:
                next_after = ids[-1]
                break
            ids.append(device_id)
    else:
        if len(rows) == SCAN_ROWS:  # the budget ran out: the client goes on from here
            next_after = rows[-1]["id"]
    records = await registry.by_ids(ids) if ids else []
    cost.rows_read += len(records)
    return records, next_after


def _match(request: web.Request) -> tuple[str | None, str | None] | None:
    """``(q, driver)`` of the query, ``q`` escaped for ILIKE; None if neither."""
    q = request.query.get("q")
    driver = request.query.get("driver")
    if q is not None:
        if not 1 <= len(q) <= SEARCH_MAX_CHARS or "\x00" in q:
            raise bad_request(f"query parameter 'q': expected 1 to {SEARCH_MAX_CHARS} "
                              "characters")
        q = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    if driver is not None and driver not in DRIVERS:
        raise bad_request(f"query parameter 'driver': expected one of "
                          f"{', '.join(sorted(DRIVERS))}")
    return None if q is None and driver is None else (q, driver)


@routes.get("/api/devices/{cloud_id}")
@requires(Access.READ)
async def get_device(request: web.Request) -> web.Response:
    view = request.app[VIEW]
    cid = cloud_id(request)
    async with view.db.acquire() as conn:
        record = await Registry(conn, view.box).get(cid)
    doc = device_json(view, record)
    await with_cluster_status(view, [doc])
    return json_response(doc)


@routes.get("/api/devices/{cloud_id}/readings")
@requires(Access.READ)
async def get_readings(request: web.Request) -> web.Response:
    view = request.app[VIEW]
    cid = cloud_id(request)
    start, to, step = query_series(request)
    async with view.db.acquire() as conn:
        record = await Registry(conn, view.box).get(cid)
        series = await device_series(conn, record.id, start, to, step,
                                     settled=settled_before(view.settings.rollups))
    return json_response({
        "cloud_id": record.cloud_id, "from": series.start.isoformat(),
        "to": series.end.isoformat(), "step_s": step, "level": series.level,
        "points": series.points,
    })
