"""Device URLs cannot reach what they should not (SSRF): the policy itself,
its configuration keys, registration (library, CLI and API) and the check on
the address actually connected, by both transports, against real servers."""

from __future__ import annotations

import asyncio
import doctest
import ipaddress
import logging
import os
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import orjson
import pytest

from poller import config, migrate, netpolicy, sealing
from poller.config import PollingSettings
from poller.errors import ConfigError, UsageError
from poller.http import HttpRequest
from poller.netpolicy import (
    DEFAULT_DENIED_NETWORKS,
    LOOPBACK_NETWORKS,
    AddressNotAllowed,
    NetPolicy,
    allowed_addresses,
)
from poller.polling.engine import PollingEngine
from poller.polling.memsink import MemorySink
from poller.registry import Registry, check_url_policy
from poller.service import Service
from poller.transport import AiohttpClient, FastHttpClient, TransportConnectError
from tests.apiview import ADMIN_TOKEN, ApiServer, settings_with
from tests.stackfix import RunningStack, fresh_database_url

DEFAULT = NetPolicy.default()
LOOPBACK = NetPolicy.from_lists(allowed=LOOPBACK_NETWORKS, denied=DEFAULT_DENIED_NETWORKS)
DENIED_LOOPBACK = "address 127.0.0.1 is not allowed by polling.denied_networks (127.0.0.0/8)"
# localhost may resolve to ::1 first: the first refused address is named.
LOCALHOST_REFUSED = (r"localhost resolved to (127\.0\.0\.1|::1); address (127\.0\.0\.1|::1) is "
                     r"not allowed by polling\.denied_networks \((127\.0\.0\.0/8|::1/128)\)")


def refusal(policy: NetPolicy, address: str) -> str | None:
    return policy.address_refusal(ipaddress.ip_address(address))


# -- the policy ------------------------------------------------------------------

def test_the_module_examples_hold() -> None:
    result = doctest.testmod(netpolicy)
    assert result.attempted >= 10 and result.failed == 0


@pytest.mark.parametrize(("address", "network"), [
    ("127.0.0.1", "127.0.0.0/8"), ("127.8.9.10", "127.0.0.0/8"),      # loopback
    ("::1", "::1/128"),
    ("169.254.169.254", "169.254.0.0/16"), ("fe80::1", "fe80::/10"),  # link-local: metadata
    ("fe80::1%eth0", "fe80::/10"),
    ("0.0.0.0", "0.0.0.0/8"), ("::", "::/128"),                        # unspecified
    ("224.0.0.1", "224.0.0.0/4"), ("ff02::1", "ff00::/8"),             # multicast
    ("100.100.100.200", "100.100.100.200/32"),                         # other clouds' metadata
    ("fd00:ec2::254", "fd00:ec2::254/128"),
    ("::ffff:127.0.0.1", "127.0.0.0/8"),                               # IPv4-mapped
    ("::ffff:169.254.169.254", "169.254.0.0/16"),
])
def test_each_default_denied_class_is_refused(address: str, network: str) -> None:
    why = refusal(DEFAULT, address)
    assert why is not None and why.endswith(f"is not allowed by polling.denied_networks "
                                            f"({network})")


@pytest.mark.parametrize("address", ["192.168.1.50", "10.0.0.7", "172.16.4.4", "8.8.8.8",
                                     "2001:db8::1", "fd12:3456::1", "::ffff:192.168.1.50"])
def test_ordinary_device_addresses_pass_by_default(address: str) -> None:
    assert refusal(DEFAULT, address) is None


def test_allowed_networks_re_admit_and_are_an_allow_list() -> None:
    assert refusal(LOOPBACK, "127.0.0.1") is None
    assert refusal(LOOPBACK, "::1") is None
    assert refusal(LOOPBACK, "::ffff:127.0.0.1") is None
    # Loopback allowed does not open the metadata service ...
    assert "polling.denied_networks (169.254.0.0/16)" in str(refusal(LOOPBACK, "169.254.169.254"))
    # ... and anything in neither list is refused once an allow-list is set.
    assert refusal(LOOPBACK, "192.168.1.50") == \
        "address 192.168.1.50 is not in polling.allowed_networks"


