"""``eagle-local``: the EAGLE-200 Local API (Local API Manual v1.0).

POST ``{url}/cgi-bin/post_manager`` with HTTP basic auth (user: the cloud id,
password: the install code). The meter's HardwareAddress is found once with
``device_list`` (the device whose ModelId is ``electric_meter``) and cached;
each poll then sends one ``device_query`` for demand, both summations and
price. Totals are always read: they come in the same answer for free, so
``with_totals`` changes nothing here.

Values are decimal text, the unit either in ``<Units>`` or inside the value
(``21.499 kW``); no unit means kW / kWh, the firmware's own. An empty value
or ``invalid`` gives None for that field; an answer with neither demand nor
totals is UNPARSEABLE. ``LastContact`` is Unix time in hex (not the 2000
epoch of the cloud API) and becomes ``device_at``; when it is missing or
unreadable the reading keeps its values without a device time.

Any failed query forgets the meter, so the next poll looks it up again (the
meter may have been re-paired). If the meter has no ``Main`` component with
the variables asked for, the session switches to the ``<All>Y</All>`` query.
"""

from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ET
from decimal import Decimal
from typing import ClassVar

from poller.drivers.base import DeviceSpec, Outcome, PollFailure, Sample
from poller.drivers.hexcodec import decode_unsigned_hex
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

NAME = "eagle-local"
POST_MANAGER_PATH = "/cgi-bin/post_manager"
DEVICE_LIST_COMMAND = b"<Command><Name>device_list</Name></Command>"
METER_MODEL_ID = "electric_meter"
DEMAND = "zigbee:InstantaneousDemand"
DELIVERED = "zigbee:CurrentSummationDelivered"
RECEIVED = "zigbee:CurrentSummationReceived"
PRICE = "zigbee:Price"
QUERY_VARIABLES = (DEMAND, DELIVERED, RECEIVED, PRICE)

POWER_UNITS_W = {"": 1000, "kw": 1000, "w": 1, "mw": 1_000_000}
ENERGY_UNITS_WH = {"": 1000, "kwh": 1000, "wh": 1, "mwh": 1_000_000}
_PRICE_ANY_UNIT: dict[str, int] = {}
_MAX_VALUE_CHARS = 64
_METER_NAMES = ("electric meter", "power meter")

_HARDWARE_ADDRESS = re.compile(r"0[xX][0-9a-fA-F]{1,16}")
# A decimal, then optionally a unit: "21.499 kW", "2.790000", "-0.5kW". NaN
# and infinities are read as such: the polling loop stores them as null.
_VALUE = re.compile(
    r"\s*([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,4})?"  # the number
    r"|[+-]?(?:[nN][aA][nN]|[iI][nN][fF](?:[iI][nN][iI][tT][yY])?)(?![a-zA-Z]))"
    r"\s*(\S.*?)?\s*"  # the unit, if any
)

_NO_VARIABLES = "answer holds none of the meter variables asked for"

_IDLE = 0
_AWAIT_LIST = 1
_AWAIT_QUERY = 2


def parse_local_value(
    value: str | None, units: str | None, factors: dict[str, int]
) -> float | None:
    """A Local API value in base units (W, Wh), or None if empty/invalid.

    ``factors`` maps a lower-cased unit to its multiplier (POWER_UNITS_W,
    ENERGY_UNITS_WH); an empty map keeps the number whatever the unit (prices).
    ValueError for text that is not a decimal, or a unit not in ``factors``.
    A value beyond a double, NaN or an infinity comes back as such (the
    polling loop stores it as null and counts it).

    >>> parse_local_value("21.499 kW", None, POWER_UNITS_W)
    21499.0
    >>> parse_local_value("invalid", "kW", POWER_UNITS_W) is None
    True
    >>> parse_local_value("1e9999", "kW", POWER_UNITS_W)
    inf
    """
    if value is None:
        return None
    text = value.strip()
    if not text or text.lower() == "invalid":
        return None
    if len(text) > _MAX_VALUE_CHARS:
        raise ValueError("value too long")
    match = _VALUE.fullmatch(text)
    if match is None:
        raise ValueError("not a decimal number")
    number = Decimal(match.group(1))
    if factors:
        unit = (match.group(2) or units or "").strip().lower()
        factor = factors.get(unit)
        if factor is None:
            raise ValueError("unknown unit")
        number *= factor
    return float(number)


