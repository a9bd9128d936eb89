"""The device simulator's CPU per request, in one process, without sockets.

``poller bench`` reports the simulator's CPU per request over a whole run
(the event loop and the kernel's socket work included); this harness times
the part the simulator's own code decides: the request bytes the poller's
drivers send, fed to the simulator's connection protocol, answered by the
gateway and written to a transport that keeps nothing::

    python -m poller.bench.simcost --devices 20000 --rounds 3 --repeat 5

Each round asks every device once, as a fleet polled every ``--interval``
seconds is asked; the simulator's clock moves on by the interval between
rounds, so a device's answer is never one it gave in the same second (as
in a real run) while the devices of one round share their second (as they
do at thousands of requests a second). The first round builds the devices
and is not timed. Reported: CPU µs per request (``time.process_time``),
the best of ``--repeat`` runs, per kind of request the drivers send.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from poller import heap
from poller.build import build_kind
from poller.clock import FakeClock
from poller.drivers.base import DeviceSpec
from poller.drivers.eagle_cloud import DEMAND_COMMAND, SUMMATION_COMMAND, EagleCloudDriver
from poller.drivers.eagle_local import EagleLocalDriver, device_query_command
from poller.drivers.http_json import HttpJsonDriver
from poller.http import HttpRequest
from poller.simulator.control import ControlApi
from poller.simulator.fleet import cloud_id_for, credentials_for
from poller.simulator.main import Simulator, SimulatorConfig
from poller.simulator.payloads import http_json_options, http_json_url
from poller.simulator.server import HttpConnection
from poller.transport.prepared import prepare

_BASE = "http://127.0.0.1:9"
_T0 = 1_800_000_000.25
KINDS = ("cloud-demand", "cloud-summation", "local-query", "http-json")
"""What the drivers send: ``eagle-cloud`` a demand request each poll and a
totals request when totals are due; ``eagle-local`` a ``device_query`` for
its meter; ``http-json`` one GET."""


def request(kind: str, index: int, seed: int) -> bytes:
    """The bytes the poller sends for one request of ``kind`` to device ``index``."""
    cid = cloud_id_for(index)
    email, password = credentials_for(cid, seed)
    request: HttpRequest
    if kind.startswith("cloud-"):
        session = EagleCloudDriver(_BASE).session(DeviceSpec(index, cid, email, password, _BASE,
                                                             {}))
        request = session.begin(False)
        if kind == "cloud-summation":
            request = HttpRequest(request.method, request.url, request.headers,
                                  SUMMATION_COMMAND)
        elif request.body != DEMAND_COMMAND:
            raise RuntimeError("the cloud driver's first request is not the demand request")
    elif kind == "local-query":
        listing = EagleLocalDriver().session(
            DeviceSpec(index, cid, email, password, _BASE, {})).begin(True)
        request = HttpRequest("POST", listing.url, listing.headers,
                              device_query_command(f"0x0007810000{cid}"))
    elif kind == "http-json":
        spec = DeviceSpec(index, cid, email, password, http_json_url(_BASE, cid),
                          http_json_options())
        request = HttpJsonDriver().session(spec).begin(False)
    else:
        raise ValueError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
    return prepare(request).raw


class _Sink:
    """A transport that counts what it is given and keeps the last answer."""

    def __init__(self) -> None:
        self.writes = 0
        self.last = b""

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.last = data

    def close(self) -> None:
        raise RuntimeError("the simulator closed a kept-alive connection")

    def abort(self) -> None:
        raise RuntimeError("the simulator aborted a connection")

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def case(kind: str, devices: int, rounds: int, *, record_served: bool = False,
         seed: int = 0) -> Callable[[], tuple[int, float]]:
    """A run of ``rounds`` rounds over the fleet: returns (requests, CPU s)."""
    sim = Simulator(SimulatorConfig(devices=devices, seed=seed, interval_s=6.0,
                                    record_served=record_served))
    clock = FakeClock(wall=_T0)
    sink = _Sink()
    conn = HttpConnection(sim.gateway, ControlApi(sim.gateway, lambda: 1), set(), 3.0,
                          clock=clock.wall)
    conn.connection_made(sink)  # type: ignore[arg-type]
    requests = [request(kind, i, seed) for i in range(devices)]
    feed = conn.data_received
    for raw in requests:  # builds the devices
        feed(raw)
    if not sink.last.startswith(b"HTTP/1.1 200 "):
        raise RuntimeError(f"{kind}: the simulator answered {sink.last[:60]!r}")

    def run() -> tuple[int, float]:
        sink.writes = 0
        start = time.process_time()
        for _ in range(rounds):
            clock.step_wall(6.0)
            for raw in requests:
                feed(raw)
        elapsed = time.process_time() - start
        if sink.writes != rounds * devices:
            raise RuntimeError(f"{kind}: {sink.writes} answers to {rounds * devices} requests")
        return rounds * devices, elapsed

    return run


def measure(run: Callable[[], tuple[int, float]], repeat: int) -> float:
    """Best CPU µs per request over ``repeat`` runs (collector off: a full
    collection is not a request's cost)."""
    best = float("inf")
    with heap.gc_paused():
        for _ in range(repeat):
            n, elapsed = run()
            best = min(best, elapsed / n * 1e6)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m poller.bench.simcost",
        description="time the simulator's answer to each kind of request in-process "
                    "(CPU µs per request)")
    parser.add_argument("--devices", type=int, default=20_000, metavar="N",
                        help="fleet size; each round asks every device once (default 20000)")
    parser.add_argument("--rounds", type=int, default=3, metavar="N",
                        help="rounds per run (default 3)")
    parser.add_argument("--repeat", type=int, default=5, metavar="N",
                        help="runs per kind; the best is reported (default 5)")
    parser.add_argument("--only", action="append", choices=KINDS, metavar="KIND",
                        help=f"run only this kind (repeatable): {', '.join(KINDS)}")
    parser.add_argument("--record-served", action="store_true",
                        help="keep the served-readings log, as the end-to-end tests do")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args(argv)
    for name in ("devices", "rounds", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    print(f"build: {build_kind()}", flush=True)
    results: dict[str, float] = {}
    for kind in KINDS:
        if args.only and kind not in args.only:
            continue
        run = case(kind, args.devices, args.rounds, record_served=args.record_served)
        results[kind] = us = measure(run, args.repeat)
        print(f"  {kind:<16} {us:8.2f} µs/request", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"build": build_kind(), "devices": args.devices,
                       "record_served": args.record_served, "us_per_request": results},
                      out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
