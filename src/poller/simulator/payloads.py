"""Bodies of the two EAGLE protocols, shaped like the published examples and
captures of real answers (Rainforest's Eagle-Http-API documentation and the
EAGLE-200 Local API manual): element order, indentation, hex widths.

Cloud API (rainforestcloud ``post_manager``): hex fields; ``TimeStamp`` is
seconds since 2000-01-01Z in 8 hex digits; ``Demand`` has 6 hex digits when
non-negative and is two's complement when negative, either 32-bit
(``0xfffffc18`` = -1000) or 24-bit (``0xfffc18``), so a decoder must take the
width from the digit count. Multiplier 1, Divisor 1000: Demand is watts, the
summations are watt-hours (kW and kWh after scaling).

EAGLE-200 local API: ``device_list`` and ``device_query``; values are plain
decimals with a separate ``Units`` element, ``LastContact`` is Unix time in hex.

http-json (any JSON meter, for the ``http-json`` driver): ``GET /json/<id>``
with ``Authorization: Bearer <password>`` answers one flat document; register
such a device with :func:`http_json_options`.

The ``*_text`` / ``timestamp`` overrides put a poison value (faults.POISON)
into an otherwise normal answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

EPOCH_2000 = 946_684_800
"""Unix time of 2000-01-01T00:00:00Z, the cloud API's epoch."""


# The answers are %-templates of bytes: "%s" where a value goes and no other
# "%" (the static text has none), written once here and filled in by the
# functions below and by the gateway's response forms (responses.Form).

CLOUD_DEMAND_JSON = (
    b'{\n"InstantaneousDemand": {\n'
    b'"DeviceMacId": "%s",\n'
    b'"MeterMacId": "%s",\n'
    b'"TimeStamp": "%s",\n'
    b'"Demand": "%s",\n'
    b'"Multiplier": "0x00000001",\n'
    b'"Divisor": "0x000003e8",\n'
    b'"DigitsRight": "0x03",\n'
    b'"DigitsLeft": "0x06",\n'
    b'"SuppressLeadingZero": "Y"}\n}\n'
)
"""Markers: DeviceMacId, MeterMacId, TimeStamp, Demand."""
CLOUD_DEMAND_XML = (
    b"<InstantaneousDemand>\n"
    b"  <DeviceMacId>%s</DeviceMacId>\n"
    b"  <MeterMacId>%s</MeterMacId>\n"
    b"  <TimeStamp>%s</TimeStamp>\n"
    b"  <Demand>%s</Demand>\n"
    b"  <Multiplier>0x00000001</Multiplier>\n"
    b"  <Divisor>0x000003e8</Divisor>\n"
    b"  <DigitsRight>0x03</DigitsRight>\n"
    b"  <DigitsLeft>0x06</DigitsLeft>\n"
    b"  <SuppressLeadingZero>Y</SuppressLeadingZero>\n"
    b"</InstantaneousDemand>\n"
)
# CurrentSummation: the fields of the REST manual, section 13.
CLOUD_SUMMATION_JSON = (
    b'{\n"CurrentSummation": {\n'
    b'"DeviceMacId": "%s",\n'
    b'"MeterMacId": "%s",\n'
    b'"TimeStamp": "%s",\n'
    b'"SummationDelivered": "%s",\n'
    b'"SummationReceived": "%s",\n'
    b'"Multiplier": "0x00000001",\n'
    b'"Divisor": "0x000003e8",\n'
    b'"DigitsRight": "0x03",\n'
    b'"DigitsLeft": "0x06",\n'
    b'"SuppressLeadingZero": "Y"}\n}\n'
)
"""Markers: DeviceMacId, MeterMacId, TimeStamp, SummationDelivered,
SummationReceived (each from :func:`totals_hex`)."""
CLOUD_SUMMATION_XML = (
    b"<CurrentSummation>\n"
    b"  <DeviceMacId>%s</DeviceMacId>\n"
    b"  <MeterMacId>%s</MeterMacId>\n"
    b"  <TimeStamp>%s</TimeStamp>\n"
    b"  <SummationDelivered>%s</SummationDelivered>\n"
    b"  <SummationReceived>%s</SummationReceived>\n"
    b"  <Multiplier>0x00000001</Multiplier>\n"
    b"  <Divisor>0x000003e8</Divisor>\n"
    b"  <DigitsRight>0x03</DigitsRight>\n"
    b"  <DigitsLeft>0x06</DigitsLeft>\n"
    b"  <SuppressLeadingZero>Y</SuppressLeadingZero>\n"
    b"</CurrentSummation>\n"
)
DEVICE_LIST = (
    b"<DeviceList>\n"
    b"  <Device>\n"
    b"    <HardwareAddress>%s</HardwareAddress>\n"
    b"    <Manufacturer>Generic</Manufacturer>\n"
    b"    <ModelId>electric_meter</ModelId>\n"
    b"    <Protocol>Zigbee</Protocol>\n"
    b"    <LastContact>%s</LastContact>\n"
    b"    <ConnectionStatus>Connected</ConnectionStatus>\n"
    b"    <NetworkAddress>0x0000</NetworkAddress>\n"
    b"  </Device>\n"
    b"</DeviceList>\n"
)
"""``DeviceList`` with the one meter of the gateway. Markers: its
HardwareAddress and LastContact (:func:`last_contact`)."""


