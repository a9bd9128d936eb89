"""``poller bench --soak-hours H``: does the poller's memory stay flat for hours?

One fleet (``--devices``, 10,000 by default) is polled for H hours by one
``poller serve`` (or ``--shards`` of them) against the simulator on the same
machine. Every ``--soak-rss-every`` seconds (60) the bench reads the RSS of
the serve process(es) and the counters of ``/metrics``, and prints a line.
At the end it reports what the ordinary bench does for the whole soak
(readings stored per tick, ticks skipped, lateness, CPU) and the RSS trend
after ``--soak-settle`` seconds (the first hour: caches fill, partitions are
made, the allocator's heaps reach their working size). Let the window take
in the upload of at least one whole hour's segment (tens of MB at 10,000
devices): a process whose allocator keeps the freed upload buffers grows by
that much at once.

- the least-squares slope of RSS over time, in bytes an hour;
- the same slope over the first and the last half of that span: growth that
  is levelling off has a last half well below the first; a leak has both
  alike.

With ``--soak-snapshots MINUTES`` the bench asks serve for a heap census
(SIGUSR2, see :mod:`poller.memtrace`) every MINUTES and at the end, and the
report compares the first one after the settle span with the last: live
objects by type, Python's allocated blocks, malloc's bytes in use and held.
With ``--soak-tracemalloc FRAMES`` serve also traces its heap
(``PYTHONTRACEMALLOC``) and each census comes with a tracemalloc snapshot; the
report lists the lines that grew most. Tracing costs several times the
poller's CPU and memory of its own: trace a smaller fleet, and read the RSS
slope of a traced run with that in mind.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
import statistics
import sys
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from poller import argtypes, memtrace
from poller.bench import storage
from poller.bench.children import BenchError, http_json
from poller.bench.report import FleetRun, Sample, run_table

if TYPE_CHECKING:
    from poller.bench.run import _Bench
    from poller.bench.serves import Serves

HOUR_S = 3600.0
MB = 1_000_000
GOAL_BYTES_PER_H = 0.5 * MB
"""The issue's goal: at most 0.5 MB an hour at 10,000 devices."""
_CHECK_EVERY_S = 5.0
_SNAPSHOT_WAIT_S = 120.0


def hours(text: str) -> float:
    """A positive, finite number of hours."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of hours, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a positive number of hours, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("soak (memory over hours)")
    g.add_argument("--soak-hours", type=hours, default=None, metavar="HOURS",
                   help="run one fleet for HOURS and report the RSS slope per hour after "
                   "--soak-settle (instead of the throughput bench)")
    g.add_argument("--soak-settle", type=argtypes.seconds, default=HOUR_S, metavar="SECONDS",
                   help="RSS before this is shown but left out of the slope (default 3600)")
    g.add_argument("--soak-rss-every", type=argtypes.seconds, default=60.0, metavar="SECONDS",
                   help="how often to read RSS and /metrics during a soak (default 60)")
    g.add_argument("--soak-snapshots", type=argtypes.seconds, default=None,
                   metavar="MINUTES", help="a heap census of serve every MINUTES and at the "
                   "end (SIGUSR2); the report compares them")
    g.add_argument("--soak-tracemalloc", type=argtypes.count, default=None, metavar="FRAMES",
                   help="serve traces its heap (PYTHONTRACEMALLOC=FRAMES); each census comes "
                   "with a snapshot and the report diffs them by file:line")


# -- the trend ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RssPoint:
    t_s: float
    """Seconds since the soak's window began (after the warm-up)."""
    rss_bytes: int


@dataclass(frozen=True, slots=True)
class RssTrend:
    settle_s: float
    points: int
    """Samples at or after ``settle_s``: the ones the slopes use."""
    span_s: float
    slope_bytes_per_h: float | None
    first_half_bytes_per_h: float | None
    last_half_bytes_per_h: float | None
    rss_at_settle_bytes: int | None
    rss_at_end_bytes: int | None
    verdict: str
    """``flat`` (slope within the goal), ``levelling off`` (the last half
    grows at most half as fast as the first, or within the goal), ``growing``,
    or ``too short`` (fewer than 4 samples after the settle span)."""
    goal_bytes_per_h: float = GOAL_BYTES_PER_H


