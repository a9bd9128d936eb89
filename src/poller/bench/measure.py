"""What the bench reads: CPU and memory of processes from /proc, and the
poller's Prometheus exposition turned into counters and histogram deltas.

Process CPU is user+sys time of the process itself (children excluded), read
from ``/proc/PID/stat``; a process tree (Postgres: the postmaster and its
backends) sums the living members plus what the root has reaped, so a
backend that exits inside the window is still counted.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
_PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (which may hold spaces)."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # Field 3 (state) is the first after the closing parenthesis.
    return raw[raw.rindex(")") + 2:].split()


def process_cpu_s(pid: int, *, reaped_children: bool = False) -> float | None:
    """User+sys seconds of ``pid``; with ``reaped_children`` also the time of
    children it has waited for. None when the process is gone."""
    f = _stat_fields(pid)
    if f is None:
        return None
    # After the name: state ppid pgrp session tty tpgid flags minflt cminflt
    # majflt cmajflt utime stime cutime cstime -> utime is index 11.
    ticks = int(f[11]) + int(f[12])
    if reaped_children:
        ticks += int(f[13]) + int(f[14])
    return ticks * _TICK_S


def _parents() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            f = _stat_fields(int(entry.name))
            if f is not None:
                parents[int(entry.name)] = int(f[1])
    return parents


def descendants(root: int) -> list[int]:
    """Living descendants of ``root`` (not including it)."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        children.setdefault(ppid, []).append(pid)
    found: list[int] = []
    todo = list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def tree_cpu_s(root: int) -> float | None:
    """User+sys seconds of ``root``, its living descendants and the children
    it reaped. None when the root is gone."""
    total = process_cpu_s(root, reaped_children=True)
    if total is None:
        return None
    for pid in descendants(root):
        total += process_cpu_s(pid) or 0.0
    return total


def rss_bytes(pid: int) -> int | None:
    """Resident set size (VmRSS) of ``pid``, or None when it is gone."""
    try:
        text = (_PROC / str(pid) / "status").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


# -- the poller's /metrics ------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Histogram:
    """A Prometheus histogram: upper bounds (ascending, last +Inf) and the
    cumulative count at each."""

    bounds: tuple[float, ...]
    cumulative: tuple[float, ...]

    @property
    def count(self) -> float:
        return self.cumulative[-1] if self.cumulative else 0.0

    def minus(self, earlier: Histogram) -> Histogram:
        """The observations made after ``earlier`` (same bounds)."""
        if earlier.bounds != self.bounds:
            raise ValueError("histograms with different buckets")
        return Histogram(self.bounds, tuple(a - b for a, b in
                                            zip(self.cumulative, earlier.cumulative, strict=True)))

    def quantile(self, q: float) -> float | None:
        """Quantile by linear interpolation inside its bucket, as Prometheus'
        ``histogram_quantile`` does; None when empty. A quantile in the +Inf
        bucket answers the highest finite bound (a lower limit)."""
        total = self.count
        if total <= 0:
            return None
        rank = q * total
        lower_bound, lower_count = 0.0, 0.0
        for bound, cum in zip(self.bounds, self.cumulative, strict=True):
            if cum >= rank and cum > lower_count:
                if bound == float("inf"):
                    return lower_bound
                share = (rank - lower_count) / (cum - lower_count)
                return lower_bound + (bound - lower_bound) * share
            lower_bound, lower_count = bound, cum
        return lower_bound

    def fraction_within(self, limit: float) -> float | None:
        """Share of observations at or below ``limit``, which must be a bound."""
        if self.count <= 0:
            return None
        return self.cumulative[self.bounds.index(limit)] / self.count

    def highest_bucket(self) -> float | None:
        """Upper bound of the highest non-empty bucket (None when empty)."""
        if self.count <= 0:
            return None
        return next(b for b, c in zip(self.bounds, self.cumulative, strict=True)
                    if c >= self.count)


@dataclass(frozen=True, slots=True)
class Scrape:
    """One reading of ``/metrics``: counter and gauge values by sample name and
    labels, and the histograms by family name."""

    values: Mapping[tuple[str, tuple[tuple[str, str], ...]], float]
    histograms: Mapping[str, Histogram]

    def value(self, name: str, **labels: str) -> float:
        return self.values.get((name, tuple(sorted(labels.items()))), 0.0)

    def total(self, name: str, **match: str) -> float:
        """Sum of every sample of ``name`` whose labels include ``match``."""
        want = set(match.items())
        return sum(v for (n, labels), v in self.values.items()
                   if n == name and want <= set(labels))


def parse_metrics(text: str) -> Scrape:
    """Parse the Prometheus text format into a :class:`Scrape`."""
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    histograms: dict[str, Histogram] = {}
    for family in text_string_to_metric_families(text):
        buckets: list[tuple[float, float]] = []
        for sample in family.samples:
            if family.type == "histogram" and sample.name.endswith("_bucket"):
                buckets.append((float(sample.labels["le"]), float(sample.value)))
                continue
            values[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
        if buckets:
            buckets.sort()
            histograms[family.name] = Histogram(tuple(b for b, _ in buckets),
                                                tuple(c for _, c in buckets))
    return Scrape(values, histograms)

