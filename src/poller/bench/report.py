"""What a bench found: the result records, the targets, and their renderings
(a table for people, JSON for machines, a PNG chart over time)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from poller.bench import failover as failing
from poller.bench import pgstore
from poller.bench import profile as profiling
from poller.bench.apiload import ApiLatency
from poller.bench.failover import Failover
from poller.bench.pgstore import StorageRun
from poller.bench.profile import Profile
from poller.bench.wrkfloor import Floor

KIB = 1024
# The targets of the issue; printed next to the measurements, never asserted.
CPU_PER_POLL_US = 35.0
CPU_FLOOR_MULTIPLE = 3.5
HELD_RATIO = 0.9999
HELD_LATENESS_P99_S = 0.100
RSS_PER_DEVICE_BYTES = 2 * KIB
COMMIT_P99_S = 2.0
BIG_FLEET = 100_000
API_P99_S = 0.050


@dataclass(frozen=True, slots=True)
class ProcessCost:
    """CPU of one process (or process tree) over the window; None: not ours
    to measure (an external server) or gone."""

    cpu_s: float | None
    percent_core: float | None
    us_per_unit: float | None
    """Per completed poll (poller, Postgres) or per request (simulator)."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One second of the window, from consecutive scrapes of /metrics."""

    t_s: float
    polls_ok_per_s: float
    rows_per_s: float
    lateness_p99_s: float | None


@dataclass(frozen=True, slots=True)
class FleetRun:
    """One measured window at one fleet size."""

    devices: int
    interval_s: float
    elapsed_s: float
    scheduled_polls: float
    """Sum over devices of elapsed / interval."""
    completed_polls: int
    """OK polls counted by the poller during the window."""
    completed_ratio: float | None
    polls_by_outcome: dict[str, int]
    skipped_ticks: int
    backpressure_skips: int
    ticks_window_s: float
    """Whole intervals from the window start: every device has exactly
    ``ticks_window_s / interval_s`` ticks in it."""
    ticks_scheduled: int
    ticks_stored: int
    """Readings in Postgres with a tick time in that span (exact, no edges)."""
    ticks_ratio: float | None
    lateness_p50_s: float | None
    lateness_p99_s: float | None
    lateness_max_s: float | None
    lateness_max_is_bound: bool
    """The window's max is only known as its bucket's upper bound (the
    poller's all-time max came before the window)."""
    lateness_within_100ms: float | None
    jitter_p50_s: float | None
    jitter_p99_s: float | None
    jitter_max_s: float | None
    jitter_intervals: int
    poller: ProcessCost
    postgres: ProcessCost
    simulator: ProcessCost
    simulator_requests: int
    rss_bytes: int | None
    rows_committed: int
    rows_per_s: float
    commit_p50_s: float | None
    commit_p99_s: float | None
    archive_bytes: int
    archive_bytes_per_reading: float | None
    series: list[Sample] = field(default_factory=list)
    api: list[ApiLatency] = field(default_factory=list)
    """API reads during the window (``--api-load``), by kind."""
    gc_full_collections: int = 0
    """Full collections of the cyclic GC in the poller during the window."""
    gc_full_pause_p99_s: float | None = None
    gc_full_pause_max_s: float | None = None
    """Upper bound of the longest full collection's bucket."""
    gc_pause_s: float = 0.0
    """Time the collector held the poller, every generation, in the window."""
    gc_full_cpu_s: float = 0.0
    """CPU time of the window's full collections."""
    shed_ticks: int = 0
    """Ticks not polled because they came due too late (overload)."""
    connections_opened: int = 0
    """Device connections the poller opened during the window."""
    requests_refused: int = 0
    """Ticks skipped because the host's connections were all busy and its
    queue full (part of ``skipped_ticks``)."""

    @property
    def polls_ok_per_s(self) -> float:
        return self.completed_polls / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def held(self) -> bool:
        """Kept its schedule: enough polls done, p99 lateness small enough."""
        ratio = self.ticks_ratio if self.ticks_ratio is not None else self.completed_ratio
        return (ratio is not None and ratio >= HELD_RATIO
                and self.lateness_p99_s is not None
                and self.lateness_p99_s <= HELD_LATENESS_P99_S)


@dataclass(frozen=True, slots=True)
class RssSlope:
    small_devices: int
    small_rss_bytes: int
    big_devices: int
    big_rss_bytes: int
    bytes_per_device: float


@dataclass(frozen=True, slots=True)
class SweepStep:
    devices: int
    held: bool
    ratio: float | None
    lateness_p99_s: float | None
    us_per_poll: float | None
    polls_ok_per_s: float = 0.0
    overload: bool = False
    """A step past the largest fleet held (how overload degrades)."""
    shed_ticks: int = 0
    timeouts: int = 0
    connections_opened: int = 0


