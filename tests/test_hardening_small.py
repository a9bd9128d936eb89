"""Small holes closed, each against the real thing it guards.

Ids and emails match whole; driver options are refused at registration, not
at the first poll; a reload cannot open the API on a public address; writes
need JSON and a Host naming the API; a lost key file is an error, never a new
key, while the registry holds sealed credentials. (``poller check`` is in
test_check.py, the embedded servers' environment in test_stack.py.)
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from poller import config, sealing
from poller.errors import ConfigError, SecretKeyError, UsageError
from poller.migrate import migrate
from poller.netpolicy import NetPolicy
from poller.registry import Registry, check_cloud_id, check_email, registry_key
from poller.service import Service
from tests.apiview import ADMIN_TOKEN, READ_TOKEN, ApiServer, api_server, settings_with
from tests.stackfix import RunningStack, fresh_database_url

PASSWORD = "pw-" + uuid.uuid4().hex
LOOPBACK_OK = settings_with()
"""Settings whose network policy admits the loopback URLs used here."""


# -- ids and emails ---------------------------------------------------------------

@pytest.mark.parametrize(("cloud_id", "driver"), [
    ("00ce69\n", "eagle-cloud"), ("00ce69\n", "eagle-local"), ("meter-1\n", "http-json"),
    ("00ce69\r\n", "eagle-cloud"), ("meter-1\x00", "http-json"),
])
def test_ids_with_a_trailing_newline_are_refused(cloud_id: str, driver: str) -> None:
    with pytest.raises(UsageError, match="malformed"):
        check_cloud_id(cloud_id, driver)
    assert check_cloud_id(cloud_id.rstrip("\r\n\x00"), driver)  # the rest is a good id


@pytest.mark.parametrize("email", ["owner@example.com\n", "owner@example.com\r\n"])
def test_emails_with_a_trailing_newline_are_refused(email: str) -> None:
    with pytest.raises(UsageError, match="malformed email"):
        check_email(email, "eagle-cloud")
    assert check_email(email.rstrip("\r\n"), "eagle-cloud") == "owner@example.com"


# -- driver options at registration ------------------------------------------------

@pytest.fixture
async def registry(stack: RunningStack) -> AsyncIterator[Registry]:
    conn = await asyncpg.connect(fresh_database_url(stack.info))
    try:
        await migrate(conn)
        yield Registry(conn, sealing.SecretBox(sealing.generate_key()),
                       NetPolicy.from_settings(LOOPBACK_OK.polling))
    finally:
        await conn.close()


BAD_OPTIONS = [
    ({"fields": {"demand_w": "/a~2"}}, "'~' not followed by 0 or 1"),
    ({"fields": {"demand_w": "w"}}, "must be empty or start with '/'"),
    ({"fields": {"colour": "/c"}}, "unknown reading fields"),
    ({"fields": {"price": "/p"}}, "must map demand_w, delivered_wh or received_wh"),
    ({}, "needs options[\"fields\"]"),
    ({"fields": {"demand_w": "/w"}, "scale": {"demand_w": 0}}, "finite non-zero"),
    ({"fields": {"demand_w": "/w"}, "method": "PUT"}, "method must be one of"),
    ({"fields": {"demand_w": "/w"}, "body": "{}"}, "only with \"POST\""),
    ({"fields": {"demand_w": "/w"}, "colour": 1}, "unknown http-json options"),
]


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS)
async def test_bad_http_json_options_are_refused_at_registration(
        registry: Registry, options: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match="http-json") as caught:
        await registry.add("meter-" + uuid.uuid4().hex[:8], email="", driver="http-json",
                           url="http://127.0.0.1:9/status", interval_s=6.0, options=options,
                           secret=PASSWORD)
    assert message in str(caught.value)
    assert await registry.listing() == []  # nothing half-written


async def test_an_update_is_checked_against_the_driver_too(registry: Registry) -> None:
    rec = await registry.add("meter-1", email="", driver="http-json",
                             url="http://127.0.0.1:9/status", interval_s=6.0,
                             options={"fields": {"demand_w": "/w"}}, secret=PASSWORD)
    with pytest.raises(UsageError, match="start with '/'"):
        await registry.update("meter-1", options={"fields": {"demand_w": "w"}})
    # A password an HTTP header cannot carry would fail every poll.
    with pytest.raises(UsageError, match="characters an HTTP header cannot carry"):
        await registry.update("meter-1", secret="pässwörd-\u20ac")
    assert PASSWORD not in repr(await registry.listing())
    cloud = await registry.add("00ce69", email="a@b.example", driver="eagle-cloud", url=None,
                               interval_s=6.0, options={}, secret=PASSWORD)
    # To http-json without saying where its fields are: refused, not a silent config_error.
    with pytest.raises(UsageError, match="fields"):
        await registry.update("00ce69", driver="http-json", url="http://127.0.0.1:9/s",
                              secret=PASSWORD)
    listed = {r.cloud_id: r for r in await registry.listing()}
    assert listed["meter-1"].options == rec.options and listed["00ce69"].driver == cloud.driver


def test_cli_refuses_bad_fields_before_asking_for_a_password(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "poller", "add-user", "meter-1", "--driver", "http-json",
         "--url", "http://127.0.0.1:9/status", "--field", "demand_w=/a~2",
         "--state-dir", str(tmp_path), "--set", "polling.allowed_networks=127.0.0.0/8"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if not k.startswith("POLLER_")})
    assert done.returncode == 2, done.stderr
    assert "'~' not followed by 0 or 1" in done.stderr
    assert "password" not in done.stderr  # refused before the password was asked for
    assert not (tmp_path / "stack.json").exists()  # and before any server started


# -- reload and the API's address ----------------------------------------------------

def settings(**overrides: str) -> config.Settings:
    return config.load(config_path=None, env={}, overrides=overrides)


def test_a_reload_cannot_open_the_api_on_a_public_address() -> None:
    tokens = {"api.admin_token": ADMIN_TOKEN, "api.read_token": READ_TOKEN}
    service = Service(settings(**{"api.host": "192.0.2.10"}, **tokens))
    # The configuration alone refuses a public host without tokens; but a new
    # file may name loopback (applied at a restart only) and drop the tokens
    # (applied at once), which would leave the bound public address open.
    fresh = settings(**{"polling.timeout_s": "2"})
    assert fresh.api.host == "127.0.0.1" and not fresh.api.admin_token
    with pytest.raises(ConfigError, match="loopback"):
        service.reload(fresh)
    assert service.settings.api.admin_token == ADMIN_TOKEN  # nothing applied
    assert service.settings.polling.timeout_s != 2.0
    # Settings made some other way than from a file are held to the same rule.
    with pytest.raises(ConfigError, match=r"192\.0\.2\.10"):
        service.reload(dataclasses.replace(service.settings, api=dataclasses.replace(
            service.settings.api, admin_token="", read_token="")))
    # Dropping one token of two keeps the API closed: applied.
    assert service.reload(settings(**{"api.host": "192.0.2.10",
                                      "api.admin_token": ADMIN_TOKEN})) == []
    assert service.settings.api.read_token == ""


def test_a_reload_may_open_an_api_bound_to_loopback() -> None:
    service = Service(settings(**{"api.admin_token": ADMIN_TOKEN}))
    assert service.reload(settings()) == []
    assert service.settings.api.admin_token == ""


def test_serve_refuses_an_open_public_api_before_starting_anything(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLLER_")}
    done = subprocess.run(
        [sys.executable, "-m", "poller", "serve", "--state-dir", str(tmp_path),
         "--set", "api.host=0.0.0.0"],
        capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "poller: configuration error: api.host: with no api.admin_token or api.read_token "
        "the API binds only to loopback (127.0.0.1, ::1), got '0.0.0.0'"]
    assert not any(tmp_path.iterdir())  # no server, no key, no spool


# -- browsers: Content-Type and Host -------------------------------------------------

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


def raw(server: ApiServer, method: str, path: str, *, body: bytes | None = None,
        headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """A request with exactly ``headers`` (http.client adds Host unless given)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host="Host" in headers,
                        skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, orjson.loads(data) if data else {}
    finally:
        conn.close()


