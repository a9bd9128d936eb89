"""Property tests: no input makes a driver raise anything but PollFailure, and
what the simulator encodes (hexcodec, format_local_value, format_pointer)
the drivers read back exactly."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poller.drivers.base import DeviceSession, DeviceSpec, PollFailure, Sample
from poller.drivers.bounds import SampleBounds
from poller.drivers.eagle_cloud import EagleCloudDriver, parse_demand, parse_summation
from poller.drivers.eagle_local import (
    ENERGY_UNITS_WH,
    POWER_UNITS_W,
    EagleLocalDriver,
    format_local_value,
    parse_device_query,
    parse_local_value,
)
from poller.drivers.hexcodec import (
    EPOCH_2000_UNIX,
    decode_signed_hex,
    decode_unsigned_hex,
    encode_scaled,
    encode_signed_hex,
    encode_unsigned_hex,
    scale,
    seconds_since_2000,
    unix_from_2000,
)
from poller.drivers.http_json import HttpJsonDriver, format_pointer, parse_pointer, resolve
from poller.drivers.response import parse_xml
from poller.http import HttpRequest, HttpResponse

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "eagle"
SECRET = "pw-Zq81"
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

REAL_BODIES = sorted(
    p.read_bytes()
    for p in FIXTURES.iterdir()
    if p.suffix in (".xml", ".json") and p.stat().st_size < 20_000
)


def cloud_at_demand() -> DeviceSession:
    spec = DeviceSpec(1, "00ce69", "me@example.com", SECRET, None, {})
    session = EagleCloudDriver().session(spec)
    session.begin(True)
    return session


def cloud_at_summation() -> DeviceSession:
    session = cloud_at_demand()
    demand = (
        b"<InstantaneousDemand><TimeStamp>0x1</TimeStamp><Demand>0x000001</Demand>"
        b"<Multiplier>0x1</Multiplier><Divisor>0x1</Divisor></InstantaneousDemand>"
    )
    session.feed(HttpResponse(200, (), demand))
    return session


def local_at_list() -> DeviceSession:
    spec = DeviceSpec(2, "004792", "", SECRET, "http://127.0.0.1:1", {})
    session = EagleLocalDriver().session(spec)
    session.begin(False)
    return session


def local_at_query() -> DeviceSession:
    session = local_at_list()
    devices = (
        b"<DeviceList><Device><HardwareAddress>0x0007810000123456</HardwareAddress>"
        b"<ModelId>electric_meter</ModelId></Device></DeviceList>"
    )
    session.feed(HttpResponse(200, (), devices))
    return session


def http_json() -> DeviceSession:
    options = {
        "fields": {"device_at": "/t", "demand_w": "/a/0", "delivered_wh": "/d", "price": "/p"},
        "time_format": "iso8601",
    }
    spec = DeviceSpec(3, "j", "", SECRET, "http://127.0.0.1:1/x", options)
    session = HttpJsonDriver().session(spec)
    session.begin(False)
    return session


SESSIONS = [cloud_at_demand, cloud_at_summation, local_at_list, local_at_query, http_json]

# Bodies that look like what the devices send, so the fuzz reaches the parsers.
TAGS = st.sampled_from(
    [
        "InstantaneousDemand",
        "CurrentSummation",
        "Error",
        "rainforest",
        "Device",
        "DeviceList",
        "DeviceDetails",
        "HardwareAddress",
        "ModelId",
        "LastContact",
        "Components",
        "Component",
        "Variables",
        "Variable",
        "Name",
        "Value",
        "Units",
        "Demand",
        "Multiplier",
        "Divisor",
        "TimeStamp",
        "SummationDelivered",
        "SummationReceived",
    ]
)
TEXTS = st.one_of(
    st.sampled_from(
        [
            "0x001738",
            "0xfffffc18",
            "electric_meter",
            "zigbee:InstantaneousDemand",
            "zigbee:CurrentSummationDelivered",
            "zigbee:Price",
            "2.5 kW",
            "invalid",
            "",
            "kWh",
            "&amp;",
            "&x;",
            SECRET,
        ]
    ),
    st.text(max_size=12),
)


def _xmlish() -> st.SearchStrategy[str]:
    leaf = st.builds(lambda t, v: f"<{t}>{v}</{t}>", TAGS, TEXTS)
    return st.recursive(
        leaf,
        lambda inner: st.builds(
            lambda t, kids: f"<{t}>{''.join(kids)}</{t}>", TAGS, st.lists(inner, max_size=5)
        ),
        max_leaves=20,
    )


def _jsonish() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**63 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        TEXTS,
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(
                st.sampled_from(["t", "a", "d", "p", "InstantaneousDemand", "Error", "Demand"]),
                inner,
                max_size=4,
            ),
        ),
        max_leaves=15,
    )


def _mutated(data: st.DataObject) -> bytes:
    body = bytearray(data.draw(st.sampled_from(REAL_BODIES)))
    for _ in range(data.draw(st.integers(0, 4))):
        if not body:
            break
        at = data.draw(st.integers(0, len(body) - 1))
        action = data.draw(st.integers(0, 2))
        if action == 0:
            del body[at : at + data.draw(st.integers(1, 20))]
        elif action == 1:
            body[at] = data.draw(st.integers(0, 255))
        else:
            body[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    return bytes(body)


BODIES = st.one_of(
    st.binary(max_size=300),
    _xmlish().map(str.encode),
    _jsonish().map(orjson.dumps),
)
STATUSES = st.one_of(st.just(200), st.integers(100, 599))


def _feed_only_pollfailure(make: Any, status: int, body: bytes) -> None:
    session = make()
    try:
        result = session.feed(HttpResponse(status, (("content-type", "text/html"),), body))
    except PollFailure as exc:
        assert len(exc.message) <= 200
        assert SECRET not in exc.message
        return
    assert isinstance(result, (Sample, HttpRequest))
    if isinstance(result, Sample):
        for value in result:
            assert value is None or isinstance(value, float)


@FUZZ
@given(make=st.sampled_from(SESSIONS), status=STATUSES, body=BODIES)
def test_any_answer_gives_a_sample_a_request_or_pollfailure(
    make: Any, status: int, body: bytes
) -> None:
    _feed_only_pollfailure(make, status, body)


@FUZZ
@given(make=st.sampled_from(SESSIONS), data=st.data())
def test_mutated_real_payloads_give_only_pollfailure(make: Any, data: st.DataObject) -> None:
    _feed_only_pollfailure(make, 200, _mutated(data))


# --- round trips ------------------------------------------------------------


@given(st.integers(-(2**23), 2**23 - 1))
def test_signed_24_bit_round_trip(value: int) -> None:
    text = encode_signed_hex(value, 6)
    assert len(text) == 8
    assert decode_signed_hex(text) == value


@given(st.integers(-(2**31), 2**31 - 1))
def test_signed_32_bit_round_trip(value: int) -> None:
    assert decode_signed_hex(encode_signed_hex(value, 8)) == value


@given(
    st.integers(3, 8).flatmap(
        lambda n: st.tuples(st.just(2 * n), st.integers(-(2 ** (8 * n - 1)), 2 ** (8 * n - 1) - 1))
    )
)
def test_signed_round_trip_any_even_width(width_value: tuple[int, int]) -> None:
    digits, value = width_value
    assert decode_signed_hex(encode_signed_hex(value, digits)) == value


@given(st.integers(1, 16).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, 16**n - 1))))
def test_unsigned_round_trip(width_value: tuple[int, int]) -> None:
    digits, value = width_value
    text = encode_unsigned_hex(value, digits)
    assert decode_unsigned_hex(text) == value
    assert decode_unsigned_hex(text.upper().replace("0X", "0x")) == value


@given(st.integers(EPOCH_2000_UNIX, EPOCH_2000_UNIX + 2**32 - 1))
def test_epoch_2000_round_trip(unix: int) -> None:
    assert unix_from_2000(seconds_since_2000(unix)) == unix
    assert seconds_since_2000(unix + 0.75) == unix - EPOCH_2000_UNIX


U32 = st.integers(0, 2**32 - 1)


@given(
    raw=st.integers(-(2**23), 2**23 - 1),
    multiplier=U32,
    divisor=U32,
    stamp=U32,
    as_json=st.booleans(),
    wide=st.booleans(),
)
def test_demand_payload_round_trip(
    raw: int, multiplier: int, divisor: int, stamp: int, as_json: bool, wide: bool
) -> None:
    fields = {
        "TimeStamp": encode_unsigned_hex(stamp, 8),
        "Demand": encode_signed_hex(raw, 8 if wide else 6),
        "Multiplier": encode_unsigned_hex(multiplier, 8),
        "Divisor": encode_unsigned_hex(divisor, 8),
    }
    if as_json:
        body = orjson.dumps({"InstantaneousDemand": fields})
    else:
        inner = "".join(f"<{k}>{v}</{k}>" for k, v in fields.items())
        body = f"<InstantaneousDemand>\r\n{inner}</InstantaneousDemand>\r\n".encode()
    device_at, demand_w = parse_demand(body)
    assert device_at == (float(stamp + EPOCH_2000_UNIX) if stamp else None)
    assert demand_w == raw * (multiplier or 1) * 1000 / (divisor or 1)
    assert demand_w == scale(raw, multiplier, divisor, 1000)


@given(
    delivered=st.integers(0, 2**48 - 1),
    received=st.integers(0, 2**48 - 1),
    multiplier=st.integers(0, 1000),
    divisor=st.integers(0, 100_000),
)
def test_summation_payload_round_trip(
    delivered: int, received: int, multiplier: int, divisor: int
) -> None:
    body = (
        "<CurrentSummation><TimeStamp>0x1c9347b8</TimeStamp>"
        f"<SummationDelivered>{encode_unsigned_hex(delivered, 16)}</SummationDelivered>"
        f"<SummationReceived>{encode_unsigned_hex(received, 16)}</SummationReceived>"
        f"<Multiplier>{encode_unsigned_hex(multiplier, 8)}</Multiplier>"
        f"<Divisor>{encode_unsigned_hex(divisor, 8)}</Divisor></CurrentSummation>"
    )
    _, delivered_wh, received_wh = parse_summation(body.encode())
    assert delivered_wh == scale(delivered, multiplier, divisor, 1000)
    assert received_wh == scale(received, multiplier, divisor, 1000)


@given(
    kw=st.floats(-1000, 1000, allow_nan=False),
    multiplier=st.integers(1, 10),
    divisor=st.sampled_from([1, 10, 100, 1000, 10_000]),
)
def test_encode_scaled_is_the_nearest_raw(kw: float, multiplier: int, divisor: int) -> None:
    raw = encode_scaled(kw, multiplier, divisor)
    assert abs(scale(raw, multiplier, divisor) - kw) <= multiplier / divisor / 2 + 1e-9


MILLI = st.integers(-(10**12), 10**12).map(lambda n: Decimal(n).scaleb(-6))


@given(number=MILLI, inline=st.booleans(), unit=st.sampled_from(["kW", "W", "kw", "MW"]))
def test_local_power_round_trip(number: Decimal, inline: bool, unit: str) -> None:
    value, units = format_local_value(float(number), unit, inline=inline)
    expected = float(Decimal(f"{float(number):.6f}") * POWER_UNITS_W[unit.lower()])
    assert parse_local_value(value, units, POWER_UNITS_W) == expected


@given(number=MILLI.map(abs), inline=st.booleans(), unit=st.sampled_from(["kWh", "Wh"]))
def test_local_energy_round_trip_through_a_query(number: Decimal, inline: bool, unit: str) -> None:
    value, units = format_local_value(float(number), unit, inline=inline)
    body = (
        "<Device><DeviceDetails><LastContact>0x5c5aff97</LastContact></DeviceDetails>"
        "<Components><Component><Name>Main</Name><Variables><Variable>"
        f"<Name>zigbee:CurrentSummationDelivered</Name><Value>{value}</Value>"
        f"<Units>{units}</Units></Variable></Variables></Component></Components></Device>"
    )
    sample = parse_device_query(body.encode())
    expected = float(Decimal(f"{float(number):.6f}") * ENERGY_UNITS_WH[unit.lower()])
    assert sample == Sample(0x5C5AFF97, None, expected, None, None)


TOKENS = st.lists(st.text(max_size=6), min_size=1, max_size=5)


@given(tokens=TOKENS)
def test_pointer_text_round_trip(tokens: list[str]) -> None:
    assert parse_pointer(format_pointer(tuple(tokens))) == tuple(tokens)


@given(
    tokens=TOKENS,
    value=st.one_of(st.integers(-(2**53), 2**53), st.floats(-1e12, 1e12, allow_nan=False)),
    factor=st.sampled_from([1, 1000, 0.001, -1]),
    index=st.booleans(),
)
def test_http_json_reads_what_a_pointer_names(
    tokens: list[str], value: float, factor: float, index: bool
) -> None:
    document: Any = value
    path = list(tokens)
    for token in reversed(tokens):
        document = {token: document}
    if index:
        document = [document]
        path.insert(0, "0")
    pointer = format_pointer(tuple(path))
    assert resolve(document, parse_pointer(pointer)) == value
    options = {"fields": {"demand_w": pointer}, "scale": {"demand_w": factor}}
    session = HttpJsonDriver().session(DeviceSpec(1, "x", "", "", "http://127.0.0.1:9", options))
    session.begin(False)
    sample = session.feed(HttpResponse(200, (), orjson.dumps(document)))
    assert isinstance(sample, Sample)
    assert sample.demand_w == float(value) * factor


# --- what a failed poll keeps; what the loop's bounds let through --------------

_BOUNDS = SampleBounds(device_time_max_behind_s=30 * 86400, device_time_max_ahead_s=86400,
                       max_demand_w=1e6, max_total_wh=1e12, max_price=1e6)
_DEMAND = (
    b'{"InstantaneousDemand": {"TimeStamp": "0x1c9347b8", "Demand": "0x0003b0", '
    b'"Multiplier": "0x00000001", "Divisor": "0x000003e8"}}'
)


@FUZZ
@given(status=STATUSES, body=BODIES)
def test_a_failed_totals_answer_leaves_the_demand_for_the_loop(status: int, body: bytes) -> None:
    session = EagleCloudDriver().session(DeviceSpec(1, "00ce69", "me@x.org", SECRET, None, {}))
    assert session.partial() is None  # no poll yet
    session.begin(True)
    assert isinstance(session.feed(HttpResponse(200, (), _DEMAND)), HttpRequest)
    demand = Sample(float(0x1C9347B8 + EPOCH_2000_UNIX), 944.0, None, None, None)
    try:
        merged = session.feed(HttpResponse(status, (), body))
    except PollFailure:
        assert session.partial() == demand
        assert session.partial() is None  # given once
        return
    assert isinstance(merged, Sample) and merged[:2] == demand[:2]
    assert session.partial() is None  # a whole poll leaves nothing behind


def test_a_transport_failure_of_the_totals_request_leaves_the_demand() -> None:
    # A timeout never reaches feed(): the loop asks partial() all the same.
    session = EagleCloudDriver().session(DeviceSpec(1, "00ce69", "me@x.org", SECRET, None, {}))
    session.begin(True)
    session.feed(HttpResponse(200, (), _DEMAND))
    assert session.partial() == Sample(float(0x1C9347B8 + EPOCH_2000_UNIX), 944.0, None, None,
                                       None)
    for make in (local_at_query, http_json):  # one request a poll: nothing to keep
        assert make().partial() is None


ANY_NUMBER = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**70), 2**70),
    st.sampled_from(["NaN", "-Infinity", "inf", "1e400", "-0", " 12.5 "]),
)


@FUZZ
@given(values=st.lists(ANY_NUMBER, min_size=5, max_size=5),
       poll_at=st.floats(1e9, 4e9))
def test_any_number_an_http_json_device_sends_is_stored_bounded(
    values: list[Any], poll_at: float
) -> None:
    options = {"fields": {"device_at": "/t", "demand_w": "/w", "delivered_wh": "/d",
                          "received_wh": "/r", "price": "/p"}}
    session = HttpJsonDriver().session(DeviceSpec(3, "j", "", "", "http://127.0.0.1:1", options))
    session.begin(False)
    document = dict(zip("twdrp", values, strict=True))
    # As Python's json writes it: NaN and Infinity bare, integers of any size.
    body = json.dumps(document).encode()
    try:
        sample = session.feed(HttpResponse(200, (), body))
    except PollFailure:
        return  # only an answer where demand and both totals are null
    assert isinstance(sample, Sample)
    flawed = _BOUNDS.check(sample, poll_at)
    kept = sample if flawed is None else flawed.sample
    for value in kept:
        assert value is None or math.isfinite(value)
    if kept.device_at is not None:
        assert abs(kept.device_at - poll_at) <= 30 * 86400


@FUZZ
@given(codec=st.sampled_from(["utf-8", "utf-16", "utf-16-le", "utf-16-be", "latin-1"]),
       declare=st.booleans(), inner=_xmlish())
def test_no_entity_is_ever_expanded_whatever_the_encoding(codec: str, declare: bool,
                                                          inner: str) -> None:
    head = f'<?xml version="1.0" encoding="{codec}"?>' if declare else ""
    text = f'{head}<!DOCTYPE Device [<!ENTITY x "EXPANDED">]><Device>&x;{inner}</Device>'
    with pytest.raises(PollFailure) as caught:
        parse_xml(text.encode(codec, errors="xmlcharrefreplace"))
    assert "EXPANDED" not in caught.value.message
