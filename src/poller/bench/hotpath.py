"""The per-poll path piece by piece, in one process, without sockets: µs per
call of each part the compiled build covers.

``poller bench`` measures the whole service against the simulator (CPU per
completed poll, with the event loop, the kernel and the simulator's noise in
it); this harness times the Python parts alone, so that the compiled and the
pure build can be told apart part by part (``--json`` to compare runs)::

    python -m poller.bench.hotpath --repeat 5
    POLLER_PURE=1 python -m poller.bench.hotpath --repeat 5

Each case runs its operation ``number`` times per repeat and reports the
best repeat (the least disturbed by the rest of a shared machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from poller import heap
from poller.build import build_kind
from poller.clock import FakeClock
from poller.config import PollingSettings
from poller.drivers.base import DeviceSpec
from poller.drivers.eagle_cloud import EagleCloudDriver, parse_demand
from poller.drivers.eagle_local import parse_device_query
from poller.http import HttpRequest, HttpResponse
from poller.ingest.livestate import reading_docs
from poller.ingest.pgcopy import encode_rows
from poller.polling.context import LoopContext
from poller.polling.loop import DeviceLoop
from poller.polling.memsink import PlainSink
from poller.polling.target import Target
from poller.reading import Reading
from poller.registry import DeviceRecord
from poller.segment import encode_readings
from poller.simulator.payloads import ALL_VARIABLES, cloud_demand, local_device_query
from poller.simulator.responses import HTML, build
from poller.transport.connection import HttpConnection, OnDone
from poller.transport.prepared import PreparedRequest, prepare
from poller.wheel import TimingWheel

Case = Callable[[], int]
"""Runs a case's operation a number of times once; returns that number."""

_T0 = datetime(2026, 1, 1, tzinfo=UTC)
_WALL = float(int(time.time()))
_INTERVAL_S = 6.0
_STEP_S = 0.02


def _demand_body() -> bytes:
    return cloud_demand("d8d5b9000001", "00135001000000a1", int(_WALL), "0x0003b0", True)


def wheel_case(items: int = 10_000) -> Case:
    """``add`` and ``fire`` of one item, spread over a 6 s interval."""

    class Item:
        __slots__ = ()

        def fire(self) -> None:
            pass

    clock = FakeClock(wall=_WALL, monotonic=1000.0)
    wheel = TimingWheel(clock, _STEP_S)
    pending = [Item() for _ in range(items)]

    def run() -> int:
        base = clock.monotonic()
        spacing = _INTERVAL_S / items
        for i, item in enumerate(pending):
            wheel.add(base + i * spacing, item)
        clock.advance(_INTERVAL_S + _STEP_S)
        return items

    return run


class AnswerNow:
    """A transport that answers every request at once with the same response
    (and counts the requests)."""

    def __init__(self, response: HttpResponse) -> None:
        self._response = response
        self.sent = 0

    def prepared(self, request: HttpRequest) -> Any:
        return request

    def shared(self, prepared: Any) -> tuple[Any, bytes | None]:
        return prepared, None

    def start(self, prepared: Any, deadline: float, on_done: OnDone,
              headers: bytes | None = None) -> None:
        self.sent += 1
        on_done(self._response)


def _no_state_change(*_: Any) -> None:
    pass


def loop_case(devices: int = 2_000) -> Case:
    """One poll of an eagle-cloud device through its loop: the wheel fires
    it, the session parses the answer, the reading is bounded, stored and
    the next tick scheduled (no totals: ``totals_every`` is large)."""
    clock = FakeClock(wall=_WALL, monotonic=1000.0)
    settings = PollingSettings(interval_s=_INTERVAL_S, timeout_s=4.0, totals_every=100_000,
                               wheel_resolution_s=_STEP_S)
    sink = PlainSink()
    ctx = LoopContext(settings, sink, clock.monotonic, _no_state_change)
    ctx.wheel = TimingWheel(clock, _STEP_S)
    ctx.wall_offset = clock.wall() - clock.monotonic()
    driver = EagleCloudDriver("http://127.0.0.1:9")
    transport = AnswerNow(HttpResponse(200, (), _demand_body()))
    loops = []
    for i in range(devices):
        cloud_id = f"{i + 1:06x}"
        record = DeviceRecord(i + 1, cloud_id, "me@example.com", "eagle-cloud", None, {},
                              _INTERVAL_S, True, _T0, _T0)
        session = driver.session(DeviceSpec(i + 1, cloud_id, "me@example.com", "pw", None, {}))
        loop = DeviceLoop(ctx, Target(record), session, transport, _INTERVAL_S,
                          i * _INTERVAL_S / devices)
        loop.start()
        loops.append(loop)

    def run() -> int:
        before = len(sink.readings)
        clock.advance(_INTERVAL_S)
        done = len(sink.readings) - before
        sink.readings.clear()
        return done

    run()  # the first poll of each loop prepares its request
    return run