def test_the_most_specific_network_decides() -> None:
    everything = NetPolicy.from_lists(allowed=("0.0.0.0/0", "::/0"),
                                      denied=DEFAULT_DENIED_NETWORKS)
    assert refusal(everything, "8.8.8.8") is None
    assert refusal(everything, "169.254.169.254") is not None  # /16 beats /0
    assert refusal(everything, "::1") is not None
    lab = NetPolicy.from_lists(allowed=("10.0.0.0/8", "169.254.10.0/24"),
                               denied=(*DEFAULT_DENIED_NETWORKS, "10.1.0.0/16"))
    assert refusal(lab, "10.2.0.1") is None
    assert "(10.1.0.0/16)" in str(refusal(lab, "10.1.2.3"))
    assert refusal(lab, "169.254.10.5") is None            # a /24 re-admitted inside the /16
    assert refusal(lab, "169.254.169.254") is not None


def test_no_denied_networks_means_everything_goes() -> None:
    open_policy = NetPolicy.from_lists(allowed=(), denied=())
    assert refusal(open_policy, "127.0.0.1") is None
    assert open_policy.host_refusal("localhost", 80) is None
    # Names of metadata services are refused whatever the lists say.
    assert open_policy.host_refusal("metadata.google.internal", 80) is not None


@pytest.mark.parametrize("host", ["metadata.google.internal", "METADATA.google.internal.",
                                  "metadata.goog", "metadata", "instance-data",
                                  "instance-data.ec2.internal"])
def test_metadata_names_are_refused_by_name(host: str) -> None:
    assert DEFAULT.host_refusal(host, 80) == f"host {host!r} is a cloud metadata service"


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "0x7f000001", "127.1", "0177.0.0.1",
                                  "017700000001", "010.0.0.1", "0xa9.0xfe.0xa9.0xfe"])
def test_legacy_numeric_forms_are_refused_as_ambiguous(host: str) -> None:
    # urlsplit leaves them as they are and ipaddress refuses them, but the C
    # resolver maps each onto an address (2130706433 is 127.0.0.1).
    assert netpolicy.literal_address(host) is None
    why = DEFAULT.host_refusal(host, 80)
    assert why is not None and "ambiguous numeric address" in why
    # Even where the address is allowed: octal 010.0.0.1 is 8.0.0.1, not 10.0.0.1.
    assert NetPolicy.from_lists(allowed=("0.0.0.0/0",), denied=()).host_refusal(host, 80)


def test_names_are_judged_by_what_they_resolve_to() -> None:
    assert DEFAULT.host_refusal("localhost", 80) is None  # not by name: see below
    assert DEFAULT.host_refusal("device.lan", 80) is None


def test_the_configured_cloud_endpoint_is_trusted_and_nothing_else() -> None:
    settings = PollingSettings(cloud_base_url="http://127.0.0.1:9445")
    policy = NetPolicy.from_settings(settings)
    assert policy.host_refusal("127.0.0.1", 9445) is None
    assert policy.host_refusal("127.0.0.1", 6379) == DENIED_LOOPBACK
    real = NetPolicy.from_settings(PollingSettings())
    assert real.trusts("RainforestCloud.com", 9445)
    assert not real.trusts("rainforestcloud.com", 443)