def demand_hex_bytes(demand_w: int, wide: bool) -> bytes:
    """Hex ``Demand`` field: 6 digits, or two's complement when negative."""
    if demand_w >= 0:
        return b"0x%06x" % demand_w
    if wide:
        return b"0x%08x" % (demand_w & 0xFFFFFFFF)
    return b"0x%06x" % (demand_w & 0xFFFFFF)


def demand_hex(demand_w: int, wide: bool) -> str:
    """:func:`demand_hex_bytes` as text."""
    return demand_hex_bytes(demand_w, wide).decode()


def cloud_timestamp(unix_s: int) -> bytes:
    """The cloud ``TimeStamp`` text of Unix time ``unix_s``."""
    return b"0x%08x" % (unix_s - EPOCH_2000)


def totals_hex(total_wh: int) -> bytes:
    """A cloud ``SummationDelivered`` or ``SummationReceived`` field."""
    return b"0x%016x" % total_wh


def last_contact(unix_s: int) -> bytes:
    """The local ``LastContact`` text: Unix time in hex."""
    return b"0x%08x" % unix_s


def kilo(value: int) -> bytes:
    """A local value (kW, kWh) of a value in W or Wh."""
    return b"%.6f" % (value / 1000)


def cloud_demand(
    device_mac: str, meter_mac: str, unix_s: int, demand: str, as_json: bool,
    timestamp: str | None = None,
) -> bytes:
    """``InstantaneousDemand`` answer; ``demand`` is from :func:`demand_hex`,
    ``timestamp`` (default: from ``unix_s``) the TimeStamp text."""
    ts = timestamp.encode() if timestamp else cloud_timestamp(unix_s)
    return (CLOUD_DEMAND_JSON if as_json else CLOUD_DEMAND_XML) % (
        device_mac.encode(), meter_mac.encode(), ts, demand.encode())


# Local variables: name -> (units, description), in the order of the capture.
LOCAL_VARIABLES: dict[str, tuple[str, str]] = {
    "zigbee:InstantaneousDemand": ("kW", "Instantaneous Demand"),
    "zigbee:Multiplier": ("", "Multiplier applied to demand and summation values"),
    "zigbee:Divisor": ("", "Divisor applied to demand and summation values"),
    "zigbee:CurrentSummationDelivered": ("kWh", "Summation Delivered to Home"),
    "zigbee:CurrentSummationReceived": ("kWh", "Summation Received from Home"),
    "zigbee:Price": ("", "Price of electricity"),
    "zigbee:TrailingDigits": (
        "", "Indicates the number of digits to the right of the decimal point"
    ),
    "zigbee:RateLabel": ("", "Active priuce rate label"),
    "zigbee:Currency": ("", "The local unit of currency used in the price field"),
    "zigbee:PriceTier": ("", "The current Price Tier"),
}
ALL_VARIABLES: tuple[str, ...] = tuple(LOCAL_VARIABLES)
_STATIC_VALUES = {
    "zigbee:Multiplier": "1",
    "zigbee:Divisor": "1000",
    "zigbee:Price": "0.088400",
    "zigbee:TrailingDigits": "4",
    "zigbee:RateLabel": "Block 1",
    "zigbee:Currency": "USD",
    "zigbee:PriceTier": "0",
}
# The meter's own values, by the index of their text in a query's values.
_METER_VALUES = {
    "zigbee:InstantaneousDemand": 0,
    "zigbee:CurrentSummationDelivered": 1,
    "zigbee:CurrentSummationReceived": 2,
}


