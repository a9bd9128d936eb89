"""The device-fleet simulator, exercised over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import math
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import uvloop

from poller.drivers.base import DeviceSpec, Sample
from poller.drivers.http_json import HttpJsonDriver
from poller.http import HttpResponse
from poller.simulator import (
    Fault,
    FaultRates,
    ServedReading,
    Simulator,
    SimulatorConfig,
    cloud_id_for,
    credentials_for,
)
from poller.simulator.fleet import Device
from poller.simulator.payloads import EPOCH_2000, demand_hex, http_json_options, http_json_url

FIXTURES = Path(os.environ.get("EAGLE_FIXTURES", "/work/shared/fixtures/eagle"))
_CLOUD_DEMAND = "cloud_get_instantaneous_demand_response__rainforestautomation_Eagle-Http-API"
CLOUD_DEMAND_JSON = _CLOUD_DEMAND + "__README.md.json"
CLOUD_DEMAND_XML = _CLOUD_DEMAND + "__README.md.xml"
SUMMATION_XML = (
    "uploader_v2_current_summation__iainchesworth_eagle-to-mqtt__tests_test_tools_"
    "test_tools_fragment_generator.cpp.xml"
)
DEVICE_LIST_XML = (
    "eagle200_device_list__tonymitchell_rfa-eagle-api__tests_sample_device_list_response.xml"
)
DEVICE_QUERY_XML = (
    "eagle200_device_query_all__tonymitchell_rfa-eagle-api__tests_sample_device_query_response.xml"
)
# CurrentSummation fields as listed in the REST API manual, section 13.
MANUAL_SUMMATION_FIELDS = [
    "DeviceMacId", "MeterMacId", "TimeStamp", "SummationDelivered", "SummationReceived",
    "Multiplier", "Divisor", "DigitsRight", "DigitsLeft", "SuppressLeadingZero",
]
PATH = "/cgi-bin/post_manager"
SEED = 11


def signed_hex(text: str) -> int:
    """Two's complement with the width given by the number of hex digits."""
    assert text.startswith("0x")
    bits = 4 * (len(text) - 2)
    value = int(text, 16)
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


def command(name: str, fmt: str | None = None) -> str:
    fmt_part = f"<Format>{fmt}</Format>" if fmt else ""
    return f"<Command>\n  <Name>{name}</Name>\n  {fmt_part}\n</Command>\n"


def query_body(cloud_id: str, variables: list[str] | None = None) -> str:
    if variables is None:
        components = "<All>Y</All>"
    else:
        inner = "".join(f"<Variable><Name>{v}</Name></Variable>" for v in variables)
        components = f"<Component><Name>Main</Name><Variables>{inner}</Variables></Component>"
    return (
        "<Command><Name>device_query</Name><DeviceDetails>"
        f"<HardwareAddress>0x0007810000{cloud_id}</HardwareAddress></DeviceDetails>"
        f"<Components>{components}</Components></Command>"
    )


def cloud_headers(cloud_id: str, password: str | None = None) -> dict[str, str]:
    email, secret = credentials_for(cloud_id, SEED)
    return {"Cloud-ID": cloud_id, "User": email, "Password": password or secret}