@pytest.mark.parametrize(("url", "expect"), [
    ("http://169.254.169.254/latest/meta-data/", "169.254.0.0/16"),
    ("http://127.0.0.1:6379", "127.0.0.0/8"),
    ("http://[::1]:5432/", "::1/128"),
    ("http://0.0.0.0:8640/", "0.0.0.0/8"),
    ("http://[::]/", "::/128"),
    ("http://[::ffff:127.0.0.1]:80/", "127.0.0.0/8"),
    ("http://[::ffff:7f00:1]/", "127.0.0.0/8"),
    ("http://2130706433/", "ambiguous numeric"),
    ("http://0x7f.1/", "ambiguous numeric"),
    ("https://metadata.google.internal/computeMetadata/v1/", "metadata service"),
    ("http://224.0.0.251:5353/", "224.0.0.0/4"),
])
def test_registration_refuses_urls_as_written(url: str, expect: str) -> None:
    with pytest.raises(UsageError, match="refused") as caught:
        check_url_policy(url, DEFAULT)
    assert expect in str(caught.value)
    assert "\n" not in str(caught.value)


def test_registration_leaves_names_to_resolve() -> None:
    assert check_url_policy("http://192.168.1.50/cgi-bin", DEFAULT) is None
    assert check_url_policy("http://device.lan:8080/x", DEFAULT) == "device.lan"
    assert check_url_policy(None, DEFAULT) is None


async def test_allowed_addresses_resolve_and_filter() -> None:
    loop = asyncio.get_running_loop()
    with pytest.raises(AddressNotAllowed) as caught:
        await allowed_addresses(loop, DEFAULT, "localhost", 80)
    assert caught.value.strerror is not None
    assert caught.value.strerror.startswith("localhost resolved to ")
    assert "polling.denied_networks" in caught.value.strerror
    found = await allowed_addresses(loop, LOOPBACK, "localhost", 80)
    assert "127.0.0.1" in found and all(refusal(LOOPBACK, a) is None for a in found)
    assert await allowed_addresses(loop, LOOPBACK, "127.0.0.1", 80) == ["127.0.0.1"]
    with pytest.raises(AddressNotAllowed, match="ambiguous"):
        await allowed_addresses(loop, LOOPBACK, "0x7f.1", 80)
    with pytest.raises(OSError):  # a name that does not resolve is a connect error too
        await allowed_addresses(loop, LOOPBACK, "no-such-device.invalid", 80)


# -- configuration -----------------------------------------------------------------

def test_networks_from_environment_flags_and_toml(tmp_path: Path) -> None:
    s = config.load(config_path=None, env={})
    assert s.polling.allowed_networks == ()
    assert s.polling.denied_networks == DEFAULT_DENIED_NETWORKS
    s = config.load(config_path=None,
                    env={"POLLER_POLLING_ALLOWED_NETWORKS": " 127.0.0.0/8 , ::1 "},
                    overrides={"polling.denied_networks": "169.254.0.0/16,10.9.0.0/16"})
    assert s.polling.allowed_networks == ("127.0.0.0/8", "::1/128")
    assert s.polling.denied_networks == ("169.254.0.0/16", "10.9.0.0/16")
    path = tmp_path / "poller.toml"
    path.write_text('[polling]\nallowed_networks = ["192.168.0.0/16"]\ndenied_networks = []\n')
    s = config.load(config_path=path, env={})
    assert s.polling.allowed_networks == ("192.168.0.0/16",)
    assert s.polling.denied_networks == ()
    # `config show` writes them back as TOML arrays that load again.
    again = tmp_path / "again.toml"
    again.write_text(config.to_toml(config.as_dict(s)))
    assert config.load(config_path=again, env={}) == s


