"""Both HTTP transports against real servers on 127.0.0.1:0.

Normal cases run against an aiohttp web server; hostile ones against raw
``asyncio.start_server`` handlers that write exactly the bytes under test.
Deadlines of the fast transport are tested on a FakeClock (poller.clock), so
a deadline passes exactly when the test moves the clock; tests run on both
transports keep the real clock and check only that a deadline is never early.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from poller.clock import FakeClock, settle
from poller.http import HttpRequest, HttpResponse
from poller.transport import (
    AiohttpClient,
    FastHttpClient,
    PreparedRequest,
    Transport,
    TransportConnectError,
    TransportPoolFull,
    TransportProtocolError,
    TransportQueueTimeout,
    TransportTimeout,
    prepare,
)

MakeClient = Callable[..., Transport]
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# -- servers -----------------------------------------------------------------


class WebServer:
    """An aiohttp server that records which client connections it saw."""

    def __init__(self) -> None:
        self.peers: set[Any] = set()
        self.runner: web.AppRunner | None = None
        self.port = 0

    def _seen(self, request: web.Request) -> None:
        assert request.transport is not None
        self.peers.add(request.transport.get_extra_info("peername"))

    async def echo(self, request: web.Request) -> web.Response:
        self._seen(request)
        body = await request.read()
        return web.Response(
            body=body,
            headers={
                "X-Method": request.method,
                "X-Seen": request.headers.get("X-Test", ""),
                "X-Path": request.path_qs,
            },
        )

    async def chunked(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(int(request.query.get("n", "5"))):
            await resp.write(f"part{i};".encode())
        await resp.write_eof()
        return resp

    async def sized(self, request: web.Request) -> web.Response:
        self._seen(request)
        return web.Response(body=b"x" * int(request.query["n"]))

    async def slow(self, request: web.Request) -> web.Response:
        self._seen(request)
        await asyncio.sleep(0.005)
        return web.Response(body=b"slow")

    async def start(self, tls: ssl.SSLContext | None = None) -> None:
        app = web.Application()
        app.router.add_route("*", "/echo", self.echo)
        app.router.add_get("/chunked", self.chunked)
        app.router.add_get("/sized", self.sized)
        app.router.add_get("/slow", self.slow)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=tls)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


class RawServer:
    """asyncio.start_server running ``handler`` per connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[Any]] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Stopped by stop(); ending normally keeps 3.11's streams from
            # reporting the cancellation as an unhandled error.
            pass
        finally:
            writer.close()
            self.tasks.discard(task)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks)
        await self.server.wait_closed()

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


