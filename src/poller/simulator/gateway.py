"""What a simulated gateway answers to one request.

Both protocols share ``POST /cgi-bin/post_manager``. A ``Cloud-ID`` header
selects the cloud protocol (credentials in the ``User`` and ``Password``
headers); otherwise HTTP basic auth selects the EAGLE-200 local protocol
(user = cloud id, password = install code). A cloud id outside the fleet gets
404; a known device with wrong credentials gets 401 with a short text body
(no capture of the real cloud's refusal exists, so this is our choice).
Unsupported commands get 400. Every device also answers as a plain JSON
meter, for the ``http-json`` driver: ``GET /json/<cloud id>`` with
``Authorization: Bearer <password>`` (see payloads.http_json_options).
"""

from __future__ import annotations

import binascii
from base64 import b64decode
from typing import Final

from poller.simulator import payloads, responses
from poller.simulator.faults import POISON, TOTALS_ONLY, Fault, FaultPlan
from poller.simulator.fleet import Device, Fleet
from poller.simulator.records import Records, ServedReading

POST_MANAGER = b"/cgi-bin/post_manager"

_LOCAL_NAMES = {name.lower(): name for name in payloads.ALL_VARIABLES}
_SUMMATION_VARS = ("zigbee:CurrentSummationDelivered", "zigbee:CurrentSummationReceived")
_DEMAND_VAR = "zigbee:InstantaneousDemand"
_5XX = (500, 502, 503)
_5XX_BODY = b"<html><body><h1>%d</h1></body></html>\n"


# What the connection does with a reply (plain ints: compared per request).
SEND: Final = 0
SLOW: Final = 1
"""Send the data after the configured delay."""
HANG: Final = 2
RESET: Final = 3
DROP: Final = 4
"""Close the connection without an answer."""

Reply = tuple[int, bytes, bool, ServedReading | None]
"""(action, data, close after writing, served reading when recording).
A plain tuple: building a NamedTuple costs a Python-level call per request."""

STAT_KEYS: tuple[str, ...] = (
    "requests", "ok", "not_found", "bad_request", "unauthorized", "control",
    *(f"fault_{kind.value}" for kind in Fault),
)
_POLL_COMMANDS = (b"get_instantaneous_demand", b"device_query")
_SUMMATION = b"get_current_summation"
_REJECT = 401
_U64_MAX = (1 << 64) - 1


