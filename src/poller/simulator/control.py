"""The control API under ``/_sim/``, on the devices' own port.

It has no authentication: the simulator is a test tool and binds loopback
(127.0.0.1) unless told otherwise. All answers are JSON.

- ``GET /_sim/stats``: request counters by outcome, open connections.
- ``GET /_sim/jitter``: :meth:`Records.jitter_report`.
- ``GET /_sim/served?offset=N``: served readings from position N
  (``{"fields": [...], "offset": N, "next": M, "readings": [[...], ...]}``).
- ``GET /_sim/arrivals?id=f00001``: kept poll arrival times of one device.
- ``GET /_sim/faults``: forced cloud ids per fault kind and the rates.
- ``POST /_sim/faults``: e.g. ``{"auth": ["f00001"], "hang": [],
  "timestamp_max": ["f00002"], "rates": {"http_5xx": 0.01}}``; each kind
  named (faults.Fault, poison and totals-only kinds too) replaces that kind's
  set, each rate named replaces that rate, the rest stays. Answers the new
  state.
- ``POST /_sim/reset``: forget records and counters; with ``{"faults": true}``
  also clear all forced faults and rates.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qs

import orjson

from poller.simulator.faults import Fault
from poller.simulator.gateway import CONTROL, Gateway
from poller.simulator.records import ServedReading

PREFIX = b"/_sim/"
_KINDS = {kind.value: kind for kind in Fault}


class ControlApi:
    __slots__ = ("_connections", "_gateway")

    def __init__(self, gateway: Gateway, connections: Callable[[], int]) -> None:
        self._gateway = gateway
        self._connections = connections

    def handle(self, method: bytes, url: bytes, body: bytes) -> tuple[int, bytes]:
        """Status and JSON body for one control request."""
        self._gateway.counts[CONTROL] += 1
        path, _, query = url.partition(b"?")
        name = path[len(PREFIX):].decode("latin-1").rstrip("/")
        params = parse_qs(query.decode("latin-1"))
        try:
            if method == b"GET":
                result = self._get(name, params)
            elif method == b"POST":
                result = self._post(name, orjson.loads(body) if body.strip() else {})
            else:
                return 405, orjson.dumps({"error": "GET or POST only"})
        except (ValueError, TypeError, KeyError) as exc:
            return 400, orjson.dumps({"error": str(exc)})
        if result is None:
            return 404, orjson.dumps({"error": f"no control endpoint {name!r}"})
        return 200, orjson.dumps(result)

    def _get(self, name: str, params: dict[str, list[str]]) -> object | None:
        gateway = self._gateway
        if name == "stats":
            return {
                **gateway.stats(),
                "connections": self._connections(),
                "devices_active": len(gateway.fleet),
                "fleet_size": gateway.fleet.size,
            }
        if name == "jitter":
            return gateway.records.jitter_report()
        if name == "served":
            offset = int(params.get("offset", ["0"])[0])
            readings = gateway.records.served(offset)
            return {
                "fields": list(ServedReading._fields),
                "offset": offset,
                "next": offset + len(readings),
                "readings": [list(r) for r in readings],
            }
        if name == "arrivals":
            cloud_id = params["id"][0].lower()
            return {"cloud_id": cloud_id, "arrivals": gateway.records.arrivals(cloud_id)}
        if name == "faults":
            return gateway.faults.snapshot()
        return None

    def _post(self, name: str, payload: object) -> object | None:
        if not isinstance(payload, dict):
            raise ValueError("the body must be a JSON object")
        gateway = self._gateway
        if name == "faults":
            unknown = set(payload) - set(_KINDS) - {"rates"}
            if unknown:
                raise ValueError(f"unknown fault kinds {sorted(unknown)}")
            rates = gateway.faults.rates.replaced(payload.get("rates", {}))
            for key, ids in payload.items():
                if key != "rates":
                    if not isinstance(ids, list):
                        raise TypeError(f"{key} must be a list of cloud ids")
                    gateway.faults.force(_KINDS[key], (str(i) for i in ids))
            gateway.faults.set_rates(rates)
            return gateway.faults.snapshot()
        if name == "reset":
            gateway.records.reset()
            gateway.reset_stats()
            if payload.get("faults"):
                gateway.faults.clear()
            return {"reset": True}
        return None