async def read_request(reader: asyncio.StreamReader) -> str | None:
    """Read one request; return its target, or None at a clean EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return lines[0].split(" ")[1]


def ok_response(body: bytes = b"ok", extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body
    )


# -- fixtures ----------------------------------------------------------------


@pytest.fixture(params=["fast", "aiohttp"])
async def make_client(request: pytest.FixtureRequest) -> AsyncIterator[MakeClient]:
    clients: list[Transport] = []

    def make(**kwargs: Any) -> Transport:
        client: Transport
        if request.param == "fast":
            client = FastHttpClient(**kwargs)
        else:
            kwargs.pop("max_waiters", None)
            client = AiohttpClient(**kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
async def web_server() -> AsyncIterator[WebServer]:
    server = WebServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def raw_servers() -> AsyncIterator[Callable[[Handler], Awaitable[RawServer]]]:
    started: list[RawServer] = []

    async def start(handler: Handler) -> RawServer:
        server = RawServer(handler)
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


def get(url: str, headers: tuple[tuple[str, str], ...] = ()) -> HttpRequest:
    return HttpRequest("GET", url, headers)


def header(response: HttpResponse, name: str) -> str | None:
    return next((v for k, v in response.headers if k == name), None)


# -- normal exchanges ----------------------------------------------------------


async def test_get_and_post_round_trip(make_client: MakeClient, web_server: WebServer) -> None:
    client = make_client()
    base = f"http://127.0.0.1:{web_server.port}"

    got = await client.fetch(get(f"{base}/echo?a=1&b=2", (("X-Test", "hello"),)), 2.0)
    assert got.status == 200
    assert header(got, "x-method") == "GET"
    assert header(got, "x-seen") == "hello"
    assert header(got, "x-path") == "/echo?a=1&b=2"
    assert got.body == b""
    assert all(name == name.lower() for name, _ in got.headers)

    body = b'{"command": "get_device_data"}' * 10
    post = HttpRequest("POST", f"{base}/echo", (("Content-Type", "text/xml"),), body)
    got = await client.fetch(post, 2.0)
    assert (got.status, header(got, "x-method"), got.body) == (200, "POST", body)
    assert header(got, "content-length") == str(len(body))

    missing = await client.fetch(get(f"{base}/nowhere"), 2.0)
    assert missing.status == 404


async def test_keep_alive_reuses_one_connection(
    make_client: MakeClient, web_server: WebServer
) -> None:
    client = make_client()
    request = get(f"http://127.0.0.1:{web_server.port}/echo")
    for _ in range(100):
        assert (await client.fetch(request, 2.0)).status == 200
    assert len(web_server.peers) == 1


async def test_chunked_body(make_client: MakeClient, web_server: WebServer) -> None:
    client = make_client()
    got = await client.fetch(get(f"http://127.0.0.1:{web_server.port}/chunked?n=40"), 2.0)
    assert got.status == 200
    assert header(got, "transfer-encoding") == "chunked"
    assert got.body == b"".join(f"part{i};".encode() for i in range(40))
    again = await client.fetch(get(f"http://127.0.0.1:{web_server.port}/chunked?n=2"), 2.0)
    assert again.body == b"part0;part1;"
    assert len(web_server.peers) == 1


async def test_large_body_within_cap(make_client: MakeClient, web_server: WebServer) -> None:
    client = make_client(max_body_bytes=300_000)
    got = await client.fetch(get(f"http://127.0.0.1:{web_server.port}/sized?n=300000"), 2.0)
    assert got.body == b"x" * 300_000


async def test_many_concurrent_requests_beyond_host_cap(
    make_client: MakeClient, web_server: WebServer
) -> None:
    client = make_client(max_connections_per_host=4)
    request = get(f"http://127.0.0.1:{web_server.port}/slow")
    results = await asyncio.gather(*(client.fetch(request, 5.0) for _ in range(120)))
    assert [r.body for r in results] == [b"slow"] * 120
    assert 1 <= len(web_server.peers) <= 4


# -- answers that end with the connection ---------------------------------------


async def test_http10_and_connection_close_read_until_eof(
    make_client: MakeClient, raw_servers: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    page = b"<html><body>" + b"y" * 5000 + b"</body></html>"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        target = await read_request(reader)
        if target == "/v10":
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        writer.write(page[:100])
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(page[100:])
        await writer.drain()

    server = await raw_servers(handler)
    client = make_client()
    for path in ("/v10", "/close", "/v10"):
        got = await client.fetch(get(server.url(path)), 2.0)
        assert (got.status, got.body) == (200, page)
    assert server.connections == 3


async def test_interim_1xx_is_skipped(
    make_client: MakeClient, raw_servers: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            writer.write(ok_response(b"final", "X-Final: 1\r\n"))

    server = await raw_servers(handler)
    client = make_client()
    for _ in range(2):
        got = await client.fetch(get(server.url()), 2.0)
        assert (got.status, got.body, header(got, "x-final")) == (200, b"final", "1")
    assert server.connections == 1


async def test_server_closing_idle_connection_is_transparent(
    make_client: MakeClient, raw_servers: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok_response())
        await writer.drain()
        await asyncio.sleep(0.02)  # idle keep-alive timeout of the server

    server = await raw_servers(handler)
    client = make_client()
    assert (await client.fetch(get(server.url()), 2.0)).body == b"ok"
    await asyncio.wait(set(server.tasks))  # the server has closed it
    assert (await client.fetch(get(server.url()), 2.0)).body == b"ok"
    assert server.connections == 2


# -- failures --------------------------------------------------------------------


async def test_hanging_server_times_out_then_next_request_works(
    make_client: MakeClient, raw_servers: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (target := await read_request(reader)) is not None:
            if target == "/hang":
                await reader.read()  # until the client gives up
                return
            writer.write(ok_response())

    server = await raw_servers(handler)
    client = make_client()
    assert (await client.fetch(get(server.url("/ok")), 2.0)).body == b"ok"
    began = time.monotonic()
    with pytest.raises(TransportTimeout):
        await client.fetch(get(server.url("/hang")), 0.3)
    assert time.monotonic() - began >= 0.29  # never early (how late is the loop's)
    assert (await client.fetch(get(server.url("/ok")), 2.0)).body == b"ok"


async def test_fast_deadlines_pass_exactly_on_the_clock(
    raw_servers: Callable[[Handler], Awaitable[RawServer]],
) -> None:
    got_request = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (target := await read_request(reader)) is not None:
            if target == "/hang":
                got_request.set()
                await reader.read()  # until the client gives up
                return
            writer.write(ok_response())

    server = await raw_servers(handler)
    clock = FakeClock()
    client = FastHttpClient(deadline_resolution_s=0.05, clock=clock)
    try:
        for _ in range(2):
            assert (await client.fetch(get(server.url("/ok")), 2.0)).body == b"ok"
            got_request.clear()
            hung = asyncio.ensure_future(client.fetch(get(server.url("/hang")), 0.3))
            await asyncio.wait_for(got_request.wait(), 5.0)  # on the wire
            clock.advance(0.29)
            await settle()
            assert not hung.done()  # never early
            clock.advance(0.06)  # the next sweep after the deadline
            with pytest.raises(TransportTimeout):
                await hung
            # The timed-out connection was dropped and the sweep, with no
            # connection open, stopped; the next exchange must be swept again.
            clock.advance(1.0)
        # One connection per round: a timed-out one is closed, never reused.
        stats = client.stats()
        assert (stats.connections_opened, stats.open_connections) == (2, 0)
    finally:
        await client.close()


async def test_connection_refused(make_client: MakeClient) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = make_client()
    with pytest.raises(TransportConnectError) as caught:
        await client.fetch(get(f"http://127.0.0.1:{port}/"), 2.0)
    assert str(port) in str(caught.value)


async def test_connect_timeout(make_client: MakeClient) -> None:
    # A listener whose accept queue is full drops further SYNs: connect hangs.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        for filler in fillers:
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        try:
            client = make_client()
            began = time.monotonic()
            with pytest.raises(TransportTimeout):
                await client.fetch(get(f"http://127.0.0.1:{port}/"), 0.3)
            assert time.monotonic() - began >= 0.29  # never early
            if isinstance(client, FastHttpClient):
                stats = client.stats()
                assert (stats.connecting, stats.open_connections, stats.in_flight) == (0, 0, 0)
        finally:
            for filler in fillers:
                filler.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"HELLO THERE\r\n\r\n",
        b"HTTP/1.1 abc OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: zz\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nXYZ\r\nok\r\n0\r\n\r\n",
    ],
    ids=["not-http", "bad-status", "bad-length", "bad-chunk"],
)
async def test_garbage_response(
    make_client: MakeClient,
    raw_servers: Callable[[Handler], Awaitable[RawServer]],
    answer: bytes,
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()
        await reader.read()

    server = await raw_servers(handler)
    client = make_client()
    with pytest.raises(TransportProtocolError):
        await client.fetch(get(server.url()), 2.0)


async def test_truncated_body(
    make_client: MakeClient, raw_servers: Callable[[Handler], Awaitable[RawServer]]
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")

    server = await raw_servers(handler)
    client = make_client()
    with pytest.raises(TransportProtocolError):
        await client.fetch(get(server.url()), 2.0)


async def test_body_over_cap(make_client: MakeClient, web_server: WebServer) -> None:
    client = make_client(max_body_bytes=1000)
    base = f"http://127.0.0.1:{web_server.port}"
    with pytest.raises(TransportProtocolError, match="1000"):
        await client.fetch(get(f"{base}/sized?n=1001"), 2.0)
    with pytest.raises(TransportProtocolError, match="1000"):
        await client.fetch(get(f"{base}/chunked?n=300"), 2.0)
    assert (await client.fetch(get(f"{base}/sized?n=1000"), 2.0)).body == b"x" * 1000


# -- TLS -----------------------------------------------------------------------


def make_self_signed(tmp: Path) -> tuple[Path, Path, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "poller-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(pem)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path, pem.decode()


async def test_tls_with_self_signed_certificate(make_client: MakeClient, tmp_path: Path) -> None:
    cert_path, key_path, pem = make_self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert_path, key_path)
    server = WebServer()
    await server.start(tls=server_ctx)
    try:
        trusting = make_client(ssl_context=ssl.create_default_context(cadata=pem))
        for host in ("127.0.0.1", "localhost"):
            got = await trusting.fetch(
                HttpRequest("POST", f"https://{host}:{server.port}/echo", (), b"secret"), 5.0
            )
            assert (got.status, got.body) == (200, b"secret")
        distrusting = make_client()  # the system roots do not know our certificate
        with pytest.raises(TransportConnectError):
            await distrusting.fetch(get(f"https://127.0.0.1:{server.port}/echo"), 5.0)
    finally:
        await server.stop()


# -- fast transport only ---------------------------------------------------------


async def test_prepare_serialises_once() -> None:
    request = HttpRequest(
        "POST",
        "https://api.example.com/cgi-bin/post_manager?x=1#frag",
        (("Authorization", "Basic abc"), ("Connection", "close"), ("content-length", "9")),
        b"<Command/>",
    )
    prepared = prepare(request)
    assert prepared.key == "https://api.example.com"
    assert (prepared.host, prepared.port, prepared.tls) == ("api.example.com", 443, True)
    assert prepared.raw == (
        b"POST /cgi-bin/post_manager?x=1 HTTP/1.1\r\n"
        b"Host: api.example.com\r\n"
        b"Authorization: Basic abc\r\n"
        b"Content-Length: 10\r\n"
        b"Connection: keep-alive\r\n\r\n<Command/>"
    )
    client = FastHttpClient()
    assert client.prepared(request) is client.prepared(request)
    for bad in (
        HttpRequest("GET", "ftp://host/", ()),
        HttpRequest("HEAD", "http://host/", ()),
        HttpRequest("GET", "http://host/", (("X-Bad", "a\r\nInjected: 1"),)),
        HttpRequest("GET", "http://host/", (("Transfer-Encoding", "chunked"),)),
        HttpRequest("GET", "http://user:pw@host/", ()),
    ):
        with pytest.raises(ValueError):
            prepare(bad)



def test_requests_to_one_place_share_all_but_their_own_headers() -> None:
    def request(device: str, body: bytes) -> HttpRequest:
        return HttpRequest("POST", "http://cloud.example:9445/cgi-bin/post_manager",
                           (("Cloud-ID", device), ("Content-Type", "text/xml")), body)

    first = prepare(request("0x01", b"<Command>demand</Command>"))
    second = prepare(request("0x02", b"<Command>demand</Command>"))
    other_body = prepare(request("0x01", b"<Command>totals</Command>"))
    assert first.start is second.start and first.end is second.end
    assert first.headers == b"Cloud-ID: 0x01\r\nContent-Type: text/xml\r\n"
    assert second.raw == (
        b"POST /cgi-bin/post_manager HTTP/1.1\r\nHost: cloud.example:9445\r\n"
        b"Cloud-ID: 0x02\r\nContent-Type: text/xml\r\n"
        b"Content-Length: 25\r\nConnection: keep-alive\r\n\r\n<Command>demand</Command>"
    )
    assert other_body.start is first.start and other_body.end != first.end

async def test_callback_api_and_stats(web_server: WebServer) -> None:
    clock = FakeClock()
    client = FastHttpClient(max_connections_per_host=2, clock=clock)
    loop = asyncio.get_running_loop()
    prepared = client.prepared(get(f"http://127.0.0.1:{web_server.port}/echo"))
    results: list[HttpResponse | BaseException] = []
    all_done = loop.create_future()
    total = 50
    started = 0

    def start() -> None:
        nonlocal started
        started += 1
        client.start(prepared, clock.monotonic() + 2.0, on_done)

    def on_done(result: HttpResponse | BaseException) -> None:
        results.append(result)
        if started < total:
            start()
        elif len(results) == started and not all_done.done():
            all_done.set_result(None)

    for _ in range(2):
        start()
        assert results == []  # never called from inside start()
    await asyncio.wait_for(all_done, 5.0)
    assert all(isinstance(r, HttpResponse) and r.status == 200 for r in results)
    stats = client.stats()
    assert stats.in_flight == 0 and stats.waiters == 0 and stats.connecting == 0
    assert stats.requests_done == len(results) >= total
    assert stats.open_connections == stats.idle == stats.connections_opened == 2
    await client.close()
    assert client.stats().open_connections == 0
    with pytest.raises(RuntimeError):
        client.start(prepared, loop.time() + 1.0, on_done)


async def test_reused_connection_closed_before_answer_is_retried_once(
    raw_servers: Callable[[Handler], Awaitable[RawServer]],
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok_response(b"first"))
        await read_request(reader)  # the race: closed just as the next request arrives

    server = await raw_servers(handler)
    client = FastHttpClient()
    try:
        assert (await client.fetch(get(server.url()), 2.0)).body == b"first"
        assert (await client.fetch(get(server.url()), 2.0)).body == b"first"
        assert server.connections == 2
    finally:
        await client.close()


async def test_fresh_connection_closed_before_answer_is_not_retried(
    raw_servers: Callable[[Handler], Awaitable[RawServer]],
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    server = await raw_servers(handler)
    client = FastHttpClient()
    try:
        with pytest.raises(TransportConnectError, match="before responding"):
            await client.fetch(get(server.url()), 2.0)
        assert server.connections == 1
    finally:
        await client.close()


async def test_bytes_after_complete_response_retire_the_connection(
    raw_servers: Callable[[Handler], Awaitable[RawServer]],
) -> None:
    # Fast only: aiohttp rejects the whole answer; we keep the complete answer
    # and never reuse the out-of-step connection.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            writer.write(ok_response() + b"JUNK")

    server = await raw_servers(handler)
    client = FastHttpClient()
    try:
        assert (await client.fetch(get(server.url()), 2.0)).body == b"ok"
        await asyncio.sleep(0.05)  # real time: the stray bytes reach us
        assert (await client.fetch(get(server.url()), 2.0)).body == b"ok"
        assert server.connections == 2
    finally:
        await client.close()


async def test_response_head_over_cap(
    raw_servers: Callable[[Handler], Awaitable[RawServer]],
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Huge: " + b"h" * 50_000)
        await reader.read()

    server = await raw_servers(handler)
    client = FastHttpClient(max_head_bytes=16_000)
    try:
        with pytest.raises(TransportProtocolError, match="head exceeds"):
            await client.fetch(get(server.url()), 2.0)
    finally:
        await client.close()


async def test_waiters_are_bounded_and_time_out(
    raw_servers: Callable[[Handler], Awaitable[RawServer]],
) -> None:
    got_hang = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (target := await read_request(reader)) is not None:
            if target == "/hang":
                got_hang.set()
                await reader.read()
                return
            writer.write(ok_response())

    server = await raw_servers(handler)
    clock = FakeClock()
    client = FastHttpClient(max_connections_per_host=1, max_waiters=1, clock=clock)
    try:
        hung = asyncio.ensure_future(client.fetch(get(server.url("/hang")), 1.0))
        await asyncio.wait_for(got_hang.wait(), 5.0)
        waiting = asyncio.ensure_future(client.fetch(get(server.url("/ok")), 0.2))
        await settle()
        assert client.stats().waiters == 1
        with pytest.raises(TransportPoolFull):
            await client.fetch(get(server.url("/ok")), 1.0)
        # A waiter waits for a connection half the time it had left (the
        # default queue_share), and then gives up before sending anything.
        clock.advance(0.09)
        await settle()
        assert not waiting.done() and not hung.done()
        clock.advance(0.06)
        with pytest.raises(TransportQueueTimeout, match="waiting for a connection"):
            await waiting
        assert client.stats().waiters == 0
        clock.advance(0.9)
        with pytest.raises(TransportTimeout) as sent:
            await hung
        assert not isinstance(sent.value, TransportQueueTimeout)  # it reached the server
        assert (await client.fetch(get(server.url("/ok")), 1.0)).body == b"ok"
    finally:
        await client.close()


async def test_waiter_left_too_little_time_is_our_timeout_not_the_servers(
    raw_servers: Callable[[Handler], Awaitable[RawServer]],
) -> None:
    # A slow answer holds the only connection for 0.16 s; the waiter then has
    # 0.19 s left, less than one deadline slot (0.2 s), so it must fail as our
    # queue's timeout rather than be sent and blamed on the server. (It would
    # have given up waiting at 0.175 s, half its time, when the wheel's slot
    # at 0.2 s came.)
    got_slow, answer_slow = asyncio.Event(), asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (target := await read_request(reader)) is not None:
            if target == "/slow":
                got_slow.set()
                await answer_slow.wait()
            writer.write(ok_response())

    server = await raw_servers(handler)
    clock = FakeClock()
    client = FastHttpClient(max_connections_per_host=1, deadline_resolution_s=0.2, clock=clock)
    try:
        slow = asyncio.ensure_future(client.fetch(get(server.url("/slow")), 2.0))
        await asyncio.wait_for(got_slow.wait(), 5.0)
        waiting = asyncio.ensure_future(client.fetch(get(server.url("/ok")), 0.35))
        await settle()
        clock.advance(0.16)
        answer_slow.set()
        assert (await slow).body == b"ok"
        with pytest.raises(TransportQueueTimeout, match="deadline too close"):
            await waiting
        assert client.stats().waiters == 0
        assert (await client.fetch(get(server.url("/ok")), 1.0)).body == b"ok"
    finally:
        await client.close()


async def test_global_cap_moves_connections_between_hosts(
    raw_servers: Callable[[Handler], Awaitable[RawServer]],
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            await asyncio.sleep(0.002)
            writer.write(ok_response())

    servers = [await raw_servers(handler) for _ in range(3)]
    client = FastHttpClient(max_connections=2, max_connections_per_host=2)
    try:
        for _ in range(3):
            for server in servers:
                assert (await client.fetch(get(server.url()), 2.0)).body == b"ok"
        burst = [client.fetch(get(s.url()), 5.0) for s in servers for _ in range(10)]
        assert all(r.body == b"ok" for r in await asyncio.gather(*burst))
        stats = client.stats()
        assert stats.open_connections <= 2
        assert stats.in_flight == 0 and stats.waiters == 0
    finally:
        await client.close()


async def test_close_fails_pending_requests(
    raw_servers: Callable[[Handler], Awaitable[RawServer]],
) -> None:
    got_request = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        got_request.set()
        await reader.read()

    server = await raw_servers(handler)
    client = FastHttpClient(max_connections_per_host=1)
    pending = [asyncio.ensure_future(client.fetch(get(server.url()), 5.0)) for _ in range(3)]
    await asyncio.wait_for(got_request.wait(), 5.0)  # one on the wire, two waiting
    await client.close()
    for fut in pending:
        with pytest.raises(TransportConnectError, match="closed"):
            await fut
    assert client.stats().in_flight == 0


# -- on uvloop, the production loop ----------------------------------------------


def test_both_transports_on_uvloop(tmp_path: Path) -> None:
    cert_path, key_path, pem = make_self_signed(tmp_path)

    async def scenario(kind: str) -> None:
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(cert_path, key_path)
        plain, tls = WebServer(), WebServer()
        await plain.start()
        await tls.start(tls=server_ctx)
        client_ctx = ssl.create_default_context(cadata=pem)
        client: Transport = (
            FastHttpClient(ssl_context=client_ctx) if kind == "fast"
            else AiohttpClient(ssl_context=client_ctx)
        )
        try:
            for _ in range(20):
                got = await client.fetch(
                    HttpRequest("POST", f"http://127.0.0.1:{plain.port}/echo", (), b"abc"), 2.0
                )
                assert got.body == b"abc"
            assert len(plain.peers) == 1
            chunked = await client.fetch(get(f"http://127.0.0.1:{plain.port}/chunked"), 2.0)
            assert chunked.body.startswith(b"part0;")
            secure = await client.fetch(get(f"https://127.0.0.1:{tls.port}/echo?t=1"), 5.0)
            assert header(secure, "x-path") == "/echo?t=1"
        finally:
            await client.close()
            await plain.stop()
            await tls.stop()

    for kind in ("fast", "aiohttp"):
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            assert isinstance(runner.get_loop(), uvloop.Loop)
            runner.run(scenario(kind))


def test_prepared_request_is_reused_by_fetch() -> None:
    request = get("http://127.0.0.1:1/")
    client = FastHttpClient()
    prepared = client.prepared(request)
    assert isinstance(prepared, PreparedRequest)
    assert client.prepared(get("http://127.0.0.1:1/")) is not prepared
    assert client.prepared(request) is prepared


def test_response_headers_read_as_lower_cased_text_pairs() -> None:
    from poller.transport.connection import ResponseHeaders

    raw = [(b"Content-Type", b"text/xml"), (b"X-Caf\xe9", b"d\xe9j\xe0 vu")]
    headers = ResponseHeaders(raw)
    assert len(headers) == 2
    assert headers[1] == ("x-caf\u00e9", "d\u00e9j\u00e0 vu")
    assert headers == (("content-type", "text/xml"), ("x-caf\u00e9", "d\u00e9j\u00e0 vu"))
    assert headers[:1] == (("content-type", "text/xml"),)
    assert dict(headers)["content-type"] == "text/xml"
    assert headers != (("content-type", "text/xml"),) and headers != "text"
    assert "content-type" in repr(headers)


async def test_a_shared_template_with_own_headers_sends_the_same_request(
        web_server: WebServer) -> None:
    client = FastHttpClient(max_connections_per_host=1)
    loop = asyncio.get_running_loop()
    url = f"http://127.0.0.1:{web_server.port}/echo"
    first = client.prepared(get(url, (("X-Test", "device one"),)))
    second = client.prepared(get(url, (("X-Test", "device two"),)))
    template, own = client.shared(first)
    assert client.shared(second)[0] is template and template.headers == b""
    assert own == first.headers
    # One connection, reused: the second request also goes out through a
    # connection that is already open (the send path), not only a new one.
    for headers, seen in ((own, "device one"), (second.headers, "device two")):
        done: asyncio.Future[HttpResponse | BaseException] = loop.create_future()
        client.start(template, loop.time() + 2.0, done.set_result, headers)
        response = await asyncio.wait_for(done, 5.0)
        assert isinstance(response, HttpResponse)
        assert header(response, "x-seen") == seen
    assert client.stats().connections_opened == 1
    await client.close()


async def test_closed_connections_are_freed_without_the_cyclic_gc(
        raw_servers: Callable[[Handler], Awaitable[RawServer]]) -> None:
    import gc

    from poller.transport.connection import HttpConnection

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\n\r\nbye")

    server = await raw_servers(handler)
    clock = FakeClock()
    client = FastHttpClient(deadline_resolution_s=0.01, clock=clock)
    gc.collect()
    gc.disable()  # whatever is freed now is freed by reference counting
    try:
        for _ in range(20):
            got = await client.fetch(get(server.url()), 0.2)
            assert got.body == b"bye"
        clock.advance(0.3)  # past every deadline: nothing holds the requests
        await settle()
        alive = [o for o in gc.get_objects() if type(o) is HttpConnection]
        assert alive == []
    finally:
        gc.enable()
        await client.close()


async def test_abandoned_and_refused_connects_leave_no_reference_cycles() -> None:
    """A connect the deadline abandons, and one the host refuses (an offline
    device), leave nothing for the cyclic GC: under overload there were
    thousands a second, and collecting them took a quarter of the CPU."""
    import gc

    from poller.transport.connection import HttpConnection

    ours = (HttpConnection, asyncio.Task, TransportTimeout, TransportConnectError)
    with socket.socket() as listener, socket.socket() as closed:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # accept queue filled below: connects hang
        fillers = [socket.socket() for _ in range(3)]
        for filler in fillers:
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
        closed.bind(("127.0.0.1", 0))  # bound, never listening: refused
        clock = FakeClock()
        client = FastHttpClient(deadline_resolution_s=0.01, clock=clock)
        loop = asyncio.get_running_loop()
        results: list[HttpResponse | BaseException] = []
        refused_all = loop.create_future()

        def on_done(result: HttpResponse | BaseException) -> None:
            results.append(result)
            if len(results) == 5 and not refused_all.done():
                refused_all.set_result(None)

        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for address in (listener.getsockname(), closed.getsockname()):
                prepared = client.prepared(get(f"http://127.0.0.1:{address[1]}/"))
                for _ in range(5):
                    client.start(prepared, clock.monotonic() + 0.05, on_done)
            await asyncio.wait_for(refused_all, 5.0)  # the refusals, in real time
            assert {type(r) for r in results} == {TransportConnectError}
            clock.advance(0.1)  # the hanging connects' deadline
            await settle()
            assert sorted(type(r).__name__ for r in results) == \
                ["TransportConnectError"] * 5 + ["TransportTimeout"] * 5
            results.clear()
            gc.collect()
            assert [o for o in gc.garbage if isinstance(o, ours)] == []
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
            for filler in fillers:
                filler.close()
            await client.close()


# -- overload: kept connections, the connect cap -------------------------------


async def test_a_connection_that_missed_its_deadline_reads_the_late_answer_and_is_reused(
    raw_servers: Callable[[Handler], Awaitable[RawServer]],
) -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (target := await read_request(reader)) is not None:
            if target == "/slow":
                await release.wait()
                writer.write(ok_response(b"late"))
            else:
                writer.write(ok_response())

    server = await raw_servers(handler)
    clock = FakeClock()
    client = FastHttpClient(max_connections_per_host=1, keep_after_timeout_s=1.0, clock=clock)
    try:
        slow = asyncio.ensure_future(client.fetch(get(server.url("/slow")), 0.2))
        await settle()
        clock.advance(0.3)
        with pytest.raises(TransportTimeout) as missed:
            await slow
        assert not isinstance(missed.value, TransportQueueTimeout)
        stats = client.stats()
        assert (stats.timeouts_kept, stats.open_connections, stats.in_flight) == (1, 1, 0)
        # The next request waits for the kept connection rather than open one
        # (one a host here); the late answer is read and dropped first.
        following = asyncio.ensure_future(client.fetch(get(server.url("/ok")), 1.0))
        await settle()
        assert not following.done()
        release.set()
        assert (await following).body == b"ok"
        stats = client.stats()
        assert (stats.connections_opened, stats.requests_done) == (1, 2)
        assert server.connections == 1
    finally:
        await client.close()


async def test_a_kept_connection_whose_answer_never_comes_is_closed(
    raw_servers: Callable[[Handler], Awaitable[RawServer]],
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (target := await read_request(reader)) is not None:
            if target == "/hang":
                await reader.read()
                return
            writer.write(ok_response())

    server = await raw_servers(handler)
    clock = FakeClock()
    client = FastHttpClient(keep_after_timeout_s=0.5, clock=clock)
    try:
        hung = asyncio.ensure_future(client.fetch(get(server.url("/hang")), 0.2))
        await settle()
        clock.advance(0.3)
        with pytest.raises(TransportTimeout):
            await hung
        assert client.stats().open_connections == 1
        clock.advance(0.4)
        await settle()
        assert client.stats().open_connections == 1  # still within the grace
        clock.advance(0.2)
        await settle()
        assert client.stats().open_connections == 0
        assert (await client.fetch(get(server.url("/ok")), 1.0)).body == b"ok"
        assert client.stats().connections_opened == 2
        assert client.stats().requests_done == 2  # the timeout counted once
    finally:
        await client.close()


async def test_new_connections_are_capped_per_second(
    raw_servers: Callable[[Handler], Awaitable[RawServer]],
) -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            await release.wait()  # every request holds its connection
            writer.write(ok_response())

    server = await raw_servers(handler)
    clock = FakeClock()
    # Two connects a second, a second's worth at once: two now, then one
    # every half second; the waiters' time is long enough not to give up.
    client = FastHttpClient(max_connections_per_host=10, max_connects_per_s=2.0, clock=clock)
    try:
        calls = [asyncio.ensure_future(client.fetch(get(server.url(f"/{i}")), 10.0))
                 for i in range(4)]
        await settle()
        await asyncio.sleep(0.05)  # real time: the server accepts
        await settle()
        assert (server.connections, client.stats().waiters) == (2, 2)
        assert client.stats().connects_deferred >= 1
        clock.advance(0.3)
        await settle()
        assert server.connections == 2
        clock.advance(0.25)
        await settle()
        await asyncio.sleep(0.05)
        await settle()
        assert (server.connections, client.stats().waiters) == (3, 1)
        clock.advance(0.5)
        await settle()
        await asyncio.sleep(0.05)
        await settle()
        assert (server.connections, client.stats().waiters) == (4, 0)
        release.set()
        assert [r.body for r in await asyncio.gather(*calls)] == [b"ok"] * 4
        assert client.stats().connections_opened == 4
    finally:
        await client.close()


async def test_waiters_per_host_are_bounded_by_its_connections(
    raw_servers: Callable[[Handler], Awaitable[RawServer]],
) -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            await release.wait()
            writer.write(ok_response())

    server = await raw_servers(handler)
    client = FastHttpClient(max_connections_per_host=1, waiters_per_connection=2)
    try:
        calls = [asyncio.ensure_future(client.fetch(get(server.url(f"/{i}")), 5.0))
                 for i in range(3)]
        await settle()
        assert client.stats().waiters == 2
        # A third waiter for one connection could not be served in time: it
        # fails at once, as our queue's limit (nothing sent), not the device's.
        with pytest.raises(TransportPoolFull) as full:
            await client.fetch(get(server.url("/3")), 5.0)
        assert isinstance(full.value, TransportQueueTimeout)
        release.set()
        assert [r.body for r in await asyncio.gather(*calls)] == [b"ok"] * 3
        assert server.connections == 1
    finally:
        await client.close()
