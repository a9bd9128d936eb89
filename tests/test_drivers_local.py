"""eagle-local: request shapes, meter discovery and the real payloads."""

from __future__ import annotations

import ast
import base64
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from poller.drivers import get_driver
from poller.drivers.base import DeviceSpec, Outcome, PollFailure, Sample
from poller.drivers.eagle_local import (
    ENERGY_UNITS_WH,
    POWER_UNITS_W,
    EagleLocalDriver,
    EagleLocalSession,
    device_query_command,
    find_meter,
    parse_device_query,
    parse_local_value,
)
from poller.http import HttpRequest, HttpResponse

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "eagle"
URL = "http://192.168.1.50"
INSTALL_CODE = "bfb0fc05f51a3932"


def fixture(name_start: str) -> bytes:
    (path,) = [p for p in FIXTURES.iterdir() if p.name.startswith(name_start)]
    return path.read_bytes()


def ok(body: bytes | str, status: int = 200) -> HttpResponse:
    if isinstance(body, str):
        body = body.encode()
    return HttpResponse(status, (("content-type", "text/html"),), body)


def spec(url: str | None = URL, cloud_id: str = "004792") -> DeviceSpec:
    return DeviceSpec(3, cloud_id, "", INSTALL_CODE, url, {})


def session() -> EagleLocalSession:
    return EagleLocalDriver().session(spec())


def query_xml(variables: list[tuple[str, str | None, str | None]], last: str = "0x5c5aff97") -> str:
    rows = "".join(
        "<Variable><Name>{}</Name>{}{}</Variable>".format(
            name,
            "<Value/>" if value is None else f"<Value>{value}</Value>",
            "" if units is None else f"<Units>{units}</Units>",
        )
        for name, value, units in variables
    )
    return (
        "<Device><DeviceDetails><Name>Power Meter</Name>"
        "<HardwareAddress>0x0007810000123456</HardwareAddress>"
        f"<LastContact>{last}</LastContact><ConnectionStatus>Connected</ConnectionStatus>"
        "</DeviceDetails><Components><Component><HardwareId></HardwareId><FixedId>0</FixedId>"
        f"<Name>Main</Name><Variables>{rows}</Variables></Component></Components></Device>"
    )


def list_xml(*devices: tuple[str, str, str]) -> str:
    rows = "".join(
        f"<Device><HardwareAddress>{addr}</HardwareAddress><Manufacturer>x</Manufacturer>"
        f"<ModelId>{model}</ModelId><Protocol>Zigbee</Protocol><LastContact>0x5989f8f5"
        f"</LastContact><ConnectionStatus>{status}</ConnectionStatus></Device>"
        for addr, model, status in devices
    )
    return f"<DeviceList>{rows}</DeviceList>"


# --- requests -------------------------------------------------------------


def test_basic_auth_matches_the_manual_example() -> None:
    request = get_driver("eagle-local", cloud_base_url="https://x.invalid").session(spec())
    first = request.begin(False)
    # The manual's example: cloud id 004792, install code bfb0fc05f51a3932.
    assert first == HttpRequest(
        "POST",
        "http://192.168.1.50/cgi-bin/post_manager",
        (
            ("Authorization", "Basic MDA0NzkyOmJmYjBmYzA1ZjUxYTM5MzI="),
            ("Content-Type", "text/xml"),
        ),
        b"<Command><Name>device_list</Name></Command>",
    )
    assert base64.b64decode(first.headers[0][1][6:]) == b"004792:" + INSTALL_CODE.encode()


def test_url_is_required() -> None:
    with pytest.raises(ValueError, match="needs the device's url"):
        EagleLocalDriver().session(spec(url=None))
    with pytest.raises(ValueError):
        EagleLocalDriver().session(spec(url="192.168.1.50"))


def test_colon_in_cloud_id_refused() -> None:
    with pytest.raises(ValueError, match="':'"):
        EagleLocalDriver().session(spec(cloud_id="ab:cd"))


def test_device_query_body_follows_the_manual() -> None:
    body = device_query_command("0x000781000081fd0b")
    root = ET.fromstring(body)
    assert root.tag == "Command"
    assert root.findtext("Name") == "device_query"
    assert root.findtext("DeviceDetails/HardwareAddress") == "0x000781000081fd0b"
    assert root.findtext("Components/Component/Name") == "Main"
    names = [v.findtext("Name") for v in root.iterfind("Components/Component/Variables/Variable")]
    assert names == [
        "zigbee:InstantaneousDemand",
        "zigbee:CurrentSummationDelivered",
        "zigbee:CurrentSummationReceived",
        "zigbee:Price",
    ]
    everything = ET.fromstring(device_query_command("0x1", all_variables=True))
    assert everything.findtext("Components/All") == "Y"


