"""``poller bench --import-devices N``: registering a fleet beside one that is polled.

The bench starts the simulator with ``--devices`` + N gateways, registers the
first ``--devices`` with ``poller import`` and polls them with ``poller
serve``. After the warm-up it samples ``/metrics`` every second for a
baseline, then runs ``poller import`` on a file of the other N devices (as a
separate process, the way an operator would) and measures:

- the import's wall time, start to exit (parse, check, seal, write);
- how long ``serve`` takes to poll all of them after the import exits
  (``/api/fleet`` devices), each batch having sent one notification;
- poll lateness p99 per second before, during and after, and the worst
  second: the issue's limit is 100 ms for the devices already polled. The
  histogram counts every poll; the new devices poll every
  ``--import-interval`` seconds (3600: 28 polls a second at 100,000, against
  1,667 of the 10,000 polled every 6 s), so the figure is theirs;
- the same import again: nothing to write, every password compared.

The import file holds the simulated devices' passwords: it is written mode
0600 and removed at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from poller import argtypes
from poller.bench import storage
from poller.bench.children import BenchError
from poller.bench.measure import Scrape
from poller.simulator.fleet import cloud_id_for, credentials_for

if TYPE_CHECKING:
    from poller.bench.run import _Bench
    from poller.bench.serves import Serves

_LATENESS = "poller_poll_lateness_seconds"
_LIMIT_S = 0.1
_SUMMARY = re.compile(r"^\d[\d,]* row\(s\): .*$", re.MULTILINE)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("import (registering a fleet beside a polled one)")
    g.add_argument("--import-devices", type=argtypes.count, default=None, metavar="N",
                   help="import N more devices with `poller import` while --devices are "
                   "polled, and report the import's time, serve's pick-up and lateness "
                   "(instead of the throughput bench)")
    g.add_argument("--import-interval", type=argtypes.seconds, default=3600.0,
                   metavar="SECONDS", help="poll interval of the imported devices "
                   "(default 3600)")
    g.add_argument("--import-window", type=argtypes.seconds, default=20.0, metavar="SECONDS",
                   help="lateness sampled this long before the import and after serve "
                   "has picked it up (default 20)")


@dataclass(frozen=True, slots=True)
class ImportRun:
    polled_devices: int
    imported_devices: int
    import_s: float
    """Wall time of ``poller import``, start to exit."""
    import_again_s: float
    """The same file again (nothing to write)."""
    pickup_s: float
    """From the import's exit until serve polls every device."""
    summary: str
    summary_again: str
    lateness_p99_before_s: float | None
    lateness_p99_during_s: float | None
    """Over the import and the pick-up."""
    lateness_p99_after_s: float | None
    worst_second_p99_s: float | None
    """The worst one-second p99 during the import and the pick-up."""
    seconds: list[tuple[float, float | None]]
    """(seconds since the baseline began, p99 of that second)."""

    @property
    def held(self) -> bool:
        return self.worst_second_p99_s is not None and self.worst_second_p99_s <= _LIMIT_S


def run(bench: _Bench, args: argparse.Namespace) -> int:
    """Run on ``bench`` (set up, never started); print and write the report.
    The caller's ``finally`` stops every child."""
    result = _ImportBench(bench, args.import_devices, args.import_interval,
                          args.import_window).run()
    sys.stdout.write(render(result))
    path = bench.opts.json_path
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {**asdict(result), "held": result.held, "limit_s": _LIMIT_S,
           "load_average": os.getloadavg(), "cpus": os.cpu_count()}
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    _progress(f"results: {path}")
    return 0


def _progress(line: str) -> None:
    print(f"bench: {line}", file=sys.stderr, flush=True)


