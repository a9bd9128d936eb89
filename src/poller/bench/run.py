"""``poller bench``: throughput, lateness, CPU and memory of a real run.

The bench starts (in its own state directory) the embedded stack, the device
simulator and ``poller serve`` as separate processes, lets the fleet warm up,
then measures a window: poll counts and lateness from ``/metrics``, the
simulator's view of interval jitter, CPU and RSS of each process from
``/proc``, readings stored per tick from Postgres. Optionally a second, smaller
fleet gives the RSS per device, a sweep finds the largest fleet held, and
``wrk`` gives the CPU floor of one request. Everything it started it stops,
on errors and Ctrl-C too.
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
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from poller import argtypes, build, sealing
from poller.bench import apiload, failover, importbench, pgstore, rollups, soak, storage
from poller.bench.children import BenchError, Child, http_json
from poller.bench.failover import Failover
from poller.bench.measure import Scrape, process_cpu_s, tree_cpu_s
from poller.bench.profile import Profile, Recorder
from poller.bench.report import (
    BenchReport,
    FleetRun,
    ProcessCost,
    RssSlope,
    Sample,
    SweepStep,
    evaluate,
    overload_ratio,
    render,
    write_chart,
    write_json,
)
from poller.bench.serves import Serves, member_dir, member_env, shard_dir, shard_env
from poller.bench.wrkfloor import Floor, run_floor
from poller.config import Settings
from poller.netpolicy import LOOPBACK_NETWORKS
from poller.simulator.fleet import DEFAULT_ID_OFFSET

_MAX_DEVICES = 0x1000000 - DEFAULT_ID_OFFSET  # the simulator's 6-hex-digit id space
_SWEEP_MAX_STEPS = 8
_LATENESS = "poller_poll_lateness_seconds"
_COMMIT = "poller_commit_latency_seconds"
_GC_FULL = "poller_gc_full_pause_seconds"
_DROP_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench's flags. ``--state-dir`` is the common flag: when not given the
    bench uses ``STATE_DIR/bench`` so it never touches ``make run``'s data."""
    parser.add_argument("--devices", type=argtypes.count, default=10_000,
                        help="fleet size (default 10000)")
    parser.add_argument("--interval", type=argtypes.seconds, default=6.0, metavar="SECONDS",
                        help="poll interval (default 6)")
    parser.add_argument("--duration", type=argtypes.seconds, default=60.0, metavar="SECONDS",
                        help="measured window (default 60)")
    parser.add_argument("--warmup", type=argtypes.seconds, default=None, metavar="SECONDS",
                        help="warm-up before the window (default two intervals)")
    parser.add_argument("--json", type=Path, default=Path("bench-out/bench.json"),
                        metavar="PATH", help="write the results here (default "
                        "bench-out/bench.json)")
    parser.add_argument("--chart", type=Path, default=None, metavar="PATH",
                        help="PNG of lateness and throughput (default: next to the JSON)")
    parser.add_argument("--no-wrk", action="store_true", help="skip the wrk floor")
    parser.add_argument("--floor-duration", type=argtypes.seconds, default=10.0, metavar="SECONDS",
                        help="how long wrk runs (default 10)")
    parser.add_argument("--no-rss-slope", action="store_true",
                        help="skip the second, smaller run that gives RSS per device")
    parser.add_argument("--small-devices", type=argtypes.count, default=None, metavar="N",
                        help="fleet size of the RSS-slope run (default devices/4)")
    parser.add_argument("--sweep", action="store_true",
                        help="raise the fleet (doubling, then bisecting) until p99 lateness "
                        "exceeds 100 ms or fewer than 99.99%% of polls complete")
    parser.add_argument("--keep-stack", action="store_true",
                        help="leave the embedded servers running at the end")
    parser.add_argument("--seed", type=int, default=0, help="simulator seed (default 0)")
    parser.add_argument("--profile", type=Path, default=None, metavar="PATH",
                        help="sample the poller with py-spy during the main window; collapsed "
                        "stacks to PATH, a summary by area and function in the report")
    parser.add_argument("--shards", type=argtypes.count, default=1, metavar="N",
                        help="run N poller instances, shard k/N each (polling.shard), and "
                        "report their sum (default 1)")
    parser.add_argument("--instances", type=argtypes.count, default=0, metavar="N",
                        help="run N poller instances as one cluster (cluster.enabled, a name "
                        "of this run's own; heartbeat and lease at most 1/8 and 1/2 of the "
                        "interval) and report their sum")
    parser.add_argument("--kill-one", action="store_true",
                        help="with --instances: SIGKILL one instance in the middle of the "
                        "window and report the failover gap of its devices (from the "
                        "simulator's record of polls)")
    parser.add_argument("--sample-every", type=argtypes.seconds, default=1.0, metavar="SECONDS",
                        help="how often to scrape /metrics during the window (default 1)")
    parser.add_argument("--storage-devices", type=argtypes.whole, default=500, metavar="N",
                        help="Postgres bytes per reading and loader rows/s: N synthetic "
                        "devices' readings through the loader into one daily partition, "
                        "then compacted (default 500; 0 skips)")
    parser.add_argument("--storage-hours", type=argtypes.count, default=4, metavar="H",
                        help="hours of readings for the storage measure (default 4: "
                        "1.2 million rows at 500 devices every 6 s)")
    soak.add_arguments(parser)
    importbench.add_arguments(parser)
    apiload.add_arguments(parser)
    rollups.add_arguments(parser)


