"""Fault injection: which misbehaviour a simulated device shows on a request.

Each kind has a per-request probability (``FaultRates``) and a set of cloud ids
for which it is forced (``FaultPlan.force``), changeable while serving. The
per-request draw comes from the device's own seeded random stream, so a given
sequence of requests to a device meets the same faults on every run.

What each kind does on the wire:

- ``auth``: HTTP 401 with a short text body, as for wrong credentials.
- ``http_5xx``: HTTP 500, 502 or 503 with a short HTML body; keep-alive.
- ``hang``: never answer; the connection stays open until the client closes it,
  and later requests on it are swallowed (answers must stay in order).
- ``slow``: the normal answer, written after ``slow_delay_s``.
- ``malformed``: HTTP 200 with a body no parser accepts: the real answer cut
  in half, binary garbage, or an HTML error page that is not well-formed XML.
- ``reset``: the connection is aborted with a TCP RST, nothing is answered.
- ``offline``: the connection is closed (FIN) without an answer.

Poison: HTTP 200 and a well-formed answer holding a value no meter reads (the
reading must still be stored, the field null). Cloud answers carry hex, so
their poison is the hex that decodes to it:

- ``timestamp_max``: the device time is 2**64-1 (cloud ``TimeStamp`` and
  local ``LastContact`` ``0xffffffffffffffff``, http-json ``ts``
  18446744073709551615).
- ``timestamp_us``: the device time in microseconds instead of seconds.
- ``value_negative``: a negative meter total (local, http-json: delivered);
  the cloud's totals are unsigned, so its demand is the most negative 64-bit
  number instead.
- ``value_nan``, ``value_infinity``: demand ``NaN`` / ``Infinity`` (http-json
  bare, as Python's ``json`` writes them; local as the value text; the cloud
  sends the word where hex is due, which no driver can read).
- ``value_huge``: demand 1e308 W (cloud ``0x7fffffffffffffff``).

A meter that does not answer totals (cloud ``get_current_summation`` only;
any other request is answered as if no fault were drawn, so a rate is a
probability per totals request):

- ``totals_malformed``, ``totals_5xx``, ``totals_hang``: as ``malformed``,
  ``http_5xx`` and ``hang``.

When a device is forced into several kinds, the first in ``FAULT_ORDER`` wins.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields


class Fault(enum.Enum):
    AUTH = "auth"
    HTTP_5XX = "http_5xx"
    HANG = "hang"
    SLOW = "slow"
    MALFORMED = "malformed"
    RESET = "reset"
    OFFLINE = "offline"
    TIMESTAMP_MAX = "timestamp_max"
    TIMESTAMP_US = "timestamp_us"
    VALUE_NEGATIVE = "value_negative"
    VALUE_NAN = "value_nan"
    VALUE_INFINITY = "value_infinity"
    VALUE_HUGE = "value_huge"
    TOTALS_MALFORMED = "totals_malformed"
    TOTALS_5XX = "totals_5xx"
    TOTALS_HANG = "totals_hang"


FAULT_ORDER: tuple[Fault, ...] = (
    Fault.OFFLINE,
    Fault.RESET,
    Fault.HANG,
    Fault.AUTH,
    Fault.HTTP_5XX,
    Fault.MALFORMED,
    Fault.SLOW,
    Fault.TOTALS_HANG,
    Fault.TOTALS_5XX,
    Fault.TOTALS_MALFORMED,
    Fault.TIMESTAMP_MAX,
    Fault.TIMESTAMP_US,
    Fault.VALUE_NEGATIVE,
    Fault.VALUE_NAN,
    Fault.VALUE_INFINITY,
    Fault.VALUE_HUGE,
)

POISON: frozenset[Fault] = frozenset({
    Fault.TIMESTAMP_MAX, Fault.TIMESTAMP_US, Fault.VALUE_NEGATIVE, Fault.VALUE_NAN,
    Fault.VALUE_INFINITY, Fault.VALUE_HUGE,
})
"""Kinds answered with HTTP 200 and a well-formed body holding a bad value."""

TOTALS_ONLY: dict[Fault, Fault] = {
    Fault.TOTALS_MALFORMED: Fault.MALFORMED,
    Fault.TOTALS_5XX: Fault.HTTP_5XX,
    Fault.TOTALS_HANG: Fault.HANG,
}
"""Kinds that hit only a cloud totals request, and what they do to it."""


@dataclass(frozen=True, slots=True)
class FaultRates:
    """Per-request probability of each fault kind; they must sum to at most 1."""

    auth: float = 0.0
    http_5xx: float = 0.0
    hang: float = 0.0
    slow: float = 0.0
    malformed: float = 0.0
    reset: float = 0.0
    offline: float = 0.0
    timestamp_max: float = 0.0
    timestamp_us: float = 0.0
    value_negative: float = 0.0
    value_nan: float = 0.0
    value_infinity: float = 0.0
    value_huge: float = 0.0
    totals_malformed: float = 0.0
    totals_5xx: float = 0.0
    totals_hang: float = 0.0

    def __post_init__(self) -> None:
        total = 0.0
        for f in fields(self):
            rate = getattr(self, f.name)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"fault rate {f.name}={rate!r} is not within [0, 1]")
            total += rate
        if total > 1.0 + 1e-9:
            raise ValueError(f"fault rates sum to {total:.4f}, more than 1")

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def replaced(self, changes: Mapping[str, float]) -> FaultRates:
        """A copy with ``changes`` applied; unknown names raise ValueError."""
        merged = self.as_dict()
        for name, rate in changes.items():
            if name not in merged:
                raise ValueError(f"unknown fault kind {name!r}")
            merged[name] = float(rate)
        return FaultRates(**merged)


class FaultPlan:
    """The fault configuration in force: rates plus per-device forced kinds."""

    __slots__ = ("_cumulative", "_sets", "any_random", "forced_ids", "rates")

    def __init__(self, rates: FaultRates) -> None:
        self.rates = rates
        self._sets: dict[Fault, frozenset[str]] = {kind: frozenset() for kind in Fault}
        self.forced_ids: dict[str, Fault] = {}
        """Cloud id -> the fault forced on it (read per request)."""
        self._cumulative: tuple[tuple[float, Fault], ...] = ()
        self.any_random = False
        self._rebuild()

    def set_rates(self, rates: FaultRates) -> None:
        self.rates = rates
        self._rebuild()

    def force(self, kind: Fault, cloud_ids: Iterable[str]) -> None:
        """Replace the set of devices forced into ``kind``."""
        self._sets[kind] = frozenset(cid.lower() for cid in cloud_ids)
        self._rebuild()

    def clear(self) -> None:
        for kind in Fault:
            self._sets[kind] = frozenset()
        self.set_rates(FaultRates())

    def draw(self, u: float) -> Fault | None:
        """The random fault for a uniform draw ``u`` in [0, 1), or None."""
        for bound, kind in self._cumulative:
            if u < bound:
                return kind
        return None

    def snapshot(self) -> dict[str, object]:
        out: dict[str, object] = {kind.value: sorted(self._sets[kind]) for kind in Fault}
        out["rates"] = self.rates.as_dict()
        return out

    def _rebuild(self) -> None:
        forced: dict[str, Fault] = {}
        for kind in reversed(FAULT_ORDER):
            for cid in self._sets[kind]:
                forced[cid] = kind
        self.forced_ids = forced
        acc = 0.0
        cumulative: list[tuple[float, Fault]] = []
        for kind in FAULT_ORDER:
            rate = getattr(self.rates, kind.value)
            if rate > 0.0:
                acc += rate
                cumulative.append((acc, kind))
        self._cumulative = tuple(cumulative)
        self.any_random = bool(cumulative)
