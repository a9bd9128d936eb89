"""http-json: option validation, RFC 6901 pointers, request shapes, parsing."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from poller.drivers import get_driver
from poller.drivers.base import DeviceSpec, Outcome, PollFailure, Sample
from poller.drivers.http_json import (
    HttpJsonDriver,
    HttpJsonSession,
    format_pointer,
    parse_pointer,
    resolve,
)
from poller.http import HttpRequest, HttpResponse

URL = "http://127.0.0.1:8080/api/now"
TOKEN = "tok-9f8e7d"


def spec(options: dict[str, Any], secret: str = "", url: str | None = URL) -> DeviceSpec:
    return DeviceSpec(11, "meter-11", "", secret, url, options)


def session(options: dict[str, Any], secret: str = "") -> HttpJsonSession:
    return HttpJsonDriver().session(spec(options, secret))


def read(options: dict[str, Any], document: Any) -> Sample:
    s = session(options)
    s.begin(False)
    result = s.feed(HttpResponse(200, (), orjson.dumps(document)))
    assert isinstance(result, Sample)
    return result


def failure(options: dict[str, Any], body: bytes, status: int = 200) -> PollFailure:
    s = session(options)
    s.begin(False)
    with pytest.raises(PollFailure) as caught:
        s.feed(HttpResponse(status, (), body))
    return caught.value


DEMAND = {"fields": {"demand_w": "/w"}}

# The example document of RFC 6901 section 5.
RFC_DOC = {
    "foo": ["bar", "baz"],
    "": 0,
    "a/b": 1,
    "c%d": 2,
    "e^f": 3,
    "g|h": 4,
    "i\\j": 5,
    'k"l': 6,
    " ": 7,
    "m~n": 8,
}


@pytest.mark.parametrize(
    ("pointer", "expected"),
    [
        ("", RFC_DOC),
        ("/foo", ["bar", "baz"]),
        ("/foo/0", "bar"),
        ("/", 0),
        ("/a~1b", 1),
        ("/c%d", 2),
        ("/e^f", 3),
        ("/g|h", 4),
        ("/i\\j", 5),
        ('/k"l', 6),
        ("/ ", 7),
        ("/m~0n", 8),
    ],
)
def test_rfc6901_examples(pointer: str, expected: Any) -> None:
    tokens = parse_pointer(pointer)
    assert resolve(RFC_DOC, tokens) == expected
    assert format_pointer(tokens) == pointer


@pytest.mark.parametrize("pointer", ["/foo/2", "/foo/-", "/foo/01", "/foo/-1", "/nope", "/foo/0/x"])
def test_unresolvable_pointers(pointer: str) -> None:
    with pytest.raises(LookupError):
        resolve(RFC_DOC, parse_pointer(pointer))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "fields"),
        ({"fields": {}}, "fields"),
        ({"fields": {"power": "/w"}}, "unknown reading fields"),
        ({"fields": {"demand_w": "w"}}, "start with '/'"),
        ({"fields": {"demand_w": "/a~2"}}, "'~'"),
        ({"fields": {"demand_w": 3}}, "must be a string"),
        ({"fields": {"price": "/p", "device_at": "/t"}}, "must map demand_w"),
        ({"fields": {"demand_w": "/w"}, "scale": {"price": 2}}, "scale for 'price'"),
        ({"fields": {"demand_w": "/w"}, "scale": {"device_at": 2}}, "scale for 'device_at'"),
        ({"fields": {"demand_w": "/w"}, "scale": {"demand_w": 0}}, "non-zero"),
        ({"fields": {"demand_w": "/w"}, "scale": {"demand_w": "2"}}, "non-zero"),
        ({"fields": {"demand_w": "/w"}, "scale": {"demand_w": True}}, "non-zero"),
        ({"fields": {"demand_w": "/w"}, "scale": [1]}, "scale"),
        ({"fields": {"demand_w": "/w"}, "time_format": "rfc2822"}, "time_format"),
        ({"fields": {"demand_w": "/w"}, "method": "PUT"}, "method"),
        ({"fields": {"demand_w": "/w"}, "body": "{}"}, "POST"),
        ({"fields": {"demand_w": "/w"}, "feilds": {}}, "unknown http-json options"),
    ],
)
def test_option_validation(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        HttpJsonDriver().session(spec(options))


def test_url_required() -> None:
    with pytest.raises(ValueError, match="url"):
        HttpJsonDriver().session(spec(DEMAND, url=None))


def test_get_request_shape_without_secret() -> None:
    driver = get_driver("http-json", cloud_base_url="https://ignored.invalid")
    request = driver.session(spec(DEMAND)).begin(True)
    assert request == HttpRequest("GET", URL, (("Accept", "application/json"),), b"")


def test_bearer_token_and_post_body() -> None:
    options = {**DEMAND, "method": "POST", "body": '{"q": 1}'}
    s = session(options, secret=TOKEN)
    assert s.begin(False) == HttpRequest(
        "POST",
        URL,
        (
            ("Accept", "application/json"),
            ("Authorization", f"Bearer {TOKEN}"),
            ("Content-Type", "application/json"),
        ),
        b'{"q": 1}',
    )
    assert TOKEN not in repr(s)
    assert TOKEN not in repr(spec(options, TOKEN))


def test_token_with_newline_refused_without_echo() -> None:
    with pytest.raises(ValueError) as caught:
        HttpJsonDriver().session(spec(DEMAND, secret="abc\r\nX: y"))
    assert "abc" not in str(caught.value)


def test_all_fields_with_scale_and_unix_time() -> None:
    options = {
        "fields": {
            "device_at": "/meta/ts",
            "demand_w": "/readings/0/kw",
            "delivered_wh": "/totals/in",
            "received_wh": "/totals/out",
            "price": "/tariff/price",
        },
        "scale": {"demand_w": 1000, "delivered_wh": 1000, "received_wh": 0.5},
    }
    document = {
        "meta": {"ts": 1_700_000_000},
        "readings": [{"kw": -1.25}],
        "totals": {"in": "12.5", "out": 8},
        "tariff": {"price": 0.31},
    }
    assert read(options, document) == Sample(1_700_000_000.0, -1250.0, 12500.0, 4.0, 0.31)


@pytest.mark.parametrize(
    ("time_format", "value", "expected"),
    [
        ("unix", 1_700_000_000.5, 1_700_000_000.5),
        ("unix", "1700000000", 1_700_000_000.0),
        ("unix_ms", 1_700_000_000_250, 1_700_000_000.25),
        ("iso8601", "2023-11-14T22:13:20Z", 1_700_000_000.0),
        ("iso8601", "2023-11-14T23:13:20+01:00", 1_700_000_000.0),
        ("iso8601", "2023-11-14T22:13:20", 1_700_000_000.0),  # no offset: UTC
        ("iso8601", None, None),
    ],
)
def test_time_formats(time_format: str, value: Any, expected: float | None) -> None:
    options = {"fields": {"device_at": "/t", "demand_w": "/w"}, "time_format": time_format}
    assert read(options, {"t": value, "w": 1}).device_at == expected


def test_iso_example_is_what_we_think() -> None:
    assert datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC).timestamp() == 1_700_000_000


def test_null_is_none_but_not_everything_null() -> None:
    options = {"fields": {"demand_w": "/w", "delivered_wh": "/d", "price": "/p"}}
    assert read(options, {"w": None, "d": 5, "p": None}) == Sample(None, None, 5.0, None, None)
    caught = failure(options, b'{"w": null, "d": null, "p": 1}')
    assert caught.outcome is Outcome.UNPARSEABLE


@pytest.mark.parametrize(
    "body",
    [
        b'{"x": 1}',
        b'{"w": true}',
        b'{"w": "12 kW"}',
        b'{"w": "nanny"}',
        b'{"w": "1e99999"}',
        b'{"w": [1]}',
        b'{"w": {"v": 1}}',
        b"[1, 2]",
        b'"just a string"',
        b"{",
        b"",
        b"<html>502</html>",
        b'{"w": 1, "w2": "\xff"}',
        b'{"w": NaN',
        b'{"w": NaNa}',
        b"[" * 100_000 + b"NaN" + b"]" * 100_000,
        b'{"w": ' + b"9" * 5000 + b", \"x\": NaN}",
    ],
)
def test_bad_answers_are_unparseable(body: bytes) -> None:
    caught = failure(DEMAND, body)
    assert caught.outcome is Outcome.UNPARSEABLE
    assert len(caught.message) <= 200


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"w": NaN}', math.nan),  # Python's json writes NaN bare
        (b'{"w": -Infinity}', -math.inf),
        (b'{"w": 1e400}', math.inf),
        (b'{"w": "nan"}', math.nan),
        (b'{"w": " -inf "}', -math.inf),
        (b'{"w": "Infinity"}', math.inf),
        (b'{"w": 1e308}', 1e308),
        (b'{"w": ' + b"9" * 400 + b", \"x\": NaN}", math.inf),
    ],
)
def test_numbers_no_reading_holds_pass_for_the_loop_to_bound(
    body: bytes, expected: float
) -> None:
    # The driver hands them on; the loop stores the field as null and keeps
    # the rest of the reading (drivers/bounds.py).
    s = session(DEMAND)
    s.begin(False)
    got = s.feed(HttpResponse(200, (), body))
    assert isinstance(got, Sample) and got.demand_w is not None
    assert (math.isnan(got.demand_w) and math.isnan(expected)) or got.demand_w == expected


@pytest.mark.parametrize(
    ("time_format", "value", "expected"),
    [
        ("unix", 1_700_000_000_000_000, 1.7e15),  # microseconds where seconds were due
        ("unix", 2**64 - 1, 2.0**64),
        ("unix_ms", 1_700_000_000, 1_700_000.0),  # seconds where milliseconds were due
        ("unix", "NaN", math.nan),
    ],
)
def test_absurd_times_pass_for_the_loop_to_bound(
    time_format: str, value: Any, expected: float
) -> None:
    options = {"fields": {"device_at": "/t", "demand_w": "/w"}, "time_format": time_format}
    got = read(options, {"t": value, "w": 1}).device_at
    assert got is not None
    assert (math.isnan(got) and math.isnan(expected)) or got == expected


@pytest.mark.parametrize(
    ("value", "time_format"),
    [("yesterday", "iso8601"), (12, "iso8601"), ("x" * 100, "iso8601"), (True, "unix")],
)
def test_bad_times_are_unparseable(value: Any, time_format: str) -> None:
    options = {"fields": {"device_at": "/t", "demand_w": "/w"}, "time_format": time_format}
    caught = failure(options, orjson.dumps({"t": value, "w": 1}))
    assert caught.outcome is Outcome.UNPARSEABLE


def test_missing_pointer_names_it() -> None:
    options = {"fields": {"demand_w": "/a~1b/0"}}
    caught = failure(options, b'{"a/b": []}')
    assert caught.message == "answer lacks '/a~1b/0'"


@pytest.mark.parametrize(
    ("status", "outcome"), [(401, Outcome.AUTH_REJECTED), (500, Outcome.HTTP_ERROR)]
)
def test_status(status: int, outcome: Outcome) -> None:
    assert failure(DEMAND, b'{"w": 1}', status).outcome is outcome
