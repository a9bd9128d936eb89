"""``GET /api/event/{cloud_id}``: a device's latest reading and status.

Redis holds the live copy; when it is down, or has nothing for the device,
the answer comes from Postgres (the latest stored reading) and the service's
memory, so the endpoint keeps working through a Redis outage.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from aiohttp import web
from redis.exceptions import RedisError

from poller import keys
from poller.api.auth import Access, requires
from poller.api.errors import json_response
from poller.api.keys import VIEW
from poller.api.params import cloud_id
from poller.api.view import ServiceView
from poller.registry import Registry

log = logging.getLogger("poller.api")
routes = web.RouteTableDef()

REDIS_TIMEOUT_S = 1.0
READING_KEYS = ("tick_at", "device_at", "received_at", "demand_w", "delivered_wh",
                "received_wh", "price")
# The newest raw row, or the newest of the device's last packed hour (a
# device silent since a compacted day: schema/007), whichever is later.
_LATEST_SQL = f"""
SELECT {', '.join(READING_KEYS)} FROM (
    (SELECT * FROM readings WHERE device_id = $1 ORDER BY tick_at DESC LIMIT 1)
    UNION ALL
    (SELECT r.* FROM (SELECT hour_at FROM packed_readings WHERE device_id = $1
                      ORDER BY hour_at DESC LIMIT 1) AS h
     CROSS JOIN LATERAL readings_all($1, h.hour_at, h.hour_at + interval '1 hour') AS r
     ORDER BY r.tick_at DESC LIMIT 1)
) AS latest ORDER BY tick_at DESC LIMIT 1
"""


def _doc(raw: bytes | str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


async def _from_redis(view: ServiceView, cid: str) -> dict[str, Any] | None:
    client = view.redis
    if client is None:
        return None
    try:
        async with asyncio.timeout(REDIS_TIMEOUT_S):
            pipe = client.pipeline(transaction=False)
            pipe.hget(keys.LATEST, cid)
            pipe.hget(keys.STATE, cid)
            latest, state = await pipe.execute()
    except (RedisError, OSError, TimeoutError) as exc:
        log.debug("event %s: redis unavailable (%s), using postgres", cid, type(exc).__name__)
        return None
    reading, status = _doc(latest), _doc(state)
    if reading is None and status is None:
        return None
    if reading is not None:
        reading = {k: reading.get(k) for k in READING_KEYS}
    return {"cloud_id": cid, "source": "redis", "reading": reading, "status": status}


async def _from_postgres(view: ServiceView, cid: str) -> dict[str, Any]:
    async with view.db.acquire() as conn:
        record = await Registry(conn, view.box).get(cid)
        row = await conn.fetchrow(_LATEST_SQL, record.id)
    reading = None
    if row is not None:
        reading = {k: row[k] for k in READING_KEYS}
        for k in ("tick_at", "device_at", "received_at"):
            if reading[k] is not None:
                reading[k] = reading[k].timestamp()
    return {"cloud_id": record.cloud_id, "source": "postgres", "reading": reading,
            "status": view.device_status(record.cloud_id)}


@routes.get("/api/event/{cloud_id}")
@requires(Access.READ)
async def get_event(request: web.Request) -> web.Response:
    view = request.app[VIEW]
    cid = cloud_id(request)
    doc = await _from_redis(view, cid)
    if doc is None:
        doc = await _from_postgres(view, cid)
    return json_response(doc)
