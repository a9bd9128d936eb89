"""The simulator's learned routes: a request seen before, answered without
parsing it, gets exactly the answer the parsed request gets.

In-process (the connection protocol fed bytes, a transport that records what
it is given, the clock a FakeClock): no sockets, no sleeping.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from poller.bench import simcost
from poller.clock import FakeClock
from poller.simulator import Fault, FaultRates, Simulator, SimulatorConfig, cloud_id_for
from poller.simulator.control import ControlApi
from poller.simulator.responses import JSON, Form
from poller.simulator.server import HttpConnection

DEVICES = 12
SEED = 7


class Wire:
    """A transport that logs writes and closes of every connection in order."""

    def __init__(self, log: list[tuple[str, int, bytes]], number: int) -> None:
        self.log = log
        self.number = number
        self.closed = False

    def write(self, data: bytes) -> None:
        self.log.append(("write", self.number, bytes(data)))

    def close(self) -> None:
        self.log.append(("close", self.number, b""))
        self.closed = True

    def abort(self) -> None:
        self.log.append(("abort", self.number, b""))
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class Harness:
    def __init__(self, **config: Any) -> None:
        settings: dict[str, Any] = {"devices": DEVICES, "seed": SEED, "interval_s": 6.0,
                                    "record_served": True, "slow_delay_s": 0.0, **config}
        self.sim = Simulator(SimulatorConfig(**settings))
        self.clock = FakeClock(wall=1_800_000_000.3)
        self.control = ControlApi(self.sim.gateway, lambda: 1)
        self.log: list[tuple[str, int, bytes]] = []
        self.opened = 0
        self.conn, self.wire = self.connect()

    def connect(self) -> tuple[HttpConnection, Wire]:
        conn = HttpConnection(self.sim.gateway, self.control, set(), 0.0, clock=self.clock.wall)
        wire = Wire(self.log, self.opened)
        self.opened += 1
        conn.connection_made(wire)  # type: ignore[arg-type]
        return conn, wire

    async def send(self, chunks: list[bytes]) -> None:
        """One request's bytes, in these reads, on a connection that is open."""
        if self.wire.closed:
            self.conn, self.wire = self.connect()
        for chunk in chunks:
            self.conn.data_received(chunk)
        await asyncio.sleep(0)  # a slow answer (delay 0) goes now

    def seen(self) -> dict[str, Any]:
        sim = self.sim
        return {"log": self.log, "served": sim.served(), "stats": sim.stats(),
                "jitter": sim.jitter_report(),
                "arrivals": [sim.arrivals(cloud_id_for(i)) for i in range(DEVICES)]}


def raw(method: str, path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: sim",
             *(f"{k}: {v}" for k, v in headers.items())]
    if method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def requests_of(index: int) -> list[bytes]:
    """What the drivers send a device, and a few requests they do not."""
    cid = cloud_id_for(index)
    demand = simcost.request("cloud-demand", index, SEED)
    cloud_headers = demand.split(b"\r\n\r\n")[0].split(b"\r\n")[2:5]
    headers = dict(line.decode().split(": ", 1) for line in cloud_headers)
    query = simcost.request("local-query", index, SEED)
    auth = next(line for line in query.split(b"\r\n") if line.startswith(b"Authorization"))
    basic = dict([auth.decode().split(": ", 1)])
    return [
        demand,
        simcost.request("cloud-summation", index, SEED),
        query,
        simcost.request("http-json", index, SEED),
        raw("POST", "/cgi-bin/post_manager", headers,
            b"<Command><Name>get_instantaneous_demand</Name><Format>XML</Format></Command>"),
        raw("POST", "/cgi-bin/post_manager", headers,
            b"<Command><Name>get_current_summation</Name></Command>"),
        raw("POST", "/cgi-bin/post_manager", headers, b"<Command><Name>get_price</Name></Command>"),
        raw("POST", "/cgi-bin/post_manager", basic, b"<Command><Name>device_list</Name></Command>"),
        raw("POST", "/cgi-bin/post_manager", basic,
            b"<Command><Name>device_query</Name><Components><Component><Variables>"
            b"<Variable><Name>zigbee:InstantaneousDemand</Name></Variable>"
            b"</Variables></Component></Components></Command>"),
        raw("POST", "/cgi-bin/post_manager", {**headers, "Password": "wrong"},
            b"<Command><Name>get_instantaneous_demand</Name></Command>"),
        raw("GET", f"/json/{cid}", {"Authorization": "Bearer nope"}),
        raw("GET", "/elsewhere", {}),
    ]


