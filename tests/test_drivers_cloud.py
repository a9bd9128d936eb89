"""eagle-cloud: request shapes and the real payloads in shared/fixtures/eagle."""

from __future__ import annotations

from pathlib import Path

import pytest

from poller.drivers import driver_names, get_driver
from poller.drivers.base import DeviceSpec, Outcome, PollFailure, Sample
from poller.drivers.eagle_cloud import (
    DEFAULT_CLOUD_BASE_URL,
    EagleCloudDriver,
    EagleCloudSession,
    parse_demand,
    parse_summation,
)
from poller.drivers.response import MAX_BODY_BYTES
from poller.http import HttpRequest, HttpResponse

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "eagle"
EPOCH_2000 = 946_684_800  # 2000-01-01T00:00:00Z, written out here on purpose
SECRET = "s3cr3t-pw"


def fixture(name_start: str) -> str:
    (path,) = [p for p in FIXTURES.iterdir() if p.name.startswith(name_start)]
    return path.read_text()


def ok(body: bytes | str, status: int = 200) -> HttpResponse:
    if isinstance(body, str):
        body = body.encode()
    return HttpResponse(status, (("content-type", "text/html; charset=UTF-8"),), body)


def spec(url: str | None = None, secret: str = SECRET) -> DeviceSpec:
    return DeviceSpec(7, "00ce69", "me@example.com", secret, url, {})


def session(url: str | None = None) -> EagleCloudSession:
    return EagleCloudDriver(DEFAULT_CLOUD_BASE_URL).session(spec(url))


def poll(body: bytes | str) -> Sample:
    s = session()
    s.begin(False)
    result = s.feed(ok(body))
    assert isinstance(result, Sample)
    return result


def failure_of(body: bytes | str, status: int = 200) -> PollFailure:
    s = session()
    s.begin(False)
    with pytest.raises(PollFailure) as caught:
        s.feed(ok(body, status))
    return caught.value


# --- requests -------------------------------------------------------------


def test_registry_knows_the_driver() -> None:
    assert "eagle-cloud" in driver_names()
    driver = get_driver("eagle-cloud", cloud_base_url="http://127.0.0.1:9/")
    request = driver.session(spec()).begin(False)
    assert request.url == "http://127.0.0.1:9/cgi-bin/post_manager"
    with pytest.raises(ValueError, match="unknown driver"):
        get_driver("eagle-nope", cloud_base_url=DEFAULT_CLOUD_BASE_URL)


def test_demand_request_shape() -> None:
    request = session().begin(False)
    assert request == HttpRequest(
        "POST",
        "https://rainforestcloud.com:9445/cgi-bin/post_manager",
        (
            ("Cloud-ID", "00ce69"),
            ("User", "me@example.com"),
            ("Password", SECRET),
            ("Content-Type", "text/xml"),
        ),
        b"<Command><Name>get_instantaneous_demand</Name><Format>JSON</Format></Command>",
    )


def test_device_url_overrides_the_global_base() -> None:
    assert session("http://127.0.0.1:8080/").begin(False).url == (
        "http://127.0.0.1:8080/cgi-bin/post_manager"
    )
    full = "http://127.0.0.1:8080/cgi-bin/post_manager"
    assert session(full).begin(False).url == full


@pytest.mark.parametrize(
    "url", ["ftp://host/", "rainforestcloud.com", "http://", "http://h /x", "http://h:99999/"]
)
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        EagleCloudDriver(url)
    with pytest.raises(ValueError):
        EagleCloudDriver().session(spec(url))


def test_url_with_password_is_not_echoed() -> None:
    with pytest.raises(ValueError) as caught:
        EagleCloudDriver().session(spec("ftp://user:hunter2@host/"))
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize("secret", ["a\r\nX-Evil: 1", "", "pw\x00"])
def test_header_injection_and_empty_secret_refused_without_echo(secret: str) -> None:
    with pytest.raises(ValueError) as caught:
        EagleCloudDriver().session(spec(secret=secret))
    if secret:
        assert secret not in str(caught.value)


def test_reprs_never_show_the_secret() -> None:
    s = session()
    assert SECRET not in repr(spec())
    assert SECRET not in repr(s)


