"""``http-json``: any HTTP endpoint answering JSON, mapped by JSON pointers.

Device options (validated once, in ``session()``)::

    {
      "fields": {"demand_w": "/meter/power", "device_at": "/ts"},   # required
      "scale": {"demand_w": 1000},          # optional multiplier per field
      "time_format": "unix",                # "unix" | "unix_ms" | "iso8601"
      "method": "GET",                      # or "POST"
      "body": "{\\"q\\": 1}"                  # POST only, sent as application/json
    }

``fields`` maps reading fields (device_at, demand_w, delivered_wh,
received_wh, price) to RFC 6901 pointers; at least one of demand_w,
delivered_wh, received_wh must be mapped. A pointed-at value is a JSON number
or a decimal string; JSON null gives None for that field. A missing pointer
or any other type is UNPARSEABLE, as is an answer where demand and both totals
are null. Numbers no reading can hold are passed on as they are, for the
polling loop to store as null and count (drivers/bounds.py): ``NaN`` and
``Infinity`` (bare, as Python's ``json`` writes them, or as strings), 1e400,
a time in microseconds. An ISO 8601 time without an offset is UTC. A
non-empty device secret is sent as ``Authorization: Bearer <secret>``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from poller.drivers.base import DeviceSpec, Sample
from poller.drivers.request import base_url, header_value
from poller.drivers.response import checked_body, unparseable
from poller.http import HttpRequest, HttpResponse

NAME = "http-json"
FIELDS = ("device_at", "demand_w", "delivered_wh", "received_wh", "price")
VALUE_FIELDS = FIELDS[1:]
TIME_FORMATS = ("unix", "unix_ms", "iso8601")
OPTION_KEYS = ("fields", "scale", "time_format", "method", "body")
METHODS = ("GET", "POST")

_MAX_TEXT_CHARS = 64
_INDEX = re.compile(r"0|[1-9][0-9]{0,8}")
_BAD_ESCAPE = re.compile(r"~(?![01])")
_DECIMAL = re.compile(r"\s*[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,4})?\s*")
_NON_FINITE = re.compile(r"\s*[+-]?(?:nan|inf|infinity)\s*", re.IGNORECASE)

Pointer = tuple[str, ...]


def parse_pointer(pointer: str) -> Pointer:
    """RFC 6901 text -> reference tokens. ValueError if malformed.

    >>> parse_pointer("/a~1b/0/m~0n")
    ('a/b', '0', 'm~n')
    """
    if pointer == "":
        return ()
    if not pointer.startswith("/"):
        raise ValueError(f"JSON pointer {pointer!r} must be empty or start with '/'")
    if _BAD_ESCAPE.search(pointer):
        raise ValueError(f"JSON pointer {pointer!r} has a '~' not followed by 0 or 1")
    return tuple(token.replace("~1", "/").replace("~0", "~") for token in pointer[1:].split("/"))


def format_pointer(tokens: Pointer) -> str:
    """Reference tokens -> RFC 6901 text (the inverse of parse_pointer)."""
    return "".join("/" + token.replace("~", "~0").replace("/", "~1") for token in tokens)


def resolve(document: Any, tokens: Pointer) -> Any:
    """The value at ``tokens`` in ``document``; LookupError if absent."""
    for token in tokens:
        if type(document) is dict:
            document = document[token]
        elif type(document) is list:
            if not _INDEX.fullmatch(token):
                raise IndexError(token)
            document = document[int(token)]
        else:
            raise KeyError(token)
    return document


def _at(document: Any, tokens: Pointer) -> Any:
    try:
        return resolve(document, tokens)
    except LookupError:
        raise unparseable(f"answer lacks {format_pointer(tokens)!r}") from None


def _number(value: Any, field: str) -> float | None:
    """The number at a field; NaN and infinities pass (the loop bounds them)."""
    kind = type(value)
    if kind is float:
        return value  # type: ignore[no-any-return]
    if kind is int:
        try:
            return float(value)
        except OverflowError:  # a 400-digit integer
            return math.inf if value > 0 else -math.inf
    if kind is str:
        if len(value) > _MAX_TEXT_CHARS or not (_DECIMAL.fullmatch(value)
                                                or _NON_FINITE.fullmatch(value)):
            raise unparseable(f"{field} is not a number")
        return float(value)
    if value is None:
        return None
    raise unparseable(f"{field} is a JSON {_json_type(value)}, not a number")


def _document(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    # orjson refuses NaN, Infinity and numbers beyond a double, which devices
    # send (Python's json writes NaN): the standard parser takes them, on
    # this failure path only, and the loop stores such a field as null.
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # also UnicodeDecodeError, a too-long integer
        raise unparseable("malformed JSON") from None


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    return "string" if isinstance(value, str) else "number"


def _time(value: Any, time_format: str) -> float | None:
    if time_format == "iso8601":
        if value is None:
            return None
        if type(value) is not str or len(value) > _MAX_TEXT_CHARS:
            raise unparseable("device_at is not an ISO 8601 string")
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise unparseable("device_at is not an ISO 8601 time") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        try:
            return moment.timestamp()
        except (OverflowError, OSError, ValueError):
            raise unparseable("device_at is out of range") from None
    seconds = _number(value, "device_at")
    if seconds is None or time_format == "unix":
        return seconds
    return seconds / 1000.0


def _options(options: Mapping[str, Any]) -> tuple[dict[str, Pointer], dict[str, float], str]:
    if not isinstance(options, Mapping):
        raise ValueError("http-json options must be an object")
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise ValueError(f"unknown http-json options {unknown}; known: {list(OPTION_KEYS)}")
    fields = options.get("fields")
    if not isinstance(fields, Mapping) or not fields:
        raise ValueError('http-json needs options["fields"]: reading field -> JSON pointer')
    bad = sorted(set(fields) - set(FIELDS))
    if bad:
        raise ValueError(f"unknown reading fields {bad}; known: {list(FIELDS)}")
    pointers: dict[str, Pointer] = {}
    for field, pointer in fields.items():
        if not isinstance(pointer, str):
            raise ValueError(f"pointer for {field} must be a string")
        pointers[field] = parse_pointer(pointer)
    if not any(field in pointers for field in ("demand_w", "delivered_wh", "received_wh")):
        raise ValueError("http-json fields must map demand_w, delivered_wh or received_wh")
    scales = options.get("scale", {})
    if not isinstance(scales, Mapping):
        raise ValueError('options["scale"] must map reading fields to numbers')
    factors: dict[str, float] = {}
    for field, factor in scales.items():
        if field not in VALUE_FIELDS or field not in pointers:
            raise ValueError(f"scale for {field!r}: not a mapped field among {list(VALUE_FIELDS)}")
        if type(factor) not in (int, float) or not math.isfinite(factor) or factor == 0:
            raise ValueError(f"scale for {field} must be a finite non-zero number")
        factors[field] = float(factor)
    time_format = options.get("time_format", "unix")
    if time_format not in TIME_FORMATS:
        raise ValueError(f"time_format must be one of {list(TIME_FORMATS)}")
    return pointers, factors, time_format


class HttpJsonSession:
    """One endpoint; the request and the field plan are fixed per device."""

    __slots__ = ("_plan", "_request", "_time", "_time_format")

    def __init__(
        self,
        request: HttpRequest,
        pointers: dict[str, Pointer],
        factors: dict[str, float],
        time_format: str,
    ) -> None:
        self._request = request
        self._time = pointers.get("device_at")
        self._time_format = time_format
        self._plan = tuple(
            (field, pointers[field], factors.get(field, 1.0))
            for field in VALUE_FIELDS
            if field in pointers
        )

    def __repr__(self) -> str:
        return f"HttpJsonSession(url={self._request.url!r})"

    def begin(self, with_totals: bool) -> HttpRequest:
        return self._request

    def feed(self, response: HttpResponse) -> HttpRequest | Sample:
        document = _document(checked_body(response))
        values: dict[str, float | None] = {}
        for field, tokens, factor in self._plan:
            number = _number(_at(document, tokens), field)
            values[field] = None if number is None else number * factor
        device_at = None
        if self._time is not None:
            device_at = _time(_at(document, self._time), self._time_format)
        get = values.get
        demand, delivered, received = get("demand_w"), get("delivered_wh"), get("received_wh")
        if demand is None and delivered is None and received is None:
            raise unparseable("answer has neither demand nor totals")
        return Sample(device_at, demand, delivered, received, get("price"))

    def partial(self) -> Sample | None:
        """None: one request answers the whole poll."""
        return None


class HttpJsonDriver:
    """The ``http-json`` driver.

    >>> from poller.drivers.base import DeviceSpec
    >>> spec = DeviceSpec(1, "x1", "", "", "http://127.0.0.1:8080/now",
    ...                   {"fields": {"demand_w": "/w"}})
    >>> session = HttpJsonDriver().session(spec)
    >>> request = session.begin(False)
    >>> from poller.http import HttpResponse
    >>> session.feed(HttpResponse(200, (), b'{"w": 512}')).demand_w
    512.0
    """

    name = NAME

    def session(self, device: DeviceSpec) -> HttpJsonSession:
        if not device.url:
            raise ValueError("http-json needs the device's url")
        url = base_url(device.url, "device url")
        pointers, factors, time_format = _options(device.options)
        method = device.options.get("method", "GET")
        if method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}")
        headers: list[tuple[str, str]] = [("Accept", "application/json")]
        if device.secret:
            headers.append(("Authorization", "Bearer " + header_value("secret", device.secret)))
        body = device.options.get("body")
        payload = b""
        if body is not None:
            if method != "POST" or not isinstance(body, str):
                raise ValueError('options["body"] must be a string, and only with "POST"')
            payload = body.encode()
            headers.append(("Content-Type", "application/json"))
        request = HttpRequest(method, url, tuple(headers), payload)
        return HttpJsonSession(request, pointers, factors, time_format)