FAULTS = FaultRates(http_5xx=0.04, slow=0.04, malformed=0.04, auth=0.02, offline=0.02,
                    reset=0.02, timestamp_max=0.02, timestamp_us=0.02, value_negative=0.02,
                    value_nan=0.02, value_infinity=0.02, value_huge=0.02,
                    totals_malformed=0.05, totals_5xx=0.05)


async def serve(whole: bool) -> Harness:
    """Three rounds of every request to every device; ``whole``: each request
    in one read (answered from its learned route from the second round on),
    else each split in two reads (parsed every time)."""
    h = Harness(http10_fraction=0.25, negative_fraction=0.5, fault_rates=FAULTS)
    h.sim.set_faults({Fault.VALUE_NAN: [cloud_id_for(3)], Fault.SLOW: [cloud_id_for(4)]})
    for _ in range(3):
        for index in range(DEVICES):
            for request in requests_of(index):
                h.clock.step_wall(0.37)
                await h.send([request] if whole else [request[:25], request[25:]])
    return h


async def test_learned_routes_answer_exactly_as_parsing_does() -> None:
    learned, parsed = await serve(whole=True), await serve(whole=False)
    assert learned.seen() == parsed.seen()
    # The learned side did answer from routes, the parsed side never could.
    assert len(learned.sim.gateway.routes) >= 8 * DEVICES
    assert parsed.sim.gateway.routes == {}
    stats = learned.sim.stats()
    assert stats["requests"] == 3 * DEVICES * len(requests_of(0))
    # ... through the faults' paths, not only the plain answers.
    for key in ("fault_http_5xx", "fault_slow", "fault_malformed", "fault_offline",
                "fault_value_nan", "fault_totals_5xx", "unauthorized", "not_found"):
        assert stats[key] > 0, key
    assert len(learned.sim.served()) > DEVICES


async def test_only_a_whole_kept_alive_request_in_one_read_is_learned() -> None:
    h = Harness()
    demand, summation = requests_of(1)[:2]
    closing = demand.replace(b"Connection: keep-alive", b"Connection: close")
    assert closing != demand
    await h.send([demand + summation])  # two in one read
    await h.send([closing])  # the connection ends after it
    await h.send([raw("GET", "/_sim/stats", {})])  # control
    await h.send([demand[:30], demand[30:]])  # one in two reads
    assert h.sim.gateway.routes == {}
    await h.send([summation])
    assert list(h.sim.gateway.routes) == [summation]
    answers = [data for kind, _, data in h.log if kind == "write"]
    assert len(answers) == 6
    assert all(a.startswith(b"HTTP/1.1 200 OK\r\n") for a in answers)


async def test_the_route_table_starts_afresh_when_full() -> None:
    h = Harness(devices=1)
    gateway = h.sim.gateway
    limit = 4 * 1 + 1024
    base = requests_of(0)[3]  # GET /json/<id>: a query string changes the bytes only
    assert base.startswith(b"GET /json/")
    first = base.split(b" ")[1]
    for n in range(limit + 20):
        await h.send([base.replace(first, first + b"?n=%d" % n, 1)])
        assert len(gateway.routes) <= limit
    assert 0 < len(gateway.routes) < limit
    answers = [data for kind, _, data in h.log if kind == "write"]
    assert len(answers) == limit + 20
    assert all(a.startswith(b"HTTP/1.1 200 OK\r\n") for a in answers)


def test_form_fills_the_length_and_values() -> None:
    form = Form(200, JSON, b'{"a": "%s", "b": %s}', False, False)
    for values in ((b"x", b"1"), (b"", b"12345678901234567890")):
        data = form.render(values)
        head, _, body = data.partition(b"\r\n\r\n")
        assert body == b'{"a": "%s", "b": %s}' % values
        assert f"Content-Length: {len(body)}".encode() in head.split(b"\r\n")
        assert form.body(values) == body
    with pytest.raises(ValueError, match="no '%'"):
        Form(200, JSON, b"100% %s", False, False)


def test_simcost_times_every_kind(tmp_path: Path) -> None:
    out = tmp_path / "simcost.json"
    assert simcost.main(["--devices", "30", "--rounds", "1", "--repeat", "1",
                         "--record-served", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert sorted(result["us_per_request"]) == sorted(simcost.KINDS)
    assert all(us > 0 for us in result["us_per_request"].values())
