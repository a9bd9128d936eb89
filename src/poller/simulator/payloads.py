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


def demand_hex(demand_w: int, wide: bool) -> str:
    """Hex ``Demand`` field: 6 digits, or two's complement when negative."""
    if demand_w >= 0:
        return f"0x{demand_w:06x}"
    if wide:
        return f"0x{demand_w & 0xFFFFFFFF:08x}"
    return f"0x{demand_w & 0xFFFFFF:06x}"


def cloud_timestamp(unix_s: int) -> str:
    """The cloud ``TimeStamp`` text of Unix time ``unix_s``."""
    return f"0x{unix_s - EPOCH_2000:08x}"


def cloud_demand(
    device_mac: str, meter_mac: str, unix_s: int, demand: str, as_json: bool,
    timestamp: str | None = None,
) -> bytes:
    """``InstantaneousDemand`` answer; ``demand`` is from :func:`demand_hex`,
    ``timestamp`` (default: from ``unix_s``) the TimeStamp text."""
    ts = timestamp or cloud_timestamp(unix_s)
    if as_json:
        return (
            '{\n"InstantaneousDemand": {\n'
            f'"DeviceMacId": "{device_mac}",\n'
            f'"MeterMacId": "{meter_mac}",\n'
            f'"TimeStamp": "{ts}",\n'
            f'"Demand": "{demand}",\n'
            '"Multiplier": "0x00000001",\n'
            '"Divisor": "0x000003e8",\n'
            '"DigitsRight": "0x03",\n'
            '"DigitsLeft": "0x06",\n'
            '"SuppressLeadingZero": "Y"}\n}\n'
        ).encode()
    return (
        "<InstantaneousDemand>\n"
        f"  <DeviceMacId>{device_mac}</DeviceMacId>\n"
        f"  <MeterMacId>{meter_mac}</MeterMacId>\n"
        f"  <TimeStamp>{ts}</TimeStamp>\n"
        f"  <Demand>{demand}</Demand>\n"
        "  <Multiplier>0x00000001</Multiplier>\n"
        "  <Divisor>0x000003e8</Divisor>\n"
        "  <DigitsRight>0x03</DigitsRight>\n"
        "  <DigitsLeft>0x06</DigitsLeft>\n"
        "  <SuppressLeadingZero>Y</SuppressLeadingZero>\n"
        "</InstantaneousDemand>\n"
    ).encode()


def cloud_summation(
    device_mac: str, meter_mac: str, unix_s: int, delivered_wh: int, received_wh: int,
    as_json: bool, timestamp: str | None = None,
) -> bytes:
    """``CurrentSummation`` answer (fields as in the REST manual, section 13)."""
    ts = timestamp or cloud_timestamp(unix_s)
    if as_json:
        return (
            '{\n"CurrentSummation": {\n'
            f'"DeviceMacId": "{device_mac}",\n'
            f'"MeterMacId": "{meter_mac}",\n'
            f'"TimeStamp": "{ts}",\n'
            f'"SummationDelivered": "0x{delivered_wh:016x}",\n'
            f'"SummationReceived": "0x{received_wh:016x}",\n'
            '"Multiplier": "0x00000001",\n'
            '"Divisor": "0x000003e8",\n'
            '"DigitsRight": "0x03",\n'
            '"DigitsLeft": "0x06",\n'
            '"SuppressLeadingZero": "Y"}\n}\n'
        ).encode()
    return (
        "<CurrentSummation>\n"
        f"  <DeviceMacId>{device_mac}</DeviceMacId>\n"
        f"  <MeterMacId>{meter_mac}</MeterMacId>\n"
        f"  <TimeStamp>{ts}</TimeStamp>\n"
        f"  <SummationDelivered>0x{delivered_wh:016x}</SummationDelivered>\n"
        f"  <SummationReceived>0x{received_wh:016x}</SummationReceived>\n"
        "  <Multiplier>0x00000001</Multiplier>\n"
        "  <Divisor>0x000003e8</Divisor>\n"
        "  <DigitsRight>0x03</DigitsRight>\n"
        "  <DigitsLeft>0x06</DigitsLeft>\n"
        "  <SuppressLeadingZero>Y</SuppressLeadingZero>\n"
        "</CurrentSummation>\n"
    ).encode()


def local_device_list(meter_mac: str, unix_s: int) -> bytes:
    """``DeviceList`` with the one meter of the gateway."""
    return (
        "<DeviceList>\n"
        "  <Device>\n"
        f"    <HardwareAddress>{meter_mac}</HardwareAddress>\n"
        "    <Manufacturer>Generic</Manufacturer>\n"
        "    <ModelId>electric_meter</ModelId>\n"
        "    <Protocol>Zigbee</Protocol>\n"
        f"    <LastContact>0x{unix_s:08x}</LastContact>\n"
        "    <ConnectionStatus>Connected</ConnectionStatus>\n"
        "    <NetworkAddress>0x0000</NetworkAddress>\n"
        "  </Device>\n"
        "</DeviceList>\n"
    ).encode()


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