OVERLOAD_FLOOR = 0.9
"""Past the limit, completed polls a second stay at least this share of the
largest fleet held's."""


def overload_ratio(steps: list[SweepStep], largest_held: int | None) -> float | None:
    """Completed polls a second at the worst step past the limit over those
    at the largest fleet held (None without both)."""
    held = [s for s in steps if s.held and s.devices == largest_held]
    over = [s for s in steps if s.overload]
    if not held or not over or held[-1].polls_ok_per_s <= 0:
        return None
    return min(s.polls_ok_per_s for s in over) / held[-1].polls_ok_per_s


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    limit: str
    value: str
    status: str
    """pass, fail or n/a."""


@dataclass(frozen=True, slots=True)
class BenchReport:
    config: dict[str, Any]
    main: FleetRun
    runs: list[FleetRun]
    rss_slope: RssSlope | None
    floor: Floor | None
    cpu_floor_multiple: float | None
    sweep: list[SweepStep]
    sweep_largest_held: int | None
    targets: list[Target]
    notes: list[str]
    chart: str | None
    profile: Profile | None = None
    storage: StorageRun | None = None
    """Postgres bytes per reading and loader rows/s (``--storage-devices``)."""
    failover: Failover | None = None
    """The killed instance's devices (``--instances N --kill-one``)."""


def _mark(ok: bool | None) -> str:
    return "n/a" if ok is None else "pass" if ok else "fail"


def evaluate(main: FleetRun, slope: RssSlope | None, floor_multiple: float | None,
             largest_held: int | None, overload: float | None = None) -> list[Target]:
    """The issue's targets against what was measured."""
    us = main.poller.us_per_unit
    big = [n for n in (main.devices if main.devices >= BIG_FLEET else None, largest_held)
           if n is not None]
    ratio = main.ticks_ratio if main.ticks_ratio is not None else main.completed_ratio
    at_big = main.devices >= BIG_FLEET and main.interval_s == 6.0
    return [
        Target(f"poller CPU per completed poll ({main.devices:,} devices)",
               f"<= {CPU_PER_POLL_US:g} µs", _num(us, "µs"),
               _mark(None if us is None else us <= CPU_PER_POLL_US)),
        Target("poller CPU per poll / wrk CPU per request", f"<= {CPU_FLOOR_MULTIPLE:g}x",
               _num(floor_multiple, "x"),
               _mark(None if floor_multiple is None else floor_multiple <= CPU_FLOOR_MULTIPLE)),
        Target(f"{BIG_FLEET:,} devices at 6 s: completed", f">= {HELD_RATIO:.2%}",
               _pct(ratio) if at_big else "not run",
               _mark(ratio is not None and ratio >= HELD_RATIO) if at_big else "n/a"),
        Target(f"{BIG_FLEET:,} devices at 6 s: p99 lateness",
               f"<= {HELD_LATENESS_P99_S * 1000:g} ms",
               _ms(main.lateness_p99_s) if at_big else "not run",
               _mark(main.lateness_p99_s is not None
                     and main.lateness_p99_s <= HELD_LATENESS_P99_S) if at_big else "n/a"),
        Target("largest fleet held (sweep)", f">= {BIG_FLEET:,}",
               f"{max(big):,}" if largest_held is not None else "no sweep",
               _mark(largest_held >= BIG_FLEET) if largest_held is not None else "n/a"),
        Target("past the limit: polls/s at 2x and 4x the fleet held / held",
               f">= {OVERLOAD_FLOOR:.0%}", "no sweep" if overload is None else f"{overload:.1%}",
               _mark(None if overload is None else overload >= OVERLOAD_FLOOR)),
        Target("RSS per device", f"<= {RSS_PER_DEVICE_BYTES} B",
               _num(slope.bytes_per_device if slope else None, "B"),
               _mark(None if slope is None else slope.bytes_per_device <= RSS_PER_DEVICE_BYTES)),
        Target("poll-to-committed p99", f"<= {COMMIT_P99_S:g} s", _num(main.commit_p99_s, "s"),
               _mark(None if main.commit_p99_s is None else main.commit_p99_s <= COMMIT_P99_S)),
        *_api_targets(main),
    ]


def _api_targets(main: FleetRun) -> list[Target]:
    """With ``--api-load``: polls keep their schedule while the API answers."""
    if not main.api:
        return []
    where = f"({main.devices:,} devices, API load)"
    out = [Target(f"p99 lateness {where}", f"<= {HELD_LATENESS_P99_S * 1000:g} ms",
                  _ms(main.lateness_p99_s),
                  _mark(None if main.lateness_p99_s is None
                        else main.lateness_p99_s <= HELD_LATENESS_P99_S))]
    for api in main.api:
        if api.kind in ("list", "filter"):
            ok = api.p99_s is not None and api.p99_s <= API_P99_S and not api.errors
            out.append(Target(f"{api.path} p99 {where}", f"<= {API_P99_S * 1000:g} ms",
                              _ms(api.p99_s), _mark(ok)))
    return out