@dataclass(frozen=True, slots=True)
class _Options:
    devices: int
    interval_s: float
    duration_s: float
    warmup_s: float
    json_path: Path
    chart_path: Path
    wrk: bool
    floor_s: float
    rss_slope: bool
    small_devices: int
    sweep: bool
    keep_stack: bool
    seed: int
    sample_every_s: float
    profile_path: Path | None
    shards: int
    api_load: bool
    api_rate_per_s: float
    storage_devices: int = 0
    storage_hours: int = 4
    instances: int = 0
    kill_one: bool = False


def run_bench(settings: Settings, args: argparse.Namespace) -> int:
    """Run the bench; print the table, write JSON and the chart. Exit code 0
    whatever the targets say: this measures, it does not judge."""
    state_dir = Path(args.state_dir) if hasattr(args, "state_dir") \
        else Path(settings.state_dir) / "bench"
    if args.rollups:
        return rollups.run(args, state_dir.resolve())  # its own PostgreSQL, no fleet
    opts = _options(args)
    bench = _Bench(settings, opts, state_dir.resolve())
    # SIGTERM would end the bench where it stands and leave the simulator,
    # the pollers and the embedded servers running: make it unwind through
    # the ``finally`` that stops them, as Ctrl-C does.
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        if args.soak_hours is not None:
            return soak.run(bench, args)  # prints and writes its own report
        if args.import_devices is not None:
            return importbench.run(bench, args)  # the same
        report = bench.run()
    finally:
        try:
            bench.close()
        finally:
            signal.signal(signal.SIGTERM, previous)
    sys.stdout.write(render(report))
    write_json(report, opts.json_path)
    _progress(f"results: {opts.json_path}")
    return 0


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _options(args: argparse.Namespace) -> _Options:
    json_path: Path = args.json
    small = args.small_devices or max(1, args.devices // 4)
    if not args.no_rss_slope and small >= args.devices:
        raise BenchError("--small-devices must be below --devices for the RSS slope")
    if args.storage_hours > 24:
        raise BenchError("--storage-hours: the storage measure fills one daily partition, "
                         "at most 24 hours")
    _check_instances(args)
    return _Options(
        devices=min(args.devices, _MAX_DEVICES), interval_s=args.interval,
        duration_s=args.duration,
        warmup_s=args.warmup if args.warmup is not None else 2 * args.interval,
        json_path=json_path, chart_path=args.chart or json_path.with_suffix(".png"),
        wrk=not args.no_wrk, floor_s=args.floor_duration, rss_slope=not args.no_rss_slope,
        small_devices=small, sweep=args.sweep, keep_stack=args.keep_stack, seed=args.seed,
        sample_every_s=args.sample_every, profile_path=args.profile, shards=args.shards,
        api_load=args.api_load, api_rate_per_s=args.api_rate,
        storage_devices=args.storage_devices, storage_hours=args.storage_hours,
        instances=args.instances, kill_one=args.kill_one)


def _check_instances(args: argparse.Namespace) -> None:
    if args.instances and args.shards > 1:
        raise BenchError("--instances and --shards: the one or the other (a cluster "
                         "shares the fleet by itself)")
    if args.instances and (args.soak_hours is not None or args.import_devices is not None):
        raise BenchError("--instances runs with the fleet bench only, not --soak-hours "
                         "or --import-devices")
    if not args.kill_one:
        return
    if args.instances < 2:
        raise BenchError("--kill-one needs --instances 2 or more (a survivor to take over)")
    if args.sweep:
        raise BenchError("--kill-one measures one window: not with --sweep")
    if args.duration < 6 * args.interval:
        raise BenchError("--kill-one needs --duration of at least 6 intervals: the kill "
                         "comes in the middle, and failover takes up to two")


def _progress(line: str) -> None:
    print(f"bench: {line}", file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    mono: float
    wall: float
    poller_cpu_s: float | None
    postgres_cpu_s: float | None
    simulator_cpu_s: float | None
    scrape: Scrape
    fleet: dict[str, Any]
    archive_bytes: int


class _Bench:
    def __init__(self, settings: Settings, opts: _Options, state_dir: Path) -> None:
        self.settings = settings
        self.opts = opts
        self.state_dir = state_dir
        self.logs = state_dir / "bench-logs"
        self.children: list[Child] = []
        self.stack: Any = None
        self.stop_stack = False
        self.database_url = ""
        self.child_env: dict[str, str] = {}
        self.s3_endpoint_url: str | None = None
        self.postgres_pid: int | None = None
        self.notes: list[str] = []
        self.profile: Profile | None = None
        self.failover: Failover | None = None
        self.cluster_name = f"bench-{uuid.uuid4().hex[:10]}"
        # Failover within two intervals wants lease + heartbeat below one.
        c = settings.cluster
        self.heartbeat_s = max(0.05, min(c.heartbeat_s, opts.interval_s / 8))
        self.lease_s = max(0.2, 2 * self.heartbeat_s, min(c.lease_s, opts.interval_s / 2))

    # -- set-up and tear-down -------------------------------------------------------

    def _setup(self) -> None:
        s = self.settings
        db, redis, s3 = s.database.url, s.redis.url, s.s3.endpoint_url
        if not (db and redis and s3):
            from poller.stack import EmbeddedStack

            self.stack = EmbeddedStack(self.state_dir, database_url=db or None,
                                       redis_url=redis or None, s3_endpoint_url=s3 or None,
                                       bucket=s.s3.bucket, progress=_progress)
            # Stop at the end only what this run started.
            self.stop_stack = not self.opts.keep_stack and not all(
                st.running for st in self.stack.status().values())
            info = self.stack.up()
            db, redis, s3 = info.database_url, info.redis_url, info.s3_endpoint_url
            pg = self.stack.status()["postgres"]
            self.postgres_pid = pg.pid if pg.state == "running" else None
        if self.postgres_pid is None:
            self.notes.append("Postgres is external: its CPU is not measured")
        self.database_url = db
        self.s3_endpoint_url = None if s3 == "aws" else s3
        env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
        # Resolved URLs: the children never start or look for servers.
        env.update({
            "POLLER_STATE_DIR": str(self.state_dir), "POLLER_DATABASE_URL": db,
            "POLLER_REDIS_URL": redis, "POLLER_S3_ENDPOINT_URL": s3,
            "POLLER_S3_BUCKET": s.s3.bucket, "POLLER_S3_PREFIX": s.s3.prefix,
            "POLLER_API_HOST": "127.0.0.1", "POLLER_API_PORT": "0",
            "POLLER_API_ADMIN_TOKEN": "", "POLLER_API_READ_TOKEN": "",
            "POLLER_LOG_LEVEL": "info", "POLLER_LOG_FORMAT": "text",
            # The simulator answers on loopback, denied to device URLs by default.
            "POLLER_POLLING_ALLOWED_NETWORKS": ",".join(LOOPBACK_NETWORKS),
        })
        self.child_env = env

    def close(self) -> None:
        """Stop every child (newest first), then the stack if this run started it."""
        for child in reversed(self.children):
            child.stop(self.settings.ingest.shutdown_grace_s + 10.0)
        self.children.clear()
        if self.stack is not None and self.stop_stack:
            _progress("stopping the embedded stack (--keep-stack keeps it)")
            self.stack.down()
            self.stack = None

    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        child = Child(name, argv, env or self.child_env, self.logs / f"{name}.log")
        self.children.append(child)
        return child

    def _stop(self, child: Child) -> None:
        child.stop(self.settings.ingest.shutdown_grace_s + 10.0)
        self.children.remove(child)

    def _simulator(self, devices: int, *, register: bool) -> tuple[Child, str]:
        port_file = self.logs / "simulator.port"
        port_file.unlink(missing_ok=True)
        argv = ["simulate", "--devices", str(devices), "--seed", str(self.opts.seed),
                "--port-file", str(port_file)]
        if register:
            argv += ["--register", "--interval", f"{self.opts.interval_s:g}"]
        sim = self._start("simulator", argv)
        port = sim.wait_file(port_file, 120.0 + devices / 500)
        return sim, f"http://127.0.0.1:{port}"

    # -- the whole bench ----------------------------------------------------------

    def run(self) -> BenchReport:
        opts = self.opts
        self._setup()
        runs: list[FleetRun] = []
        sweep: list[SweepStep] = []
        largest: int | None = None
        if opts.sweep:
            runs, sweep, largest = self._sweep()
            held = [r for r in runs if r.held]
            main = max(held, key=lambda r: r.devices) if held else runs[0]
        else:
            main = self._measure(opts.devices, "main")
            runs.append(main)
        slope = None
        if opts.rss_slope and not opts.sweep:
            small = self._measure(opts.small_devices, "RSS slope")
            runs.append(small)
            if main.rss_bytes is not None and small.rss_bytes is not None:
                slope = RssSlope(small.devices, small.rss_bytes, main.devices, main.rss_bytes,
                                 (main.rss_bytes - small.rss_bytes)
                                 / (main.devices - small.devices))
        floor = self._floor() if opts.wrk else None
        stored = self._storage() if opts.storage_devices else None
        if floor is not None and not floor.available:
            _progress(f"floor not measured: {floor.reason}")
            self.notes.append(f"wrk floor not measured: {floor.reason}")
        multiple = None
        if floor is not None and floor.us_per_request and main.poller.us_per_unit is not None:
            multiple = main.poller.us_per_unit / floor.us_per_request
        reason = write_chart(main, opts.chart_path)
        if reason is not None:
            self.notes.append(reason)
        self.notes.append("lateness and commit quantiles interpolate inside the /metrics "
                          "buckets; 'ticks stored' counts readings in Postgres per tick "
                          "(exact), 'completed' the poller's ok counter (edge noise)")
        self.notes.append("load average (1/5/15 min) at the end: "
                          + " / ".join(f"{x:.2f}" for x in os.getloadavg())
                          + f" on {os.cpu_count()} CPUs (the machine may be shared)")
        # The children run what this process runs (same interpreter and paths).
        self.notes.append(f"build: {build.build_kind()}")
        return BenchReport(
            config={"devices": opts.devices, "interval_s": opts.interval_s,
                    "duration_s": opts.duration_s, "warmup_s": opts.warmup_s,
                    "state_dir": str(self.state_dir), "seed": opts.seed,
                    "sample_every_s": opts.sample_every_s, "cpus": os.cpu_count(),
                    "api_load_per_s": opts.api_rate_per_s if opts.api_load else None,
                    "load_average": os.getloadavg(), "argv": sys.argv[1:]},
            main=main, runs=runs, rss_slope=slope, floor=floor, cpu_floor_multiple=multiple,
            sweep=sweep, sweep_largest_held=largest,
            targets=evaluate(main, slope, multiple, largest,
                             overload_ratio(sweep, largest)), notes=self.notes,
            chart=None if reason else str(opts.chart_path), profile=self.profile,
            storage=stored, failover=self.failover)

    def _sweep(self) -> tuple[list[FleetRun], list[SweepStep], int | None]:
        runs: list[FleetRun] = []
        steps: list[SweepStep] = []
        held_max, fail_min = 0, _MAX_DEVICES + 1
        n = self.opts.devices
        for _ in range(_SWEEP_MAX_STEPS):
            run = self._measure(n, f"sweep step {len(steps) + 1}")
            runs.append(run)
            steps.append(_step(run))
            if run.held:
                held_max = max(held_max, n)
            else:
                fail_min = min(fail_min, n)
            if fail_min > _MAX_DEVICES:
                n = min(2 * n, _MAX_DEVICES)
                if n == held_max:
                    break
            elif held_max == 0:
                n = fail_min // 2
                if n < 10:
                    break
            else:
                if fail_min - held_max <= max(held_max // 8, 100):
                    break
                n = (held_max + fail_min) // 2
        for factor in (2, 4) if held_max else ():
            # Past the limit: twice and four times the largest fleet held
            # (which a latency bar may hold below what the CPU can do), to
            # show that overload degrades (polls a second kept) rather than
            # collapses.
            over = min(factor * held_max, _MAX_DEVICES)
            run = self._measure(over, f"past the limit ({factor}x the fleet held)")
            runs.append(run)
            steps.append(dataclasses.replace(_step(run), overload=True))
        return runs, steps, held_max or None

    def _storage(self) -> pgstore.StorageRun:
        opts = self.opts
        _progress(f"storage: {opts.storage_devices:,} synthetic devices every "
                  f"{opts.interval_s:g} s for {opts.storage_hours} h through the loader")
        return pgstore.run(self.database_url, opts.storage_devices, opts.storage_hours,
                           opts.interval_s, seed=opts.seed, progress=_progress)

    def _floor(self) -> Floor:
        devices = min(self.opts.devices, 10_000)
        _progress(f"floor: wrk for {self.opts.floor_s:g} s against the simulator "
                  f"({devices:,} devices)")
        sim, base = self._simulator(devices, register=False)
        try:
            return run_floor(base, devices=devices, seed=self.opts.seed,
                             duration_s=self.opts.floor_s)
        finally:
            self._stop(sim)

    # -- one fleet size -------------------------------------------------------------

    def _measure(self, devices: int, label: str) -> FleetRun:
        opts = self.opts
        _progress(f"{label}: {devices:,} devices every {opts.interval_s:g} s: simulator "
                  "(registering the fleet)")
        sim, sim_url = self._simulator(devices, register=True)
        removed = storage.trim_registry(self.database_url, devices)
        if removed:
            _progress(f"{label}: removed {removed:,} device(s) of earlier runs from the registry")
        serves = self._start_serves(label)
        serves.wait_ready(devices, 120.0 + devices / 1000)
        _countdown(f"{label}: warm-up", opts.warmup_s, serves.check_alive)
        _progress(f"{label}: measuring for {opts.duration_s:g} s")
        recorder = None
        if opts.profile_path is not None and label == "main" and self.profile is None:
            # With shards, the first one stands for all: they run the same code.
            recorder = Recorder(serves.pids[0], opts.duration_s, opts.profile_path)
        start = self._snapshot(serves, sim, sim_url, reset=True)
        load = None
        if opts.api_load and label == "main":
            # With shards, the first one's API: each answers the same way.
            load = apiload.ApiLoad(serves.apis[0], devices=devices,
                                   rate_per_s=opts.api_rate_per_s, seed=opts.seed)
            load.start()
        series: list[Sample] = []
        rss_samples: list[int] = []
        last = start.scrape
        last_t = start.mono
        end_at = start.mono + opts.duration_s
        # In the middle, but no more intervals before the end than the
        # simulator keeps arrivals of a device.
        kill_at = start.mono + max(opts.duration_s / 2, opts.duration_s
                                   - failover.MAX_INTERVALS_AFTER_KILL * opts.interval_s) \
            if opts.kill_one and label == "main" else math.inf
        while (left := end_at - time.monotonic()) > 0:
            time.sleep(min(opts.sample_every_s, left, max(0.0, kill_at - time.monotonic())))
            if time.monotonic() >= kill_at:
                kill_at = math.inf
                killed = serves.kill_last()
                _progress(f"{label}: SIGKILL to {killed.child.name} (pid {killed.child.pid}, "
                          f"{len(killed.devices):,} devices)")
            serves.check_alive()
            sim.check_alive()
            if end_at - time.monotonic() <= 0:
                break
            now = time.monotonic()
            scrape = serves.scrape()
            sample = _sample(now - start.mono, now - last_t, last, scrape)
            series.append(sample)
            if (rss_now := serves.rss_bytes()) is not None:
                rss_samples.append(rss_now)
            last, last_t = scrape, now
            _status(f"{label}: {end_at - now:4.0f} s left, {sample.polls_ok_per_s:,.0f} polls/s, "
                    f"p99 lateness {_ms(sample.lateness_p99_s)}")
        api = load.stop() if load is not None else []
        end = self._snapshot(serves, sim, sim_url, reset=False)
        _status_done()
        if recorder is not None:
            self.profile = recorder.finish()
            if not self.profile.available:
                self.notes.append(f"profile not recorded: {self.profile.reason}")
        # The median over the window: one reading at its end could land on a
        # flush's transient buffers, a few hundred bytes a device either way.
        rss = int(statistics.median(rss_samples)) if rss_samples else serves.rss_bytes()
        jitter = http_json(sim_url + "/_sim/jitter")
        sim_requests = int(http_json(sim_url + "/_sim/stats")["requests"])
        k = math.floor((end.wall - start.wall) / opts.interval_s + 1e-9)
        if serves.killed:
            self.failover = self._failover(serves, sim_url, start.wall)
        stored = self._stored_ticks(start.wall, start.wall + k * opts.interval_s, serves) \
            if k else 0
        for child in serves.started:
            self._stop(child)
        self._stop(sim)
        run = dataclasses.replace(
            _fleet_run(devices, opts.interval_s, start, end, series, rss, jitter,
                       sim_requests, k, stored), api=api)
        _progress(f"{label}: {devices:,} devices: {run.completed_polls:,} polls ok "
                  f"({_pct(run.completed_ratio)}), p99 lateness {_ms(run.lateness_p99_s)}, "
                  f"poller {_us(run.poller.us_per_unit)}/poll, "
                  f"{'held' if run.held else 'NOT held'}")
        return run

    def _failover(self, serves: Serves, sim_url: str, window_at: float) -> Failover:
        killed = serves.killed[0]
        until = time.time()
        _progress(f"failover: the simulator's record of {len(killed.devices):,} devices")
        seen = failover.arrivals(sim_url, killed.devices)
        gaps = [failover.device_gap(cid, seen[cid], killed.at_wall, until)
                for cid in killed.devices]
        self.notes.append("after the kill, poller CPU and RSS are the survivors' (plus the "
                          "killed instance's CPU until then)")
        return failover.summarize(
            gaps, instances=self.opts.instances,
            killed=killed.instance_id,
            killed_at_s=killed.at_wall - window_at, observed_s=until - killed.at_wall,
            interval_s=self.opts.interval_s, heartbeat_s=self.heartbeat_s,
            lease_s=self.lease_s)

    def _start_serves(self, label: str) -> Serves:
        if self.opts.instances:
            return self._start_members(label)
        n = self.opts.shards
        if n == 1:
            _progress(f"{label}: starting poller serve")
            return Serves([self._start("serve", ["serve"])])
        _progress(f"{label}: starting {n} poller serve instances (shards 0/{n}..{n - 1}/{n})")
        key = sealing.encode_key(sealing.load_key(self.state_dir))
        return Serves([
            self._start(f"serve-{k}", ["serve"],
                        shard_env(self.child_env, self.state_dir, k, n, key))
            for k in range(n)])

    def _start_members(self, label: str) -> Serves:
        n = self.opts.instances
        _progress(f"{label}: starting {n} poller serve instances as cluster "
                  f"{self.cluster_name} (heartbeat {self.heartbeat_s:g} s, "
                  f"lease {self.lease_s:g} s)")
        key = sealing.encode_key(sealing.load_key(self.state_dir))
        return Serves([
            self._start(f"serve-{k}", ["serve"],
                        member_env(self.child_env, self.state_dir, k, key,
                                   cluster=self.cluster_name, heartbeat_s=self.heartbeat_s,
                                   lease_s=self.lease_s))
            for k in range(n)])

    def _snapshot(self, serves: Serves, sim: Child, sim_url: str, *,
                  reset: bool) -> _Snapshot:
        n = self.opts.shards
        spools = [self.state_dir / "spool"] if n == 1 else \
            [shard_dir(self.state_dir, k) / "spool" for k in range(n)]
        if self.opts.instances:
            spools = [member_dir(self.state_dir, k) / "spool"
                      for k in range(self.opts.instances)]
        archive = storage.archive_bytes(self.settings, spools, self.s3_endpoint_url)
        if reset:
            http_json(sim_url + "/_sim/reset", method="POST", body={})
        pg_cpu = tree_cpu_s(self.postgres_pid) if self.postgres_pid else None
        poller_cpu = serves.cpu_s()
        sim_cpu = process_cpu_s(sim.pid)
        # The counters are read while the scrape is served: time its middle.
        before, wall = time.monotonic(), time.time()
        scrape = serves.scrape()
        mono = (before + time.monotonic()) / 2
        return _Snapshot(mono, wall, poller_cpu, pg_cpu, sim_cpu, scrape, serves.fleet(),
                         archive)

    def _stored_ticks(self, start: float, end: float, serves: Serves) -> int:
        """Readings stored for ticks in [start, end), once every poll of those
        ticks has had its timeout and a flush to land."""
        settle_until = end + self.settings.polling.timeout_s + 2 * \
            self.settings.ingest.flush_interval_s + 1.0
        give_up = settle_until + 30.0
        _progress("waiting for the window's readings to reach Postgres")
        while time.time() < settle_until:
            serves.check_alive()
            time.sleep(0.5)
        count = storage.readings_between(self.database_url, start, end)
        while time.time() < give_up:
            time.sleep(1.0)
            again = storage.readings_between(self.database_url, start, end)
            if again == count:
                break
            count = again
        return count


def _step(run: FleetRun) -> SweepStep:
    ratio = run.ticks_ratio if run.ticks_ratio is not None else run.completed_ratio
    return SweepStep(run.devices, run.held, ratio, run.lateness_p99_s, run.poller.us_per_unit,
                     polls_ok_per_s=run.polls_ok_per_s, shed_ticks=run.shed_ticks,
                     timeouts=run.polls_by_outcome.get("timeout", 0),
                     connections_opened=run.connections_opened)


def _sample(t_s: float, dt: float, before: Scrape, after: Scrape) -> Sample:
    ok = after.total("poller_polls_total", outcome="ok") - \
        before.total("poller_polls_total", outcome="ok")
    rows = after.value("poller_rows_committed_total") - before.value("poller_rows_committed_total")
    late = after.histograms[_LATENESS].minus(before.histograms[_LATENESS])
    return Sample(round(t_s, 3), ok / dt, rows / dt, late.quantile(0.99))


def _fleet_run(devices: int, interval_s: float, start: _Snapshot, end: _Snapshot,
               series: list[Sample], rss: int | None, jitter: dict[str, Any],
               sim_requests: int, k: int, stored: int) -> FleetRun:
    elapsed = end.mono - start.mono
    a, b = start.scrape, end.scrape
    outcomes = {o: int(end.fleet["polls_by_outcome"].get(o, 0)
                       - start.fleet["polls_by_outcome"].get(o, 0))
                for o in end.fleet["polls_by_outcome"]}
    ok = outcomes.get("ok", 0)
    scheduled = b.value("poller_expected_polls_per_second") * elapsed
    late = b.histograms[_LATENESS].minus(a.histograms[_LATENESS])
    commit = b.histograms[_COMMIT].minus(a.histograms[_COMMIT])
    # The poller's max is since start: it belongs to the window only if it grew.
    max_end, max_start = end.fleet["lateness_max_s"], start.fleet["lateness_max_s"]
    bucket = late.highest_bucket()
    window_max = max_end if max_end > max_start or bucket is None else min(bucket, max_end)
    rows = int(b.value("poller_rows_committed_total") - a.value("poller_rows_committed_total"))
    archive = end.archive_bytes - start.archive_bytes
    ticks_scheduled = devices * k

    def cost(before: float | None, after: float | None, units: int) -> ProcessCost:
        if before is None or after is None:
            return ProcessCost(None, None, None)
        used = after - before
        return ProcessCost(used, 100.0 * used / elapsed, used / units * 1e6 if units else None)

    return FleetRun(
        devices=devices, interval_s=interval_s, elapsed_s=elapsed, scheduled_polls=scheduled,
        completed_polls=ok, completed_ratio=ok / scheduled if scheduled else None,
        polls_by_outcome=outcomes,
        skipped_ticks=int(b.value("poller_skipped_ticks_total")
                          - a.value("poller_skipped_ticks_total")),
        backpressure_skips=int(b.value("poller_backpressure_skips_total")
                               - a.value("poller_backpressure_skips_total")),
        shed_ticks=int(b.value("poller_shed_ticks_total") - a.value("poller_shed_ticks_total")),
        connections_opened=int(b.value("poller_http_connections_opened_total")
                               - a.value("poller_http_connections_opened_total")),
        requests_refused=int(b.value("poller_http_requests_refused_total")
                             - a.value("poller_http_requests_refused_total")),
        ticks_window_s=k * interval_s, ticks_scheduled=ticks_scheduled, ticks_stored=stored,
        ticks_ratio=stored / ticks_scheduled if ticks_scheduled else None,
        lateness_p50_s=late.quantile(0.5), lateness_p99_s=late.quantile(0.99),
        lateness_max_s=window_max, lateness_max_is_bound=max_end <= max_start,
        lateness_within_100ms=late.fraction_within(0.1),
        jitter_p50_s=jitter.get("jitter_p50_s"), jitter_p99_s=jitter.get("jitter_p99_s"),
        jitter_max_s=jitter.get("jitter_max_s"), jitter_intervals=int(jitter["intervals"]),
        poller=cost(start.poller_cpu_s, end.poller_cpu_s, ok),
        postgres=cost(start.postgres_cpu_s, end.postgres_cpu_s, ok),
        simulator=cost(start.simulator_cpu_s, end.simulator_cpu_s, sim_requests),
        simulator_requests=sim_requests, rss_bytes=rss, rows_committed=rows,
        rows_per_s=rows / elapsed, commit_p50_s=commit.quantile(0.5),
        commit_p99_s=commit.quantile(0.99), archive_bytes=archive,
        archive_bytes_per_reading=archive / rows if rows else None, series=series,
        **_gc_window(a, b))


def _gc_window(a: Scrape, b: Scrape) -> dict[str, Any]:
    """The poller's collector pauses between two scrapes (``heap.PauseWatch``)."""
    full = b.histograms.get(_GC_FULL)
    if full is None:
        return {}
    before = a.histograms.get(_GC_FULL)
    if before is not None:
        full = full.minus(before)
    held = b.total("poller_gc_pause_seconds_total") - a.total("poller_gc_pause_seconds_total")
    return {"gc_full_collections": int(full.count),
            "gc_full_pause_p99_s": full.quantile(0.99),
            "gc_full_pause_max_s": full.highest_bucket(), "gc_pause_s": held,
            "gc_full_cpu_s": b.value("poller_gc_full_cpu_seconds_total")
            - a.value("poller_gc_full_cpu_seconds_total")}


# -- progress ---------------------------------------------------------------------

def _countdown(label: str, seconds: float, check: Callable[[], None]) -> None:
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        _status(f"{label}: {left:4.0f} s left")
        check()
        time.sleep(min(1.0, left))
    _status_done()


_last_line_at = [0.0]


def _status(line: str) -> None:
    """A countdown line: rewritten in place on a terminal, every 10 s otherwise."""
    if sys.stderr.isatty():
        sys.stderr.write(f"\r\033[Kbench: {line}")
        sys.stderr.flush()
    elif time.monotonic() - _last_line_at[0] >= 10.0:
        _last_line_at[0] = time.monotonic()
        _progress(line)


def _status_done() -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _us(us: float | None) -> str:
    return "-" if us is None else f"{us:.1f} µs"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.4%}"




