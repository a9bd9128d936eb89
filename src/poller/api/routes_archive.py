"""``GET /api/archive?days=N``: is the archive complete, and what each level holds.

For each of the last ``days`` UTC days (today first), the hours whose
segments Postgres loaded, how many of those S3 holds verified (count and
size, see :mod:`poller.retention.manifest`), the bytes S3 holds for the day,
the hours not verified and whether any is overdue (``behind``); then one
line per storage level (raw, minute, hour) with its retention, span, rows
and bytes. Read token. The service's retention job carries the archive
client; an API without one answers 503.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, runtime_checkable

from aiohttp import web

from poller.api.auth import Access, requires
from poller.api.errors import ApiError, json_response
from poller.api.keys import VIEW
from poller.api.params import check_query, query_int
from poller.archive.s3 import ArchiveError
from poller.retention import levels
from poller.retention.job import RetentionJob
from poller.retention.manifest import check_day, day_status

routes = web.RouteTableDef()
MAX_DAYS = 62
_QUERY = frozenset({"days"})


@runtime_checkable
class _WithRetention(Protocol):
    retention: RetentionJob | None


@routes.get("/api/archive")
@requires(Access.READ)
async def get_archive(request: web.Request) -> web.Response:
    check_query(request, _QUERY)
    count = query_int(request, "days", 7, 1, MAX_DAYS)
    view = request.app[VIEW]
    job = view.retention if isinstance(view, _WithRetention) else None
    if job is None:
        raise ApiError(503, "unavailable", "archive status is not available in this process")
    policy = job.policy
    now = job.clock.wall()
    today = datetime.fromtimestamp(now, UTC).date()
    days: list[dict[str, Any]] = []
    async with view.db.acquire() as conn:
        try:
            for back in range(count):
                archive = await check_day(conn, policy.store, policy.prefix,
                                          today - timedelta(days=back))
                days.append(day_status(archive, now))
        except ArchiveError as exc:
            raise ApiError(503, "unavailable", f"the archive is not reachable: {exc}") from None
        summary = await levels.summaries(conn, policy.keep_days())
    return json_response({
        "days": days,
        "levels": [{"level": s.level, "keep_days": s.keep_days,
                    "oldest": s.oldest.isoformat() if s.oldest else None,
                    "newest": s.newest.isoformat() if s.newest else None,
                    "rows": s.rows, "bytes": s.bytes} for s in summary],
    })