def basic(cloud_id: str, password: str | None = None) -> dict[str, str]:
    secret = password or credentials_for(cloud_id, SEED)[1]
    token = base64.b64encode(f"{cloud_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def children(elem: ET.Element) -> list[str]:
    return [child.tag for child in elem]


def fixture_xml(name: str) -> ET.Element:
    return ET.fromstring((FIXTURES / name).read_text())


async def make_sim(**kwargs: object) -> Simulator:
    cfg = SimulatorConfig(**{"devices": 50, "seed": SEED, **kwargs})  # type: ignore[arg-type]
    sim = Simulator(cfg)
    await sim.start()
    return sim


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    s = await make_sim(record_served=True, interval_s=0.05, slow_delay_s=0.3)
    yield s
    await s.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def url(sim: Simulator, path: str = PATH) -> str:
    return f"http://127.0.0.1:{sim.port}{path}"


async def cloud_get(
    http: aiohttp.ClientSession, sim: Simulator, cloud_id: str, name: str, fmt: str | None = "JSON"
) -> tuple[int, str]:
    async with http.post(url(sim), data=command(name, fmt), headers=cloud_headers(cloud_id)) as r:
        return r.status, (await r.read()).decode("utf-8", "replace")


# --- identities --------------------------------------------------------------


def test_ids_and_credentials_are_deterministic() -> None:
    assert cloud_id_for(0) == "f00000"
    assert cloud_id_for(0x1A) == "f0001a"
    assert cloud_id_for(3, id_offset=0xABC000) == "abc003"
    with pytest.raises(ValueError):
        cloud_id_for(0x100000)
    email, password = credentials_for("f00007", 1)
    assert email == "dev7@sim.invalid"
    assert len(password) == 16 and int(password, 16) >= 0
    assert credentials_for("f00007", 1) == (email, password)
    assert credentials_for("f00007", 2)[1] != password
    assert credentials_for("f00008", 1)[1] != password


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        SimulatorConfig(devices=0)
    with pytest.raises(ValueError):
        SimulatorConfig(devices=0x100001)
    with pytest.raises(ValueError):
        SimulatorConfig(http10_fraction=1.5)
    with pytest.raises(ValueError):
        FaultRates(hang=0.6, reset=0.6)


# --- cloud protocol ----------------------------------------------------------


async def test_cloud_json_demand_matches_fixture(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    before = int(time.time())
    status, text = await cloud_get(http, sim, "f00003", "get_instantaneous_demand", "JSON")
    assert status == 200
    got = json.loads(text)
    real = json.loads((FIXTURES / CLOUD_DEMAND_JSON).read_text())
    assert list(got) == list(real) == ["InstantaneousDemand"]
    fields, real_fields = got["InstantaneousDemand"], real["InstantaneousDemand"]
    assert list(fields) == list(real_fields)
    for key, value in real_fields.items():  # same hex widths as the capture
        assert len(fields[key]) == len(value) or key == "Demand", key
    assert fields["DeviceMacId"] == "0xd8d5b90000f00003"
    ts = int(fields["TimeStamp"], 16) + EPOCH_2000
    assert before <= ts <= time.time() + 1
    demand_kw = signed_hex(fields["Demand"]) * int(fields["Multiplier"], 16) / int(
        fields["Divisor"], 16
    )
    assert -6.0 <= demand_kw <= 9.0
    assert sim.served()[-1] == ServedReading("f00003", ts, demand_kw * 1000, None, None)


async def test_cloud_xml_demand_matches_fixture(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    for fmt in ("XML", None):
        status, text = await cloud_get(http, sim, "f00004", "get_instantaneous_demand", fmt)
        assert status == 200
        got = ET.fromstring(text)
        real = fixture_xml(CLOUD_DEMAND_XML)
        assert got.tag == real.tag == "InstantaneousDemand"
        assert children(got) == children(real)
        assert len(got.findtext("TimeStamp", "")) == 10


async def test_cloud_summation_shape_and_monotonic(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    real_tags = set(children(fixture_xml(SUMMATION_XML).find("CurrentSummation")))  # type: ignore[arg-type]
    last = (-1, -1)
    for i in range(6):
        fmt = "XML" if i % 2 else "JSON"
        status, text = await cloud_get(http, sim, "f00005", "get_current_summation", fmt)
        assert status == 200
        if fmt == "XML":
            root = ET.fromstring(text)
            assert root.tag == "CurrentSummation"
            assert children(root) == MANUAL_SUMMATION_FIELDS
            assert set(children(root)) <= real_tags
            fields = {child.tag: child.text or "" for child in root}
        else:
            obj = json.loads(text)
            assert list(obj) == ["CurrentSummation"]
            fields = obj["CurrentSummation"]
            assert list(fields) == MANUAL_SUMMATION_FIELDS
        delivered = int(fields["SummationDelivered"], 16)
        received = int(fields["SummationReceived"], 16)
        assert delivered >= last[0] and received >= last[1]
        last = (delivered, received)
        served = sim.served()[-1]
        assert (served.demand_w, served.delivered_wh, served.received_wh) == (
            None, float(delivered), float(received)
        )
        await asyncio.sleep(0.01)


def test_meter_walk_bounded_and_totals_monotonic() -> None:
    """The clock is a parameter: a simulated day in 6 s steps."""
    for index, negative in ((0, False), (1, True)):
        device = Device(index, cloud_id_for(index), 3, 0xF00000, 0.0, negative, False)
        delivered, received = device.delivered_wh, device.received_wh
        seen_negative = False
        for step in range(1, 14_400):
            demand = device.advance(step * 6.0)
            assert device.low_w - 1 <= demand <= device.high_w + 1
            seen_negative |= demand < 0
            assert device.delivered_wh >= delivered and device.received_wh >= received
            delivered, received = device.delivered_wh, device.received_wh
        assert seen_negative is negative
        assert device.delivered_wh > 1_000_000.0
        if negative:
            assert device.received_wh > 0


def test_demand_hex_twos_complement() -> None:
    assert demand_hex(944, True) == "0x0003b0"
    assert demand_hex(-1000, True) == "0xfffffc18"
    assert demand_hex(-1000, False) == "0xfffc18"
    assert signed_hex("0xfffffc18") == signed_hex("0xfffc18") == -1000


async def test_negative_demand_served_in_both_widths(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    for cloud_id, width in (("f00006", 10), ("f00007", 8)):  # even: 32-bit, odd: 24-bit
        device = sim.fleet.get(cloud_id, time.time())
        assert device is not None
        device.demand_w = -2500.0
        device.low_w = -6000.0
        status, text = await cloud_get(http, sim, cloud_id, "get_instantaneous_demand", "XML")
        assert status == 200
        raw = ET.fromstring(text).findtext("Demand", "")
        assert len(raw) == width
        demand_w = signed_hex(raw)
        assert -2600 <= demand_w <= -2400
        assert sim.served()[-1].demand_w == float(demand_w)


# --- local protocol ----------------------------------------------------------


async def test_local_device_list_and_query_match_fixtures(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    cloud_id = "f00008"
    before = int(time.time())
    async with http.post(url(sim), data=command("device_list"), headers=basic(cloud_id)) as r:
        assert r.status == 200
        got = ET.fromstring(await r.text())
    real = fixture_xml(DEVICE_LIST_XML)
    assert got.tag == real.tag == "DeviceList"
    assert children(got[0]) == children(real[0])
    address = got[0].findtext("HardwareAddress", "")
    assert address == f"0x0007810000{cloud_id}" and len(address) == 18
    assert before <= int(got[0].findtext("LastContact", ""), 16) <= time.time() + 1

    async with http.post(url(sim), data=query_body(cloud_id), headers=basic(cloud_id)) as r:
        assert r.status == 200
        got = ET.fromstring(await r.text())
    real = fixture_xml(DEVICE_QUERY_XML)
    assert children(got) == children(real) == ["DeviceDetails", "Components"]
    assert children(got[0]) == children(real[0])
    got_component = got.find("Components/Component")
    real_component = real.find("Components/Component")
    assert got_component is not None and real_component is not None
    assert children(got_component) == children(real_component)
    real_names = {v.findtext("Name") for v in real_component.iter("Variable")}
    values: dict[str, str] = {}
    for variable in got_component.iter("Variable"):
        assert children(variable) == ["Name", "Value", "Units", "Description"]
        name = variable.findtext("Name", "")
        assert name in real_names
        values[name] = variable.findtext("Value", "")
    served = sim.served()[-1]
    assert float(values["zigbee:InstantaneousDemand"]) * 1000 == pytest.approx(served.demand_w)
    assert float(values["zigbee:CurrentSummationDelivered"]) * 1000 == pytest.approx(
        served.delivered_wh
    )
    assert float(values["zigbee:CurrentSummationReceived"]) * 1000 == pytest.approx(
        served.received_wh
    )
    assert served.device_at == int(got[0].findtext("LastContact", ""), 16)


async def test_local_single_variable_query(sim: Simulator, http: aiohttp.ClientSession) -> None:
    body = query_body("f00009", ["zigbee:InstantaneousDemand"])
    async with http.post(url(sim), data=body, headers=basic("f00009")) as r:
        assert r.status == 200
        got = ET.fromstring(await r.text())
    names = [v.findtext("Name") for v in got.iter("Variable")]
    assert names == ["zigbee:InstantaneousDemand"]
    served = sim.served()[-1]
    assert served.delivered_wh is None and served.received_wh is None
    assert served.demand_w is not None


# --- errors ------------------------------------------------------------------


async def test_unknown_device_wrong_credentials_and_paths(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    for cloud_id in ("f00032", "abcdef", "zz"):  # 50 devices: f00032 is the 51st
        hdrs = {"Cloud-ID": cloud_id, "User": "x", "Password": "y"}
        async with http.post(url(sim), data=command("get_instantaneous_demand"), headers=hdrs) as r:
            assert r.status == 404
        hdrs = basic(cloud_id, "p")
        async with http.post(url(sim), data=command("device_list"), headers=hdrs) as r:
            assert r.status == 404
    async with http.post(
        url(sim), data=command("get_instantaneous_demand"), headers=cloud_headers("f00001", "bad")
    ) as r:
        assert r.status == 401
    hdrs = basic("f00001", "bad")
    async with http.post(url(sim), data=command("device_list"), headers=hdrs) as r:
        assert r.status == 401
        assert "Basic" in r.headers["WWW-Authenticate"]
    async with http.post(url(sim), data=command("device_list")) as r:
        assert r.status == 401
    async with http.post(url(sim, "/other"), data="", headers=cloud_headers("f00001")) as r:
        assert r.status == 404
    async with http.post(url(sim), data=command("reboot"), headers=cloud_headers("f00001")) as r:
        assert r.status == 400
    stats = sim.stats()
    assert stats["not_found"] == 7 and stats["unauthorized"] == 3 and stats["ok"] == 0


# --- faults ------------------------------------------------------------------


async def set_faults(http: aiohttp.ClientSession, sim: Simulator, payload: object) -> object:
    async with http.post(url(sim, "/_sim/faults"), json=payload) as r:
        assert r.status == 200
        return await r.json()


async def test_fault_auth_5xx_malformed(sim: Simulator, http: aiohttp.ClientSession) -> None:
    state = await set_faults(
        http, sim, {"auth": ["f00001"], "http_5xx": ["f00002"], "malformed": ["f00003"]}
    )
    assert isinstance(state, dict) and state["auth"] == ["f00001"]
    status, _ = await cloud_get(http, sim, "f00001", "get_instantaneous_demand")
    assert status == 401
    async with http.post(url(sim), data=command("device_list"), headers=basic("f00001")) as r:
        assert r.status == 401
    for _ in range(3):
        status, _ = await cloud_get(http, sim, "f00002", "get_instantaneous_demand")
        assert status in (500, 502, 503)
    served_before = len(sim.served())
    for i in range(12):
        status, text = await cloud_get(
            http, sim, "f00003", "get_instantaneous_demand", "JSON" if i % 2 else "XML"
        )
        assert status == 200
        with pytest.raises(ValueError):
            json.loads(text)
        with pytest.raises(ET.ParseError):
            ET.fromstring(text)
    assert len(sim.served()) == served_before  # nothing unparseable is "served"
    await set_faults(http, sim, {"auth": [], "http_5xx": [], "malformed": []})
    for cloud_id in ("f00001", "f00002", "f00003"):
        status, _ = await cloud_get(http, sim, cloud_id, "get_instantaneous_demand")
        assert status == 200
    stats = sim.stats()
    assert stats["fault_auth"] == 2 and stats["fault_http_5xx"] == 3
    assert stats["fault_malformed"] == 12


async def test_fault_hang_and_slow(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.set_faults({Fault.HANG: ["f00010"], Fault.SLOW: ["f00011"]})
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(
            url(sim), data=command("get_instantaneous_demand"), headers=cloud_headers("f00010"),
            timeout=aiohttp.ClientTimeout(total=0.4),
        ) as r:
            await r.read()
    start = time.monotonic()
    status, text = await cloud_get(http, sim, "f00011", "get_instantaneous_demand")
    assert status == 200 and "InstantaneousDemand" in json.loads(text)
    assert time.monotonic() - start >= 0.29


async def raw_exchange(sim: Simulator, payload: bytes) -> tuple[bytes, type[BaseException] | None]:
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    writer.write(payload)
    await writer.drain()
    data = b""
    error: type[BaseException] | None = None
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 2.0):
            data += chunk
    except ConnectionResetError as exc:
        error = type(exc)
    writer.close()
    return data, error


def raw_request(cloud_id: str, name: str = "get_instantaneous_demand") -> bytes:
    body = command(name, "JSON").encode()
    email, password = credentials_for(cloud_id, SEED)
    return (
        f"POST {PATH} HTTP/1.1\r\nHost: sim\r\nCloud-ID: {cloud_id}\r\nUser: {email}\r\n"
        f"Password: {password}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def test_fault_reset_and_offline(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.set_faults({Fault.RESET: ["f00012"], Fault.OFFLINE: ["f00013"]})
    data, error = await raw_exchange(sim, raw_request("f00012"))
    assert data == b"" and error is ConnectionResetError
    data, error = await raw_exchange(sim, raw_request("f00013"))
    assert data == b"" and error is None  # orderly close, no answer
    for cloud_id in ("f00012", "f00013"):
        with pytest.raises(aiohttp.ClientConnectionError):
            await cloud_get(http, sim, cloud_id, "get_instantaneous_demand")
    sim.set_faults({Fault.RESET: [], Fault.OFFLINE: []})
    status, _ = await cloud_get(http, sim, "f00012", "get_instantaneous_demand")
    assert status == 200


async def test_fault_rates_are_seeded() -> None:
    outcomes: list[list[int]] = []
    for _ in range(2):
        s = await make_sim(fault_rates=FaultRates(http_5xx=0.5))
        try:
            async with aiohttp.ClientSession() as session:
                statuses = [
                    (await cloud_get(session, s, "f00001", "get_instantaneous_demand"))[0]
                    for _ in range(40)
                ]
        finally:
            await s.stop()
        assert 5 <= sum(st >= 500 for st in statuses) <= 35
        assert set(statuses) <= {200, 500, 502, 503}
        outcomes.append(statuses)
    assert outcomes[0] == outcomes[1]


async def json_get(
    http: aiohttp.ClientSession, sim: Simulator, cloud_id: str, token: str | None = None
) -> tuple[int, str]:
    secret = token or credentials_for(cloud_id, SEED)[1]
    async with http.get(url(sim, f"/json/{cloud_id}"),
                        headers={"Authorization": f"Bearer {secret}"}) as r:
        return r.status, (await r.read()).decode()


async def test_http_json_meter(sim: Simulator, http: aiohttp.ClientSession) -> None:
    before = time.time()
    status, text = await json_get(http, sim, "f00004")
    assert status == 200
    doc = json.loads(text)
    assert doc["id"] == "f00004" and before - 1 <= doc["ts"] <= time.time()
    # The driver options the simulator publishes read this document.
    options = http_json_options()
    session = HttpJsonDriver().session(
        DeviceSpec(1, "f00004", "", "x", http_json_url(url(sim, ""), "f00004"), options))
    session.begin(False)
    sample = session.feed(HttpResponse(200, (), text.encode()))
    assert isinstance(sample, Sample)
    assert sim.served()[-1] == ServedReading("f00004", doc["ts"], sample.demand_w,
                                             sample.delivered_wh, sample.received_wh)
    assert sample.price == 0.0884
    assert (await json_get(http, sim, "f00004", token="wrong"))[0] == 401
    assert (await json_get(http, sim, "f99999"))[0] == 404
    async with http.post(url(sim, "/json/f00004")) as r:
        assert r.status == 400
    assert sim.records.polls_of("f00004") == 1  # a refused request is no poll arrival


def _hex_field(text: str, name: str) -> str:
    return str(json.loads(text)["InstantaneousDemand"][name])


async def test_poison_faults_serve_well_formed_bad_values(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    kinds = {"timestamp_max": "f00020", "timestamp_us": "f00021", "value_nan": "f00022",
             "value_infinity": "f00023", "value_huge": "f00024", "value_negative": "f00025"}
    await set_faults(http, sim, {kind: [cid] for kind, cid in kinds.items()})
    served_before = len(sim.served())
    now_2000 = int(time.time()) - EPOCH_2000

    # Cloud: the hex that decodes to the poison (or the word where hex has none).
    demand = {kind: (await cloud_get(http, sim, cid, "get_instantaneous_demand"))[1]
              for kind, cid in kinds.items()}
    assert _hex_field(demand["timestamp_max"], "TimeStamp") == "0xffffffffffffffff"
    micros = int(_hex_field(demand["timestamp_us"], "TimeStamp"), 16)
    assert abs(micros / 1e6 - now_2000) <= 2
    assert _hex_field(demand["value_huge"], "Demand") == "0x7fffffffffffffff"
    assert signed_hex(_hex_field(demand["value_negative"], "Demand")) == -(2**63)
    assert _hex_field(demand["value_nan"], "Demand") == "NaN"
    summation = (await cloud_get(http, sim, kinds["timestamp_max"], "get_current_summation"))[1]
    assert json.loads(summation)["CurrentSummation"]["TimeStamp"] == "0xffffffffffffffff"

    # Local: the value texts and LastContact.
    local = {}
    for kind, cid in kinds.items():
        async with http.post(url(sim), data=query_body(cid), headers=basic(cid)) as r:
            assert r.status == 200
            root = ET.fromstring(await r.text())
        values = {v.findtext("Name"): v.findtext("Value") for v in root.iter("Variable")}
        local[kind] = (root.findtext("DeviceDetails/LastContact"), values)
    assert local["timestamp_max"][0] == "0xffffffffffffffff"
    assert abs(int(str(local["timestamp_us"][0]), 16) / 1e6 - time.time()) <= 2
    assert local["value_nan"][1]["zigbee:InstantaneousDemand"] == "NaN"
    assert local["value_infinity"][1]["zigbee:InstantaneousDemand"] == "Infinity"
    assert local["value_huge"][1]["zigbee:InstantaneousDemand"] == "1e305"
    assert local["value_negative"][1]["zigbee:CurrentSummationDelivered"] == "-1234.500000"

    # http-json: bare NaN and Infinity, as Python's json writes them.
    docs = {kind: json.loads((await json_get(http, sim, cid))[1]) for kind, cid in kinds.items()}
    assert docs["timestamp_max"]["ts"] == 2**64 - 1
    assert abs(docs["timestamp_us"]["ts"] / 1e6 - time.time()) <= 2
    assert math.isnan(docs["value_nan"]["power"]["w"])
    assert docs["value_infinity"]["power"]["w"] == math.inf
    assert docs["value_huge"]["power"]["w"] == 1e308
    assert docs["value_negative"]["energy"]["delivered_wh"] == -1234.5

    assert len(sim.served()) == served_before  # a poisoned answer is no served reading
    stats = sim.stats()
    assert all(stats[f"fault_{kind}"] == 3 for kind in kinds if kind != "timestamp_max")
    assert stats["fault_timestamp_max"] == 4


async def test_totals_faults_hit_only_the_summation(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    state = await set_faults(http, sim, {"totals_5xx": ["f00026"], "totals_malformed": ["f00027"],
                                         "totals_hang": ["f00028"]})
    assert isinstance(state, dict) and state["totals_hang"] == ["f00028"]
    for cid in ("f00026", "f00027", "f00028"):
        status, text = await cloud_get(http, sim, cid, "get_instantaneous_demand")
        assert status == 200 and "InstantaneousDemand" in json.loads(text)
        async with http.post(url(sim), data=query_body(cid), headers=basic(cid)) as r:
            assert r.status == 200  # the local query holds the totals: untouched
        assert (await json_get(http, sim, cid))[0] == 200
    assert (await cloud_get(http, sim, "f00026", "get_current_summation"))[0] in (500, 502, 503)
    status, text = await cloud_get(http, sim, "f00027", "get_current_summation")
    assert status == 200
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(url(sim), data=command("get_current_summation", "JSON"),
                             headers=cloud_headers("f00028"),
                             timeout=aiohttp.ClientTimeout(total=0.4)) as r:
            await r.read()
    stats = sim.stats()
    assert stats["fault_totals_5xx"] == stats["fault_totals_malformed"] == 1
    assert stats["fault_totals_hang"] == 1


async def test_totals_fault_rates_are_seeded() -> None:
    runs: list[list[int]] = []
    for _ in range(2):
        s = await make_sim(fault_rates=FaultRates(totals_5xx=0.5))
        try:
            async with aiohttp.ClientSession() as session:
                statuses = []
                for _ in range(30):
                    demand, _ = await cloud_get(session, s, "f00001", "get_instantaneous_demand")
                    assert demand == 200
                    statuses.append((await cloud_get(session, s, "f00001",
                                                     "get_current_summation"))[0])
        finally:
            await s.stop()
        assert 4 <= sum(st >= 500 for st in statuses) <= 26
        runs.append(statuses)
    assert runs[0] == runs[1]


# --- connection handling -----------------------------------------------------


async def read_responses(reader: asyncio.StreamReader, count: int) -> list[tuple[bytes, bytes]]:
    out = []
    for _ in range(count):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2.0)
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        out.append((head, await reader.readexactly(length)))
    return out


async def test_keep_alive_pipelining_in_order(sim: Simulator) -> None:
    sim.set_faults({Fault.SLOW: ["f00002"]})
    ids = [cloud_id_for(i % 20) for i in range(120)]
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    writer.write(b"".join(raw_request(cid) for cid in ids))  # all pipelined at once
    responses = await read_responses(reader, len(ids))
    for cid, (head, body) in zip(ids, responses, strict=True):
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert json.loads(body)["InstantaneousDemand"]["DeviceMacId"].endswith(cid)
    writer.write(raw_request("f00001"))  # still open afterwards
    [(head, _)] = await read_responses(reader, 1)
    assert head.startswith(b"HTTP/1.1 200")
    assert sim.stats()["connections"] == 1
    writer.close()


async def test_legacy_http10_devices_close(http: aiohttp.ClientSession) -> None:
    s = await make_sim(http10_fraction=1.0)
    try:
        data, error = await raw_exchange(s, raw_request("f00001") + raw_request("f00001"))
        assert error is None
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0] == b"HTTP/1.0 200 OK"
        assert b"Connection: close" in lines
        assert b"Content-Type: text/html; charset=UTF-8" in lines
        assert data.count(b"HTTP/1.0") == 1  # closed after the first answer
        assert "InstantaneousDemand" in json.loads(body)
    finally:
        await s.stop()


# --- records -----------------------------------------------------------------


async def test_served_export_equals_client_view(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    seen: list[ServedReading] = []
    for i in range(10):
        cloud_id = cloud_id_for(20 + i)
        status, text = await cloud_get(http, sim, cloud_id, "get_instantaneous_demand")
        assert status == 200
        fields = json.loads(text)["InstantaneousDemand"]
        ts = int(fields["TimeStamp"], 16) + EPOCH_2000
        seen.append(ServedReading(cloud_id, ts, float(signed_hex(fields["Demand"])), None, None))
        async with http.post(url(sim), data=query_body(cloud_id), headers=basic(cloud_id)) as r:
            root = ET.fromstring(await r.text())
        values = {v.findtext("Name"): v.findtext("Value", "") for v in root.iter("Variable")}
        seen.append(ServedReading(
            cloud_id, int(root.findtext("DeviceDetails/LastContact", ""), 16),
            round(float(values["zigbee:InstantaneousDemand"]) * 1000.0, 3),
            round(float(values["zigbee:CurrentSummationDelivered"]) * 1000.0, 3),
            round(float(values["zigbee:CurrentSummationReceived"]) * 1000.0, 3),
        ))
    assert sim.served() == seen
    async with http.get(url(sim, "/_sim/served?offset=5")) as r:
        exported = await r.json()
    assert exported["fields"] == list(ServedReading._fields)
    assert exported["next"] == len(seen)
    assert [ServedReading(*row) for row in exported["readings"]] == seen[5:]


async def test_jitter_report_and_arrivals(sim: Simulator, http: aiohttp.ClientSession) -> None:
    for _ in range(6):
        await cloud_get(http, sim, "f00015", "get_instantaneous_demand")
        await cloud_get(http, sim, "f00015", "get_current_summation")  # not a poll arrival
        await asyncio.sleep(0.05)
    report = sim.jitter_report()
    assert report["polls"] == 6 and report["devices"] == 1 and report["intervals"] == 5
    assert report["expected_interval_s"] == 0.05
    p50, p99, peak = report["jitter_p50_s"], report["jitter_p99_s"], report["jitter_max_s"]
    assert isinstance(p50, float) and isinstance(p99, float) and isinstance(peak, float)
    assert 0 <= p50 <= p99 <= peak < 0.05
    async with http.get(url(sim, "/_sim/jitter")) as r:
        assert (await r.json())["polls"] == 6
    async with http.get(url(sim, "/_sim/arrivals?id=f00015")) as r:
        arrivals = (await r.json())["arrivals"]
    assert len(arrivals) == 6 and arrivals == sorted(arrivals)
    assert all(b - a >= 0.045 for a, b in itertools.pairwise(arrivals))
    async with http.post(url(sim, "/_sim/reset")) as r:
        assert r.status == 200
    assert sim.jitter_report()["polls"] == 0 and sim.served() == []


async def test_control_api_errors(sim: Simulator, http: aiohttp.ClientSession) -> None:
    async with http.post(url(sim, "/_sim/faults"), json={"explode": ["f00001"]}) as r:
        assert r.status == 400
    async with http.post(url(sim, "/_sim/faults"), json={"rates": {"hang": 2.0}}) as r:
        assert r.status == 400
    async with http.post(url(sim, "/_sim/faults"), data=b"{not json") as r:
        assert r.status == 400
    async with http.get(url(sim, "/_sim/nothing")) as r:
        assert r.status == 404
    state = await set_faults(http, sim, {"rates": {"slow": 0.25}, "hang": ["F00001"]})
    assert isinstance(state, dict)
    assert state["rates"]["slow"] == 0.25 and state["hang"] == ["f00001"]
    async with http.post(url(sim, "/_sim/reset"), json={"faults": True}) as r:
        assert r.status == 200
    async with http.get(url(sim, "/_sim/faults")) as r:
        state = await r.json()
    assert state["hang"] == [] and state["rates"]["slow"] == 0.0
    async with http.get(url(sim, "/_sim/stats")) as r:
        stats = await r.json()
    assert stats["fleet_size"] == 50 and stats["control"] >= 1


def test_serves_on_uvloop() -> None:
    """The CLI runs on uvloop, whose transports and sockets differ from asyncio's."""

    async def scenario() -> None:
        s = await make_sim(record_served=True)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
            for _ in range(3):
                writer.write(raw_request("f00001"))
                [(head, body)] = await read_responses(reader, 1)
                assert head.startswith(b"HTTP/1.1 200") and b"InstantaneousDemand" in body
            writer.close()
            s.set_faults({Fault.RESET: ["f00002"]})
            data, error = await raw_exchange(s, raw_request("f00002"))
            assert data == b"" and error is ConnectionResetError
            assert len(s.served()) == 3
        finally:
            await s.stop()

    uvloop.run(scenario())


async def test_garbage_request_gets_400_and_close(sim: Simulator) -> None:
    data, error = await raw_exchange(sim, b"NOT HTTP AT ALL\r\n\r\n")
    assert error is None and data.startswith(b"HTTP/1.1 400")
    assert b"Connection: close" in data


async def test_closed_connections_are_freed_without_the_cyclic_gc(sim: Simulator) -> None:
    import gc

    from poller.simulator.server import HttpConnection

    close = raw_request("f00012").replace(b"Host: sim\r\n", b"Host: sim\r\nConnection: close\r\n")
    gc.collect()
    gc.disable()  # whatever is freed now is freed by reference counting
    try:
        for _ in range(10):
            data, error = await raw_exchange(sim, close)
            assert data.startswith(b"HTTP/1.1 200") and error is None
        await asyncio.sleep(0.05)
        assert [o for o in gc.get_objects() if type(o) is HttpConnection] == []
    finally:
        gc.enable()


async def test_the_simulate_command_freezes_its_devices_as_they_are_built(
        sim: Simulator) -> None:
    import gc

    from poller.simulator.main import freeze_as_the_fleet_grows

    gc.unfreeze()
    task = asyncio.create_task(freeze_as_the_fleet_grows(sim, period_s=0.05))
    try:
        await asyncio.sleep(0.12)
        assert gc.get_freeze_count() == 0  # nothing built yet: nothing frozen
        for cloud_id in ("f00001", "f00002"):
            data, _ = await raw_exchange(sim, raw_request(cloud_id).replace(
                b"Host: sim\r\n", b"Host: sim\r\nConnection: close\r\n"))
            assert data.startswith(b"HTTP/1.1 200")
        await asyncio.sleep(0.12)
        assert gc.get_freeze_count() > 0
        device = sim.fleet.get("f00001", 0.0)
        assert device is not None
        # Frozen: in no generation a collection walks.
        assert all(device is not o for g in (0, 1, 2) for o in gc.get_objects(generation=g))
    finally:
        task.cancel()
        gc.unfreeze()
