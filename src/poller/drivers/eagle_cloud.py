"""``eagle-cloud``: the Rainforest cloud REST API (EAGLE REST API manual 1.0).

One POST to ``{base}/cgi-bin/post_manager`` per answer, with the headers
``Cloud-ID``, ``User``, ``Password``. A poll asks ``get_instantaneous_demand``
and, when totals are due, ``get_current_summation`` next, merged into one
Sample.

Answers are told apart by content, not Content-Type (the cloud says
``text/html`` for both):

* XML, a flat fragment: ``<InstantaneousDemand><Demand>0x0003b0</Demand>...``.
  A ``<rainforest>`` wrapper (the uploader form) is unwrapped.
* JSON, the shape of the real captures in the Eagle-Http-API README: one key
  naming the notification, holding an object of strings::

      {"InstantaneousDemand": {"TimeStamp": "0x1c9347b8", "Demand": "0x0003b0",
                               "Multiplier": "0x00000001", "Divisor": "0x000003e8"}}

  The ``"Key"="value"`` text on page 9 of the manual is not JSON and is
  refused like any other malformed body.

A root ``<Error>`` or a JSON ``{"Error": ...}`` is the device (or cloud)
refusing the command: DEVICE_ERROR. When the totals request of a poll fails
(any way: a refusal, a 5xx, garbage, a timeout) the demand already read is
kept: ``partial()`` gives it to the polling loop, which stores it with null
totals and counts TOTALS_FAILED. Hex fields are decoded by
:mod:`poller.drivers.hexcodec`; a TimeStamp of 0 means "never" and gives no
device time.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, ClassVar

import orjson

from poller.drivers.base import DeviceSpec, Outcome, PollFailure, Sample
from poller.drivers.hexcodec import (
    EPOCH_2000_UNIX,
    decode_signed_hex,
    decode_unsigned_hex,
    scale,
)
from poller.drivers.request import endpoint_url, header_value
from poller.drivers.response import (
    checked_body,
    element_text,
    excerpt,
    failure,
    local_name,
    parse_xml,
    unparseable,
)
from poller.http import HttpRequest, HttpResponse

NAME = "eagle-cloud"
DEFAULT_CLOUD_BASE_URL = "https://rainforestcloud.com:9445"
POST_MANAGER_PATH = "/cgi-bin/post_manager"
DEMAND_COMMAND = b"<Command><Name>get_instantaneous_demand</Name><Format>JSON</Format></Command>"
SUMMATION_COMMAND = b"<Command><Name>get_current_summation</Name><Format>JSON</Format></Command>"

DEMAND_ROOTS = ("InstantaneousDemand",)
# CurrentSummationDelivered is the uploader's name for the same fragment.
SUMMATION_ROOTS = ("CurrentSummation", "CurrentSummationDelivered")

_BOM = b"\xef\xbb\xbf"
_XML_NAME = r"[A-Za-z_][\w.\-]*"
# The common answer: optional prolog, a root, leaf children with plain text.
# Anything else (attributes, comments, entities, nesting) goes to ElementTree.
_FLAT_DOC = re.compile(
    rf"\s*(?:<\?xml[^<>]*\?>\s*)?<({_XML_NAME})>"
    rf"((?:\s*<{_XML_NAME}>[^<&]*</{_XML_NAME}>)*)\s*</\1>\s*"
)
_FLAT_FIELD = re.compile(rf"<({_XML_NAME})>([^<&]*)</({_XML_NAME})>")
_new_tuple = tuple.__new__  # Sample(...) runs a Python-level __new__
_CONTENT_TYPE = ("Content-Type", "text/xml")

_IDLE = 0
_AWAIT_DEMAND = 1
_AWAIT_SUMMATION = 2


def _device_error(text: str, secret: str) -> PollFailure:
    detail = excerpt(text, secret)
    return failure(Outcome.DEVICE_ERROR, f"device error: {detail}" if detail else "device error")


def _flat_fields(text: str) -> tuple[str, dict[str, str]] | None:
    match = _FLAT_DOC.fullmatch(text)
    if match is None or match.group(1).lower() == "rainforest":
        return None
    fields: dict[str, str] = {}
    for name, value, closing in _FLAT_FIELD.findall(match.group(2)):
        if name != closing:
            return None
        fields[name] = value
    return match.group(1), fields


def _xml_fields(body: bytes, secret: str) -> tuple[str, dict[str, str]]:
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise unparseable("body is not UTF-8") from None
    flat = _flat_fields(text)
    if flat is not None:
        root, fields = flat
        if root.lower() == "error":
            raise _device_error(" ".join(fields.values()), secret)
        return flat
    element = parse_xml(body)
    if local_name(element.tag).lower() == "rainforest":
        children = list(element)
        if not children:
            raise unparseable("empty <rainforest> wrapper")
        element = children[0]
    root = local_name(element.tag)
    if root.lower() == "error":
        raise _device_error(element_text(element), secret)
    return root, {local_name(child.tag): child.text or "" for child in element}


def _json_fields(body: bytes, secret: str) -> tuple[str, dict[str, Any]]:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise unparseable("malformed JSON") from None
    if type(document) is dict and len(document) == 1:
        # The common answer, checked in one step: one notification of fields.
        ((root, fields),) = document.items()
        if type(fields) is dict and root.lower() != "error":
            return root, fields
    if not isinstance(document, dict) or not document:
        raise unparseable("JSON answer is not an object naming a notification")
    for key, value in document.items():
        if key.lower() == "error":
            text = value if isinstance(value, str) else orjson.dumps(value).decode()
            raise _device_error(text, secret)
        root, fields = key, value
    if len(document) != 1:
        raise unparseable("JSON answer has more than one notification")
    if not isinstance(fields, dict):
        raise unparseable(f"JSON {excerpt(root, secret)} is not an object")
    return root, fields


def read_notification(body: bytes, expected: tuple[str, ...], secret: str = "") -> dict[str, Any]:
    """The fields of the notification in ``body``, which must be one of
    ``expected``. Raises PollFailure (DEVICE_ERROR or UNPARSEABLE)."""
    start = body[:1]
    if start != b"{":  # not the common bare JSON: a BOM, blanks, XML, garbage
        if body.startswith(_BOM):
            body = body[len(_BOM) :]
        start = body.lstrip()[:1]
    if start == b"<":
        root, fields = _xml_fields(body, secret)
    elif start == b"{" or start == b"[":
        root, fields = _json_fields(body, secret)
    elif not start:
        raise unparseable("empty body")
    else:
        raise unparseable("body is neither XML nor JSON")
    if root not in expected:
        raise unparseable(f"expected {expected[0]}, got {excerpt(root, secret)!r}")
    return fields


def _hex(fields: dict[str, Any], name: str,
         decode: Callable[[str], int] = decode_unsigned_hex) -> int:
    value = fields.get(name)
    if type(value) is str:
        try:
            return decode(value)
        except ValueError:
            pass
    raise _bad_hex(value, name)


def _bad_hex(value: Any, name: str) -> PollFailure:
    if value is None:
        return unparseable(f"missing {name}")
    if not isinstance(value, str):
        return unparseable(f"{name} is not a string")
    return unparseable(f"{name} is not a hex number")


def _device_at(fields: dict[str, Any]) -> float | None:
    if fields.get("TimeStamp") is None:
        return None
    seconds = _hex(fields, "TimeStamp")
    return float(seconds + EPOCH_2000_UNIX) if seconds else None


def parse_demand(body: bytes, secret: str = "") -> tuple[float | None, float]:
    """``(device_at, demand_w)`` from an InstantaneousDemand answer body."""
    fields = read_notification(body, DEMAND_ROOTS, secret)
    raw = _hex(fields, "Demand", decode_signed_hex)
    demand_w = scale(raw, _hex(fields, "Multiplier"), _hex(fields, "Divisor"), 1000)
    return _device_at(fields), demand_w


def parse_summation(body: bytes, secret: str = "") -> tuple[float | None, float, float | None]:
    """``(device_at, delivered_wh, received_wh)`` from a CurrentSummation
    answer body; meters that do not report SummationReceived give None."""
    fields = read_notification(body, SUMMATION_ROOTS, secret)
    multiplier = _hex(fields, "Multiplier")
    divisor = _hex(fields, "Divisor")
    delivered = scale(_hex(fields, "SummationDelivered"), multiplier, divisor, 1000)
    received: float | None = None
    if fields.get("SummationReceived") is not None:
        received = scale(_hex(fields, "SummationReceived"), multiplier, divisor, 1000)
    return _device_at(fields), delivered, received


class EagleCloudSession:
    """One device's exchange with the cloud.

    Every poll starts with the same request, so the session implements
    ``repeat``: the loop keeps that request's wire bytes and the session keeps
    only the strings it is made of, not the request and its header tuples
    (300 B a device, which a 100k fleet feels)."""

    __slots__ = ("_cloud_id", "_email", "_pending", "_secret", "_state", "_url", "_with_totals")

    def __init__(self, url: str, cloud_id: str, email: str, secret: str) -> None:
        self._url = url
        self._cloud_id = cloud_id
        self._email = email
        self._secret = secret
        self._state = _IDLE
        self._with_totals = False
        self._pending: tuple[float | None, float] | None = None
        """``(device_at, demand_w)`` of a poll waiting for its totals. None,
        not a sentinel tuple: the compiled build keeps such a tuple unboxed,
        so an identity test on it would not hold."""

    def __repr__(self) -> str:
        return f"EagleCloudSession(url={self._url!r})"

    def _request(self, command: bytes) -> HttpRequest:
        headers = (("Cloud-ID", self._cloud_id), ("User", self._email),
                   ("Password", self._secret), _CONTENT_TYPE)
        return HttpRequest("POST", self._url, headers, command)

    def begin(self, with_totals: bool) -> HttpRequest:
        self.repeat(with_totals)
        return self._request(DEMAND_COMMAND)

    def repeat(self, with_totals: bool) -> bool:
        """Start a poll whose first request equals the last ``begin()``'s."""
        self._with_totals = with_totals
        self._state = _AWAIT_DEMAND
        return True

    def feed(self, response: HttpResponse) -> HttpRequest | Sample:
        state = self._state
        # Idle on any failure below, so a stray feed() cannot mix two polls.
        self._state = _IDLE
        if state == _AWAIT_DEMAND:
            device_at, demand_w = parse_demand(checked_body(response), self._secret)
            if not self._with_totals:
                return _new_tuple(Sample, (device_at, demand_w, None, None, None))
            self._pending = (device_at, demand_w)
            self._state = _AWAIT_SUMMATION
            return self._request(SUMMATION_COMMAND)
        if state == _AWAIT_SUMMATION:
            summed_at, delivered, received = parse_summation(checked_body(response), self._secret)
            pending = self._pending
            self._pending = None  # not held by every device until its next totals poll
            assert pending is not None  # set with _AWAIT_SUMMATION
            device_at, demand_w = pending
            if device_at is None:
                device_at = summed_at
            return _new_tuple(Sample, (device_at, demand_w, delivered, received, None))
        raise RuntimeError("feed() called without begin() or after the poll ended")

    def partial(self) -> Sample | None:
        """The demand reading of a poll whose totals follow-up failed."""
        pending = self._pending
        if pending is None:
            return None
        self._pending = None
        return _new_tuple(Sample, (*pending, None, None, None))


class EagleCloudDriver:
    """The ``eagle-cloud`` driver; ``cloud_base_url`` unless a device has a URL.

    >>> from poller.drivers.base import DeviceSpec
    >>> driver = EagleCloudDriver("https://rainforestcloud.com:9445")
    >>> spec = DeviceSpec(1, "00ce69", "me@example.com", "pw", None, {})
    >>> driver.session(spec).begin(False).url
    'https://rainforestcloud.com:9445/cgi-bin/post_manager'
    """

    name: ClassVar[str] = NAME

    def __init__(self, cloud_base_url: str = DEFAULT_CLOUD_BASE_URL) -> None:
        self._default_url = endpoint_url(cloud_base_url, POST_MANAGER_PATH, "cloud_base_url")

    def session(self, device: DeviceSpec) -> EagleCloudSession:
        url = self._default_url
        if device.url:
            url = endpoint_url(device.url, POST_MANAGER_PATH, "device url")
        return EagleCloudSession(url, header_value("cloud_id", device.cloud_id),
                                 header_value("email", device.email),
                                 header_value("secret", device.secret))