def format_local_value(number: float, unit: str, *, inline: bool) -> tuple[str, str]:
    """``(Value, Units)`` texts as firmware writes them: ``("2.790000", "kW")``
    or, ``inline``, ``("2.790000 kW", "")``. For the device simulator."""
    text = f"{number:.6f}"
    return (f"{text} {unit}", "") if inline else (text, unit)


def device_query_command(hardware_address: str, *, all_variables: bool = False) -> bytes:
    """The ``device_query`` body for the meter at ``hardware_address``."""
    if not _HARDWARE_ADDRESS.fullmatch(hardware_address):
        raise ValueError("hardware address must be 0x and up to 16 hex digits")
    if all_variables:
        components = "<All>Y</All>"
    else:
        variables = "".join(f"<Variable><Name>{name}</Name></Variable>" for name in QUERY_VARIABLES)
        components = f"<Component><Name>Main</Name><Variables>{variables}</Variables></Component>"
    return (
        "<Command><Name>device_query</Name>"
        f"<DeviceDetails><HardwareAddress>{hardware_address}</HardwareAddress></DeviceDetails>"
        f"<Components>{components}</Components></Command>"
    ).encode()


def _root(body: bytes, expected: str, secret: str) -> ET.Element:
    root = parse_xml(body)
    tag = local_name(root.tag)
    if tag == expected:
        return root
    if tag.lower() == "error":
        detail = excerpt(element_text(root), secret)
        raise failure(Outcome.DEVICE_ERROR, f"device error: {detail}" if detail else "device error")
    raise unparseable(f"expected <{expected}>, got <{excerpt(tag, secret)}>")


def _is_meter(device: ET.Element) -> bool:
    model = (device.findtext("ModelId") or "").strip().lower()
    name = (device.findtext("Name") or "").strip().lower()
    return model == METER_MODEL_ID or name in _METER_NAMES


def find_meter(body: bytes, secret: str = "") -> str:
    """The HardwareAddress of the electric meter in a DeviceList answer,
    preferring a connected one. DEVICE_ERROR when there is none."""
    root = _root(body, "DeviceList", secret)
    meters = [device for device in root.iterfind("Device") if _is_meter(device)]
    if not meters:
        raise failure(Outcome.DEVICE_ERROR, "no electric meter in the device list")
    connected = [
        device
        for device in meters
        if (device.findtext("ConnectionStatus") or "").strip().lower() == "connected"
    ]
    address = ((connected or meters)[0].findtext("HardwareAddress") or "").strip()
    if not _HARDWARE_ADDRESS.fullmatch(address):
        raise unparseable("meter HardwareAddress is not a hex address")
    return address


def _last_contact(root: ET.Element) -> float | None:
    text = root.findtext("DeviceDetails/LastContact")
    if not text:
        return None
    try:
        seconds = decode_unsigned_hex(text)
    except ValueError:
        return None
    return float(seconds) if seconds else None


def _field(
    found: dict[str, tuple[str | None, str | None]], name: str, factors: dict[str, int]
) -> float | None:
    entry = found.get(name)
    if entry is None:
        return None
    try:
        return parse_local_value(entry[0], entry[1], factors)
    except ValueError as exc:
        raise unparseable(f"{name}: {exc}") from None