def test_totals_poll_asks_demand_then_summation_and_merges() -> None:
    s = session()
    first = s.begin(True)
    assert b"get_instantaneous_demand" in first.body
    demand = fixture("cloud_instantaneous_demand_response__")
    second = s.feed(ok(demand))
    assert isinstance(second, HttpRequest)
    assert second.body == (
        b"<Command><Name>get_current_summation</Name><Format>JSON</Format></Command>"
    )
    assert second.headers == first.headers and second.url == first.url
    summation = fixture("uploader_v2_current_summation__")
    sample = s.feed(ok(summation))
    assert sample == Sample(
        device_at=0x185ADC1D + EPOCH_2000,
        demand_w=5944.0,
        delivered_wh=0x1F81F * 1.0,  # multiplier 1, divisor 1000: kWh -> Wh cancels
        received_wh=0.0,
        price=None,
    )
    # The next poll without totals ends after one answer.
    assert s.begin(False) == first
    assert isinstance(s.feed(ok(demand)), Sample)


def attribute_names(cls: type) -> tuple[str, ...]:
    """A slotted class's attributes; mypyc's build of it lists them in
    ``__mypyc_attrs__``, not ``__slots__``."""
    names: tuple[str, ...] = vars(cls).get("__slots__") or vars(cls)["__mypyc_attrs__"]
    return names


def test_repeat_starts_the_same_poll_without_holding_a_request() -> None:
    import gc

    s = session()
    first = s.begin(False)
    demand = fixture("cloud_instantaneous_demand_response__")
    assert isinstance(s.feed(ok(demand)), Sample)
    # repeat() stands for begin(): the poll goes on exactly as after begin(),
    # totals included, and the request it stands for is what begin() makes.
    assert s.repeat(True) is True
    second = s.feed(ok(demand))
    assert isinstance(second, HttpRequest) and b"get_current_summation" in second.body
    assert isinstance(s.feed(ok(fixture("uploader_v2_current_summation__"))), Sample)
    # Nor, once a totals poll has ended, the demand half (device time first)
    # it held meanwhile.
    assert not [v for v in (getattr(s, name) for name in attribute_names(type(s)))
                if isinstance(v, tuple) and v and isinstance(v[0], float)]
    assert s.begin(False) == first
    # What the polling loop relies on to keep only the wire bytes: the
    # session refers to no request, nor header pairs, of its own.
    held = [getattr(s, name) for name in attribute_names(type(s))]
    held += gc.get_referents(*held)
    assert not [o for o in held if isinstance(o, HttpRequest)
                or (isinstance(o, tuple) and any(isinstance(i, tuple) for i in o))]


def test_feed_without_begin_is_a_programming_error() -> None:
    s = session()
    with pytest.raises(RuntimeError):
        s.feed(ok("<x/>"))
    s.begin(False)
    s.feed(ok(fixture("cloud_instantaneous_demand_response__")))
    with pytest.raises(RuntimeError):
        s.feed(ok("<x/>"))


def test_failed_demand_ends_the_poll() -> None:
    s = session()
    s.begin(True)
    with pytest.raises(PollFailure):
        s.feed(ok("garbage"))
    with pytest.raises(RuntimeError):
        s.feed(ok(fixture("uploader_v2_current_summation__")))


# --- the fixtures ---------------------------------------------------------


def test_manual_p7_demand_xml() -> None:
    sample = poll(fixture("cloud_instantaneous_demand_response__"))
    # Demand 0x001738 = 5944, x1 / 0x3e8 (1000) = 5.944 kW
    assert sample == Sample(0x185ADC1D + EPOCH_2000, 5944.0, None, None, None)


def test_manual_p7_full_http_reply_text_html() -> None:
    raw = fixture("cloud_http_response_full__")
    head, _, body = raw.partition("\n\n")
    assert head.startswith("HTTP/1.0 200 OK") and "text/html" in head
    assert poll(body).demand_w == 5944.0


@pytest.mark.parametrize(
    ("suffix", "timestamp"),
    [(".xml", 0x1C91EC39), (".json", 0x1C9347B8)],
)
def test_readme_capture_demand_xml_and_json(suffix: str, timestamp: int) -> None:
    name = "cloud_get_instantaneous_demand_response__rainforestautomation_Eagle-Http-API__README.md"
    body = (FIXTURES / (name + suffix)).read_bytes()
    # 0x0003b0 = 944, x1 / 1000 = 0.944 kW
    assert poll(body) == Sample(timestamp + EPOCH_2000, 944.0, None, None, None)


def test_readme_interactive_session_answer() -> None:
    text = fixture("cloud_interactive_session_request_and_response__")
    body = text[text.index("<InstantaneousDemand>") :]
    assert poll(body) == Sample(0x1C91EC39 + EPOCH_2000, 944.0, None, None, None)


def test_uploader_v2_demand_with_rainforest_wrapper_and_prolog() -> None:
    sample = poll(fixture("uploader_v2_instantaneous_demand__"))
    assert sample == Sample(0x211CC7A8 + EPOCH_2000, 50.0, None, None, None)  # 0x32 = 50 W


