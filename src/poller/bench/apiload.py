"""``poller bench --api-load``: API reads during the measured window.

The API runs in the poller's event loop, so a slow request is time no device
is polled: a state filter that walked the fleet per row once held the loop
for 246 s at 30,000 devices. With ``--api-load`` a client thread of the bench
reads, in turn and over one keep-alive connection, what an operator's
dashboard reads:

- ``list``: ``GET /api/devices?limit=1000``, walking the fleet by cursor;
- ``filter``: ``GET /api/devices?state=auth_failed&limit=100`` (in the bench
  no device is auth_failed: the filter matches nothing, its worst case once);
- ``unpolled``: ``GET /api/devices?state=unpolled&limit=100``, walking by
  cursor (a state only Postgres knows: a bounded scan per request);
- ``device``: ``GET /api/devices/{cloud_id}`` of a device picked at random.

``--api-rate`` requests a second in all (0: back to back). The report gives
each kind's latency p50 / p99 / max beside the window's poll lateness.
"""

from __future__ import annotations

import argparse
import http.client
import math
import random
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson

from poller.simulator.fleet import cloud_id_for

LIST_LIMIT = 1000
_TIMEOUT_S = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-load", action="store_true",
                        help="read the API during the main window (device listings, a "
                        "state filter, single devices) and report their latency")
    parser.add_argument("--api-rate", type=_rate, default=10.0,
                        metavar="PER_S", help="API requests a second with --api-load, all "
                        "kinds together (default 10; 0: back to back)")


def _rate(text: str) -> float:
    """Requests a second: a finite number, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"expected 0 or a positive number, got {text!r}")
    return value


@dataclass(frozen=True, slots=True)
class ApiLatency:
    """One kind of request over the window."""

    kind: str
    path: str
    """An example path (cursors vary)."""
    requests: int
    errors: int
    """Answers other than 200, and failed connections."""
    p50_s: float | None
    p99_s: float | None
    max_s: float | None
    rows_per_answer: float | None
    """Devices per answer, on average."""


def _quantile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Kind:
    __slots__ = ("cursor", "errors", "example", "name", "rows", "seconds")

    def __init__(self, name: str, example: str) -> None:
        self.name = name
        self.example = example
        self.cursor = 0
        self.seconds: list[float] = []
        self.errors = 0
        self.rows = 0

    def result(self) -> ApiLatency:
        ordered = sorted(self.seconds)
        n = len(ordered)
        return ApiLatency(self.name, self.example, n + self.errors, self.errors,
                          _quantile(ordered, 0.5), _quantile(ordered, 0.99),
                          ordered[-1] if ordered else None, self.rows / n if n else None)


class ApiLoad:
    """A thread reading the API of one ``serve`` (base URL ``api``, a fleet of
    ``devices`` simulated devices) from :meth:`start` until :meth:`stop`,
    which returns the latencies by kind."""

    def __init__(self, api: str, *, devices: int, rate_per_s: float, seed: int = 0) -> None:
        parts = urlsplit(api)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 80
        self._devices = devices
        self._period_s = 1.0 / rate_per_s if rate_per_s > 0 else 0.0
        self._random = random.Random(seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-api-load", daemon=True)
        self._kinds = [
            _Kind("list", f"/api/devices?limit={LIST_LIMIT}"),
            _Kind("filter", "/api/devices?state=auth_failed&limit=100"),
            _Kind("unpolled", "/api/devices?state=unpolled&limit=100"),
            _Kind("device", f"/api/devices/{cloud_id_for(0)}"),
        ]
        self._conn: http.client.HTTPConnection | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> list[ApiLatency]:
        self._stop.set()
        self._thread.join(_TIMEOUT_S + 5.0)
        return [kind.result() for kind in self._kinds]

    def _path(self, kind: _Kind) -> str:
        if kind.name == "list":
            return f"/api/devices?limit={LIST_LIMIT}&after={kind.cursor}"
        if kind.name == "unpolled":
            return f"/api/devices?state=unpolled&limit=100&after={kind.cursor}"
        if kind.name == "device":
            return f"/api/devices/{cloud_id_for(self._random.randrange(self._devices))}"
        return kind.example

    def _run(self) -> None:
        next_at = time.monotonic()
        turn = 0
        try:
            while not self._stop.is_set():
                kind = self._kinds[turn % len(self._kinds)]
                turn += 1
                self._one(kind)
                if self._period_s:
                    next_at += self._period_s
                    self._stop.wait(max(0.0, next_at - time.monotonic()))
        finally:
            if self._conn is not None:
                self._conn.close()

    def _one(self, kind: _Kind) -> None:
        path = self._path(kind)
        began = time.perf_counter()
        try:
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self._host, self._port,
                                                        timeout=_TIMEOUT_S)
            self._conn.request("GET", path)
            resp = self._conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException):
            kind.errors += 1
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            return
        elapsed = time.perf_counter() - began
        if resp.status != 200:
            kind.errors += 1
            return
        kind.seconds.append(elapsed)
        doc = orjson.loads(body)
        if "devices" in doc:
            kind.rows += len(doc["devices"])
            # Walk on; at the end of the fleet, start again from the first device.
            kind.cursor = doc["next_after"] or 0
        else:
            kind.rows += 1
