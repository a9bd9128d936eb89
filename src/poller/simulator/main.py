"""Simulator lifecycle: configuration, start/stop, and the CLI entry."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from poller import heap
from poller.simulator.control import ControlApi
from poller.simulator.faults import Fault, FaultPlan, FaultRates
from poller.simulator.fleet import DEFAULT_ID_OFFSET, Fleet, cloud_id_for
from poller.simulator.gateway import Gateway
from poller.simulator.records import Records, ServedReading
from poller.simulator.server import HttpConnection


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """Everything a simulator run needs; built once at the edge."""

    host: str = "127.0.0.1"
    """Loopback by default: the control API has no authentication."""
    port: int = 0
    """0 picks a free port; :meth:`Simulator.start` returns the bound one."""
    devices: int = 1000
    id_offset: int = DEFAULT_ID_OFFSET
    """Device i has cloud id ``f"{id_offset + i:06x}"``."""
    seed: int = 0
    interval_s: float | None = None
    """Expected poll interval per device, for the jitter histogram."""
    negative_fraction: float = 0.2
    """Share of devices whose demand also goes negative (solar export)."""
    http10_fraction: float = 0.0
    """Share of devices answering HTTP/1.0, text/html, Connection: close."""
    fault_rates: FaultRates = field(default_factory=FaultRates)
    slow_delay_s: float = 3.0
    """How late a ``slow`` answer comes."""
    record_served: bool = False
    arrivals_kept: int = 64
    backlog: int = 4096

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is out of range")
        if self.devices < 1:
            raise ValueError("devices must be at least 1")
        cloud_id_for(self.devices - 1, self.id_offset)
        for name in ("negative_fraction", "http10_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value!r} is not within [0, 1]")
        if self.interval_s is not None and self.interval_s <= 0:
            raise ValueError("interval_s must be positive")
        if self.slow_delay_s < 0:
            raise ValueError("slow_delay_s must not be negative")


class Simulator:
    """A fleet of simulated EAGLE gateways behind one HTTP port.

    Example::

        sim = Simulator(SimulatorConfig(devices=10, record_served=True))
        port = await sim.start()
        ...  # poll http://127.0.0.1:{port}/cgi-bin/post_manager
        readings = sim.served()
        await sim.stop()
    """

    def __init__(self, cfg: SimulatorConfig) -> None:
        self.cfg = cfg
        self.fleet = Fleet(
            cfg.devices, cfg.id_offset, cfg.seed, cfg.negative_fraction, cfg.http10_fraction
        )
        self.faults = FaultPlan(cfg.fault_rates)
        self.records = Records(cfg.interval_s, cfg.arrivals_kept, cfg.record_served)
        self.gateway = Gateway(self.fleet, self.faults, self.records)
        self._connections: set[HttpConnection] = set()
        self._control = ControlApi(self.gateway, lambda: len(self._connections))
        self._server: asyncio.Server | None = None
        self.port: int | None = None

    async def start(self) -> int:
        """Listen and return the bound port."""
        if self._server is not None:
            raise RuntimeError("simulator already started")
        loop = asyncio.get_running_loop()
        cfg = self.cfg

        def factory() -> HttpConnection:
            return HttpConnection(self.gateway, self._control, self._connections, cfg.slow_delay_s)

        self._server = await loop.create_server(
            factory, cfg.host, cfg.port, backlog=cfg.backlog, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        """Stop listening, then drop every open connection. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for conn in list(self._connections):
            conn.close()
        await server.wait_closed()

    def cloud_ids(self) -> list[str]:
        return [cloud_id_for(i, self.cfg.id_offset) for i in range(self.cfg.devices)]

    def set_faults(
        self, forced: Mapping[Fault, Iterable[str]] | None = None,
        rates: Mapping[str, float] | None = None,
    ) -> None:
        """Replace the forced device sets of the kinds named, and the rates named."""
        new_rates = self.faults.rates.replaced(rates or {})
        for kind, ids in (forced or {}).items():
            self.faults.force(kind, ids)
        self.faults.set_rates(new_rates)

    def served(self, offset: int = 0) -> list[ServedReading]:
        return self.records.served(offset)

    def arrivals(self, cloud_id: str) -> list[float]:
        return self.records.arrivals(cloud_id)

    def jitter_report(self) -> dict[str, object]:
        return self.records.jitter_report()

    def stats(self) -> dict[str, int]:
        return {**self.gateway.stats(), "connections": len(self._connections)}

    def reset(self, faults: bool = False) -> None:
        """Forget records and counters (and all faults if ``faults``)."""
        self.records.reset()
        self.gateway.reset_stats()
        if faults:
            self.faults.clear()


async def freeze_as_the_fleet_grows(sim: Simulator, period_s: float = 5.0) -> None:
    """Keep the simulator's devices out of the cyclic GC (see poller.heap).

    Devices are built on their first request, so the heap is frozen again
    whenever the fleet has grown since the last look: at 100k devices a full
    collection of the simulator's heap took 160 ms, a stall every poller in
    flight waited through. No collection first (that would be the same
    stall): the simulator makes few reference cycles."""
    seen = 0
    while True:
        await asyncio.sleep(period_s)
        if len(sim.fleet) > seen:
            seen = len(sim.fleet)
            heap.freeze(f"{seen} simulated devices", collect=False)


async def run_simulator(cfg: SimulatorConfig, ready: Callable[[int], None] | None = None) -> None:
    """Serve until cancelled; ``ready`` gets the bound port once listening."""
    sim = Simulator(cfg)
    port = await sim.start()
    try:
        if ready is not None:
            ready(port)
        await asyncio.Future()
    finally:
        await sim.stop()
