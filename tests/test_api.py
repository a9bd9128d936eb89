"""The HTTP API against real Postgres and Valkey: endpoints, auth, errors, secrets."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from poller import keys
from poller.api.app import make_app, start_api
from poller.api.openapi import document
from poller.config import RollupSettings
from poller.errors import ConfigError
from poller.ingest.compact import compact_day
from poller.rollups.worker import RollupWorker, mark_minutes
from tests.apiview import (
    ADMIN_TOKEN,
    READ_TOKEN,
    ApiServer,
    api_server,
    dead_redis_url,
    fixed_snapshot,
    settings_with,
)
from tests.stackfix import RunningStack, fresh_database_url

PASSWORD = "pw-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def server(stack: RunningStack) -> Iterator[ApiServer]:
    with api_server(fresh_database_url(stack.info), stack.info.redis_url) as srv:
        yield srv


@pytest.fixture(scope="module")
def open_server(stack: RunningStack) -> Iterator[ApiServer]:
    srv = ApiServer(fresh_database_url(stack.info), stack.info.redis_url,
                    settings_with()).start()
    try:
        yield srv
    finally:
        srv.stop()


def new_id() -> str:
    return uuid.uuid4().hex[:6]


def create(server: ApiServer, cid: str, **fields: Any) -> dict[str, Any]:
    body = {"email": "a@b.example", "driver": "eagle-cloud", "password": PASSWORD, **fields}
    reply = server.request("POST", f"/api/user/{cid}", token=ADMIN_TOKEN, json=body)
    assert reply.status == 201, reply.body
    doc: dict[str, Any] = reply.json()
    return doc


def assert_error(reply: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert reply.status == status, (reply.status, reply.body)
    assert reply.headers["Content-Type"].startswith("application/json")
    err: dict[str, Any] = reply.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


# -- happy paths -------------------------------------------------------------

def test_create_update_get_delete(server: ApiServer) -> None:
    cid = new_id().upper()
    doc = create(server, cid, interval_s=10)
    assert doc["cloud_id"] == cid.lower()
    assert doc["interval_s"] == 10 and doc["enabled"] is True and doc["state"] == "unpolled"
    assert "sealed_secret" not in doc and "password" not in doc

    reply = server.request("POST", f"/api/user/{cid}", token=ADMIN_TOKEN,
                           json={"enabled": False, "interval_s": 30})
    assert reply.status == 200, reply.body
    assert reply.json()["enabled"] is False and reply.json()["interval_s"] == 30
    assert reply.json()["state"] == "disabled"

    got = server.request("GET", f"/api/devices/{cid.lower()}", token=READ_TOKEN)
    assert got.status == 200 and got.json()["id"] == doc["id"]

    gone = server.request("DELETE", f"/api/user/{cid}", token=ADMIN_TOKEN)
    assert gone.status == 200 and gone.json() == {"removed": cid.lower(), "id": doc["id"]}
    assert_error(server.request("GET", f"/api/devices/{cid}", token=READ_TOKEN), 404,
                 "not_found")
    assert_error(server.request("DELETE", f"/api/user/{cid}", token=ADMIN_TOKEN), 404)


def test_http_json_device_with_fields(server: ApiServer) -> None:
    cid = "meter-" + uuid.uuid4().hex[:8]
    doc = create(server, cid, driver="http-json", url="http://127.0.0.1:9/x", email="",
                 fields={"demand_w": "/w"})
    assert doc["options"] == {"fields": {"demand_w": "/w"}}
    assert doc["url"] == "http://127.0.0.1:9/x"


def test_new_device_needs_driver_and_password(server: ApiServer) -> None:
    err = assert_error(server.request("POST", f"/api/user/{new_id()}", token=ADMIN_TOKEN,
                                      json={"email": "a@b.example"}), 400, "missing_field")
    assert "driver" in err["message"] and "password" in err["message"]


def test_registry_validation_is_reported(server: ApiServer) -> None:
    err = assert_error(server.request("POST", "/api/user/nothex", token=ADMIN_TOKEN,
                                      json={"driver": "eagle-cloud", "password": "x",
                                            "email": "a@b.example"}), 400, "invalid")
    assert "6 hexadecimal digits" in err["message"]
    err = assert_error(server.request("POST", f"/api/user/{new_id()}", token=ADMIN_TOKEN,
                                      json={"driver": "eagle-cloud", "password": "x",
                                            "email": "nope"}), 400, "invalid")
    assert "email" in err["message"]


def test_most_failing_devices_come_most_failures_first(server: ApiServer) -> None:
    docs = [create(server, new_id()) for _ in range(4)]
    assert server.view is not None
    for doc, (state, failures) in zip(docs, [("failing", 2), ("auth_failed", 9), ("ok", 0),
                                             ("failing", 5)], strict=True):
        server.view.statuses[doc["cloud_id"]] = {"state": state,
                                                 "consecutive_failures": failures}
        server.view.status_ids[doc["cloud_id"]] = doc["id"]
    try:
        reply = server.request("GET", "/api/fleet/failing?limit=10", token=READ_TOKEN)
        assert reply.status == 200
        shown = [(d["cloud_id"], d["status"]["consecutive_failures"])
                 for d in reply.json()["devices"]]
        ours = {d["cloud_id"] for d in docs}
        assert [s for s in shown if s[0] in ours] == [
            (docs[1]["cloud_id"], 9), (docs[3]["cloud_id"], 5), (docs[0]["cloud_id"], 2)]
        assert_error(server.request("GET", "/api/fleet/failing?limit=101", token=READ_TOKEN),
                     400, "bad_request")
    finally:
        for doc in docs:
            server.view.statuses.pop(doc["cloud_id"], None)
            server.view.status_ids.pop(doc["cloud_id"], None)


def test_listing_paginates_and_filters_by_state(server: ApiServer) -> None:
    docs = [create(server, new_id()) for _ in range(3)]
    ids = [d["cloud_id"] for d in docs]
    assert server.view is not None
    server.view.statuses[ids[1]] = {"state": "failing", "consecutive_failures": 3}
    server.view.status_ids[ids[1]] = docs[1]["id"]
    seen: list[str] = []
    after = 0
    for _ in range(100):
        page = server.request("GET", f"/api/devices?limit=2&after={after}", token=READ_TOKEN)
        assert page.status == 200
        doc = page.json()
        assert len(doc["devices"]) <= 2
        seen += [d["cloud_id"] for d in doc["devices"]]
        if doc["next_after"] is None:
            break
        after = doc["next_after"]
    assert set(ids) <= set(seen) and len(seen) == len(set(seen))
    failing = server.request("GET", "/api/devices?state=failing&limit=1000", token=READ_TOKEN)
    assert [d["cloud_id"] for d in failing.json()["devices"]] == [ids[1]]
    assert failing.json()["devices"][0]["status"]["consecutive_failures"] == 3


def _insert_readings(server: ApiServer, device_id: int,
                     rows: list[tuple[datetime, float]]) -> None:
    assert server.view is not None
    pool = server.view.pool

    async def insert() -> None:
        await pool.executemany(
            "INSERT INTO readings (device_id, tick_at, received_at, demand_w) "
            "VALUES ($1, $2, $2, $3)", [(device_id, t, w) for t, w in rows])
        # As the loader would: mark their minutes for the rollups, which a
        # step of a minute or more reads; then settle them.
        await pool.execute("SELECT poller_ensure_rollup_partitions($1::date, 1)", rows[0][0])
        async with pool.acquire() as conn:
            await mark_minutes(conn, sorted({int(t.timestamp() // 60) for t, _ in rows}))
        await RollupWorker(pool, RollupSettings()).settle_all()
    server.run(insert())


def test_readings_are_bucketed(server: ApiServer) -> None:
    doc = create(server, new_id())
    base = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=10)
    _insert_readings(server, doc["id"], [(base, 100.0), (base + timedelta(seconds=6), 200.0),
                                         (base + timedelta(seconds=61), -50.0)])
    frm, to = int(base.timestamp()), (base + timedelta(minutes=5)).isoformat()
    reply = server.request("GET", f"/api/devices/{doc['cloud_id']}/readings?from={frm}"
                           f"&to={to.replace('+', '%2B')}&step=60", token=READ_TOKEN)
    assert reply.status == 200, reply.body
    points = reply.json()["points"]
    assert [(p["min"], p["avg"], p["max"], p["count"]) for p in points] == [
        (100.0, 150.0, 200.0, 2), (-50.0, -50.0, -50.0, 1)]
    assert datetime.fromisoformat(points[0]["t"]) == base
    assert reply.json()["step_s"] == 60
    # A minute step reads the per-minute rollups; 30 s the raw rows; alike here.
    assert reply.json()["level"] == "minute"
    assert [p["failed"] for p in points] == [0, 0]
    raw = server.request("GET", f"/api/devices/{doc['cloud_id']}/readings?from={frm}"
                         f"&to={to.replace('+', '%2B')}&step=30", token=READ_TOKEN).json()
    assert raw["level"] == "raw"
    assert [(p["min"], p["max"], p["count"]) for p in raw["points"]] == [
        (100.0, 200.0, 2), (-50.0, -50.0, 1)]


def test_fleet_demand_reads_the_fleet_minutes(server: ApiServer) -> None:
    doc = create(server, new_id())
    base = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=2)
    _insert_readings(server, doc["id"], [(base, 100.0), (base + timedelta(seconds=6), 200.0)])
    frm = int(base.timestamp())
    reply = server.request("GET", f"/api/fleet/demand?from={frm}&to={frm + 120}&step=60",
                           token=READ_TOKEN)
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["level"] == "minute" and body["step_s"] == 60
    (point,) = body["points"]  # only this test's device wrote at that minute
    assert (point["total_w"], point["devices"], point["outcomes"]) == (150.0, 1, {"ok": 1})
    bad = assert_error(server.request("GET", "/api/fleet/demand?step=90", token=READ_TOKEN),
                       400)
    assert "multiple of 60" in bad["message"]


@pytest.mark.parametrize(("query", "needle"), [
    ("from=2024-01-02T00:00:00Z&to=2024-01-01T00:00:00Z", "before"),
    ("from=2020-01-01&to=2024-01-01&step=86400", "366 days"),
    ("from=2024-01-01&to=2024-01-02&step=1", "10000"),
    ("from=yesterday", "ISO 8601"),
    ("step=0", "step"),
    ("step=1.5", "step"),
    ("color=red", "unknown"),
])
def test_readings_bad_queries(server: ApiServer, query: str, needle: str) -> None:
    cid = create(server, new_id())["cloud_id"]
    err = assert_error(server.request("GET", f"/api/devices/{cid}/readings?{query}",
                                      token=READ_TOKEN), 400)
    assert needle in err["message"]


def test_readings_of_unknown_device(server: ApiServer) -> None:
    assert_error(server.request("GET", "/api/devices/abcdef0/readings", token=READ_TOKEN), 404)


def _redis_set(server: ApiServer, cid: str, latest: Any, state: Any) -> None:
    assert server.view is not None and server.view.redis_client is not None
    client = server.view.redis_client

    async def write() -> None:
        await client.hset(keys.LATEST, cid, orjson.dumps(latest))
        await client.hset(keys.STATE, cid, orjson.dumps(state))
    server.run(write())


def test_event_from_redis(server: ApiServer) -> None:
    cid = create(server, new_id())["cloud_id"]
    latest = {"tick_at": 1.7e9, "device_at": None, "received_at": 1.7e9 + 0.2,
              "demand_w": 512.0, "delivered_wh": 10.0, "received_wh": 0.0, "price": None}
    _redis_set(server, cid, latest, {"state": "ok", "total_events_logged": 7})
    reply = server.request("GET", f"/api/event/{cid.upper()}", token=READ_TOKEN)
    assert reply.status == 200, reply.body
    doc = reply.json()
    assert doc["source"] == "redis" and doc["reading"] == latest
    assert doc["status"]["total_events_logged"] == 7


def test_event_falls_back_to_postgres(server: ApiServer) -> None:
    doc = create(server, new_id())
    cid = doc["cloud_id"]
    now = datetime.now(UTC).replace(microsecond=0)
    _insert_readings(server, doc["id"], [(now - timedelta(seconds=12), 1.0), (now, 2.0)])
    # Nothing in Redis for this device: Postgres answers.
    reply = server.request("GET", f"/api/event/{cid}", token=READ_TOKEN)
    assert reply.status == 200 and reply.json()["source"] == "postgres"
    assert reply.json()["reading"]["demand_w"] == 2.0
    assert reply.json()["reading"]["tick_at"] == now.timestamp()

    # Redis unreachable (a real refused connection): still answered, from Postgres.
    _redis_set(server, cid, {"demand_w": 99.0}, {"state": "ok"})
    assert server.view is not None
    live = server.view.redis_client
    server.view.redis_client = aioredis.from_url(dead_redis_url(), socket_timeout=0.5)
    try:
        reply = server.request("GET", f"/api/event/{cid}", token=READ_TOKEN)
        assert reply.status == 200 and reply.json()["source"] == "postgres"
        assert reply.json()["reading"]["demand_w"] == 2.0
    finally:
        dead, server.view.redis_client = server.view.redis_client, live
        server.run(dead.aclose())


def test_event_falls_back_to_a_packed_day(server: ApiServer) -> None:
    # A device silent since a day that was compacted (schema/007): its
    # latest reading is packed, and Postgres still answers with it.
    doc = create(server, new_id())
    day = (datetime.now(UTC) - timedelta(days=3)).date()
    last = datetime(day.year, day.month, day.day, 17, 30, tzinfo=UTC)
    assert server.view is not None
    pool = server.view.pool

    async def pack() -> None:
        await pool.execute("SELECT poller_ensure_partitions($1::date, 1)", day)
        await pool.executemany(
            "INSERT INTO readings (device_id, tick_at, received_at, demand_w) "
            "VALUES ($1, $2, $2, $3)",
            [(doc["id"], last - timedelta(seconds=6), 1.0), (doc["id"], last, 3.5)])
        async with pool.acquire() as conn:
            await compact_day(conn, day)
        assert await pool.fetchval("SELECT count(*) FROM readings WHERE device_id = $1",
                                   doc["id"]) == 0

    server.run(pack())
    reply = server.request("GET", f"/api/event/{doc['cloud_id']}", token=READ_TOKEN)
    assert reply.status == 200 and reply.json()["source"] == "postgres"
    assert reply.json()["reading"]["demand_w"] == 3.5
    assert reply.json()["reading"]["tick_at"] == last.timestamp()


def test_event_of_registered_device_without_readings(server: ApiServer) -> None:
    cid = create(server, new_id())["cloud_id"]
    reply = server.request("GET", f"/api/event/{cid}", token=READ_TOKEN)
    assert reply.status == 200 and reply.json()["reading"] is None


def test_event_unknown_and_malformed_ids(server: ApiServer) -> None:
    assert_error(server.request("GET", "/api/event/fedcba9", token=READ_TOKEN), 404,
                 "not_found")
    assert_error(server.request("GET", "/api/event/%00bad", token=READ_TOKEN), 400,
                 "invalid_id")


def test_fleet(server: ApiServer) -> None:
    reply = server.request("GET", "/api/fleet", token=READ_TOKEN)
    assert reply.status == 200
    doc = reply.json()
    assert doc["polls_per_s"] == {"ok": 0.45, "timeout": 0.05}
    assert doc["polls_by_driver_outcome"] == {"eagle-cloud": {"ok": 90, "timeout": 10}}
    assert doc["segments_pending_upload"] == 1 and doc["ingest_lag_s"] == 1.5


def test_openapi_describes_exactly_the_routes(server: ApiServer) -> None:
    reply = server.request("GET", "/api/openapi.json", token=READ_TOKEN)
    assert reply.status == 200
    doc = reply.json()
    assert doc["openapi"] == "3.1.0" and doc == orjson.loads(orjson.dumps(document()))
    assert server.view is not None
    app = make_app(server.view)
    served = {(r.method.lower(), r.resource.canonical) for r in app.router.routes()
              if r.method != "HEAD" and r.resource is not None}
    described = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert served == described


def test_metrics_exposition(server: ApiServer) -> None:
    reply = server.request("GET", "/metrics")
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(reply.body.decode())}
    polls = {(s.labels["driver"], s.labels["outcome"]): s.value
             for s in families["poller_polls"].samples if s.name == "poller_polls_total"}
    assert polls == {("eagle-cloud", "ok"): 90, ("eagle-cloud", "timeout"): 10}
    lateness = {s.labels.get("le"): s.value for s in families["poller_poll_lateness_seconds"]
                .samples if s.name.endswith("_bucket")}
    assert lateness["0.001"] == 1 and lateness["0.005"] == 3 and lateness["+Inf"] == 5
    up = {s.labels["component"]: s.value for s in families["poller_component_up"].samples}
    assert up == {"postgres": 1.0, "redis": 1.0, "s3": 1.0}
    for name in ("poller_copy_batch_seconds", "poller_rows_committed", "poller_spool_bytes",
                 "poller_segments_pending_upload", "poller_upload_failures", "poller_devices",
                 "poller_buffer_rows", "poller_polls_in_flight", "poller_skipped_ticks"):
        assert name in families, name


def test_health_and_readiness(server: ApiServer) -> None:
    assert server.view is not None
    assert server.request("GET", "/healthz").json() == {"status": "ok"}
    ready = server.request("GET", "/readyz")
    assert ready.status == 200 and ready.json()["failed"] == []
    server.view.responsive = False
    server.view.snapshot = fixed_snapshot(ingest_lag_s=45.0, polling=False)
    try:
        assert server.request("GET", "/healthz").status == 503
        ready = server.request("GET", "/readyz")
        assert ready.status == 503
        assert ready.json()["failed"] == ["polling", "ingest_lag"]
        assert ready.json()["checks"]["postgres"]["ok"] is True
    finally:
        server.view.responsive = True
        server.view.snapshot = fixed_snapshot()


def test_unexpected_error_is_a_logged_json_500(server: ApiServer,
                                               caplog: pytest.LogCaptureFixture) -> None:
    assert server.view is not None
    server.view.broken = True
    try:
        reply = server.request("GET", "/api/fleet", token=READ_TOKEN)
    finally:
        server.view.broken = False
    err = assert_error(reply, 500, "internal")
    assert "fleet snapshot failed" not in err["message"]
    assert "unexpected error serving GET /api/fleet" in caplog.text
    assert "RuntimeError: fleet snapshot failed" in caplog.text


# -- authentication ----------------------------------------------------------

WRITES = [("POST", "/api/user/{id}"), ("DELETE", "/api/user/{id}")]
READS = ["/api/event/{id}", "/api/devices", "/api/devices/{id}",
         "/api/devices/{id}/readings", "/api/fleet", "/api/fleet/demand", "/api/openapi.json"]


@pytest.mark.parametrize(("method", "path"), WRITES)
def test_writes_need_the_admin_token(server: ApiServer, method: str, path: str) -> None:
    cid = create(server, new_id())["cloud_id"]
    url = path.format(id=cid)
    body = {"enabled": False} if method == "POST" else None
    for token in (None, "wrong-token-0123456789", ADMIN_TOKEN + "x"):
        reply = server.request(method, url, token=token, json=body)
        assert_error(reply, 401, "unauthorized")
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    assert_error(server.request(method, url, token=READ_TOKEN, json=body), 403, "forbidden")
    reply = server.request(method, url, headers={"Authorization": f"Basic {ADMIN_TOKEN}"},
                           json=body)
    assert_error(reply, 401)
    assert server.request(method, url, token=ADMIN_TOKEN, json=body).status == 200


@pytest.mark.parametrize("path", READS)
def test_reads_need_a_token(server: ApiServer, path: str) -> None:
    cid = create(server, new_id())["cloud_id"]
    url = path.format(id=cid)
    reply = server.request("GET", url)
    assert_error(reply, 401)
    assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    assert_error(server.request("GET", url, token="x" * 30), 401)
    assert server.request("GET", url, token=READ_TOKEN).status == 200
    assert server.request("GET", url, token=ADMIN_TOKEN).status == 200


def test_operational_endpoints_need_no_token(server: ApiServer) -> None:
    for path in ("/metrics", "/healthz", "/readyz"):
        assert server.request("GET", path).status == 200, path


def test_open_api_on_loopback(open_server: ApiServer) -> None:
    cid = new_id()
    reply = open_server.request("POST", f"/api/user/{cid}", json={
        "email": "a@b.example", "driver": "eagle-cloud", "password": PASSWORD})
    assert reply.status == 201
    assert open_server.request("GET", f"/api/devices/{cid}").status == 200


def test_open_api_refuses_other_addresses(open_server: ApiServer) -> None:
    assert open_server.view is not None
    view = dataclasses.replace(open_server.view)
    with pytest.raises(ConfigError, match="loopback"):
        asyncio.run(start_api(view, "0.0.0.0", 0))


# -- bad requests --------------------------------------------------------------

@pytest.mark.parametrize(("body", "code"), [
    (b"{not json", "malformed_json"),
    (b"[1, 2]", "malformed_json"),
    (b"", "malformed_json"),
    (b'{"email": 5}', "wrong_type"),
    (b'{"interval_s": true}', "wrong_type"),
    (b'{"interval_s": "6"}', "wrong_type"),
    (b'{"enabled": "yes"}', "wrong_type"),
    (b'{"fields": []}', "wrong_type"),
    (b'{"colour": "red"}', "unknown_field"),
    (b'{"sealed_secret": "x"}', "unknown_field"),
    (b'{"email": "a\\u0000@b.example"}', "bad_request"),
])
def test_bad_bodies(server: ApiServer, body: bytes, code: str) -> None:
    assert_error(server.request("POST", f"/api/user/{new_id()}", token=ADMIN_TOKEN,
                                body=body), 400, code)


def test_oversized_body(server: ApiServer) -> None:
    body = orjson.dumps({"email": "a@b.example", "options": {"x": "y" * 70_000}})
    assert_error(server.request("POST", f"/api/user/{new_id()}", token=ADMIN_TOKEN,
                                body=body), 413, "body_too_large")


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "limit=abc", "after=-1",
                                   "state=sleepy", "limit=1&limit=x", "page=2"])
def test_bad_listing_queries(server: ApiServer, query: str) -> None:
    assert_error(server.request("GET", f"/api/devices?{query}", token=READ_TOKEN), 400)


def test_unknown_route_and_method(server: ApiServer) -> None:
    assert_error(server.request("GET", "/api/nothing", token=READ_TOKEN), 404, "not_found")
    reply = server.request("PUT", "/api/fleet", token=ADMIN_TOKEN)
    assert_error(reply, 405, "method_not_allowed")


# -- secrets -------------------------------------------------------------------

def test_no_secret_in_responses_or_logs(server: ApiServer,
                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    cid = new_id()
    bodies = [server.request("POST", f"/api/user/{cid}", token=ADMIN_TOKEN,
                             json={"email": "a@b.example", "driver": "eagle-cloud",
                                   "password": PASSWORD}).body]
    bodies.append(server.request("POST", f"/api/user/{cid}", token=ADMIN_TOKEN,
                                 json={"password": PASSWORD + "2"}).body)
    # A refused password must not be echoed in the error either.
    bodies.append(server.request("POST", f"/api/user/{cid}", token=ADMIN_TOKEN,
                                 json={"password": PASSWORD + "\n"}).body)
    for path in ("/api/devices", f"/api/devices/{cid}", f"/api/event/{cid}", "/api/fleet",
                 "/api/openapi.json", f"/api/devices/{cid}/readings", "/metrics", "/readyz"):
        bodies.append(server.request("GET", path, token=READ_TOKEN).body)
    bodies.append(server.request("GET", "/api/fleet", token="z" * 20 + READ_TOKEN).body)
    bodies.append(server.request("DELETE", f"/api/user/{cid}", token=ADMIN_TOKEN).body)
    text = b"\n".join(bodies).decode() + "\n" + caplog.text
    for secret in (PASSWORD, ADMIN_TOKEN, READ_TOKEN, "sealed_secret"):
        assert secret not in text