def _synthetic_parts() -> list[str]:
    text = fixture("uploader_rfa_demand_export_summation_synthetic__")
    demand, rest = text.split("<!-- EXPORT_XML -->")
    export, summation = rest.split("<!-- SUMMATION_XML -->")
    return [demand, export, summation]


def test_synthetic_import_export_and_summation() -> None:
    demand, export, summation = _synthetic_parts()
    assert poll(demand) == Sample(0x2FF09E00 + EPOCH_2000, 1500.0, None, None, None)
    # 0xfffffc18 is -1000 in 32-bit two's complement: -1 kW exported.
    assert poll(export) == Sample(0x2FF09E0F + EPOCH_2000, -1000.0, None, None, None)
    at, delivered, received = parse_summation(summation.encode())
    assert (at, delivered, received) == (0x2FF09E00 + EPOCH_2000, 0xA03B2F * 1.0, 0x6B12C0 * 1.0)


def test_raven_negative_demand_with_multiplier() -> None:
    sample = poll(fixture("raven_negative_demand_synthetic__"))
    # 0xFFFFFFF0 = -16; x4 / 2 = -32 kW
    assert sample == Sample(0x29BD58A7 + EPOCH_2000, -32000.0, None, None, None)


def test_summation_json() -> None:
    body = (
        b'{"CurrentSummation": {"TimeStamp": "0x1c9347b8", '
        b'"SummationDelivered": "0x00000000000f4240", "SummationReceived": "0x0000000000000064",'
        b' "Multiplier": "0x00000001", "Divisor": "0x00000064"}}'
    )
    # 1,000,000 / 100 = 10,000 kWh; 100 / 100 = 1 kWh
    assert parse_summation(body) == (0x1C9347B8 + EPOCH_2000, 10_000_000.0, 1000.0)


def test_summation_without_received() -> None:
    body = (
        "<CurrentSummation><TimeStamp>0x0</TimeStamp><SummationDelivered>0x10"
        "</SummationDelivered><Multiplier>0x2</Multiplier><Divisor>0x0</Divisor>"
        "</CurrentSummation>"
    )
    # Divisor 0 means 1; TimeStamp 0 means no device time.
    assert parse_summation(body.encode()) == (None, 32000.0, None)


def test_zero_multiplier_and_divisor_mean_one() -> None:
    body = (
        "<InstantaneousDemand><TimeStamp>0x1</TimeStamp><Demand>0x000005</Demand>"
        "<Multiplier>0x00000000</Multiplier><Divisor>0x00000000</Divisor></InstantaneousDemand>"
    )
    assert parse_demand(body.encode()) == (1.0 + EPOCH_2000, 5000.0)


def test_24_bit_negative_demand() -> None:
    body = (
        "<InstantaneousDemand><TimeStamp>0x1</TimeStamp><Demand>0xfffc18</Demand>"
        "<Multiplier>0x1</Multiplier><Divisor>0x3e8</Divisor></InstantaneousDemand>"
    )
    assert parse_demand(body.encode())[1] == -1000.0


def test_entities_and_comments_take_the_slow_path_correctly() -> None:
    body = (
        "<?xml version='1.0'?>\n<!-- hi --><InstantaneousDemand>\r\n"
        "<Demand>0x0003b0</Demand><Multiplier>0x1</Multiplier>"
        "<Divisor><![CDATA[0x3e8]]></Divisor><Note>a &amp; b</Note></InstantaneousDemand>"
    )
    assert poll(body).demand_w == 944.0


# --- failures -------------------------------------------------------------


def test_manual_p9_pseudo_json_is_unparseable() -> None:
    raw = fixture("cloud_http_request_response_json_chunked__")
    body = raw[raw.index('{ "Notification"') : raw.rindex("}") + 1]
    assert failure_of(body).outcome is Outcome.UNPARSEABLE


def test_uploader_spec_with_pdf_junk_is_unparseable() -> None:
    assert failure_of(fixture("uploader_v1_spec_")).outcome is Outcome.UNPARSEABLE


@pytest.mark.parametrize(
    "prefix",
    [
        "cloud_get_price_response__",
        "cloud_get_message_response__",
        "cloud_get_network_info_response__rainforestautomation_Eagle-Http-API__README.md.json",
        "cloud_price_cluster_response__",
        "wifi_status_",
    ],
)
def test_other_notifications_are_not_a_demand(prefix: str) -> None:
    paths = [p for p in FIXTURES.iterdir() if p.name.startswith(prefix)]
    assert paths
    for path in paths:
        caught = failure_of(path.read_bytes())
        assert caught.outcome is Outcome.UNPARSEABLE
        assert "InstantaneousDemand" in caught.message


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (401, Outcome.AUTH_REJECTED),
        (403, Outcome.AUTH_REJECTED),
        (404, Outcome.HTTP_ERROR),
        (500, Outcome.HTTP_ERROR),
        (302, Outcome.HTTP_ERROR),
    ],
)
def test_http_status(status: int, outcome: Outcome) -> None:
    caught = failure_of(fixture("cloud_instantaneous_demand_response__"), status)
    assert caught.outcome is outcome
    assert caught.message == f"HTTP {status}"