def local_device_query(
    meter_mac: str, device_mac: str, unix_s: int, demand_w: int, delivered_wh: int,
    received_wh: int, variables: Sequence[str], *, last_contact: str | None = None,
    demand_text: str | None = None, delivered_text: str | None = None,
) -> bytes:
    """``Device`` answer to ``device_query`` with the named ``variables``;
    the keyword texts, when given, replace what the values would give."""
    demand = demand_text or f"{demand_w / 1000:.6f}"
    delivered = delivered_text or f"{delivered_wh / 1000:.6f}"
    received = f"{received_wh / 1000:.6f}"
    last_contact = last_contact or f"0x{unix_s:08x}"
    if variables is ALL_VARIABLES:  # the usual poll: one format call
        return (
            _ALL_TEMPLATE % (meter_mac, device_mac, last_contact, demand, delivered, received)
        ).encode()
    text = _render_query(
        meter_mac, device_mac, last_contact, demand, delivered, received, variables
    )
    return text.encode()


def _render_query(
    meter_mac: str, device_mac: str, last_contact: str, demand: str, delivered: str,
    received: str, variables: Sequence[str],
) -> str:
    values = {
        "zigbee:InstantaneousDemand": demand,
        "zigbee:CurrentSummationDelivered": delivered,
        "zigbee:CurrentSummationReceived": received,
    }
    parts = [
        "<Device>\n"
        "  <DeviceDetails>\n"
        "    <Name>Power Meter</Name>\n"
        f"    <HardwareAddress>{meter_mac}</HardwareAddress>\n"
        f"    <NetworkInterface>{device_mac}</NetworkInterface>\n"
        "    <Protocol>Zigbee</Protocol>\n"
        "    <NetworkAddress>0x0000</NetworkAddress>\n"
        "    <Manufacturer>Generic</Manufacturer>\n"
        "    <ModelId>electric_meter</ModelId>\n"
        f"    <LastContact>{last_contact}</LastContact>\n"
        "    <ConnectionStatus>Connected</ConnectionStatus>\n"
        "  </DeviceDetails>\n"
        "  <Components>\n"
        "    <Component>\n"
        "      <HardwareId></HardwareId>\n"
        "      <FixedId>0</FixedId>\n"
        "      <Name>Main</Name>\n"
        "      <Variables>\n"
    ]
    for name in variables:
        units, description = LOCAL_VARIABLES[name]
        value = values.get(name) or _STATIC_VALUES[name]
        parts.append(
            "        <Variable>\n"
            f"          <Name>{name}</Name>\n"
            f"          <Value>{value}</Value>\n"
            f"          <Units>{units}</Units>\n"
            f"          <Description>{description}</Description>\n"
            "        </Variable>\n"
        )
    parts.append("      </Variables>\n    </Component>\n  </Components>\n</Device>\n")
    return "".join(parts)


# The static text contains no "%", so the placeholders are the only ones.
_ALL_TEMPLATE = _render_query("%s", "%s", "%s", "%s", "%s", "%s", ALL_VARIABLES)


JSON_PATH = b"/json/"
"""http-json devices answer ``GET /json/<cloud id>``."""


def http_json_options() -> dict[str, Any]:
    """The ``http-json`` driver options that read a simulated JSON meter (a
    fresh document: the registry stores it as JSON)."""
    return {"fields": {
        "device_at": "/ts", "demand_w": "/power/w", "delivered_wh": "/energy/delivered_wh",
        "received_wh": "/energy/received_wh", "price": "/price",
    }}


_JSON_TEMPLATE = (
    '{"id": "%s", "ts": %s, "power": {"w": %s}, '
    '"energy": {"delivered_wh": %s, "received_wh": %s}, "price": 0.0884}\n'
)


def http_json_url(base_url: str, cloud_id: str) -> str:
    """The URL to register an http-json device of the simulator at ``base_url``."""
    return f"{base_url.rstrip('/')}{JSON_PATH.decode()}{cloud_id}"


def json_status(cloud_id: str, ts: str, demand: str, delivered: str, received: str) -> bytes:
    """The http-json document; each value is the JSON text to write as it is
    (a number, or a poison such as ``NaN``)."""
    return (_JSON_TEMPLATE % (cloud_id, ts, demand, delivered, received)).encode()


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
