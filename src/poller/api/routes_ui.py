"""The dashboard: static files under ``/ui/``, ``/`` redirecting there, and
``GET /api/session`` (which token the page holds).

The files ship in the package (``poller/ui/static``) and are read once, when
the application is made: a request can only name one of them (no path is
ever joined to the file system), and serving one is a dictionary lookup.
They need no token: they hold no data. The page asks the API for data with
the token the user typed, through the same checks as any client.

Every file goes out with a strict Content-Security-Policy: scripts and styles
from this origin only (no inline script, no ``eval``), requests to this origin
only, no framing (``frame-ancestors 'none'``), and no form submission at all
(``form-action 'none'``): should the page's script fail to load, the login
form cannot send the token anywhere, not even into a URL.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

from poller.api.auth import Access, _bearer, requires
from poller.api.errors import ApiError, json_response
from poller.api.keys import VIEW

routes = web.RouteTableDef()

UI_PREFIX = "/ui/"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    # Revalidate each time (an ETag makes that a 304): a new version of
    # poller never runs with an old page's scripts.
    "Cache-Control": "no-cache",
}
_TYPES = {
    ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
    ".txt": "text/plain; charset=utf-8", ".ico": "image/x-icon",
}


@dataclass(frozen=True, slots=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str


def load_static() -> dict[str, StaticFile]:
    """Every file under ``poller/ui/static``, by its path below it ('' is index.html)."""
    root = resources.files("poller").joinpath("ui", "static")
    found: dict[str, StaticFile] = {}
    pending = [(root, "")]
    while pending:
        folder, prefix = pending.pop()
        for entry in folder.iterdir():
            name = prefix + entry.name
            if entry.is_dir():
                pending.append((entry, name + "/"))
                continue
            suffix = name[name.rfind("."):] if "." in name else ""
            if suffix not in _TYPES:
                continue  # a licence file without suffix, an editor's backup: not served
            body = entry.read_bytes()
            found[name] = StaticFile(body, _TYPES[suffix],
                                     '"' + hashlib.sha256(body).hexdigest()[:20] + '"')
    if "index.html" in found:
        found[""] = found["index.html"]
    return found


STATIC = web.AppKey("ui_static", dict)


@routes.get("/")
@requires(Access.PUBLIC)
async def get_root(request: web.Request) -> web.Response:
    raise web.HTTPFound(UI_PREFIX, headers=SECURITY_HEADERS)


@routes.get("/ui/{path:.*}")
@requires(Access.PUBLIC)
async def get_static(request: web.Request) -> web.Response:
    files: dict[str, StaticFile] = request.app[STATIC]
    found = files.get(request.match_info["path"])
    if found is None:
        raise ApiError(404, "not_found", "no such dashboard file")
    headers = {**SECURITY_HEADERS, "ETag": found.etag}
    if request.headers.get("If-None-Match") == found.etag:
        return web.Response(status=304, headers=headers)
    return web.Response(body=found.body, headers={**headers,
                                                  "Content-Type": found.content_type})


@routes.get("/api/session")
@requires(Access.PUBLIC)
async def get_session(request: web.Request) -> web.Response:
    """What the request's token may do: ``admin``, ``read``, or ``none`` (no
    token sent); a wrong token is a 401. Public, so that the page can tell
    "sign in" from "open API" without provoking a refusal; it says nothing
    but whether tokens are configured. The page shows admin controls only
    for ``admin``; the API checks every write again."""
    api = request.app[VIEW].settings.api
    if not (api.admin_token or api.read_token):
        return json_response({"access": "admin", "open": True})
    given = _bearer(request)
    if given is None:
        return json_response({"access": "none", "open": False})
    if api.admin_token and hmac.compare_digest(given, api.admin_token.encode()):
        return json_response({"access": "admin", "open": False})
    if api.read_token and hmac.compare_digest(given, api.read_token.encode()):
        return json_response({"access": "read", "open": False})
    raise ApiError(401, "unauthorized", "the bearer token is not valid",
                   {"WWW-Authenticate": 'Bearer realm="poller"'})


_REGISTERED_SQL = """
SELECT count(*) AS registered, count(*) FILTER (WHERE NOT enabled) AS disabled
FROM devices WHERE removed_at IS NULL
"""


@routes.get("/api/fleet/registered")
@requires(Access.READ)
async def get_registered(request: web.Request) -> web.Response:
    """Devices in the registry, and how many are disabled: the pool (``/api/fleet``)
    knows only the devices it polls. One count over the table (~10 ms at 100,000)."""
    async with request.app[VIEW].db.acquire() as conn:
        row = await conn.fetchrow(_REGISTERED_SQL)
    assert row is not None  # an aggregate always returns its row
    return json_response({"registered": row["registered"], "disabled": row["disabled"]})