@pytest.mark.parametrize("address", ["0x1</HardwareAddress><x>", "", "12", "0x" + "f" * 17])
def test_hardware_address_cannot_inject(address: str) -> None:
    with pytest.raises(ValueError):
        device_query_command(address)


def test_reprs_never_show_the_secret() -> None:
    s = session()
    assert INSTALL_CODE not in repr(s)
    assert INSTALL_CODE not in repr(spec())


# --- discovery ------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "address"),
    [
        ("eagle200_device_list__tonymitchell", "0x0007810000123456"),
        ("eagle200_device_list_capture__vera", "0x00078100006a18d7"),
        ("eagle200_device_list_response__", "0x000781000081fd0b"),
    ],
)
def test_device_list_fixtures(prefix: str, address: str) -> None:
    assert find_meter(fixture(prefix)) == address


def test_meter_among_other_devices_prefers_connected() -> None:
    body = list_xml(
        ("0x00244600000ebaba", "1202", "Connected"),
        ("0x0000000000000001", "electric_meter", "Not joined"),
        ("0x0000000000000002", "electric_meter", "Connected"),
    )
    assert find_meter(body.encode()) == "0x0000000000000002"
    only_stale = list_xml(
        ("0x00244600000ebaba", "1202", "Connected"), ("0x3", "electric_meter", "x")
    )
    assert find_meter(only_stale.encode()) == "0x3"


def test_no_meter_is_a_device_error() -> None:
    body = list_xml(("0x00244600000ebaba", "1202", "Connected"))
    with pytest.raises(PollFailure) as caught:
        find_meter(body.encode())
    assert caught.value.outcome is Outcome.DEVICE_ERROR
    with pytest.raises(PollFailure) as empty:
        find_meter(b"<DeviceList></DeviceList>")
    assert empty.value.outcome is Outcome.DEVICE_ERROR


def test_bad_meter_address_is_unparseable() -> None:
    body = list_xml(("0x1&lt;/HardwareAddress&gt;", "electric_meter", "Connected"))
    with pytest.raises(PollFailure) as caught:
        find_meter(body.encode())
    assert caught.value.outcome is Outcome.UNPARSEABLE


def test_first_poll_discovers_then_queries_then_caches() -> None:
    s = session()
    assert s.begin(True).body == b"<Command><Name>device_list</Name></Command>"
    query = s.feed(ok(fixture("eagle200_device_list__tonymitchell")))
    assert isinstance(query, HttpRequest)
    assert query.url == "http://192.168.1.50/cgi-bin/post_manager"
    assert query.body == device_query_command("0x0007810000123456")
    assert s.meter == "0x0007810000123456"
    sample = s.feed(ok(fixture("eagle200_device_query_all__tonymitchell")))
    assert isinstance(sample, Sample)
    # Second poll goes straight to the query.
    assert s.begin(False) == query
    assert isinstance(s.feed(ok(fixture("eagle200_device_query_all__tonymitchell"))), Sample)
    with pytest.raises(RuntimeError):
        s.feed(ok(b"<Device/>"))


def test_failed_query_forgets_the_meter() -> None:
    s = session()
    s.begin(False)
    s.feed(ok(fixture("eagle200_device_list__tonymitchell")))
    with pytest.raises(PollFailure) as caught:
        s.feed(ok("", 500))
    assert caught.value.outcome is Outcome.HTTP_ERROR
    assert s.meter is None
    assert s.begin(False).body == b"<Command><Name>device_list</Name></Command>"


def test_missing_main_component_switches_to_all_variables() -> None:
    s = session()
    s.begin(False)
    s.feed(ok(fixture("eagle200_device_list__tonymitchell")))
    empty = "<Device><DeviceDetails/><Components></Components></Device>"
    with pytest.raises(PollFailure):
        s.feed(ok(empty))
    s.begin(False)
    query = s.feed(ok(fixture("eagle200_device_list__tonymitchell")))
    assert isinstance(query, HttpRequest)
    assert b"<All>Y</All>" in query.body


@pytest.mark.parametrize(
    ("status", "outcome"), [(401, Outcome.AUTH_REJECTED), (503, Outcome.HTTP_ERROR)]
)
def test_status_on_discovery(status: int, outcome: Outcome) -> None:
    s = session()
    s.begin(False)
    with pytest.raises(PollFailure) as caught:
        s.feed(ok("Unauthorized", status))
    assert caught.value.outcome is outcome


