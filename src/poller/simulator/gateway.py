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

A request is answered in two steps: :meth:`Gateway.resolve` decides from its
bytes what it asks (a :class:`Route`: the device, the command, the answer's
form, or a refusal), :meth:`Gateway.answer` what it gets now (the faults
drawn, the reading, the records). The connection keeps the routes of the
requests it saw whole (server.py), so a poll repeats only the second step.
The usual answer is one formatting call of a response form built once per
kind of answer (responses.Form, the payloads' templates), with the time
texts shared by all answers in the same second.
"""

from __future__ import annotations

import binascii
from base64 import b64decode
from typing import Final, cast

from poller.simulator import payloads, responses
from poller.simulator.faults import POISON, TOTALS_ONLY, Fault, FaultPlan
from poller.simulator.fleet import Device, Fleet
from poller.simulator.records import Records, ServedReading

POST_MANAGER = b"/cgi-bin/post_manager"

_LOCAL_NAMES = {name.lower(): name for name in payloads.ALL_VARIABLES}
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
# Indexes of the counters (Gateway.counts) in STAT_KEYS' order.
REQUESTS: Final = 0
OK: Final = 1
NOT_FOUND: Final = 2
BAD_REQUEST: Final = 3
UNAUTHORIZED: Final = 4
CONTROL: Final = 5
_FAULT_COUNTERS = {kind: STAT_KEYS.index(f"fault_{kind.value}") for kind in Fault}
_POLL_COMMANDS = (b"get_instantaneous_demand", b"device_query")
_SUMMATION = b"get_current_summation"
_REJECT = 401
_U64_MAX = (1 << 64) - 1

# What a request to a device asks for (Route.kind).
REFUSED: Final = 0
"""Answered before any device: a wrong path or method, an unknown device,
wrong credentials."""
JSON_STATUS: Final = 1
CLOUD_DEMAND: Final = 2
CLOUD_SUMMATION: Final = 3
DEVICE_LIST: Final = 4
DEVICE_QUERY: Final = 5
BAD_COMMAND: Final = 6
"""A command the device has no answer to: HTTP 400, after its faults."""


class Route:
    """A request to a device as its bytes decide it: the device, what it asks
    for, the answer's form, and the refusal if it is refused outright.

    Nothing here changes while the simulator runs (the fleet and each
    device's credentials are fixed), so the connection keeps the route of a
    request that came whole in one read (:attr:`Gateway.routes`) and answers
    the same bytes again without parsing them; what changes per request (the
    reading, the faults, the records) is :meth:`Gateway.answer`'s.
    """

    __slots__ = (
        "close",
        "content_type",
        "device",
        "form",
        "idents",
        "kind",
        "legacy",
        "picks",
        "poll",
        "refusal",
        "stat",
        "summation",
    )

    def __init__(
        self, kind: int, device: Device | None, close: bool, *, legacy: bool = False,
        poll: bool = False, summation: bool = False, form: responses.Form | None = None,
        content_type: bytes = responses.XML, idents: tuple[bytes, ...] = (),
        picks: tuple[int, ...] = (), refusal: Reply | None = None, stat: int = 0,
    ) -> None:
        self.kind = kind
        self.device = device
        self.close = close
        """Close the connection after the answer."""
        self.legacy = legacy
        self.poll = poll
        """A poll's request: its arrival is recorded."""
        self.summation = summation
        """A totals request (the totals-only faults hit it)."""
        self.form = form
        """The answer's HTTP 200 form (responses.Form)."""
        self.content_type = content_type
        self.idents = idents
        """The device's texts that lead the form's values."""
        self.picks = picks
        """device_query: which meter values its variables show, in order."""
        self.refusal = refusal
        self.stat = stat
        """REFUSED: the counter of the refusal."""


class _Second:
    """The time texts of one second, shared by every answer in it."""

    __slots__ = ("cloud", "decimal", "hex", "unix_s")

    def __init__(self, unix_s: int) -> None:
        self.unix_s = unix_s
        self.cloud = payloads.cloud_timestamp(unix_s)
        self.hex = payloads.last_contact(unix_s)
        self.decimal = b"%d" % unix_s


_QUERIES_MAX = 256
"""device_query templates kept by variable list (the drivers ask one or two)."""


class Gateway:
    """Answers device requests for a whole fleet."""

    __slots__ = (
        "_by_auth",
        "_forms",
        "_queries",
        "_routes_max",
        "_second",
        "counts",
        "faults",
        "fleet",
        "records",
        "routes",
    )

    def __init__(self, fleet: Fleet, faults: FaultPlan, records: Records) -> None:
        self.fleet = fleet
        self.faults = faults
        self.records = records
        self.counts = [0] * len(STAT_KEYS)
        """Request counters by outcome, in STAT_KEYS' order (see :meth:`stats`)."""
        # Authorization header value -> device, filled on first success so a
        # local poll costs one dict lookup instead of a base64 decode.
        self._by_auth: dict[bytes, Device] = {}
        self.routes: dict[bytes, Route] = {}
        """The bytes of a request that came whole in one read -> its route
        (see :class:`Route`); learned by the connections."""
        # A poller sends each device a request or two of its own, always the
        # same bytes; past this many (a client varying its requests) the
        # table starts afresh rather than grow.
        self._routes_max = 4 * fleet.size + 1024
        self._forms: dict[tuple[bytes, bytes, bool, bool], responses.Form] = {}
        self._queries: dict[tuple[str, ...], tuple[bytes, tuple[int, ...]]] = {}
        self._second = _Second(0)

    def stats(self) -> dict[str, int]:
        """The request counters by name."""
        return dict(zip(STAT_KEYS, self.counts, strict=True))

    def reset_stats(self) -> None:
        self.counts = [0] * len(STAT_KEYS)

    def handle(
        self, method: bytes, path: bytes, cloud_id: bytes | None, user: bytes | None,
        password: bytes | None, authorization: bytes | None, body: bytes, keep_alive: bool,
        now: float,
    ) -> Reply:
        """The reply to one request to a device (not the control API)."""
        route = self.resolve(method, path, cloud_id, user, password, authorization, body,
                             keep_alive, now)
        return self.answer(route, now)

    def learn(self, request: bytes, route: Route) -> None:
        """Remember that ``request`` (a whole request's bytes) resolves to ``route``."""
        routes = self.routes
        if len(routes) >= self._routes_max:
            routes.clear()
        routes[request] = route

    # what a request asks

    def resolve(
        self, method: bytes, path: bytes, cloud_id: bytes | None, user: bytes | None,
        password: bytes | None, authorization: bytes | None, body: bytes, keep_alive: bool,
        now: float,
    ) -> Route:
        """The route of a request to a device; ``now`` dates a device built for it."""
        close = not keep_alive
        json_api = path.startswith(payloads.JSON_PATH)
        if json_api:
            if method != b"GET":
                return self._refusal(400, b"GET only\n", close)
            device = self._json_device(path[len(payloads.JSON_PATH):], authorization, now)
        elif path != POST_MANAGER:
            return self._refusal(404, b"Not Found\n", close)
        elif method != b"POST":
            return self._refusal(400, b"POST only\n", close)
        elif cloud_id is not None:
            device = self._cloud_device(cloud_id, user, password, now)
        else:
            device = self._local_device(authorization, now)
        if not isinstance(device, Device):
            if device is None:
                return self._refusal(404, b"Unknown device\n", close)
            return self._refusal(401, b"Unauthorized\n", close)
        legacy = device.http10
        close = close or legacy
        if json_api:
            return Route(JSON_STATUS, device, close, legacy=legacy, poll=True,
                         form=self._form(payloads.JSON_STATUS, responses.JSON, legacy, close),
                         content_type=responses.JSON, idents=(device.cloud_id.encode(),))
        lowered = body.lower()
        command = _element(lowered, b"name")
        poll = command in _POLL_COMMANDS
        summation = command == _SUMMATION
        kind = BAD_COMMAND
        template = b""
        picks: tuple[int, ...] = ()
        idents: tuple[bytes, ...]
        if cloud_id is not None:
            as_json = _element(lowered, b"format") == b"json"
            ctype = responses.JSON if as_json else responses.XML
            idents = (device.device_mac.encode(), device.meter_mac.encode())
            if command == b"get_instantaneous_demand":
                kind = CLOUD_DEMAND
                template = payloads.CLOUD_DEMAND_JSON if as_json else payloads.CLOUD_DEMAND_XML
            elif summation:
                kind = CLOUD_SUMMATION
                template = (payloads.CLOUD_SUMMATION_JSON if as_json
                            else payloads.CLOUD_SUMMATION_XML)
        else:
            ctype = responses.XML
            idents = (device.meter_mac.encode(),)
            if command == b"device_list":
                kind, template = DEVICE_LIST, payloads.DEVICE_LIST
            elif command == b"device_query":
                address = _element(lowered, b"hardwareaddress")
                if address is None or address == idents[0]:
                    kind = DEVICE_QUERY
                    template, picks = self._query(_requested_variables(lowered))
                    idents = (idents[0], device.device_mac.encode())
        form = None if kind == BAD_COMMAND else self._form(template, ctype, legacy, close)
        return Route(kind, device, close, legacy=legacy, poll=poll, summation=summation,
                     form=form, content_type=ctype, idents=idents, picks=picks)

    def _refusal(self, status: int, body: bytes, close: bool) -> Route:
        data = responses.build(status, responses.TEXT, body, False, close)
        return Route(REFUSED, None, close, refusal=(SEND, data, close, None),
                     stat=_refusal_counter(status))

    def _form(self, template: bytes, content_type: bytes, legacy: bool,
              close: bool) -> responses.Form:
        key = (template, content_type, legacy, close)
        form = self._forms.get(key)
        if form is None:
            form = self._forms[key] = responses.Form(200, content_type, template, legacy, close)
        return form

    def _query(self, variables: tuple[str, ...]) -> tuple[bytes, tuple[int, ...]]:
        found = self._queries.get(variables)
        if found is None:
            if len(self._queries) >= _QUERIES_MAX:
                self._queries.clear()
            found = self._queries[variables] = payloads.query_template(variables)
        return found

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

    # the answer

    def answer(self, route: Route, now: float) -> Reply:
        """The reply to a request of ``route`` at ``now``: its faults, its
        reading, its records."""
        counts = self.counts
        counts[REQUESTS] += 1
        device = route.device
        if device is None:
            counts[route.stat] += 1
            return cast(Reply, route.refusal)
        legacy, close = route.legacy, route.close
        if route.poll:
            self.records.arrival(device.index, device.cloud_id, now)

        faults = self.faults
        forced = faults.forced_ids
        fault = forced.get(device.cloud_id) if forced else None
        if fault is None and faults.any_random:
            fault = faults.draw(device.uniform())
        poison = None
        if fault is not None:
            totals_fault = TOTALS_ONLY.get(fault)
            if totals_fault is not None and not route.summation:
                fault = None  # a meter that fails only its totals answers the rest
            else:
                counts[_FAULT_COUNTERS[fault]] += 1
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

        kind = route.kind
        form = route.form
        if form is None:  # BAD_COMMAND
            return self._plain(400, b"Bad command\n", legacy, close)
        unix_s = int(now)
        second = self._second
        if second.unix_s != unix_s:
            second = self._second = _Second(unix_s)
        if kind == CLOUD_DEMAND:
            values, served = self._cloud_demand(route, device, now, second, poison)
        elif kind == CLOUD_SUMMATION:
            values, served = self._cloud_summation(route, device, now, second, poison)
        elif kind == DEVICE_QUERY:
            values, served = self._device_query(route, device, now, second, poison)
        elif kind == JSON_STATUS:
            values, served = self._json_status(route, device, now, second, poison)
        else:  # DEVICE_LIST
            values, served = (route.idents[0], second.hex), None
        if fault is Fault.MALFORMED:
            payload = payloads.malformed(form.body(values), int(device.uniform() * 3))
            data = responses.build(200, route.content_type, payload, legacy, close)
            return (SEND, data, close, None)
        if poison is None:
            counts[OK] += 1
        return (SEND if fault is None else SLOW, form.render(values), close, served)

    def _plain(self, status: int, body: bytes, legacy: bool, close: bool) -> Reply:
        self.counts[_refusal_counter(status)] += 1
        return (SEND, responses.build(status, responses.TEXT, body, legacy, close), close, None)

    def _record(self, poison: Fault | None) -> bool:
        return poison is None and self.records.record_served

    def _cloud_demand(self, route: Route, device: Device, now: float, second: _Second,
                      poison: Fault | None) -> tuple[tuple[bytes, ...], ServedReading | None]:
        demand = device.advance(now)
        ts = second.cloud
        text = None
        if poison is not None:
            ts = _cloud_poison_time(poison, second.unix_s) or ts
            text = _CLOUD_POISON.get(poison)
        values = (route.idents[0], route.idents[1], ts,
                  text or payloads.demand_hex_bytes(demand, device.wide_negative))
        served = None
        if self._record(poison):
            served = ServedReading(device.cloud_id, second.unix_s, float(demand), None, None)
        return values, served

    def _cloud_summation(self, route: Route, device: Device, now: float, second: _Second,
                         poison: Fault | None) -> tuple[tuple[bytes, ...], ServedReading | None]:
        device.advance(now)
        delivered, received = int(device.delivered_wh), int(device.received_wh)
        ts = second.cloud
        if poison is not None:
            ts = _cloud_poison_time(poison, second.unix_s) or ts
        values = (route.idents[0], route.idents[1], ts, payloads.totals_hex(delivered),
                  payloads.totals_hex(received))
        served = None
        if self._record(poison):
            served = ServedReading(device.cloud_id, second.unix_s, None, float(delivered),
                                   float(received))
        return values, served

    def _device_query(self, route: Route, device: Device, now: float, second: _Second,
                      poison: Fault | None) -> tuple[tuple[bytes, ...], ServedReading | None]:
        demand = device.advance(now)
        delivered, received = int(device.delivered_wh), int(device.received_wh)
        numbers = (demand, delivered, received)
        overrides: list[bytes | None] = [None, None, None]
        contact = second.hex
        unix_s = second.unix_s
        if poison is Fault.TIMESTAMP_MAX:
            contact = b"0x%016x" % _U64_MAX
        elif poison is Fault.TIMESTAMP_US:
            contact = b"0x%x" % (unix_s * 1_000_000)
        elif poison is Fault.VALUE_NEGATIVE:
            overrides[1] = b"-1234.500000"
        elif poison is not None:
            overrides[0] = _LOCAL_POISON[poison]
        values = [route.idents[0], route.idents[1], contact]
        for pick in route.picks:
            values.append(overrides[pick] or payloads.kilo(numbers[pick]))
        served = None
        picks = route.picks
        if self._record(poison) and picks:
            served = ServedReading(
                device.cloud_id, unix_s, float(demand) if 0 in picks else None,
                float(delivered) if 1 in picks else None,
                float(received) if 2 in picks else None,
            )
        return tuple(values), served

    def _json_status(self, route: Route, device: Device, now: float, second: _Second,
                     poison: Fault | None) -> tuple[tuple[bytes, ...], ServedReading | None]:
        demand = device.advance(now)
        delivered, received = int(device.delivered_wh), int(device.received_wh)
        unix_s = second.unix_s
        ts, demand_text, delivered_text = second.decimal, b"%d" % demand, b"%d" % delivered
        if poison is not None:
            if poison is Fault.TIMESTAMP_MAX:
                ts = b"%d" % _U64_MAX
            elif poison is Fault.TIMESTAMP_US:
                ts = b"%d" % (unix_s * 1_000_000)
            elif poison is Fault.VALUE_NEGATIVE:
                delivered_text = b"-1234.5"
            else:
                demand_text = _JSON_POISON[poison]
        values = (route.idents[0], ts, demand_text, delivered_text, b"%d" % received)
        served = None
        if self._record(poison):
            served = ServedReading(device.cloud_id, unix_s, float(demand), float(delivered),
                                   float(received))
        return values, served


# Poison demand texts by protocol (faults.POISON); the cloud's are hex where
# hex decodes to one, and the word itself where none does.
_JSON_POISON = {Fault.VALUE_NAN: b"NaN", Fault.VALUE_INFINITY: b"Infinity",
                Fault.VALUE_HUGE: b"1e308"}
_CLOUD_POISON = {Fault.VALUE_NEGATIVE: b"0x8000000000000000", Fault.VALUE_NAN: b"NaN",
                 Fault.VALUE_INFINITY: b"Infinity", Fault.VALUE_HUGE: b"0x7fffffffffffffff"}
# The local API's values are kW: 1e305 kW is 1e308 W.
_LOCAL_POISON = {Fault.VALUE_NAN: b"NaN", Fault.VALUE_INFINITY: b"Infinity",
                 Fault.VALUE_HUGE: b"1e305"}


def _refusal_counter(status: int) -> int:
    return NOT_FOUND if status == 404 else UNAUTHORIZED if status == 401 else BAD_REQUEST


def _cloud_poison_time(poison: Fault, unix_s: int) -> bytes | None:
    """The cloud TimeStamp text that carries ``poison``, if it is a time."""
    if poison is Fault.TIMESTAMP_MAX:
        return b"0x%016x" % _U64_MAX
    if poison is Fault.TIMESTAMP_US:
        return b"0x%016x" % ((unix_s - payloads.EPOCH_2000) * 1_000_000)
    return None


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