# -- rendering -------------------------------------------------------------------

def render_sweep(steps: list[SweepStep], largest_held: int | None) -> str:
    """The sweep's curve as a table, with the overload verdict."""
    out = [f"  {'devices':>9}  {'':8}  {'stored':>9}  {'ok polls/s':>10}  "
           f"{'p99 late':>9}  {'CPU/poll':>10}  {'shed':>8}  {'timeouts':>8}  {'connects':>8}"]
    for step in steps:
        mark = "held" if step.held else "past" if step.overload else "NOT held"
        out.append(f"  {step.devices:>9,}  {mark:8}  {_pct(step.ratio)[:-2]:>9}  "
                   f"{step.polls_ok_per_s:>10,.0f}  {_ms(step.lateness_p99_s):>9}  "
                   f"{_num(step.us_per_poll, 'µs'):>10}  {step.shed_ticks:>8,}  "
                   f"{step.timeouts:>8,}  {step.connections_opened:>8,}")
    out.append(f"  largest fleet held: {largest_held:,}" if largest_held else "  no size held")
    ratio = overload_ratio(steps, largest_held)
    if ratio is not None:
        out.append(f"  past the limit: {ratio:.1%} of the held fleet's ok polls a second "
                   f"(target >= {OVERLOAD_FLOOR:.0%}); 'shed': ticks not polled because they "
                   "came due too late")
    return "\n".join(out)


def _num(value: float | None, unit: str, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f} {unit}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.1f} ms"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.4%}"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / KIB / KIB:,.1f} MiB"