def query_template(variables: Sequence[str]) -> tuple[bytes, tuple[int, ...]]:
    """The ``device_query`` answer naming ``variables``, as a template, and
    which of (demand, delivered, received) fill its value markers, in order.

    Markers: HardwareAddress, NetworkInterface, LastContact, then the values.
    """
    parts = [
        "<Device>\n"
        "  <DeviceDetails>\n"
        "    <Name>Power Meter</Name>\n"
        "    <HardwareAddress>%s</HardwareAddress>\n"
        "    <NetworkInterface>%s</NetworkInterface>\n"
        "    <Protocol>Zigbee</Protocol>\n"
        "    <NetworkAddress>0x0000</NetworkAddress>\n"
        "    <Manufacturer>Generic</Manufacturer>\n"
        "    <ModelId>electric_meter</ModelId>\n"
        "    <LastContact>%s</LastContact>\n"
        "    <ConnectionStatus>Connected</ConnectionStatus>\n"
        "  </DeviceDetails>\n"
        "  <Components>\n"
        "    <Component>\n"
        "      <HardwareId></HardwareId>\n"
        "      <FixedId>0</FixedId>\n"
        "      <Name>Main</Name>\n"
        "      <Variables>\n"
    ]
    picks: list[int] = []
    for name in variables:
        units, description = LOCAL_VARIABLES[name]
        pick = _METER_VALUES.get(name)
        if pick is None:
            value = _STATIC_VALUES[name]
        else:
            value = "%s"
            picks.append(pick)
        parts.append(
            "        <Variable>\n"
            f"          <Name>{name}</Name>\n"
            f"          <Value>{value}</Value>\n"
            f"          <Units>{units}</Units>\n"
            f"          <Description>{description}</Description>\n"
            "        </Variable>\n"
        )
    parts.append("      </Variables>\n    </Component>\n  </Components>\n</Device>\n")
    return "".join(parts).encode(), tuple(picks)


def local_device_query(
    meter_mac: str, device_mac: str, unix_s: int, demand_w: int, delivered_wh: int,
    received_wh: int, variables: Sequence[str], *, last_contact_text: str | None = None,
    demand_text: str | None = None, delivered_text: str | None = None,
) -> bytes:
    """``Device`` answer to ``device_query`` with the named ``variables``;
    the keyword texts, when given, replace what the values would give."""
    template, picks = query_template(variables)
    meter = (
        demand_text.encode() if demand_text else kilo(demand_w),
        delivered_text.encode() if delivered_text else kilo(delivered_wh),
        kilo(received_wh),
    )
    contact = last_contact_text.encode() if last_contact_text else last_contact(unix_s)
    values = [meter_mac.encode(), device_mac.encode(), contact]
    values.extend([meter[i] for i in picks])
    return template % tuple(values)


JSON_PATH = b"/json/"
"""http-json devices answer ``GET /json/<cloud id>``."""


def http_json_options() -> dict[str, Any]:
    """The ``http-json`` driver options that read a simulated JSON meter (a
    fresh document: the registry stores it as JSON)."""
    return {"fields": {
        "device_at": "/ts", "demand_w": "/power/w", "delivered_wh": "/energy/delivered_wh",
        "received_wh": "/energy/received_wh", "price": "/price",
    }}


JSON_STATUS = (
    b'{"id": "%s", "ts": %s, "power": {"w": %s}, '
    b'"energy": {"delivered_wh": %s, "received_wh": %s}, "price": 0.0884}\n'
)
"""The http-json document. Markers: the cloud id, then each value as the
JSON text to write as it is (a number, or a poison such as ``NaN``): ts,
demand, delivered, received."""


def http_json_url(base_url: str, cloud_id: str) -> str:
    """The URL to register an http-json device of the simulator at ``base_url``."""
    return f"{base_url.rstrip('/')}{JSON_PATH.decode()}{cloud_id}"


_GARBAGE = b"\x00\x1f\x8b\xfe\xff<InstantaneousDemand>\x00\x00\xc3(\r\n"
_BROKEN_HTML = (
    b"<!DOCTYPE html>\n<html><head><title>Gateway Error</title></head>\n"
    b"<body><h1>Gateway Error</h1><p>The gateway did not answer in time.<br>\n"
    b"<hr></body></html>\n"
)


def malformed(body: bytes, variant: int) -> bytes:
    """A body no XML or JSON parser accepts, derived from the good ``body``:
    variant 0 cuts it in half, 1 is binary garbage, 2 an HTML error page."""
    if variant == 0:
        return body[: len(body) // 2]
    if variant == 1:
        return _GARBAGE
    return _BROKEN_HTML