def least_squares_slope(points: Sequence[RssPoint]) -> float | None:
    """Slope of the least-squares line through ``points``, in bytes an hour;
    None for fewer than two points or no spread in time.

    >>> least_squares_slope([RssPoint(0, 100), RssPoint(1800, 150), RssPoint(3600, 200)])
    100.0
    """
    if len(points) < 2:
        return None
    xs = [p.t_s / HOUR_S for p in points]
    ys = [float(p.rss_bytes) for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def rss_trend(points: Sequence[RssPoint], settle_s: float, *,
              goal_bytes_per_h: float = GOAL_BYTES_PER_H) -> RssTrend:
    """The slope after ``settle_s`` and the plateau check (see the module)."""
    used = sorted((p for p in points if p.t_s >= settle_s), key=lambda p: p.t_s)
    if len(used) < 4:
        return RssTrend(settle_s, len(used), used[-1].t_s - used[0].t_s if used else 0.0,
                        least_squares_slope(used), None, None,
                        used[0].rss_bytes if used else None,
                        used[-1].rss_bytes if used else None, "too short", goal_bytes_per_h)
    mid = (used[0].t_s + used[-1].t_s) / 2
    first = [p for p in used if p.t_s <= mid]
    last = [p for p in used if p.t_s >= mid]
    slope = least_squares_slope(used)
    early, late = least_squares_slope(first), least_squares_slope(last)
    assert slope is not None
    if slope <= goal_bytes_per_h:
        verdict = "flat"
    elif late is not None and early is not None and (
            late <= goal_bytes_per_h or late <= early / 2):
        verdict = "levelling off"
    else:
        verdict = "growing"
    return RssTrend(settle_s, len(used), used[-1].t_s - used[0].t_s, slope, early, late,
                    used[0].rss_bytes, used[-1].rss_bytes, verdict, goal_bytes_per_h)


# -- the report --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SoakReport:
    config: dict[str, Any]
    run: FleetRun
    """The whole soak window, as the bench reports a window."""
    rss: list[RssPoint]
    trend: RssTrend
    snapshots: list[str] = field(default_factory=list)
    growers: list[memtrace.Growth] = field(default_factory=list)
    """Top places by growth (tracemalloc), first snapshot after the settle
    span to the last."""
    census: str | None = None
    """The same two moments compared by census (see poller.memtrace)."""
    notes: list[str] = field(default_factory=list)


def _mb(n: float | None, *, sign: bool = False) -> str:
    return "-" if n is None else f"{n / MB:{'+' if sign else ''}.2f} MB"


def render(report: SoakReport) -> str:
    t = report.trend
    run = report.run
    out = [f"\n== soak: {run.devices:,} devices for {_clock(run.elapsed_s)} ==",
           run_table(run), "\n== RSS of poller serve ==",
           f"  samples           {len(report.rss)} (every "
           f"{report.config['rss_every_s']:g} s), {t.points} after the first "
           f"{_clock(t.settle_s)}",
           f"  RSS               start {_mb(report.rss[0].rss_bytes if report.rss else None)}, "
           f"at settle {_mb(t.rss_at_settle_bytes)}, end {_mb(t.rss_at_end_bytes)}",
           f"  slope after settle  {_mb(t.slope_bytes_per_h, sign=True)}/h over "
           f"{_clock(t.span_s)}  (goal <= {_mb(t.goal_bytes_per_h)}/h)",
           f"  first / last half   {_mb(t.first_half_bytes_per_h, sign=True)}/h / "
           f"{_mb(t.last_half_bytes_per_h, sign=True)}/h",
           f"  verdict           {t.verdict}"]
    if report.census:
        out.append("\n== heap census ==")
        out.extend("  " + line for line in report.census.splitlines())
    if report.growers:
        out.append("\n== heap growth (tracemalloc), by file:line ==")
        out.extend("  " + line for line in memtrace.render(report.growers).splitlines())
    for note in report.notes:
        out.append(f"  note: {note}")
    return "\n".join(out) + "\n"


def write_json(report: SoakReport, path: Path) -> None:
    doc = dataclasses.asdict(report)
    doc["run"]["held"] = report.run.held
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))