def parse_device_query(body: bytes, secret: str = "") -> Sample:
    """The Sample in a ``device_query`` answer for the meter."""
    root = _root(body, "Device", secret)
    found: dict[str, tuple[str | None, str | None]] = {}
    for variable in root.iterfind("Components/Component/Variables/Variable"):
        name = (variable.findtext("Name") or "").strip()
        if name in QUERY_VARIABLES:
            found[name] = (variable.findtext("Value"), variable.findtext("Units"))
    if not found:
        raise unparseable(_NO_VARIABLES)
    demand_w = _field(found, DEMAND, POWER_UNITS_W)
    delivered_wh = _field(found, DELIVERED, ENERGY_UNITS_WH)
    received_wh = _field(found, RECEIVED, ENERGY_UNITS_WH)
    if demand_w is None and delivered_wh is None and received_wh is None:
        raise unparseable("answer has neither demand nor totals")
    price = _field(found, PRICE, _PRICE_ANY_UNIT)
    return Sample(_last_contact(root), demand_w, delivered_wh, received_wh, price)


class EagleLocalSession:
    """One EAGLE-200's exchange; the meter address survives across polls."""

    __slots__ = (
        "_headers",
        "_list",
        "_meter",
        "_query",
        "_query_all",
        "_secret",
        "_state",
        "_url",
    )

    def __init__(self, url: str, headers: tuple[tuple[str, str], ...], secret: str) -> None:
        self._url = url
        self._headers = headers
        self._secret = secret
        self._list = HttpRequest("POST", url, headers, DEVICE_LIST_COMMAND)
        self._query: HttpRequest | None = None
        self._meter: str | None = None
        self._query_all = False
        self._state = _IDLE

    def __repr__(self) -> str:
        return f"EagleLocalSession(url={self._url!r}, meter={self._meter!r})"

    @property
    def meter(self) -> str | None:
        """The cached meter HardwareAddress, None until discovered."""
        return self._meter

    def begin(self, with_totals: bool) -> HttpRequest:
        if self._query is None:
            self._state = _AWAIT_LIST
            return self._list
        self._state = _AWAIT_QUERY
        return self._query

    def _forget_meter(self) -> None:
        self._meter = None
        self._query = None

    def feed(self, response: HttpResponse) -> HttpRequest | Sample:
        state = self._state
        self._state = _IDLE
        if state == _AWAIT_LIST:
            meter = find_meter(checked_body(response), self._secret)
            self._meter = meter
            self._query = HttpRequest(
                "POST",
                self._url,
                self._headers,
                device_query_command(meter, all_variables=self._query_all),
            )
            self._state = _AWAIT_QUERY
            return self._query
        if state == _AWAIT_QUERY:
            try:
                return parse_device_query(checked_body(response), self._secret)
            except PollFailure as exc:
                if exc.message == _NO_VARIABLES:
                    self._query_all = True
                self._forget_meter()
                raise
        raise RuntimeError("feed() called without begin() or after the poll ended")

    def partial(self) -> Sample | None:
        """None: one ``device_query`` answers the whole poll."""
        return None


class EagleLocalDriver:
    """The ``eagle-local`` driver; every device needs its own ``url``.

    >>> from poller.drivers.base import DeviceSpec
    >>> spec = DeviceSpec(1, "004792", "", "bfb0fc05f51a3932", "http://192.168.1.50", {})
    >>> request = EagleLocalDriver().session(spec).begin(True)
    >>> request.url, request.body
    ('http://192.168.1.50/cgi-bin/post_manager', b'<Command><Name>device_list</Name></Command>')
    """

    name: ClassVar[str] = NAME

    def session(self, device: DeviceSpec) -> EagleLocalSession:
        if not device.url:
            raise ValueError("eagle-local needs the device's url (e.g. http://192.168.1.50)")
        url = endpoint_url(device.url, POST_MANAGER_PATH, "device url")
        cloud_id = header_value("cloud_id", device.cloud_id)
        if ":" in cloud_id:
            raise ValueError("cloud_id must not contain ':' (it is the basic-auth user)")
        secret = header_value("secret (install code)", device.secret)
        token = base64.b64encode(f"{cloud_id}:{secret}".encode("latin-1")).decode("ascii")
        headers = (("Authorization", f"Basic {token}"), ("Content-Type", "text/xml"))
        return EagleLocalSession(url, headers, secret)