class _ImportBench:
    def __init__(self, bench: _Bench, devices: int, interval_s: float, window_s: float) -> None:
        self.bench = bench
        self.base = bench.opts.devices
        self.devices = devices
        self.interval_s = interval_s
        self.window_s = window_s
        self.seconds: list[tuple[float, float | None]] = []
        self.t0 = 0.0
        self.scraped_at = 0.0

    def run(self) -> ImportRun:
        bench, opts = self.bench, self.bench.opts
        bench._setup()
        total = self.base + self.devices
        _progress(f"simulator: {total:,} devices; {self.base:,} registered and polled every "
                  f"{opts.interval_s:g} s, {self.devices:,} to import")
        _, sim_url = bench._simulator(total, register=False)
        polled = self._fleet_file("polled.csv", 0, self.base, sim_url, opts.interval_s)
        self._import(polled, "register the polled fleet")  # and migrate a new database
        removed = storage.trim_registry(bench.database_url, self.base)
        if removed:
            _progress(f"removed {removed:,} device(s) of earlier runs from the registry")
        serves = bench._start_serves("import")
        serves.wait_ready(self.base, 120.0 + self.base / 1000)
        _progress(f"warm-up {opts.warmup_s:g} s")
        time.sleep(opts.warmup_s)
        imported = self._fleet_file("imported.csv", self.base, self.devices, sim_url,
                                    self.interval_s)
        try:
            self.t0 = time.monotonic()
            first = last = serves.scrape()
            last = self._sample(serves, last, self.window_s)
            before = last
            _progress(f"importing {self.devices:,} devices")
            during = len(self.seconds)
            began = time.monotonic()
            child = bench._start("import", ["import", str(imported), "--apply"])
            while child.alive():
                last = self._sample(serves, last, 1.0)
            import_s = time.monotonic() - began
            if child.proc.returncode != 0:
                raise BenchError(f"poller import exited with {child.proc.returncode}:\n"
                                 f"{child.tail()}")
            summary = _summary(child.log_path)
            exited = time.monotonic()
            deadline = exited + 300.0
            while serves.fleet()["devices"] < total:
                if time.monotonic() > deadline:
                    raise BenchError("serve did not pick the imported devices up in 300 s")
                time.sleep(0.1)
                if time.monotonic() - self.scraped_at >= 1.0:
                    last = self._sample(serves, last, 0.0)
            pickup_s = time.monotonic() - exited
            last = self._sample(serves, last, 1.0 - (time.monotonic() - self.scraped_at))
            worst = [p for _, p in self.seconds[during:] if p is not None]
            picked = last
            last = self._sample(serves, last, self.window_s)
            _progress("importing the same file again")
            began = time.monotonic()
            again = bench._start("import-again", ["import", str(imported), "--apply"])
            again.proc.wait()
            import_again_s = time.monotonic() - began
            summary_again = _summary(again.log_path)
        finally:
            imported.unlink(missing_ok=True)
            polled.unlink(missing_ok=True)
        return ImportRun(
            polled_devices=self.base, imported_devices=self.devices, import_s=import_s,
            import_again_s=import_again_s, pickup_s=pickup_s, summary=summary,
            summary_again=summary_again,
            lateness_p99_before_s=_p99(first, before),
            lateness_p99_during_s=_p99(before, picked),
            lateness_p99_after_s=_p99(picked, last),
            worst_second_p99_s=max(worst) if worst else None, seconds=self.seconds)

    def _sample(self, serves: Serves, last: Scrape, for_s: float) -> Scrape:
        """Scrape every second for ``for_s`` seconds (at least once); each
        second's p99 goes to ``seconds``."""
        end = time.monotonic() + for_s
        while True:
            time.sleep(min(1.0, max(0.0, end - time.monotonic())))
            serves.check_alive()
            now = serves.scrape()
            self.scraped_at = time.monotonic()
            self.seconds.append((round(self.scraped_at - self.t0, 1), _p99(last, now)))
            last = now
            if time.monotonic() >= end:
                return last

    def _fleet_file(self, name: str, first: int, count: int, sim_url: str,
                    interval_s: float) -> Path:
        """A CSV of simulated devices ``first`` .. ``first + count - 1``."""
        path = self.bench.state_dir / name
        seed = self.bench.opts.seed
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write("cloud_id,email,password,url,interval_s\n")
            for i in range(first, first + count):
                cid = cloud_id_for(i)
                email, password = credentials_for(cid, seed)
                out.write(f"{cid},{email},{password},{sim_url},{interval_s:g}\n")
        return path

    def _import(self, path: Path, what: str) -> None:
        _progress(what)
        # --update: the devices of an earlier run point at that run's simulator.
        child = self.bench._start("import-setup", ["import", str(path), "--apply", "--update"])
        child.proc.wait()
        if child.proc.returncode != 0:
            raise BenchError(f"poller import exited with {child.proc.returncode}:\n"
                             f"{child.tail()}")


def _p99(before: Scrape, after: Scrape) -> float | None:
    return after.histograms[_LATENESS].minus(before.histograms[_LATENESS]).quantile(0.99)


def _summary(log: Path) -> str:
    found = _SUMMARY.findall(log.read_text(errors="replace"))
    return found[-1] if found else "(no summary)"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def render(r: ImportRun) -> str:
    rows: list[tuple[str, Any]] = [
        ("devices polled meanwhile", f"{r.polled_devices:,}"),
        ("devices imported", f"{r.imported_devices:,}"),
        ("poller import, start to exit", f"{r.import_s:.1f} s "
         f"({r.imported_devices / r.import_s:,.0f} devices/s)"),
        ("serve polls them all, after the import", f"{r.pickup_s:.1f} s"),
        ("the same file again", f"{r.import_again_s:.1f} s"),
        ("lateness p99 before / during / after", f"{_ms(r.lateness_p99_before_s)} / "
         f"{_ms(r.lateness_p99_during_s)} / {_ms(r.lateness_p99_after_s)}"),
        ("worst one-second p99 during", f"{_ms(r.worst_second_p99_s)} "
         f"({'held' if r.held else 'NOT held'}: limit {_LIMIT_S * 1000:.0f} ms)"),
        ("import said", r.summary),
        ("again said", r.summary_again),
    ]
    width = max(len(k) for k, _ in rows)
    return "".join(f"{k:<{width}}  {v}\n" for k, v in rows)