# --- device_query fixtures -------------------------------------------------


def test_query_all_capture() -> None:
    sample = parse_device_query(fixture("eagle200_device_query_all__tonymitchell"))
    assert sample == Sample(
        device_at=0x5C5AFF97,  # Unix time, not the 2000 epoch
        demand_w=2790.0,  # 2.790000 kW
        delivered_wh=91_937_250.0,  # 91937.250000 kWh
        received_wh=0.0,
        price=0.0884,
    )


def test_query_single_var_manual_value_with_unit_inside() -> None:
    sample = parse_device_query(fixture("eagle200_device_query_single_var_response__"))
    assert sample == Sample(0x59A0B67C, 21499.0, None, None, None)  # "21.499 kW"


def test_query_redacted_capture_keeps_values_without_time() -> None:
    sample = parse_device_query(fixture("eagle200_device_query_capture_value_with_units_suffix"))
    assert sample == Sample(None, 2151.0, None, None, None)  # "2.151000 kW", LastContact redacted


def test_aioeagle_parsed_capture_rendered_back_to_xml() -> None:
    text = fixture("eagle200_device_query_all_parsed_pyrepr__").decode()
    data: dict[str, dict[str, Any]] = ast.literal_eval(text)
    rows = [(name, v["Value"], v["Units"]) for name, v in data.items()]
    sample = parse_device_query(query_xml(rows, last="0x61234567").encode())
    # Demand 1.965000 kW, delivered 2853.662000 kWh, received 0, Price 'invalid'.
    assert sample == Sample(0x61234567, 1965.0, 2_853_662.0, 0.0, None)


def test_device_details_answer_is_not_a_query_answer() -> None:
    with pytest.raises(PollFailure) as caught:
        parse_device_query(fixture("eagle200_device_details_response__"))
    assert caught.value.outcome is Outcome.UNPARSEABLE


def test_single_var_request_fixture_matches_our_shape() -> None:
    manual = ET.fromstring(fixture("eagle200_device_query_single_var_request__"))
    ours = ET.fromstring(device_query_command("0x000781000081fd0b"))
    for path in ("Name", "DeviceDetails/HardwareAddress", "Components/Component/Name"):
        assert (ours.findtext(path) or "").strip() == (manual.findtext(path) or "").strip()


# --- values ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "units", "table", "expected"),
    [
        ("2.790000", "kW", POWER_UNITS_W, 2790.0),
        ("2.790000", "", POWER_UNITS_W, 2790.0),
        ("2.790000", None, POWER_UNITS_W, 2790.0),
        ("512", "W", POWER_UNITS_W, 512.0),
        ("512 W", "kW", POWER_UNITS_W, 512.0),  # the unit in the value wins
        ("-1.5 kW", None, POWER_UNITS_W, -1500.0),
        ("0.001 MW", None, POWER_UNITS_W, 1000.0),
        ("91937.25", "kWh", ENERGY_UNITS_WH, 91_937_250.0),
        ("12 Wh", None, ENERGY_UNITS_WH, 12.0),
        ("", "kW", POWER_UNITS_W, None),
        (None, "kW", POWER_UNITS_W, None),
        ("invalid", "kW", POWER_UNITS_W, None),
        ("  INVALID ", None, POWER_UNITS_W, None),
        ("0.0884 USD/kWh", None, {}, 0.0884),
        ("0.0884", "USD", {}, 0.0884),
    ],
)
def test_local_values(
    value: str | None, units: str | None, table: dict[str, int], expected: float | None
) -> None:
    assert parse_local_value(value, units, table) == expected


@pytest.mark.parametrize(
    ("value", "units"),
    [("2.79", "C"), ("abc", "kW"), ("nanny", ""), ("infinite", "kW"), ("1_000", "W")],
)
def test_bad_local_values(value: str, units: str) -> None:
    with pytest.raises(ValueError):
        parse_local_value(value, units, POWER_UNITS_W)


@pytest.mark.parametrize(
    ("value", "units", "expected"),
    [("nan", "", math.nan), ("NaN kW", None, math.nan), ("inf kW", "", math.inf),
     ("-Infinity", "kW", -math.inf), ("1e9999", "kW", math.inf), ("1e305", "kW", 1e308)],
)
def test_non_finite_local_values_pass_for_the_loop_to_bound(
    value: str, units: str | None, expected: float
) -> None:
    # Not refused here: the polling loop stores such a field as null and
    # keeps the rest of the reading (drivers/bounds.py).
    got = parse_local_value(value, units, POWER_UNITS_W)
    assert got is not None
    assert (math.isnan(got) and math.isnan(expected)) or got == expected


