"""The ``poller serve`` processes of one bench run: one, or n shards.

With ``--shards n`` the bench starts n instances, each with ``polling.shard
= k/n``, its own instance id and state directory (its spool) and the bench's
sealing key, all on the same Postgres, Redis and S3. What the bench reports
for "the poller" is then the sum over the instances: CPU, RSS, counters and
histograms (merged bucket by bucket), devices polled.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from poller.bench.children import BenchError, Child, http_json, http_text, wait_http
from poller.bench.measure import Histogram, Scrape, parse_metrics, process_cpu_s, rss_bytes


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
        self.children = children
        self.apis: list[str] = []

    @property
    def pids(self) -> list[int]:
        return [c.pid for c in self.children]

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
        return merge_scrapes([parse_metrics(http_text(api + "/metrics")) for api in self.apis])

    def fleet(self) -> dict[str, Any]:
        return merge_fleets([http_json(api + "/api/fleet") for api in self.apis])

    def cpu_s(self) -> float | None:
        times = [process_cpu_s(pid) for pid in self.pids]
        return None if any(t is None for t in times) else sum(t for t in times if t)

    def rss_bytes(self) -> int | None:
        sizes = [rss_bytes(pid) for pid in self.pids]
        return None if any(s is None for s in sizes) else sum(s for s in sizes if s)
