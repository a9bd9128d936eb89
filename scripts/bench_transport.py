"""Micro-benchmark: client CPU per request for the HTTP transports.

A minimal uvloop asyncio.Protocol server runs in a child process (pinned to
one core when two exist) answering every request with a fixed EAGLE-sized
JSON body; this process (pinned to the other core) sends N keep-alive POSTs
with C in flight and reports its own user+sys CPU time per request.

    .venv/bin/python scripts/bench_transport.py [-n 20000] [-c 64]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import time
from collections.abc import Awaitable, Callable
from functools import partial

import httptools
import uvloop

from poller.drivers.base import HttpRequest, HttpResponse
from poller.transport import AiohttpClient, FastHttpClient

_BODY = (
    b'{"device_list":[{"hardware_address":"0x0013500100abcdef","variables":{'
    b'"zigbee:InstantaneousDemand":"1.234","zigbee:CurrentSummationDelivered":"12345.678",'
    b'"zigbee:CurrentSummationReceived":"0.000","zigbee:Price":"0.1200"}}]}' * 3
)
_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nServer: bench\r\n"
    b"Content-Length: " + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY
)


class _Server(asyncio.Protocol):
    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._parser.feed_data(data)

    def on_message_complete(self) -> None:
        assert self._transport is not None
        self._transport.write(_RESPONSE)


def _serve(port_out: multiprocessing.connection.Connection, cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Server, "127.0.0.1", 0, backlog=1024)
        port_out.send(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    uvloop.run(main())


async def _run_fetch(fetch: Callable[[], Awaitable[HttpResponse]], n: int, c: int) -> None:
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            response = await fetch()
            assert response.status == 200 and len(response.body) == len(_BODY)

    await asyncio.gather(*(worker() for _ in range(c)))


async def _run_callbacks(client: FastHttpClient, request: HttpRequest, n: int, c: int) -> None:
    loop = asyncio.get_running_loop()
    prepared = client.prepared(request)
    done = loop.create_future()
    state = {"started": 0, "finished": 0}

    def on_done(result: HttpResponse | BaseException) -> None:
        if isinstance(result, BaseException) or result.status != 200:
            if not done.done():
                done.set_exception(RuntimeError(f"request failed: {result!r}"))
            return
        state["finished"] += 1
        if state["started"] < n:
            state["started"] += 1
            client.start(prepared, loop.time() + 10.0, on_done)
        elif state["finished"] == n and not done.done():
            done.set_result(None)

    for _ in range(c):
        state["started"] += 1
        client.start(prepared, loop.time() + 10.0, on_done)
    await done


async def _measure(name: str, port: int, n: int, c: int) -> tuple[float, float]:
    request = HttpRequest(
        "POST",
        f"http://127.0.0.1:{port}/cgi-bin/post_manager",
        (("Authorization", "Basic dXNlcjpwYXNz"), ("Content-Type", "text/xml")),
        b"<Command><Name>device_query</Name></Command>",
    )
    results: list[tuple[float, float]] = []
    for count in (1000, n):  # warm-up, then the measured run
        if name == "aiohttp":
            aio = AiohttpClient(max_connections_per_host=c)
            run = _run_fetch(partial(aio.fetch, request, 10.0), count, c)
            close = aio.close
        else:
            fast = FastHttpClient(max_connections_per_host=c)
            if name == "fast-callback":
                run = _run_callbacks(fast, request, count, c)
            else:
                run = _run_fetch(partial(fast.fetch, request, 10.0), count, c)
            close = fast.close
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await run
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        await close()
        results.append((cpu / count * 1e6, count / wall))
    return results[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20_000, help="requests per transport")
    parser.add_argument("-c", type=int, default=64, help="requests in flight")
    args = parser.parse_args()
    two_cores = len(os.sched_getaffinity(0)) >= 2
    receiver, sender = multiprocessing.Pipe(duplex=False)
    server = multiprocessing.Process(target=_serve, args=(sender, 1 if two_cores else None))
    server.start()
    try:
        port = receiver.recv()
        if two_cores:
            os.sched_setaffinity(0, {0})
        print(f"N={args.n} C={args.c} uvloop, keep-alive, loopback, body {len(_BODY)} B")
        for name in ("fast-callback", "fast-fetch", "aiohttp"):
            cpu_us, rate = uvloop.run(_measure(name, port, args.n, args.c))
            print(f"{name:14s} {cpu_us:7.1f} µs CPU/request   {rate:9.0f} req/s")
    finally:
        server.terminate()
        server.join()


if __name__ == "__main__":
    main()