class _Owner:
    """A connection owner that keeps the connection and calls back at once."""

    def deliver(self, on_done: OnDone, result: HttpResponse | BaseException) -> None:
        on_done(result)

    def release(self, conn: HttpConnection, reusable: bool) -> None:
        if not reusable:
            raise RuntimeError("the canned answer should keep the connection")

    def discard(self, conn: HttpConnection) -> None:
        raise RuntimeError("the canned answer should not be refused")

    def retry(self, conn: HttpConnection, prepared: PreparedRequest, headers: bytes,
              deadline: float, on_done: OnDone) -> None:
        raise RuntimeError("nothing to retry")


class _NullTransport:
    def write(self, data: bytes) -> None:
        pass

    def abort(self) -> None:
        pass


def connection_case(number: int = 10_000) -> Case:
    """One exchange on a kept-alive connection: the request written, the
    simulator's answer parsed by httptools into a response."""
    conn = HttpConnection(_Owner(), "http://127.0.0.1:9", 1 << 20, 1 << 16)
    conn.connection_made(_NullTransport())  # type: ignore[arg-type]
    prepared = prepare(HttpRequest("POST", "http://127.0.0.1:9/cgi-bin/post_manager",
                                   (("Cloud-ID", "00ce69"),), b"<Command/>"))
    answer = build(200, HTML, _demand_body(), False, False)
    got: list[HttpResponse | BaseException] = []
    keep = got.append

    def run() -> int:
        send, feed = conn.send, conn.data_received
        for _ in range(number):
            send(prepared, prepared.headers, 1e18, keep)
            feed(answer)
        if len(got) != number or not isinstance(got[-1], HttpResponse):
            raise RuntimeError(f"connection case: {got[-1]!r}")
        got.clear()
        return number

    return run


def _calls(number: int, op: Callable[[], object]) -> Case:
    def run() -> int:
        for _ in range(number):
            op()
        return number

    return run


def _rows(n: int) -> list[Reading]:
    return [Reading(i, _WALL + i, _WALL + i - 1, _WALL + i + 0.01, 1234.5, 1e7 + i, 5e5,
                    None, f"{i:06x}") for i in range(n)]


def cases() -> dict[str, tuple[str, Case]]:
    """The cases by name: ``(what one operation is, the case)``."""
    demand = _demand_body()
    local = local_device_query("00135001000000a1", "d8d5b9000001", int(_WALL), 1234, 10_000_000,
                               500_000, ALL_VARIABLES)
    rows = _rows(1_000)
    plain = [r[:] for r in rows]
    columns = [r[:8] for r in rows]
    return {
        "wheel": ("add+fire", wheel_case()),
        "loop": ("poll", loop_case()),
        "connection": ("exchange", connection_case()),
        "eagle-cloud parse": ("answer", _calls(10_000, lambda: parse_demand(demand))),
        "eagle-local parse": ("answer", _calls(2_000, lambda: parse_device_query(local))),
        "reading": ("record", _calls(100_000, lambda: Reading(*rows[0]))),
        "segment encode": ("reading", lambda: (encode_readings(rows), len(rows))[1]),
        "pgcopy encode": ("reading", lambda: (encode_rows(columns), len(columns))[1]),
        "livestate docs": ("reading", lambda: (reading_docs(plain), len(plain))[1]),
    }


def measure(case: Case, repeat: int) -> float:
    """Best µs per operation over ``repeat`` runs (collector off, as in
    ``timeit``: a full collection is not the operation's cost)."""
    best = float("inf")
    with heap.gc_paused():
        for _ in range(repeat):
            start = time.perf_counter()
            n = case()
            elapsed = time.perf_counter() - start
            best = min(best, elapsed / n * 1e6)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m poller.bench.hotpath",
        description="time the per-poll path's parts in-process (µs per operation)")
    parser.add_argument("--repeat", type=int, default=5, metavar="N",
                        help="runs per case; the best is reported (default 5)")
    parser.add_argument("--only", action="append", metavar="CASE",
                        help="run only this case (repeatable)")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    table = cases()
    unknown = set(args.only or ()) - set(table)
    if unknown:
        parser.error(f"unknown case(s): {', '.join(sorted(unknown))}; "
                     f"known: {', '.join(table)}")
    print(f"build: {build_kind()}", flush=True)
    results: dict[str, float] = {}
    for name, (unit, case) in table.items():
        if args.only and name not in args.only:
            continue
        results[name] = us = measure(case, args.repeat)
        print(f"  {name:<20} {us:9.3f} µs/{unit}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"build": build_kind(), "us_per_op": results}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