def _clock(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# -- the run -----------------------------------------------------------------------

def run(bench: _Bench, args: argparse.Namespace) -> int:
    """Run the soak on ``bench`` (set up, never started); print and write the
    report. The caller's ``finally`` stops every child."""
    report = _Soak(bench, args).run()
    sys.stdout.write(render(report))
    write_json(report, bench.opts.json_path)
    _progress(f"results: {bench.opts.json_path}")
    return 0


def _progress(line: str) -> None:
    print(f"bench: {line}", file=sys.stderr, flush=True)


class _Soak:
    def __init__(self, bench: _Bench, args: argparse.Namespace) -> None:
        self.bench = bench
        self.duration_s: float = args.soak_hours * HOUR_S
        self.settle_s: float = args.soak_settle
        self.every_s: float = args.soak_rss_every
        self.frames: int | None = args.soak_tracemalloc
        every_min: float | None = args.soak_snapshots
        if every_min is None and self.frames is not None:
            every_min = 15.0
        self.snapshot_every_s = every_min * 60.0 if every_min is not None else None
        self.snapshots: list[tuple[float, Path]] = []
        self.censuses: list[tuple[float, Path]] = []
        self.notes: list[str] = []

    def run(self) -> SoakReport:
        from poller.bench.run import _countdown, _fleet_run, _sample

        bench, opts = self.bench, self.bench.opts
        devices = opts.devices
        bench._setup()
        _progress(f"soak: {devices:,} devices every {opts.interval_s:g} s for "
                  f"{_clock(self.duration_s)}: simulator (registering the fleet)")
        sim, sim_url = bench._simulator(devices, register=True)
        removed = storage.trim_registry(bench.database_url, devices)
        if removed:
            _progress(f"soak: removed {removed:,} device(s) of earlier runs from the registry")
        if self.frames is not None:
            # Only serve traces: the simulator's heap is not under test.
            bench.child_env = {**bench.child_env, "PYTHONTRACEMALLOC": str(self.frames)}
        serves = bench._start_serves("soak")
        serves.wait_ready(devices, 120.0 + devices / 1000)
        _countdown("soak: warm-up", opts.warmup_s, serves.check_alive)
        start = bench._snapshot(serves, sim, sim_url, reset=True)
        rss: list[RssPoint] = []
        series: list[Sample] = []
        self._sample_rss(serves, start.mono, rss)
        last, last_t = start.scrape, start.mono
        next_sample = start.mono + self.every_s
        next_trace = start.mono if self.snapshot_every_s is not None else math.inf
        end_at = start.mono + self.duration_s
        while (now := time.monotonic()) < end_at:
            time.sleep(max(0.0, min(_CHECK_EVERY_S, next_sample - now, end_at - now)))
            serves.check_alive()
            sim.check_alive()
            now = time.monotonic()
            if now >= next_trace:
                assert self.snapshot_every_s is not None
                self._snapshot(serves, now - start.mono)
                next_trace = now + self.snapshot_every_s
            if now < next_sample or now >= end_at:
                continue
            next_sample += self.every_s * max(1, math.ceil((now - next_sample) / self.every_s))
            scrape = serves.scrape()
            sample = _sample(now - start.mono, now - last_t, last, scrape)
            series.append(sample)
            last, last_t = scrape, now
            self._sample_rss(serves, start.mono, rss)
            self._show(now - start.mono, rss, sample, scrape)
        if self.snapshot_every_s is not None:
            self._snapshot(serves, time.monotonic() - start.mono)
        end = bench._snapshot(serves, sim, sim_url, reset=False)
        self._sample_rss(serves, start.mono, rss)
        jitter = http_json(sim_url + "/_sim/jitter")
        sim_requests = int(http_json(sim_url + "/_sim/stats")["requests"])
        k = math.floor((end.wall - start.wall) / opts.interval_s + 1e-9)
        stored = bench._stored_ticks(start.wall, start.wall + k * opts.interval_s, serves) \
            if k else 0
        for child in serves.children:
            bench._stop(child)
        bench._stop(sim)
        median_rss = int(statistics.median(p.rss_bytes for p in rss)) if rss else None
        fleet_run = _fleet_run(devices, opts.interval_s, start, end, series, median_rss,
                               jitter, sim_requests, k, stored)
        trend = rss_trend(rss, self.settle_s)
        growers = self._growth()
        census = self._census_diff()
        if self.snapshot_every_s is not None:
            self.notes.append("each heap census stalls serve's loop for a second or two")
        if self.frames is not None:
            self.notes.append("serve traced its heap (tracemalloc): its RSS and CPU include "
                              "the tracer's own")
        self.notes.append("RSS is VmRSS of the serve process(es), summed over shards; "
                          "1 MB = 10^6 bytes")
        return SoakReport(
            config={"devices": devices, "interval_s": opts.interval_s,
                    "duration_s": self.duration_s, "settle_s": self.settle_s,
                    "rss_every_s": self.every_s, "warmup_s": opts.warmup_s,
                    "snapshot_every_s": self.snapshot_every_s,
                    "tracemalloc_frames": self.frames, "shards": opts.shards,
                    "state_dir": str(bench.state_dir), "cpus": os.cpu_count(),
                    "load_avg_at_end": list(os.getloadavg()), "argv": sys.argv[1:]},
            run=fleet_run, rss=rss, trend=trend,
            snapshots=[str(p) for _, p in self.censuses + self.snapshots], growers=growers,
            census=census, notes=self.notes)

    def _sample_rss(self, serves: Serves, t0: float, into: list[RssPoint]) -> None:
        size = serves.rss_bytes()
        if size is not None:
            into.append(RssPoint(round(time.monotonic() - t0, 3), size))

    def _show(self, t_s: float, rss: list[RssPoint], sample: Sample, scrape: Any) -> None:
        trend = rss_trend(rss, self.settle_s)
        slope = "settling" if t_s < self.settle_s else \
            f"slope {_mb(trend.slope_bytes_per_h, sign=True)}/h"
        skipped = scrape.value("poller_skipped_ticks_total") + \
            scrape.value("poller_backpressure_skips_total")
        late = sample.lateness_p99_s
        _progress(f"soak: {_clock(t_s)} of {_clock(self.duration_s)}, RSS "
                  f"{_mb(rss[-1].rss_bytes if rss else None)}, {slope}, "
                  f"{sample.polls_ok_per_s:,.0f} polls/s, p99 lateness "
                  f"{'-' if late is None else f'{late * 1000:.0f} ms'}, "
                  f"{skipped:,.0f} ticks skipped since start, load "
                  f"{os.getloadavg()[0]:.1f}")

    def _snapshot(self, serves: Serves, t_s: float) -> None:
        """SIGUSR2 to the first serve, then wait for its new census (written
        after the tracemalloc snapshot, when there is one)."""
        directory = memtrace.snapshot_dir(self._serve_state_dir())

        def present(suffix: str) -> set[Path]:
            return set(directory.glob("*" + suffix)) if directory.is_dir() else set()

        before = present(memtrace.CENSUS_SUFFIX) | present(memtrace.SUFFIX)
        os.kill(serves.pids[0], signal.SIGUSR2)
        deadline = time.monotonic() + _SNAPSHOT_WAIT_S
        while time.monotonic() < deadline:
            serves.check_alive()
            census = present(memtrace.CENSUS_SUFFIX) - before
            if census:
                self.censuses.append((t_s, max(census)))
                traced = present(memtrace.SUFFIX) - before
                if traced:
                    self.snapshots.append((t_s, max(traced)))
                _progress(f"soak: heap census {max(census).name}"
                          + (f" and {max(traced).name}" if traced else ""))
                return
            time.sleep(0.5)
        raise BenchError(f"serve wrote no heap census to {directory} within "
                         f"{_SNAPSHOT_WAIT_S:.0f} s (see its log)")

    def _serve_state_dir(self) -> Path:
        from poller.bench.serves import shard_dir

        bench = self.bench
        return bench.state_dir if bench.opts.shards == 1 else shard_dir(bench.state_dir, 0)

    def _pair(self, taken: list[tuple[float, Path]]) -> tuple[Path, Path] | None:
        """The first file after the settle span (or the first) and the last."""
        if len(taken) < 2:
            return None
        after = [p for t, p in taken if t >= self.settle_s]
        first = after[0] if len(after) >= 2 else taken[0][1]
        return (first, taken[-1][1]) if first != taken[-1][1] else None

    def _growth(self) -> list[memtrace.Growth]:
        pair = self._pair(self.snapshots)
        if pair is None:
            return []
        first, last = pair
        try:
            old = tracemalloc.Snapshot.load(str(first))
            new = tracemalloc.Snapshot.load(str(last))
        except (OSError, EOFError, ValueError) as exc:
            self.notes.append(f"could not read the heap snapshots {first.name}, "
                              f"{last.name}: {exc}")
            return []
        self.notes.append(f"heap growth: {first.name} -> {last.name} "
                          "(python -m poller.memtrace OLD NEW --traceback for stacks)")
        return memtrace.growers(old, new)

    def _census_diff(self) -> str | None:
        pair = self._pair(self.censuses)
        if pair is None:
            return None
        first, last = pair
        try:
            text = memtrace.render_census(orjson.loads(first.read_bytes()),
                                          orjson.loads(last.read_bytes()))
        except (OSError, ValueError, KeyError) as exc:
            self.notes.append(f"could not read the heap censuses: {exc}")
            return None
        return f"{first.name} -> {last.name}\n{text}"