class Gateway:
    """Answers device requests for a whole fleet."""

    __slots__ = ("_by_auth", "faults", "fleet", "records", "stats")

    def __init__(self, fleet: Fleet, faults: FaultPlan, records: Records) -> None:
        self.fleet = fleet
        self.faults = faults
        self.records = records
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        # Authorization header value -> device, filled on first success so a
        # local poll costs one dict lookup instead of a base64 decode.
        self._by_auth: dict[bytes, Device] = {}

    def reset_stats(self) -> None:
        self.stats = dict.fromkeys(STAT_KEYS, 0)

    def handle(
        self, method: bytes, path: bytes, cloud_id: bytes | None, user: bytes | None,
        password: bytes | None, authorization: bytes | None, body: bytes, keep_alive: bool,
        now: float,
    ) -> Reply:
        """The reply to one request to a device (not the control API)."""
        stats = self.stats
        stats["requests"] += 1
        close = not keep_alive
        json_api = path.startswith(payloads.JSON_PATH)
        if json_api:
            if method != b"GET":
                return self._plain(400, b"GET only\n", False, close)
            device = self._json_device(path[len(payloads.JSON_PATH):], authorization, now)
        elif path != POST_MANAGER:
            return self._plain(404, b"Not Found\n", False, close)
        elif method != b"POST":
            return self._plain(400, b"POST only\n", False, close)
        elif cloud_id is not None:
            device = self._cloud_device(cloud_id, user, password, now)
        else:
            device = self._local_device(authorization, now)
        if not isinstance(device, Device):
            if device is None:
                return self._plain(404, b"Unknown device\n", False, close)
            return self._plain(401, b"Unauthorized\n", False, close)
        legacy = device.http10
        close = close or legacy
        lowered = body.lower()
        command = None if json_api else _element(lowered, b"name")
        if json_api or command in _POLL_COMMANDS:
            self.records.arrival(device.cloud_id, now)

        faults = self.faults
        fault = faults.forced_ids.get(device.cloud_id)
        if fault is None and faults.any_random:
            fault = faults.draw(device.uniform())
        poison = None
        if fault is not None:
            totals_fault = TOTALS_ONLY.get(fault)
            if totals_fault is not None and command != _SUMMATION:
                fault = None  # a meter that fails only its totals answers the rest
            else:
                stats["fault_" + fault.value] += 1
                fault = totals_fault or fault
                if fault in POISON:
                    poison, fault = fault, None
        if fault is not None:
            if fault is Fault.OFFLINE:
                return (DROP, b"", True, None)
            if fault is Fault.RESET:
                return (RESET, b"", True, None)
            if fault is Fault.HANG:
                return (HANG, b"", False, None)
            if fault is Fault.AUTH:
                return self._plain(401, b"Unauthorized\n", legacy, close)
            if fault is Fault.HTTP_5XX:
                status = _5XX[int(device.uniform() * 3)]
                data = responses.build(status, responses.HTML, _5XX_BODY % status, legacy, close)
                return (SEND, data, close, None)

        answer: tuple[bytes, bytes, ServedReading | None] | None
        if json_api:
            answer = self._json(device, now, poison)
        elif cloud_id is not None:
            answer = self._cloud(device, command, lowered, now, poison)
        else:
            answer = self._local(device, command, lowered, now, poison)
        if answer is None:
            return self._plain(400, b"Bad command\n", legacy, close)
        payload, ctype, served = answer
        if fault is Fault.MALFORMED:
            payload = payloads.malformed(payload, int(device.uniform() * 3))
            return (SEND, responses.build(200, ctype, payload, legacy, close), close, None)
        if poison is None:
            stats["ok"] += 1
        data = responses.build(200, ctype, payload, legacy, close)
        return (SEND if fault is None else SLOW, data, close, served)

    def _plain(self, status: int, body: bytes, legacy: bool, close: bool) -> Reply:
        key = "not_found" if status == 404 else "unauthorized" if status == 401 else "bad_request"
        self.stats[key] += 1
        return (SEND, responses.build(status, responses.TEXT, body, legacy, close), close, None)

    def _cloud_device(
        self, cloud_id: bytes, user: bytes | None, password: bytes | None, now: float
    ) -> Device | int | None:
        """The addressed device, None if unknown, or _REJECT for bad credentials."""
        device = self.fleet.get(cloud_id.decode("latin-1").strip().lower(), now)
        if device is None:
            return None
        if user != device.user_b or password != device.password_b:
            return _REJECT
        return device

    def _local_device(self, authorization: bytes | None, now: float) -> Device | int | None:
        if authorization is None:
            return _REJECT
        device = self._by_auth.get(authorization)
        if device is not None:
            return device
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"basic":
            return _REJECT
        try:
            user, _, _ = b64decode(token, validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return _REJECT
        device = self.fleet.get(user.decode("latin-1").lower(), now)
        if device is None:
            return None
        if authorization.replace(scheme, b"Basic", 1) != device.basic_auth:
            return _REJECT
        self._by_auth[authorization] = device
        return device

    def _json_device(self, cloud_id: bytes, authorization: bytes | None,
                     now: float) -> Device | int | None:
        device = self.fleet.get(cloud_id.decode("latin-1").strip().lower(), now)
        if device is None:
            return None
        if authorization != b"Bearer " + device.password_b:
            return _REJECT
        return device

    def _json(self, device: Device, now: float, poison: Fault | None,
              ) -> tuple[bytes, bytes, ServedReading | None]:
        unix_s = int(now)
        demand = device.advance(now)
        delivered, received = int(device.delivered_wh), int(device.received_wh)
        ts, demand_text, delivered_text = str(unix_s), str(demand), str(delivered)
        if poison is not None:
            if poison is Fault.TIMESTAMP_MAX:
                ts = str(_U64_MAX)
            elif poison is Fault.TIMESTAMP_US:
                ts = str(unix_s * 1_000_000)
            elif poison is Fault.VALUE_NEGATIVE:
                delivered_text = "-1234.5"
            else:
                demand_text = _JSON_POISON[poison]
        body = payloads.json_status(device.cloud_id, ts, demand_text, delivered_text,
                                    str(received))
        served = None
        if self.records.record_served and poison is None:
            served = ServedReading(device.cloud_id, unix_s, float(demand), float(delivered),
                                   float(received))
        return body, responses.JSON, served

    def _cloud(
        self, device: Device, command: bytes | None, lowered: bytes, now: float,
        poison: Fault | None,
    ) -> tuple[bytes, bytes, ServedReading | None] | None:
        as_json = _element(lowered, b"format") == b"json"
        ctype = responses.JSON if as_json else responses.XML
        unix_s = int(now)
        record = self.records.record_served and poison is None
        timestamp = None
        if poison is Fault.TIMESTAMP_MAX:
            timestamp = f"0x{_U64_MAX:016x}"
        elif poison is Fault.TIMESTAMP_US:
            timestamp = f"0x{(unix_s - payloads.EPOCH_2000) * 1_000_000:016x}"
        if command == b"get_instantaneous_demand":
            demand = device.advance(now)
            demand_text = _CLOUD_POISON.get(poison) if poison is not None else None
            body = payloads.cloud_demand(
                device.device_mac, device.meter_mac, unix_s,
                demand_text or payloads.demand_hex(demand, device.wide_negative), as_json,
                timestamp,
            )
            served = (
                ServedReading(device.cloud_id, unix_s, float(demand), None, None)
                if record else None
            )
            return body, ctype, served
        if command == _SUMMATION:
            device.advance(now)
            delivered, received = int(device.delivered_wh), int(device.received_wh)
            body = payloads.cloud_summation(
                device.device_mac, device.meter_mac, unix_s, delivered, received, as_json,
                timestamp,
            )
            served = (
                ServedReading(device.cloud_id, unix_s, None, float(delivered), float(received))
                if record else None
            )
            return body, ctype, served
        return None

    def _local(
        self, device: Device, command: bytes | None, lowered: bytes, now: float,
        poison: Fault | None,
    ) -> tuple[bytes, bytes, ServedReading | None] | None:
        unix_s = int(now)
        if command == b"device_list":
            return payloads.local_device_list(device.meter_mac, unix_s), responses.XML, None
        if command != b"device_query":
            return None
        address = _element(lowered, b"hardwareaddress")
        if address is not None and address != device.meter_mac.encode():
            return None
        variables = _requested_variables(lowered)
        demand = device.advance(now)
        delivered, received = int(device.delivered_wh), int(device.received_wh)
        if poison is None:
            body = payloads.local_device_query(
                device.meter_mac, device.device_mac, unix_s, demand, delivered, received,
                variables,
            )
        else:
            body = payloads.local_device_query(
                device.meter_mac, device.device_mac, unix_s, demand, delivered, received,
                variables, **_local_poison(poison, unix_s),
            )
        has_demand = _DEMAND_VAR in variables
        has_delivered = _SUMMATION_VARS[0] in variables
        has_received = _SUMMATION_VARS[1] in variables
        served = None
        if self.records.record_served and poison is None and \
                (has_demand or has_delivered or has_received):
            served = ServedReading(
                device.cloud_id, unix_s, float(demand) if has_demand else None,
                float(delivered) if has_delivered else None,
                float(received) if has_received else None,
            )
        return body, responses.XML, served


# Poison demand texts by protocol (faults.POISON); the cloud's are hex where
# hex decodes to one, and the word itself where none does.
_JSON_POISON = {Fault.VALUE_NAN: "NaN", Fault.VALUE_INFINITY: "Infinity",
                Fault.VALUE_HUGE: "1e308"}
_CLOUD_POISON = {Fault.VALUE_NEGATIVE: "0x8000000000000000", Fault.VALUE_NAN: "NaN",
                 Fault.VALUE_INFINITY: "Infinity", Fault.VALUE_HUGE: "0x7fffffffffffffff"}
# The local API's values are kW: 1e305 kW is 1e308 W.
_LOCAL_POISON = {Fault.VALUE_NAN: "NaN", Fault.VALUE_INFINITY: "Infinity",
                 Fault.VALUE_HUGE: "1e305"}


def _local_poison(poison: Fault, unix_s: int) -> dict[str, str]:
    """The local_device_query keyword texts that carry ``poison``."""
    if poison is Fault.TIMESTAMP_MAX:
        return {"last_contact": f"0x{_U64_MAX:016x}"}
    if poison is Fault.TIMESTAMP_US:
        return {"last_contact": f"0x{unix_s * 1_000_000:x}"}
    if poison is Fault.VALUE_NEGATIVE:
        return {"delivered_text": "-1234.500000"}
    return {"demand_text": _LOCAL_POISON[poison]}


def _element(lowered: bytes, tag: bytes, start: int = 0) -> bytes | None:
    """Stripped text of the first ``<tag>`` in an already lower-cased body."""
    opening = b"<" + tag + b">"
    i = lowered.find(opening, start)
    if i < 0:
        return None
    i += len(opening)
    j = lowered.find(b"<", i)
    if j < 0:
        return None
    return lowered[i:j].strip()


def _requested_variables(lowered: bytes) -> tuple[str, ...]:
    """Variables a ``device_query`` asks for: all of them for ``<All>Y</All>``
    or when it names none we know."""
    start = lowered.find(b"<components>")
    if start < 0 or _element(lowered, b"all", start) == b"y":
        return payloads.ALL_VARIABLES
    names: list[str] = []
    i = lowered.find(b"<variable>", start)
    while i >= 0:
        name = _element(lowered, b"name", i)
        known = _LOCAL_NAMES.get(name.decode("latin-1")) if name else None
        if known is not None and known not in names:
            names.append(known)
        i = lowered.find(b"<variable>", i + 10)
    return tuple(names) if names else payloads.ALL_VARIABLES
