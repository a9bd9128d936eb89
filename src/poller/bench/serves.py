"""The ``poller serve`` processes of one bench run: one, n shards or n
cluster instances.

With ``--shards n`` the bench starts n instances, each with ``polling.shard
= k/n``, its own instance id and state directory (its spool) and the bench's
sealing key, all on the same Postgres, Redis and S3. ``--instances n`` starts
n members of one cluster (``[cluster]``, a name of this run's own) instead,
which split the fleet by themselves. What the bench reports for "the poller"
is then the sum over the instances: CPU, RSS, counters and histograms (merged
bucket by bucket), devices polled. An instance the bench killed counts with
what it had done at its last scrape before the kill.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from poller.bench import failover
from poller.bench.children import BenchError, Child, http_json, http_text, wait_http
from poller.bench.measure import Histogram, Scrape, parse_metrics, process_cpu_s, rss_bytes

_COUNTED = ("_total", "_count", "_sum")


def shard_dir(state_dir: Path, k: int) -> Path:
    """The state directory (spool) of shard ``k`` under the bench's."""
    return state_dir / f"shard-{k}"


def shard_env(base: Mapping[str, str], state_dir: Path, k: int, n: int,
              key: str) -> dict[str, str]:
    """The environment of shard ``k`` of ``n``: ``key`` is the encoded sealing
    key of the registry's secrets (in the environment, never on a command line)."""
    env = dict(base)
    env.update({
        "POLLER_POLLING_SHARD": f"{k}/{n}",
        "POLLER_INSTANCE_ID": f"bench-shard-{k}",
        "POLLER_STATE_DIR": str(shard_dir(state_dir, k)),
        "POLLER_SECRET_KEY": key,
    })
    return env


def member_dir(state_dir: Path, k: int) -> Path:
    """The state directory (spool) of cluster instance ``k`` under the bench's."""
    return state_dir / f"instance-{k}"


def member_env(base: Mapping[str, str], state_dir: Path, k: int, key: str, *,
               cluster: str, heartbeat_s: float, lease_s: float) -> dict[str, str]:
    """The environment of cluster instance ``k`` of the cluster ``cluster``."""
    env = dict(base)
    env.update({
        "POLLER_CLUSTER_ENABLED": "true",
        "POLLER_CLUSTER_NAME": cluster,
        "POLLER_CLUSTER_HEARTBEAT_S": f"{heartbeat_s:g}",
        "POLLER_CLUSTER_LEASE_S": f"{lease_s:g}",
        "POLLER_POLLING_SHARD": "",
        "POLLER_INSTANCE_ID": f"bench-instance-{k}",
        "POLLER_STATE_DIR": str(member_dir(state_dir, k)),
        "POLLER_SECRET_KEY": key,
    })
    return env


@dataclass(frozen=True, slots=True)
class Killed:
    """An instance the bench killed: what it polled and had counted just before."""

    child: Child
    instance_id: str
    devices: list[str]
    """Cloud ids it polled."""
    at_wall: float
    """Wall time once it was reaped."""


def merge_scrapes(scrapes: list[Scrape]) -> Scrape:
    """One scrape as if one process had counted everything: values summed by
    name and labels, histograms summed bucket by bucket."""
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    histograms: dict[str, Histogram] = {}
    for scrape in scrapes:
        for key, value in scrape.values.items():
            values[key] = values.get(key, 0.0) + value
        for name, hist in scrape.histograms.items():
            have = histograms.get(name)
            if have is None:
                histograms[name] = hist
            elif have.bounds != hist.bounds:
                raise BenchError(f"the shards report {name} with different buckets")
            else:
                histograms[name] = Histogram(have.bounds, tuple(
                    a + b for a, b in zip(have.cumulative, hist.cumulative, strict=True)))
    return Scrape(values, histograms)


def merge_fleets(fleets: list[dict[str, Any]]) -> dict[str, Any]:
    """``/api/fleet`` of the shards as one: devices and outcome counts summed,
    the largest lateness."""
    outcomes: dict[str, int] = {}
    for fleet in fleets:
        for outcome, n in fleet["polls_by_outcome"].items():
            outcomes[outcome] = outcomes.get(outcome, 0) + n
    return {
        "devices": sum(f["devices"] for f in fleets),
        "polls_by_outcome": outcomes,
        "lateness_max_s": max(f["lateness_max_s"] for f in fleets),
    }


class Serves:
    """The running instances of one fleet size and their API base URLs."""

    def __init__(self, children: list[Child]) -> None:
        self.children = children  # the live ones
        self.started = list(children)  # and the killed ones
        self.apis: list[str] = []
        self.killed: list[Killed] = []
        # The killed instances' last counts, so the sums do not fall back.
        self._gone_scrapes: list[Scrape] = []
        self._gone_fleets: list[dict[str, Any]] = []
        self._gone_cpu_s = 0.0

    @property
    def pids(self) -> list[int]:
        return [c.pid for c in self.children]

    def kill_last(self) -> Killed:
        """SIGKILL (by pid) the last live instance, after reading what it polls
        and what it has counted. Never the first: it stands for all in a
        profile or the API load."""
        if len(self.children) < 2:
            raise BenchError("--kill-one needs a second instance to take over")
        child, api = self.children[-1], self.apis[-1]
        devices = failover.owned(api)
        scrape = parse_metrics(http_text(api + "/metrics"))
        fleet = http_json(api + "/api/fleet")
        cpu = process_cpu_s(child.pid)
        child.proc.send_signal(signal.SIGKILL)
        child.proc.wait()
        killed = Killed(child, str(fleet["instance_id"]), devices, time.time())
        del self.children[-1], self.apis[-1]
        self.killed.append(killed)
        # Its counts stay in the sums; its gauges (devices, expected polls per
        # second) are the survivors' now.
        self._gone_scrapes.append(Scrape(
            {key: v for key, v in scrape.values.items() if key[0].endswith(_COUNTED)},
            scrape.histograms))
        self._gone_fleets.append({**fleet, "devices": 0})
        self._gone_cpu_s += cpu or 0.0
        return killed

    def wait_ready(self, devices: int, timeout_s: float) -> None:
        """Until every instance serves its API and together they poll ``devices``."""
        self.apis = [f"http://127.0.0.1:{c.api_port(timeout_s)}" for c in self.children]
        deadline = time.monotonic() + timeout_s
        for child, api in zip(self.children, self.apis, strict=True):
            wait_http(api + "/api/fleet", child, timeout_s)
        while (polled := self.fleet()["devices"]) != devices:
            if time.monotonic() > deadline:
                raise BenchError(f"serve polls {polled} devices, expected {devices}")
            time.sleep(0.5)
            self.check_alive()

    def check_alive(self) -> None:
        for child in self.children:
            child.check_alive()

    def scrape(self) -> Scrape:
        return merge_scrapes([parse_metrics(http_text(api + "/metrics")) for api in self.apis]
                             + self._gone_scrapes)

    def fleet(self) -> dict[str, Any]:
        return merge_fleets([http_json(api + "/api/fleet") for api in self.apis]
                            + self._gone_fleets)

    def cpu_s(self) -> float | None:
        times = [process_cpu_s(pid) for pid in self.pids]
        return None if any(t is None for t in times) \
            else sum(t for t in times if t) + self._gone_cpu_s

    def rss_bytes(self) -> int | None:
        sizes = [rss_bytes(pid) for pid in self.pids]
        return None if any(s is None for s in sizes) else sum(s for s in sizes if s)