@pytest.mark.parametrize(("source", "raw", "message"), [
    ("env", "10.0.0.1/8", "host bits set (did you mean 10.0.0.0/8?)"),
    ("env", "localhost", "is not a network"),
    ("set", "10.0.0.0/33", "is not a network"),
    ("toml", '"10.0.0.0/8"', "expected a list of CIDR networks"),
    ("toml", "[10]", "expected a list of CIDR networks"),
    ("toml", '["fe80::/10", "nope"]', "is not a network"),
])
def test_bad_networks_are_refused_naming_the_key(tmp_path: Path, source: str, raw: str,
                                                 message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        if source == "env":
            config.load(config_path=None, env={"POLLER_POLLING_DENIED_NETWORKS": raw})
        elif source == "set":
            config.load(config_path=None, env={}, overrides={"polling.denied_networks": raw})
        else:
            path = tmp_path / "poller.toml"
            path.write_text(f"[polling]\ndenied_networks = {raw}\n")
            config.load(config_path=path, env={})
    assert str(caught.value).startswith("polling.denied_networks: ")
    assert message in str(caught.value)


def test_a_reload_keeps_the_policy_and_names_it_for_a_restart() -> None:
    # The transports hold the policy, and connections kept alive under the old
    # one would outlive a change made live.
    service = Service(config.load(config_path=None, env={}))
    fresh = config.load(config_path=None, env={"POLLER_POLLING_ALLOWED_NETWORKS": "127.0.0.0/8",
                                               "POLLER_POLLING_TIMEOUT_S": "2"})
    assert service.reload(fresh) == ["polling.allowed_networks"]
    assert service.settings.polling.allowed_networks == ()
    assert service.settings.polling.timeout_s == 2.0  # the rest applies live


# -- registration --------------------------------------------------------------------

async def _migrated(url: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(url)
    await migrate.migrate(conn)
    return conn


async def test_registry_refuses_denied_urls_and_names_resolving_to_them(
        fresh_db: str, caplog: pytest.LogCaptureFixture) -> None:
    conn = await _migrated(fresh_db)
    try:
        reg = Registry(conn, sealing.SecretBox(sealing.generate_key()))  # the default policy
        for url in ("http://169.254.169.254/latest/meta-data/", "http://127.0.0.1:6379",
                    "http://[::1]:5432", "http://0.0.0.0/", "http://2130706433/",
                    "http://metadata.google.internal/", "http://localhost:8080/"):
            with pytest.raises(UsageError, match="refused"):
                await reg.add("00ab12", email="a@b.example", driver="eagle-local", url=url,
                              interval_s=6, options={}, secret="pw")
        with pytest.raises(UsageError, match=LOCALHOST_REFUSED.replace("resolved", "resolves")):
            await reg.add("00ab12", email="a@b.example", driver="eagle-local",
                          url="http://localhost/", interval_s=6, options={}, secret="pw")
        with pytest.raises(UsageError, match="refused"):
            await reg.upsert_many([("00ab13", "a@b.example", "eagle-local",
                                    "http://127.0.0.1:9", 6.0, "pw")])
        assert await reg.listing() == []  # nothing half-written
        # A name that does not resolve now: registered, with a warning.
        with caplog.at_level(logging.WARNING, logger="poller.registry"):
            rec = await reg.add("00ab14", email="a@b.example", driver="eagle-local",
                                url="http://gateway-7.invalid/", interval_s=6, options={},
                                secret="pw")
        assert rec.url == "http://gateway-7.invalid/"
        assert "gateway-7.invalid does not resolve now" in caplog.text
        assert "pw" not in caplog.text
        # An ordinary LAN address, and loopback where the policy allows it.
        await reg.add("00ab15", email="a@b.example", driver="eagle-local",
                      url="http://192.168.1.50", interval_s=6, options={}, secret="pw")
        lab = Registry(conn, sealing.SecretBox(sealing.generate_key()), LOOPBACK)
        await lab.add("00ab16", email="a@b.example", driver="eagle-local",
                      url="http://localhost:8080/", interval_s=6, options={}, secret="pw")
        # Moving a device onto a denied address is refused like registering it there.
        with pytest.raises(UsageError, match=r"\(169\.254\.0\.0/16\)"):
            await reg.update("00ab15", url="http://169.254.169.254/", secret="pw")
        assert (await reg.get("00ab15")).url == "http://192.168.1.50"
    finally:
        await conn.close()


def _cli(args: list[str], env: dict[str, str], stdin: str = "pw\n",
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "poller", *args], input=stdin,
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=120)


def test_cli_refuses_each_measured_url_in_one_line(stack: RunningStack, tmp_path: Path) -> None:
    env = {"POLLER_STATE_DIR": str(tmp_path / "state"),
           "POLLER_DATABASE_URL": fresh_database_url(stack.info),
           "POLLER_REDIS_URL": stack.info.redis_url,
           "POLLER_S3_ENDPOINT_URL": stack.info.s3_endpoint_url}
    for url in ("http://169.254.169.254/latest/meta-data/", "http://127.0.0.1:6379",
                "http://[::1]:5432", "http://localhost/", "http://metadata.google.internal/",
                "http://0.0.0.0/"):
        out = _cli(["add-user", "00ab12", "--email", "a@b.example", "--driver", "eagle-local",
                    "--url", url, "--password-stdin"], env)
        assert out.returncode == 2, (url, out.stdout, out.stderr)
        assert out.stderr.strip().count("\n") == 0 and "refused" in out.stderr, out.stderr
    listing = _cli(["list-users", "--json"], env)
    assert listing.returncode == 0 and orjson.loads(listing.stdout) == []
    # Allowed explicitly, by configuration: the same loopback URL registers.
    out = _cli(["add-user", "00ab12", "--email", "a@b.example", "--driver", "eagle-local",
                "--url", "http://127.0.0.1:6379", "--password-stdin",
                "--set", "polling.allowed_networks=127.0.0.0/8"], env)
    assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module")
def api(stack: RunningStack) -> Iterator[ApiServer]:
    srv = ApiServer(fresh_database_url(stack.info), stack.info.redis_url,
                    settings_with(ADMIN_TOKEN)).start()
    try:
        yield srv
    finally:
        srv.stop()


def test_api_refuses_denied_urls_and_moving_a_device_without_its_password(
        api: ApiServer) -> None:
    def put(cid: str, **body: object) -> tuple[int, dict[str, object]]:
        body.setdefault("email", "a@b.example")
        reply = api.request("POST", f"/api/user/{cid}", token=ADMIN_TOKEN, json=body)
        return reply.status, reply.json()

    cid = uuid.uuid4().hex[:6]
    # settings_with allows loopback only: the metadata service stays refused.
    for url in ("http://169.254.169.254/latest/meta-data/", "http://metadata.google.internal/",
                "http://0x7f.1/", "http://192.168.1.50/"):
        status, doc = put(cid, driver="eagle-local", url=url, password="pw")
        assert status == 400, doc
        assert "refused" in str(doc["error"]["message"])  # type: ignore[index]
    status, doc = put(cid, driver="eagle-local", url="http://127.0.0.1:9", password="pw")
    assert status == 201, doc
    status, doc = put(cid, url="http://127.0.0.2:9")
    assert status == 400, doc
    message = str(doc["error"]["message"])  # type: ignore[index]
    assert "needs its password again" in message and "never sent to a new address" in message
    status, doc = put(cid, driver="http-json", fields={"demand_w": "/w"})
    assert status == 400 and "driver" in str(doc["error"]["message"])  # type: ignore[index]
    status, doc = put(cid, url="http://127.0.0.2:9", password="pw2")
    assert status == 200 and doc["url"] == "http://127.0.0.2:9", doc
    status, doc = put(cid, interval_s=30)  # what does not move the password needs none
    assert status == 200 and doc["interval_s"] == 30, doc


# -- the address actually connected ------------------------------------------------------

class CountingServer:
    """A tiny HTTP/1.1 server on loopback that counts the connections it accepts."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> CountingServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        body = b'{"w": 1234}'
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


@pytest.fixture
async def server() -> AsyncIterator[CountingServer]:
    srv = await CountingServer().start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.mark.parametrize("kind", ["fast", "aiohttp"])
@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::ffff:127.0.0.1]"])
async def test_both_transports_refuse_a_denied_address_at_connect(
        server: CountingServer, kind: str, host: str) -> None:
    request = HttpRequest("GET", f"http://{host}:{server.port}/status", ())
    denied = FastHttpClient(net_policy=DEFAULT) if kind == "fast" \
        else AiohttpClient(net_policy=DEFAULT)
    try:
        with pytest.raises(TransportConnectError) as caught:
            await denied.fetch(request, timeout_s=5.0)
    finally:
        await denied.close()
    message = str(caught.value)
    if host == "localhost":
        assert re.search(LOCALHOST_REFUSED, message), message
    else:
        assert "is not allowed by polling.denied_networks (127.0.0.0/8)" in message, message
    assert server.connections == 0  # refused before dialling: nothing reached the server
    # The control: allowed by configuration, the same request is answered.
    allowed = FastHttpClient(net_policy=LOOPBACK) if kind == "fast" \
        else AiohttpClient(net_policy=LOOPBACK)
    try:
        if host != "[::ffff:127.0.0.1]":  # a mapped address needs an IPv6 socket to dial
            response = await allowed.fetch(request, timeout_s=5.0)
            assert response.status == 200 and response.body == b'{"w": 1234}'
            assert server.connections == 1
    finally:
        await allowed.close()


async def test_a_kept_alive_connection_is_not_checked_again(server: CountingServer) -> None:
    client = FastHttpClient(net_policy=LOOPBACK)
    request = client.prepared(HttpRequest("GET", f"http://localhost:{server.port}/", ()))
    try:
        for _ in range(5):
            assert (await client.fetch(request, timeout_s=5.0)).status == 200
        assert server.connections == 1 and client.stats().connections_opened == 1
    finally:
        await client.close()


async def test_a_device_whose_name_now_resolves_to_loopback_gets_connect_errors(
        fresh_db: str, server: CountingServer) -> None:
    """Registered where its name was allowed (here: a registry allowing loopback,
    as if the name resolved elsewhere then), polled by an engine whose policy
    denies loopback: each poll is a connect_error naming the policy, and no
    connection reaches the server, on the fast transport and on aiohttp."""
    key = sealing.generate_key()
    conn = await _migrated(fresh_db)
    try:
        reg = Registry(conn, sealing.SecretBox(key), LOOPBACK)
        local = await reg.add("00ab21", email="a@b.example", driver="eagle-local",
                              url=f"http://localhost:{server.port}", interval_s=0.5,
                              options={}, secret="pw")
        meter = await reg.add("meter-21", email="", driver="http-json",
                              url=f"http://localhost:{server.port}/status", interval_s=0.5,
                              options={"fields": {"demand_w": "/w"}}, secret="pw")
        literal = await reg.add("meter-22", email="", driver="http-json",
                                url=f"http://127.0.0.1:{server.port}/status", interval_s=0.5,
                                options={"fields": {"demand_w": "/w"}}, secret="pw")
    finally:
        await conn.close()
    settings = PollingSettings(interval_s=0.5, timeout_s=0.3)  # loopback denied by default
    engine = PollingEngine(settings, fresh_db, sealing.SecretBox(key), MemorySink(), seed="t")
    await engine.start()
    try:
        targets = {rec.id: engine.pool.loops[rec.id].target for rec in (local, meter, literal)}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10.0
        while any(t.last_outcome is None for t in targets.values()):
            assert loop.time() < deadline, {i: t.last_outcome for i, t in targets.items()}
            await asyncio.sleep(0.05)
        for target in targets.values():
            assert target.last_outcome == "connect_error", target.snapshot()
            assert target.last_error is not None
            assert "is not allowed by polling.denied_networks (" in target.last_error, \
                target.last_error
        assert re.search(LOCALHOST_REFUSED, str(targets[local.id].last_error))
        assert re.search(LOCALHOST_REFUSED, str(targets[meter.id].last_error))
        assert "address 127.0.0.1 is not allowed" in str(targets[literal.id].last_error)
        assert server.connections == 0
    finally:
        await engine.stop(2.0)