NEW_DEVICE = b'{"email": "a@b.example", "driver": "eagle-cloud", "password": "pw-0123"}'
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_writes_need_a_json_content_type(server: ApiServer, content_type: str | None) -> None:
    cid = uuid.uuid4().hex[:6]
    headers = dict(AUTH)
    if content_type is not None:
        headers["Content-Type"] = content_type
    status, doc = raw(server, "POST", f"/api/user/{cid}", body=NEW_DEVICE, headers=headers)
    assert status == 415 and doc["error"]["code"] == "unsupported_media_type", doc
    assert "application/json" in doc["error"]["message"]
    status, _ = raw(server, "GET", f"/api/devices/{cid}",
                    headers={"Authorization": f"Bearer {READ_TOKEN}"})
    assert status == 404  # nothing was written
    status, _ = raw(server, "POST", f"/api/user/{cid}", body=NEW_DEVICE,
                    headers={**AUTH, "Content-Type": "application/json; charset=utf-8"})
    assert status == 201


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8640", "127.0.0.1.evil.example",
                                  "10.0.0.1", ""])
def test_writes_need_a_host_naming_the_api(server: ApiServer, host: str) -> None:
    cid = uuid.uuid4().hex[:6]
    json_auth = {**AUTH, "Content-Type": "application/json"}
    status, doc = raw(server, "POST", f"/api/user/{cid}", body=NEW_DEVICE,
                      headers={**json_auth, "Host": host})
    assert status == 421 and doc["error"]["code"] == "misdirected_request", doc
    assert "127.0.0.1" in doc["error"]["message"]
    status, _ = raw(server, "POST", f"/api/user/{cid}", body=NEW_DEVICE, headers=json_auth)
    assert status == 201
    for interval, good in enumerate(("127.0.0.1", f"127.0.0.1:{server.port}",
                                     f"localhost:{server.port}", "LOCALHOST."), start=7):
        status, doc = raw(server, "POST", f"/api/user/{cid}",
                          body=f'{{"interval_s": {interval}}}'.encode(),
                          headers={**json_auth, "Host": good})
        assert status == 200 and doc["interval_s"] == interval, (good, doc)
    status, _ = raw(server, "POST", f"/api/user/{cid}", body=b'{"interval_s": 60}',
                    headers={**json_auth, "Host": host})
    assert status == 421
    status, doc = raw(server, "GET", f"/api/devices/{cid}",
                      headers={"Authorization": f"Bearer {READ_TOKEN}"})
    assert status == 200 and doc["interval_s"] == 10  # the refused write changed nothing
    status, doc = raw(server, "DELETE", f"/api/user/{cid}", headers={**AUTH, "Host": host})
    assert status == 421, doc
    status, _ = raw(server, "DELETE", f"/api/user/{cid}", headers=AUTH)  # no body, no type
    assert status == 200


