"""The device-driver seam.

A driver knows one device protocol and nothing about scheduling or I/O. For
each device it makes a :class:`DeviceSession`, which holds everything that can
be computed once (request bytes, auth headers) and turns one poll into a short
exchange: ``begin()`` gives the first request, ``feed()`` takes each answer and
gives either the next request or the finished :class:`Sample`. Failures are
raised as :class:`PollFailure` with an :class:`Outcome`; the polling loop turns
them into data (counters, state, backoff).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeGuard, runtime_checkable

from poller.http import HttpRequest, HttpResponse


class Outcome(enum.Enum):
    """How a poll ended. The values are the label values of the metrics.

    The last four never end a poll on their own: a poll that stored a reading
    counts as OK and, when the reading lacks something, also under what it
    lacks (a field out of bounds and stored as null, see
    :mod:`poller.drivers.bounds`, or totals whose follow-up request failed).
    """

    OK = "ok"
    TIMEOUT = "timeout"
    CONNECT_ERROR = "connect_error"
    HTTP_ERROR = "http_error"
    AUTH_REJECTED = "auth_rejected"
    DEVICE_ERROR = "device_error"
    UNPARSEABLE = "unparseable"
    DEVICE_TIME_OUT_OF_RANGE = "device_time_out_of_range"
    VALUE_NOT_FINITE = "value_not_finite"
    VALUE_OUT_OF_RANGE = "value_out_of_range"
    TOTALS_FAILED = "totals_failed"


class PollFailure(Exception):
    """A poll that produced no reading; ``outcome`` says why."""

    def __init__(self, outcome: Outcome, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.message = message

    def __repr__(self) -> str:
        return f"PollFailure({self.outcome.value}, {self.message!r})"


class Sample(NamedTuple):
    """What a driver extracts from a device's answer; fields as in Reading.

    Numbers are as the device sent them, even when absurd (NaN, 1e308, a
    TimeStamp of 2**64-1): the polling loop bounds every driver's Sample in
    one place (:mod:`poller.drivers.bounds`), since only it knows the poll time."""

    device_at: float | None
    demand_w: float | None
    delivered_wh: float | None
    received_wh: float | None
    price: float | None


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """What a driver needs to know about one registered device."""

    device_id: int
    cloud_id: str
    email: str
    secret: str
    """Unsealed password or install code. Never logged, never returned."""
    url: str | None
    """Endpoint base URL; None means the driver's (or global) default."""
    options: dict[str, Any]
    """Driver-specific options (e.g. http-json field pointers)."""

    def __repr__(self) -> str:  # keep the secret out of every repr
        return f"DeviceSpec(id={self.device_id}, cloud_id={self.cloud_id!r}, url={self.url!r})"


class DeviceSession(Protocol):
    """One device's protocol state across polls (e.g. a discovered meter)."""

    def begin(self, with_totals: bool) -> HttpRequest:
        """First request of a poll. ``with_totals``: also read meter totals."""
        ...

    def feed(self, response: HttpResponse) -> HttpRequest | Sample:
        """Next request of this poll, or its result. Raises PollFailure."""
        ...

    def partial(self) -> Sample | None:
        """After a poll failed: the Sample its earlier answers already gave,
        or None. eagle-cloud gives the demand reading of a poll whose totals
        follow-up failed, so that reading is kept. Forgets it (a second call
        gives None); the polling loop asks once per failed poll."""
        ...


@runtime_checkable
class RepeatingSession(DeviceSession, Protocol):
    """A session whose polls all start with the same request.

    The polling loop keeps only that request's wire bytes, so the session
    need not keep the request at all: each poll after the first starts
    with ``repeat()`` instead of ``begin()``."""

    def repeat(self, with_totals: bool) -> bool:
        """Start a poll whose first request equals the one the last
        ``begin()`` returned, and say so (False: call ``begin()``)."""
        ...


_REPEATS: dict[type, bool] = {}


def is_repeating(session: DeviceSession) -> TypeGuard[RepeatingSession]:
    """Whether ``session`` is a :class:`RepeatingSession`, decided once per
    session class: a protocol check inspects the protocol's members on every
    call, and a pool asks it of every device it starts.

    >>> from poller.drivers.eagle_cloud import EagleCloudDriver
    >>> from poller.drivers.http_json import HttpJsonDriver
    >>> spec = DeviceSpec(1, "00ce69", "me@example.com", "pw", "http://10.0.0.7/status",
    ...                   {"fields": {"demand_w": "/w"}})
    >>> is_repeating(EagleCloudDriver("https://cloud.example").session(spec))
    True
    >>> is_repeating(HttpJsonDriver().session(spec))
    False
    """
    kind = type(session)
    repeats = _REPEATS.get(kind)
    if repeats is None:
        repeats = _REPEATS[kind] = isinstance(session, RepeatingSession)
    return repeats


class Driver(Protocol):
    @property
    def name(self) -> str:
        """As stored in ``devices.driver``: a class attribute of each driver
        (a ClassVar, so that a compiled class keeps it on the class)."""
        ...

    def session(self, device: DeviceSpec) -> DeviceSession:
        """Validate ``device`` (raise ValueError with a clear message) and
        return its session."""
        ...
