"""The failover gap of ``poller bench --instances N --kill-one``.

One cluster instance is killed with SIGKILL in the middle of the window; the
survivors take its devices over once its lease ends. What counts is what the
devices saw, so the gap is measured on the simulator's record of poll
arrivals, per device the dead instance polled: the longest stretch without a
poll from its last arrival before the kill to the end of the window, and
whether a survivor polled it within two intervals of the death (the
cluster's promise, issue 18).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import quote

from poller.bench.children import BenchError, http_json

ARRIVALS_KEPT = 64
"""The simulator keeps this many arrivals per device (``SimulatorConfig``)."""
MAX_INTERVALS_AFTER_KILL = 48
"""The kill comes at most this many intervals before the window's end, so the
simulator's ring still holds each device's last arrival before it."""
WITHIN_INTERVALS = 2.0


@dataclass(frozen=True, slots=True)
class DeviceGap:
    """One device of the killed instance: its longest unpolled stretch around
    the kill, and when it was polled again (None: never, in the window)."""

    cloud_id: str
    gap_s: float
    repolled_after_s: float | None


@dataclass(frozen=True, slots=True)
class Failover:
    """What the killed instance's devices saw."""

    instances: int
    killed: str
    """Instance id of the member killed with SIGKILL."""
    killed_at_s: float
    """Seconds into the measured window."""
    observed_s: float
    """From the kill to the end of the window."""
    interval_s: float
    heartbeat_s: float
    lease_s: float
    devices: int
    """Devices the killed instance polled just before the kill."""
    gap_max_s: float
    gap_p99_s: float
    gap_max_intervals: float
    gap_p99_intervals: float
    worst_device: str
    repolled_within_2_intervals: int
    not_repolled: int
    """Devices no survivor polled before the window ended."""
    repolled_after_max_s: float | None
    """The latest first poll after the kill, over the devices polled again."""


def device_gap(cloud_id: str, arrivals: Iterable[float], killed_at: float,
               until: float) -> DeviceGap:
    """The gap of one device from its arrivals (wall times).

    >>> g = device_gap("f00001", [1.0, 3.0, 5.0, 9.5, 11.5], killed_at=6.0, until=12.0)
    >>> g.gap_s, g.repolled_after_s
    (4.5, 3.5)
    >>> device_gap("f00002", [4.0], killed_at=6.0, until=12.0).gap_s  # never again
    8.0
    """
    times = sorted(arrivals)
    before = [t for t in times if t < killed_at]
    if not before:
        raise BenchError(f"{cloud_id}: no poll before the kill in the simulator's record "
                         f"(it keeps {ARRIVALS_KEPT} per device)")
    after = [t for t in times if killed_at <= t <= until]
    points = [before[-1], *after, until]
    gap = max(b - a for a, b in itertools.pairwise(points))
    return DeviceGap(cloud_id, gap, after[0] - killed_at if after else None)


def summarize(gaps: list[DeviceGap], *, instances: int, killed: str, killed_at_s: float,
              observed_s: float, interval_s: float, heartbeat_s: float,
              lease_s: float) -> Failover:
    """The gaps as max and p99 (nearest rank), in seconds and in intervals."""
    if not gaps:
        raise BenchError(f"the killed instance {killed} polled no devices")
    by_gap = sorted(gaps, key=lambda g: g.gap_s)
    worst = by_gap[-1]
    p99 = by_gap[max(0, math.ceil(0.99 * len(by_gap)) - 1)].gap_s
    again = [g.repolled_after_s for g in gaps if g.repolled_after_s is not None]
    return Failover(
        instances=instances, killed=killed, killed_at_s=killed_at_s, observed_s=observed_s,
        interval_s=interval_s, heartbeat_s=heartbeat_s, lease_s=lease_s, devices=len(gaps),
        gap_max_s=worst.gap_s, gap_p99_s=p99, gap_max_intervals=worst.gap_s / interval_s,
        gap_p99_intervals=p99 / interval_s, worst_device=worst.cloud_id,
        repolled_within_2_intervals=sum(a <= WITHIN_INTERVALS * interval_s for a in again),
        not_repolled=len(gaps) - len(again),
        repolled_after_max_s=max(again) if again else None)


def owned(api: str) -> list[str]:
    """The cloud ids one instance polls: its pool's devices in state ok (the
    bench injects no faults, so that is all of them)."""
    found: list[str] = []
    after = 0
    while True:
        page = http_json(f"{api}/api/devices?state=ok&limit=1000&after={after}")
        found.extend(d["cloud_id"] for d in page["devices"])
        if page["next_after"] is None:
            return found
        after = int(page["next_after"])


def arrivals(sim_url: str, cloud_ids: Iterable[str]) -> Mapping[str, list[float]]:
    """The simulator's kept arrivals of each device (one request each)."""
    return {cid: [float(t) for t in http_json(
        f"{sim_url}/_sim/arrivals?id={quote(cid)}")["arrivals"]] for cid in cloud_ids}


def render(f: Failover) -> list[str]:
    """The report's lines."""
    within = f.repolled_within_2_intervals
    again = "-" if f.repolled_after_max_s is None else f"{f.repolled_after_max_s:.2f} s"
    return [
        f"  SIGKILL to {f.killed} (1 of {f.instances}) {f.killed_at_s:.1f} s into the window; "
        f"{f.observed_s:.1f} s watched after it",
        f"  cluster heartbeat {f.heartbeat_s:g} s, lease {f.lease_s:g} s, "
        f"interval {f.interval_s:g} s",
        f"  its devices: {f.devices:,}; polled again within 2 intervals: {within:,} "
        f"({within / f.devices:.2%}), never: {f.not_repolled:,}; latest first poll "
        f"after the kill {again}",
        f"  largest gap per device, max / p99: {f.gap_max_s:.2f} s / {f.gap_p99_s:.2f} s "
        f"= {f.gap_max_intervals:.2f} / {f.gap_p99_intervals:.2f} intervals "
        f"(worst {f.worst_device})",
    ]