def test_reads_with_a_token_answer_any_host(server: ApiServer) -> None:
    # A page cannot make the browser send the token: no rebinding risk there.
    status, _ = raw(server, "GET", "/api/fleet", headers={
        "Authorization": f"Bearer {READ_TOKEN}", "Host": "poller.example"})
    assert status == 200


def test_an_open_api_answers_only_its_own_host(open_server: ApiServer) -> None:
    status, doc = raw(open_server, "GET", "/api/devices", headers={"Host": "rebound.example"})
    assert status == 421 and doc["error"]["code"] == "misdirected_request"
    assert raw(open_server, "GET", "/api/devices", headers={})[0] == 200
    assert raw(open_server, "GET", "/api/devices", headers={"Host": "[::1]:1"})[0] == 200
    # Nothing secret behind these: probes may use any name.
    assert raw(open_server, "GET", "/healthz", headers={"Host": "rebound.example"})[0] == 200


# -- a lost key file -------------------------------------------------------------------

async def test_a_lost_key_file_is_an_error_while_secrets_are_sealed(stack: RunningStack,
                                                                      tmp_path: Path) -> None:
    conn = await asyncpg.connect(fresh_database_url(stack.info))
    try:
        await migrate(conn)
        key = await registry_key(conn, tmp_path)  # nothing sealed yet: a key is made
        key_file = tmp_path / sealing.KEY_FILE_NAME
        assert key_file.exists()
        reg = Registry(conn, sealing.SecretBox(key))
        await reg.add("00ce69", email="a@b.example", driver="eagle-cloud", url=None,
                      interval_s=6.0, options={}, secret=PASSWORD)
        key_file.unlink()
        with pytest.raises(SecretKeyError) as caught:
            await registry_key(conn, tmp_path)
        message = str(caught.value)
        assert "secret.key is missing" in message and "1 sealed device credential" in message
        assert sealing.KEY_ENV in message
        assert not key_file.exists()  # never silently replaced
        # The key itself, given back, opens them again.
        env_key = {sealing.KEY_ENV: sealing.encode_key(key)}
        assert sealing.load_key(tmp_path, env_key, sealed=1) == key
        # Removed devices hold nothing sealed: then a new key is fine.
        await reg.remove("00ce69")
        assert await registry_key(conn, tmp_path) != key
    finally:
        await conn.close()


def test_serve_will_not_make_a_new_key_for_sealed_devices(stack: RunningStack,
                                                          tmp_path: Path) -> None:
    from tests.servicefix import service_env

    database_url = fresh_database_url(stack.info)
    env = service_env(stack.info, database_url, tmp_path / "state",
                      f"key-{uuid.uuid4().hex[:8]}")
    add = subprocess.run(
        [sys.executable, "-m", "poller", "add-user", "00ce69", "--email", "a@b.example",
         "--password-stdin"], input=PASSWORD + "\n", capture_output=True, text=True,
        timeout=60, env={**os.environ, **env})
    assert add.returncode == 0, add.stderr
    key_file = tmp_path / "state" / sealing.KEY_FILE_NAME
    key_file.unlink()
    serve = subprocess.run([sys.executable, "-m", "poller", "serve"], capture_output=True,
                           text=True, timeout=120, env={**os.environ, **env},
                           stdin=subprocess.DEVNULL)
    assert serve.returncode == 2, serve.stderr[-2000:]
    assert "secret.key is missing" in serve.stderr and "Traceback" not in serve.stderr
    assert not key_file.exists()


def test_doctests_of_the_guards() -> None:
    import doctest

    from poller.api import auth
    from poller.stack import process

    for module in (auth, process):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__