@pytest.mark.parametrize(
    "body",
    [
        f"<Error><Text>bad password {SECRET}</Text></Error>",
        f"<Error>Password {SECRET} rejected</Error>",
        f'{{"Error": {{"Text": "nope {SECRET}"}}}}',
        f'{{"error": "nope {SECRET}"}}',
        f"<rainforest><Error>{SECRET}</Error></rainforest>",
    ],
)
def test_error_roots_are_device_errors_without_the_secret(body: str) -> None:
    caught = failure_of(body)
    assert caught.outcome is Outcome.DEVICE_ERROR
    assert SECRET not in caught.message
    assert SECRET not in repr(caught)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"   ",
        b"<html><body><h1>502 Bad Gateway</h1></body></html>",
        b"<!DOCTYPE html><html></html>",
        b"Service Unavailable",
        b"<InstantaneousDemand><Demand>0x0003b0</Demand>",
        b"<InstantaneousDemand><Demand>0x0003b0</Demand></InstantaneousDemand>",
        b"<InstantaneousDemand><Demand>zz</Demand><Multiplier>0x1</Multiplier>"
        b"<Divisor>0x1</Divisor></InstantaneousDemand>",
        b"<InstantaneousDemand><Demand>0x1_0</Demand><Multiplier>0x1</Multiplier>"
        b"<Divisor>0x1</Divisor></InstantaneousDemand>",
        b"<InstantaneousDemand><Demand>-0x10</Demand><Multiplier>0x1</Multiplier>"
        b"<Divisor>0x1</Divisor></InstantaneousDemand>",
        b"<InstantaneousDemand><Demand>0x11112222333344445</Demand><Multiplier>0x1"
        b"</Multiplier><Divisor>0x1</Divisor></InstantaneousDemand>",
        b'{"InstantaneousDemand": {"Demand": 944, "Multiplier": "0x1", "Divisor": "0x1"}}',
        b'{"InstantaneousDemand": "0x3b0"}',
        b'{"InstantaneousDemand": {}, "PriceCluster": {}}',
        b"[1, 2]",
        b'{"InstantaneousDemand": {"Demand": "0x3b0"',
        b"<InstantaneousDemand><Demand>0x\xff</Demand></InstantaneousDemand>",
        b"\xff\xfe<\x00a\x00",
        b"<rainforest></rainforest>",
    ],
)
def test_malformed_bodies_are_unparseable(body: bytes) -> None:
    caught = failure_of(body)
    assert caught.outcome is Outcome.UNPARSEABLE
    assert len(caught.message) <= 200


def test_billion_laughs_is_refused_quickly() -> None:
    lol = (
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        + b"".join(
            b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
            for i in range(1, 10)
        )
        + b"]><InstantaneousDemand><Demand>&lol9;</Demand></InstantaneousDemand>"
    )
    caught = failure_of(lol)
    assert caught.outcome is Outcome.UNPARSEABLE
    assert "DTD" in caught.message


def test_external_entity_is_refused() -> None:
    body = (
        b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b"<InstantaneousDemand><Demand>&x;</Demand></InstantaneousDemand>"
    )
    assert failure_of(body).outcome is Outcome.UNPARSEABLE


def test_undeclared_entity_is_unparseable() -> None:
    body = b"<InstantaneousDemand><Demand>&x;</Demand></InstantaneousDemand>"
    assert failure_of(body).outcome is Outcome.UNPARSEABLE


def test_oversized_body_is_refused_before_parsing() -> None:
    body = b"<InstantaneousDemand>" + b" " * MAX_BODY_BYTES + b"</InstantaneousDemand>"
    caught = failure_of(body)
    assert caught.outcome is Outcome.UNPARSEABLE
    assert "exceeds" in caught.message


def test_deep_nesting_is_unparseable_not_a_crash() -> None:
    body = b"<Error>" + b"<a>" * 100_000 + b"x" + b"</a>" * 100_000 + b"</Error>"
    assert failure_of(body).outcome is Outcome.DEVICE_ERROR
    nested = b"<InstantaneousDemand>" + b"<a>" * 100_000 + b"</a>" * 100_000
    nested += b"</InstantaneousDemand>"
    assert failure_of(nested).outcome is Outcome.UNPARSEABLE