def test_blank_demand_with_totals_is_a_reading() -> None:
    body = query_xml(
        [
            ("zigbee:InstantaneousDemand", None, "kW"),
            ("zigbee:CurrentSummationDelivered", "10.5", "kWh"),
            ("zigbee:CurrentSummationReceived", "invalid", "kWh"),
        ]
    )
    assert parse_device_query(body.encode()) == Sample(0x5C5AFF97, None, 10500.0, None, None)


@pytest.mark.parametrize(
    "body",
    [
        query_xml([("zigbee:InstantaneousDemand", None, "kW"), ("zigbee:Price", "0.1", "")]),
        query_xml([("zigbee:InstantaneousDemand", "lots", "kW")]),
        query_xml([("zigbee:InstantaneousDemand", "1.0", "degC")]),
        query_xml([("zigbee:Multiplier", "1", "")]),
        "<DeviceList/>",
        "<html><body>Internal error</body></html>",
        "<Device>",
        "not xml",
        '<!DOCTYPE x [<!ENTITY a "b">]><Device/>',
    ],
)
def test_bad_query_answers_are_unparseable(body: str) -> None:
    with pytest.raises(PollFailure) as caught:
        parse_device_query(body.encode())
    assert caught.value.outcome is Outcome.UNPARSEABLE


# (codec, the name an XML declaration gives it); None: no declaration.
ENCODINGS = [("utf-16", "UTF-16"), ("utf-16", None), ("utf-16-le", "UTF-16LE"),
             ("utf-16-be", "UTF-16BE"), ("utf-8", "UTF-8"),
             ("utf-8", None), ("latin-1", "ISO-8859-1")]


def _declared(text: str, codec: str, name: str | None) -> bytes:
    head = "" if name is None else f'<?xml version="1.0" encoding="{name}"?>'
    return (head + text).encode(codec)


@pytest.mark.parametrize(("codec", "name"), ENCODINGS)
def test_a_dtd_is_refused_in_any_encoding(codec: str, name: str | None) -> None:
    # Before defusedxml, a UTF-16 body slipped past a check for b"<!DOCTYPE"
    # and ElementTree expanded its entities into the reading.
    meter = query_xml([("zigbee:InstantaneousDemand", "&a;", "kW")])
    for dtd in ('<!DOCTYPE Device [<!ENTITY a "2.5">]>', "<!DOCTYPE Device>",
                '<!DOCTYPE Device [<!ENTITY a SYSTEM "file:///etc/hostname">]>'):
        with pytest.raises(PollFailure) as caught:
            parse_device_query(_declared(dtd + meter, codec, name))
        assert caught.value.outcome is Outcome.UNPARSEABLE
        assert "DTD" in caught.value.message, (codec, dtd)


@pytest.mark.parametrize(("codec", "name"), ENCODINGS)
def test_an_answer_without_dtd_reads_the_same_in_any_encoding(codec: str,
                                                              name: str | None) -> None:
    text = query_xml([("zigbee:InstantaneousDemand", "2.5", "kW"),
                      ("zigbee:CurrentSummationDelivered", "10", "kWh")])
    expected = Sample(0x5C5AFF97, 2500.0, 10000.0, None, None)
    assert parse_device_query(_declared(text, codec, name)) == expected
    commented = text.replace("<Components>", "<!-- a comment --><Components>")
    assert parse_device_query(_declared(commented, codec, name)) == expected


def test_an_encoding_expat_cannot_read_is_unparseable() -> None:
    bodies = [f'<?xml version="1.0" encoding="{name}"?><Device/>'.encode()
              for name in ("bogus", "UTF-7", "cp500")]
    bodies.append(_declared('<!DOCTYPE d [<!ENTITY a "b">]><Device>&a;</Device>',
                            "utf-32", "UTF-32"))
    for body in bodies:
        with pytest.raises(PollFailure) as caught:
            parse_device_query(body)
        assert caught.value.outcome is Outcome.UNPARSEABLE


def test_error_answer_is_a_device_error_without_secret() -> None:
    body = f"<Error><Text>install code {INSTALL_CODE} wrong</Text></Error>"
    with pytest.raises(PollFailure) as caught:
        parse_device_query(body.encode(), INSTALL_CODE)
    assert caught.value.outcome is Outcome.DEVICE_ERROR
    assert INSTALL_CODE not in caught.value.message
