"""``poller check`` against a real HTTP server serving a fleet document."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from poller.api.routes_fleet import fleet_json
from poller.check import (
    CRITICAL,
    OK,
    UNKNOWN,
    WARNING,
    Thresholds,
    default_url,
    run_check,
    token_from,
)
from poller.config import load
from tests.apiview import fixed_snapshot

TOKEN = "check-token-0123456789"


@dataclass
class FleetServer:
    url: str
    doc: dict[str, Any]
    status: int = 200
    seen_tokens: list[str | None] = field(default_factory=list)


def healthy_fleet() -> dict[str, Any]:
    return fleet_json(fixed_snapshot(polls_per_s={"ok": 99.0, "timeout": 1.0},
                                     expected_polls_per_s=100.0, ingest_lag_s=1.0,
                                     segments_pending_upload=0))


@pytest.fixture
async def fleet_server() -> AsyncIterator[FleetServer]:
    state = FleetServer("", healthy_fleet())

    async def fleet(request: web.Request) -> web.Response:
        state.seen_tokens.append(request.headers.get("Authorization"))
        if state.status != 200:
            return web.json_response({"error": {"code": "x", "message": "y"}},
                                     status=state.status)
        return web.json_response(state.doc)

    app = web.Application()
    app.router.add_get("/api/fleet", fleet)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state.url = f"http://127.0.0.1:{port}"
    try:
        yield state
    finally:
        await runner.cleanup()


async def check(server: FleetServer, thresholds: Thresholds | None = None,
                **changes: Any) -> tuple[int, str]:
    server.doc.update(changes)
    return await asyncio.to_thread(run_check, server.url, TOKEN, thresholds or Thresholds(), 5.0)


def perfdata(line: str) -> dict[str, str]:
    _, _, perf = line.partition(" | ")
    return {k: v.split(";")[0] for k, v in (item.split("=") for item in perf.split())}


async def test_ok(fleet_server: FleetServer) -> None:
    code, line = await check(fleet_server)
    assert code == OK, line
    assert line.startswith("POLLER OK - 100.0/100.0 polls/s (100%)")
    assert "\n" not in line
    perf = perfdata(line)
    assert perf == {"polls_per_s": "100", "expected_polls_per_s": "100", "poll_ratio": "1",
                    "failure_ratio": "0.01", "ingest_lag_s": "1s", "upload_backlog": "0"}
    assert fleet_server.seen_tokens == [f"Bearer {TOKEN}"]
    assert TOKEN not in line


@pytest.mark.parametrize(("changes", "code", "word"), [
    ({"polls_per_s": {"ok": 90.0}}, WARNING, "polls/s (90%) (WARNING)"),
    ({"polls_per_s": {"ok": 70.0}}, CRITICAL, "polls/s (70%) (CRITICAL)"),
    ({"polls_per_s": {"ok": 90.0, "timeout": 10.0}}, WARNING, "failures 10.0% (WARNING)"),
    ({"polls_per_s": {"ok": 70.0, "timeout": 30.0}}, CRITICAL, "failures 30.0% (CRITICAL)"),
    ({"ingest_lag_s": 11.0}, WARNING, "ingest lag 11.0 s (WARNING)"),
    ({"ingest_lag_s": 61.0}, CRITICAL, "ingest lag 61.0 s (CRITICAL)"),
    ({"segments_pending_upload": 3}, WARNING, "3 segment(s) awaiting upload (WARNING)"),
    ({"segments_pending_upload": 7}, CRITICAL, "7 segment(s) awaiting upload (CRITICAL)"),
])
async def test_each_threshold(fleet_server: FleetServer, changes: dict[str, Any], code: int,
                              word: str) -> None:
    got, line = await check(fleet_server, **changes)
    assert got == code, line
    status = line.split(" | ")[0]
    head, _, rest = status.partition(" - ")
    assert head == f"POLLER {'WARNING' if code == WARNING else 'CRITICAL'}"
    assert rest.split(", ")[0].endswith(word)


async def test_worst_state_wins(fleet_server: FleetServer) -> None:
    code, line = await check(fleet_server, ingest_lag_s=11.0, segments_pending_upload=9)
    assert code == CRITICAL
    assert line.index("segment(s) awaiting upload (CRITICAL)") < line.index("(WARNING)")


async def test_thresholds_are_overridable(fleet_server: FleetServer) -> None:
    relaxed = Thresholds(ingest_lag_warn_s=100, ingest_lag_crit_s=200)
    code, line = await check(fleet_server, relaxed, ingest_lag_s=61.0)
    assert code == OK, line
    assert "ingest_lag_s=61s;100;200;0" in line


async def test_idle_fleet_is_ok(fleet_server: FleetServer) -> None:
    code, line = await check(fleet_server, polls_per_s={}, expected_polls_per_s=0.0)
    assert code == OK, line


@pytest.mark.parametrize("status", [401, 403, 500])
async def test_http_errors_are_unknown(fleet_server: FleetServer, status: int) -> None:
    fleet_server.status = status
    code, line = await check(fleet_server)
    assert code == UNKNOWN and f"HTTP {status}" in line


async def test_malformed_document_is_unknown(fleet_server: FleetServer) -> None:
    fleet_server.doc.pop("ingest_lag_s")
    code, line = await check(fleet_server)
    assert code == UNKNOWN and "unexpected fleet document" in line


async def test_unreachable_is_unknown(fleet_server: FleetServer) -> None:
    code, line = await asyncio.to_thread(run_check, fleet_server.url.replace("http:", "ftp:"),
                                         None,
                                         Thresholds(), 1.0)
    assert code == UNKNOWN and "not an http(s) URL" in line
    code, line = await asyncio.to_thread(run_check, "http://127.0.0.1:9", None,
                                         Thresholds(), 1.0)
    assert code == UNKNOWN and "cannot reach" in line


def test_url_and_token_from_configuration() -> None:
    settings = load(config_path=None, env={}, overrides={"api.host": "0.0.0.0",
                                                         "api.read_token": "r" * 16,
                                                         "api.admin_token": "a" * 16})
    assert default_url(settings) == "http://127.0.0.1:8640"
    assert token_from({}, settings) == "r" * 16
    assert token_from({"POLLER_API_TOKEN": "e" * 16}, settings) == "e" * 16
    assert token_from({}, None) is None


def test_never_the_admin_token() -> None:
    admin_only = load(config_path=None, env={}, overrides={"api.admin_token": "a" * 16})
    assert token_from({}, admin_only) is None


async def test_redirects_are_not_followed_and_get_no_token(fleet_server: FleetServer) -> None:
    async def elsewhere(request: web.Request) -> web.Response:
        raise web.HTTPFound(fleet_server.url + "/api/fleet")

    app = web.Application()
    app.router.add_get("/api/fleet", elsewhere)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        code, line = await asyncio.to_thread(run_check, url, TOKEN, Thresholds(), 5.0)
    finally:
        await runner.cleanup()
    assert code == UNKNOWN, line
    assert "HTTP 302" in line and "redirect, not followed" in line
    # The server the redirect named was never asked, so never saw the token.
    assert fleet_server.seen_tokens == []