def run_table(run: FleetRun) -> str:
    rows: list[tuple[str, str]] = [
        ("devices / interval", f"{run.devices:,} every {run.interval_s:g} s"),
        ("window", f"{run.elapsed_s:.1f} s"),
        ("scheduled polls", f"{run.scheduled_polls:,.0f}"),
        ("completed polls (ok)", f"{run.completed_polls:,}  ({_pct(run.completed_ratio)})"),
        ("ticks stored in Postgres", f"{run.ticks_stored:,} of {run.ticks_scheduled:,} over "
         f"{run.ticks_window_s:g} s  ({_pct(run.ticks_ratio)})"),
        ("failed polls", ", ".join(f"{k} {v:,}" for k, v in run.polls_by_outcome.items()
                                   if k != "ok" and v) or "none"),
        ("skipped ticks", f"{run.skipped_ticks:,} overrun or no connection in time "
         f"({run.requests_refused:,} of them refused at once), {run.shed_ticks:,} shed (due "
         f"too late), {run.backpressure_skips:,} backpressure"),
        ("device connections opened", f"{run.connections_opened:,}  "
         f"({run.connections_opened / run.elapsed_s if run.elapsed_s else 0:,.0f}/s)"),
        ("lateness p50 / p99 / max", f"{_ms(run.lateness_p50_s)} / {_ms(run.lateness_p99_s)} / "
         f"{'<= ' if run.lateness_max_is_bound else ''}{_ms(run.lateness_max_s)}  "
         f"({_pct(run.lateness_within_100ms)} <= 100 ms)"),
        ("sim interval jitter p50 / p99 / max", f"{_ms(run.jitter_p50_s)} / "
         f"{_ms(run.jitter_p99_s)} / {_ms(run.jitter_max_s)}  ({run.jitter_intervals:,} "
         "intervals)"),
        ("poller CPU", _cost(run.poller, "poll")),
        ("postgres CPU", _cost(run.postgres, "poll")),
        ("simulator CPU", _cost(run.simulator, "request")
         + f"  ({run.simulator_requests:,} requests)"),
        ("poller RSS", f"{_mib(run.rss_bytes)}"
         + (f"  ({run.rss_bytes / run.devices:,.0f} B/device incl. base)"
            if run.rss_bytes else "")),
        ("poller GC: full collections, p99 / max, all passes",
         f"{run.gc_full_collections:,}, {_ms(run.gc_full_pause_p99_s)} / "
         f"<= {_ms(run.gc_full_pause_max_s)} ({_ms(run.gc_full_cpu_s)} CPU in all), "
         f"{_ms(run.gc_pause_s)} in all passes"),
        ("rows committed", f"{run.rows_committed:,}  ({run.rows_per_s:,.0f}/s)"),
        ("poll-to-committed p50 / p99", f"{_num(run.commit_p50_s, 's', 2)} / "
         f"{_num(run.commit_p99_s, 's', 2)}"),
        ("archive bytes per reading", _num(run.archive_bytes_per_reading, "B")),
        ("held (>= 99.99%, p99 <= 100 ms)", "yes" if run.held else "no"),
    ]
    for api in run.api:
        rows.append((f"API {api.kind} p50 / p99 / max",
                     f"{_ms(api.p50_s)} / {_ms(api.p99_s)} / {_ms(api.max_s)}  "
                     f"({api.requests:,} x {api.path}, {api.errors} errors, "
                     f"{_num(api.rows_per_answer, 'devices', 0)} an answer)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _cost(cost: ProcessCost, unit: str) -> str:
    if cost.cpu_s is None:
        return "not measured (external or gone)"
    per = "" if cost.us_per_unit is None else f"{cost.us_per_unit:,.1f} µs/{unit}, "
    return f"{per}{cost.percent_core or 0:.1f}% of a core ({cost.cpu_s:.2f} s)"


def render(report: BenchReport) -> str:
    """The whole report as text."""
    out: list[str] = []
    for run in report.runs:
        out.append(f"\n== {run.devices:,} devices ==")
        out.append(run_table(run))
    floor = report.floor
    out.append("\n== floor: wrk ==")
    if floor is None:
        out.append("  skipped (--no-wrk)")
    elif not floor.available:
        out.append(f"  not run: {floor.reason}")
    else:
        out.append(f"  {floor.requests:,} requests in {floor.seconds:.1f} s "
                   f"({floor.requests_per_s or 0:,.0f}/s, {floor.connections} connections), "
                   f"CPU {floor.cpu_s:.2f} s = {_num(floor.us_per_request, 'µs')}/request"
                   + (f", {floor.status_errors + floor.socket_errors} errors"
                      if floor.status_errors or floor.socket_errors else ""))
        out.append(f"  poller CPU per poll = {_num(report.cpu_floor_multiple, 'x', 2)} the floor")
    if report.rss_slope is not None:
        s = report.rss_slope
        out.append(f"\n== RSS slope ==\n  {s.small_devices:,} devices {_mib(s.small_rss_bytes)}, "
                   f"{s.big_devices:,} devices {_mib(s.big_rss_bytes)}: "
                   f"{s.bytes_per_device:,.0f} B per device")
    if report.sweep:
        out.append("\n== sweep ==")
        out.append(render_sweep(report.sweep, report.sweep_largest_held))
    if report.profile is not None:
        out.append("\n== profile: poller serve, main window ==")
        out.extend(profiling.render(report.profile))
    if report.failover is not None:
        out.append("\n== failover: kill -9 of one cluster instance ==")
        out.extend(failing.render(report.failover))
    if report.storage is not None:
        out.append("\n== Postgres storage ==")
        out.extend(pgstore.render(report.storage))
    out.append("\n== targets ==")
    width = max(len(t.name) for t in report.targets)
    for t in report.targets:
        out.append(f"  [{t.status:^4}] {t.name:<{width}}  {t.value:>14}  (target {t.limit})")
    for note in report.notes:
        out.append(f"  note: {note}")
    if report.chart:
        out.append(f"\nchart: {report.chart}")
    return "\n".join(out) + "\n"


def write_json(report: BenchReport, path: Path) -> None:
    doc = dataclasses.asdict(report)
    doc["main"]["held"] = report.main.held
    for raw, run in zip(doc["runs"], report.runs, strict=True):
        raw["held"] = run.held
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))


def write_chart(run: FleetRun, path: Path) -> str | None:
    """Lateness and throughput over the window as a PNG; the reason when it
    cannot (matplotlib missing), None when written."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed: no chart (pip install matplotlib)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t_s for s in run.series]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    top.plot(t, [None if s.lateness_p99_s is None else s.lateness_p99_s * 1000
                 for s in run.series], label="p99 lateness (per second)")
    top.axhline(HELD_LATENESS_P99_S * 1000, color="red", linestyle=":", label="100 ms")
    top.set_ylabel("ms")
    top.set_ylim(bottom=0)
    top.legend(loc="upper right")
    top.set_title(f"poller bench: {run.devices:,} devices every {run.interval_s:g} s")
    bottom.plot(t, [s.polls_ok_per_s for s in run.series], label="ok polls/s")
    bottom.plot(t, [s.rows_per_s for s in run.series], label="rows committed/s")
    bottom.axhline(run.devices / run.interval_s, color="gray", linestyle=":",
                   label="scheduled/s")
    bottom.set_xlabel("seconds into the window")
    bottom.set_ylabel("per second")
    bottom.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
