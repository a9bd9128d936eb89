"""``POST /api/users:import``: ``poller import`` for programs.

The body is a JSON array of device objects, or NDJSON (one object a line),
with the fields of ``poller import`` (:data:`poller.fleetfile.COLUMNS`); the
answer is the report ``poller import --json`` prints. One request is one
batch: written whole or not at all, with one notification to the pollers.
The import runs in the service's event loop, so it pauses every few hundred
rows for the polls due meanwhile.
"""

from __future__ import annotations

from aiohttp import web

from poller import fleetfile
from poller.api.auth import Access, requires
from poller.api.errors import ApiError, bad_request, json_response
from poller.api.keys import VIEW
from poller.api.params import check_query
from poller.importer import Importer, ImportOptions, Pace
from poller.netpolicy import NetPolicy

IMPORT_MAX_BYTES = 8 * 1024 * 1024
"""About 60,000 devices a request; a larger fleet goes in several."""
_WRITE_TIMEOUT_S = 120.0
"""A whole request's rows are written in one transaction: at the limit's
60,000 devices, seconds."""
_READ_CHUNK = 64 * 1024
_FLAGS = {"true": True, "1": True, "false": False, "0": False}
_STATUS = {"conflict": 409, "database": 503}

routes = web.RouteTableDef()


def _too_large() -> ApiError:
    return ApiError(413, "body_too_large", f"the body is larger than {IMPORT_MAX_BYTES:,} "
                    "bytes: send the fleet in several requests")


async def _body(request: web.Request) -> bytes:
    """The body, refused with a 413 as soon as it passes the limit (the API's
    own limit, for the other writes, is far smaller)."""
    if request.content_length is not None and request.content_length > IMPORT_MAX_BYTES:
        raise _too_large()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(_READ_CHUNK):
        size += len(chunk)
        if size > IMPORT_MAX_BYTES:
            raise _too_large()
        chunks.append(chunk)
    return b"".join(chunks)


def _flag(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "false")
    if raw not in _FLAGS:
        raise bad_request(f"query parameter {name!r}: expected true or false")
    return _FLAGS[raw]


@routes.post("/api/users:import")
@requires(Access.WRITE)
async def import_users(request: web.Request) -> web.Response:
    view = request.app[VIEW]
    check_query(request, frozenset({"update", "dry_run"}))
    options = ImportOptions(update=_flag(request, "update"), dry_run=_flag(request, "dry_run"),
                            batch_rows=2**62, write_timeout_s=_WRITE_TIMEOUT_S,
                            default_interval_s=view.settings.polling.interval_s)
    data = await _body(request)
    fmt = "json" if data.lstrip()[:1] == b"[" else "ndjson"
    rows: list[fleetfile.Parsed] = []
    pace = Pace()
    for row in fleetfile.iter_rows(data, fmt):  # a bad body as a whole: UsageError, a 400
        rows.append(row)
        await pace.tick()
    async with view.db.acquire() as conn:
        report = await Importer(conn, view.box, NetPolicy.from_settings(view.settings.polling),
                                options).run(rows)
    if report.error_code is not None:
        raise ApiError(_STATUS[report.error_code], report.error_code,
                       report.error or "not written")
    return json_response(report.to_json())
