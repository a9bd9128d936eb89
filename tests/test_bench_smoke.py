"""A small real run of ``poller bench`` so it cannot rot: the JSON it writes has
every field with a sane type, and polls completed. No timing is asserted: the
machine is shared, and the bench measures rather than judges."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from poller import config
from poller.bench.report import SweepStep, overload_ratio, render_sweep
from poller.bench.run import add_arguments, run_bench
from poller.bench.serves import shard_dir
from tests.servicefix import QUICK_SETTLE
from tests.stackfix import RunningStack

NUMBER = (int, float)


def _bench_args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([
        "--devices", "50", "--interval", "1", "--duration", "3", "--warmup", "1",
        "--no-wrk", "--no-rss-slope", "--json", str(tmp_path / "out" / "bench.json"),
        "--storage-devices", "0", *extra])
    args.state_dir = str(tmp_path / "state")
    return args


def _check_types(doc: dict[str, Any], spec: dict[str, Any]) -> None:
    for key, kind in spec.items():
        assert key in doc, f"missing {key}"
        assert isinstance(doc[key], kind), f"{key}={doc[key]!r} is not {kind}"


def _settings(stack: RunningStack, database_url: str,
              monkeypatch: pytest.MonkeyPatch) -> config.Settings:
    for name, value in QUICK_SETTLE.items():
        monkeypatch.setenv(name, value)
    # The session's servers by URL: the bench starts no embedded stack of its own.
    return config.load(config_path=None, env={
        "POLLER_DATABASE_URL": database_url,
        "POLLER_REDIS_URL": stack.info.redis_url,
        "POLLER_S3_ENDPOINT_URL": stack.info.s3_endpoint_url,
        "POLLER_S3_BUCKET": stack.info.bucket,
        "POLLER_S3_PREFIX": f"bench-{uuid.uuid4().hex[:8]}",
        **QUICK_SETTLE,
    })


def test_bench_smoke_writes_a_complete_report(stack: RunningStack, fresh_db: str,
                                              tmp_path: Path, capsys: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(stack, fresh_db, monkeypatch)
    stacks = tmp_path / "out" / "stacks.txt"
    assert run_bench(settings, _bench_args(tmp_path, "--profile", str(stacks),
                                           "--storage-devices", "20",
                                           "--storage-hours", "1")) == 0

    doc = json.loads((tmp_path / "out" / "bench.json").read_text())
    main = doc["main"]
    _check_types(main, {
        "devices": int, "interval_s": NUMBER, "elapsed_s": NUMBER, "scheduled_polls": NUMBER,
        "completed_polls": int, "completed_ratio": NUMBER, "polls_by_outcome": dict,
        "skipped_ticks": int, "backpressure_skips": int, "ticks_scheduled": int,
        "ticks_stored": int, "ticks_ratio": NUMBER, "lateness_p50_s": NUMBER,
        "lateness_p99_s": NUMBER, "lateness_max_s": NUMBER, "lateness_within_100ms": NUMBER,
        "jitter_p50_s": NUMBER, "jitter_p99_s": NUMBER, "jitter_intervals": int,
        "poller": dict, "postgres": dict, "simulator": dict, "simulator_requests": int,
        "rss_bytes": int, "rows_committed": int, "rows_per_s": NUMBER,
        "commit_p50_s": NUMBER, "commit_p99_s": NUMBER, "archive_bytes": int,
        "archive_bytes_per_reading": NUMBER, "series": list, "held": bool,
    })
    assert main["devices"] == 50
    assert main["completed_polls"] > 0
    assert main["ticks_scheduled"] == 50 * 3
    assert 0 < main["ticks_stored"] <= main["ticks_scheduled"]
    assert main["simulator_requests"] >= main["completed_polls"]
    assert main["rows_committed"] > 0 and main["archive_bytes"] > 0
    assert main["rss_bytes"] > 1_000_000
    _check_types(main["poller"], {"cpu_s": NUMBER, "percent_core": NUMBER,
                                  "us_per_unit": NUMBER})
    # CPU over the window: some was spent (50 devices polled every second),
    # never more than the machine's cores give in that time; per poll, those
    # seconds over the polls completed, and more than a microsecond (a poll
    # through the interpreter cannot cost less).
    poller = main["poller"]
    assert 0 < poller["cpu_s"] <= main["elapsed_s"] * (os.cpu_count() or 1)
    assert poller["us_per_unit"] == pytest.approx(poller["cpu_s"] / main["completed_polls"] * 1e6)
    assert poller["us_per_unit"] > 1.0
    # The session's Postgres is not the bench's to measure.
    assert main["postgres"]["cpu_s"] is None
    assert main["series"] and {"t_s", "polls_ok_per_s", "rows_per_s",
                               "lateness_p99_s"} <= set(main["series"][0])
    assert doc["runs"] == [main]
    assert doc["floor"] is None and doc["rss_slope"] is None and doc["sweep"] == []
    names = [t["name"] for t in doc["targets"]]
    assert len(names) == 8
    past = next(t for t in doc["targets"] if t["name"].startswith("past the limit"))
    assert (past["value"], past["status"]) == ("no sweep", "n/a")
    # Kept-alive connections: no device's connection opened again and again.
    assert main["shed_ticks"] == 0 and main["connections_opened"] <= 50
    assert {t["status"] for t in doc["targets"]} <= {"pass", "fail", "n/a"}
    assert doc["chart"] is None or Path(doc["chart"]).is_file()

    profile = doc["profile"]
    assert profile["available"], profile["reason"]
    assert profile["path"] == str(stacks) and stacks.is_file()
    assert profile["samples"] == sum(int(line.rsplit(" ", 1)[1])
                                     for line in stacks.read_text().splitlines())

    # The storage measure: 20 devices for an hour at 1 s through the loader, then packed.
    storage = doc["storage"]
    assert storage["rows"] == 20 * 3600 and storage["loader_rows_per_s"] > 0
    assert [p["rows"] for p in storage["raw"]] == [storage["rows"]]
    assert [p["rows"] for p in storage["packed"]] == [0, storage["rows"]]
    assert 0 < storage["packed_bytes_per_reading"] < storage["raw_bytes_per_reading"]

    out = capsys.readouterr().out
    assert "== 50 devices ==" in out and "== targets ==" in out
    assert "raw bytes per reading" in out and "loader catch-up" in out
    assert "== profile: poller serve, main window ==" in out


def test_bench_shards_poll_the_fleet_once_between_them(stack: RunningStack, fresh_db: str,
                                                       tmp_path: Path, capsys: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(stack, fresh_db, monkeypatch)
    assert run_bench(settings, _bench_args(tmp_path, "--shards", "2", "--api-load",
                                           "--api-rate", "0")) == 0
    doc = json.loads((tmp_path / "out" / "bench.json").read_text())
    main = doc["main"]
    # --api-load: every kind of read was answered, each a list of devices or one.
    api = {a["kind"]: a for a in main["api"]}
    assert set(api) == {"list", "filter", "unpolled", "device"}
    for kind in api.values():
        assert kind["requests"] > 0 and kind["errors"] == 0, kind
        assert 0 < kind["p50_s"] <= kind["p99_s"] <= kind["max_s"]
    # Shard 0 polls about half the fleet: the rest is unpolled there.
    assert 0 < api["list"]["rows_per_answer"] <= 50
    assert api["filter"]["rows_per_answer"] == 0
    assert 0 < api["unpolled"]["rows_per_answer"] < 50
    assert api["device"]["rows_per_answer"] == 1
    assert sum("API load" in t["name"] for t in doc["targets"]) == 3
    assert "API list p50 / p99 / max" in capsys.readouterr().out
    assert main["devices"] == 50
    assert 0 < main["ticks_stored"] <= main["ticks_scheduled"] == 50 * 3
    assert main["completed_polls"] > 0 and main["rows_committed"] > 0
    logs = tmp_path / "state" / "bench-logs"
    polled = []
    for k in range(2):
        found = re.search(rf"polling (\d+) device\(s\) \(shard {k}/2\)",
                          (logs / f"serve-{k}.log").read_text())
        assert found, f"serve-{k} did not log its shard"
        polled.append(int(found.group(1)))
        assert (shard_dir(tmp_path / "state", k) / "spool").is_dir()
    assert sum(polled) == 50 and min(polled) > 0


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # gone meanwhile
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigterm_stops_the_bench_and_every_process_it_started(
        stack: RunningStack, fresh_db: str, tmp_path: Path) -> None:
    env = {**os.environ, "POLLER_DATABASE_URL": fresh_db,
           "POLLER_REDIS_URL": stack.info.redis_url,
           "POLLER_S3_ENDPOINT_URL": stack.info.s3_endpoint_url,
           "POLLER_S3_BUCKET": stack.info.bucket,
           "POLLER_S3_PREFIX": f"bench-{uuid.uuid4().hex[:8]}"}
    log = tmp_path / "bench.err"
    started: list[int] = []
    with log.open("wb") as err:
        bench = subprocess.Popen(
            [sys.executable, "-m", "poller", "--state-dir", str(tmp_path / "state"), "bench",
             "--devices", "20", "--interval", "1", "--duration", "120", "--warmup", "1",
             "--no-wrk", "--no-rss-slope", "--json", str(tmp_path / "bench.json")],
            stdout=subprocess.DEVNULL, stderr=err, env=env)
    try:
        deadline = time.monotonic() + 90
        while b"measuring for" not in log.read_bytes():
            assert bench.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        started = _children(bench.pid)
        assert len(started) == 2  # the simulator and the poller
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=90) == 128 + signal.SIGTERM
        assert not [pid for pid in started if _alive(pid)], log.read_text()
        assert not (tmp_path / "bench.json").exists()  # a cut run reports nothing
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
        for pid in [p for p in started if _alive(p)]:  # only if the bench failed to
            os.kill(pid, signal.SIGKILL)


def test_bench_kills_one_instance_and_reports_the_failover(stack: RunningStack, fresh_db: str,
                                                           tmp_path: Path, capsys: Any,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    settings = _settings(stack, fresh_db, monkeypatch)
    args = _bench_args(tmp_path, "--instances", "2", "--kill-one", "--devices", "200",
                       "--duration", "8")
    assert run_bench(settings, args) == 0
    doc = json.loads((tmp_path / "out" / "bench.json").read_text())
    failover = doc["failover"]
    assert failover["instances"] == 2 and failover["killed"] == "bench-instance-1"
    # Rendezvous hashing gives each of two members about half the fleet.
    assert 40 < failover["devices"] < 160
    # Every device of the dead one was polled again by the survivor, within
    # two intervals (heartbeat and lease are derived from the 1 s interval).
    assert failover["not_repolled"] == 0
    assert failover["repolled_within_2_intervals"] == failover["devices"]
    assert 0 < failover["repolled_after_max_s"] <= 2 * failover["interval_s"]
    assert failover["heartbeat_s"] + failover["lease_s"] < failover["interval_s"]
    # The gap spans the kill: more than nothing, at most the window after it.
    assert 0 < failover["gap_p99_s"] <= failover["gap_max_s"]
    assert failover["gap_max_s"] <= failover["observed_s"] + failover["interval_s"]
    assert failover["gap_max_intervals"] == pytest.approx(failover["gap_max_s"])  # 1 s interval
    assert 2.0 < failover["killed_at_s"] < 6.0
    # The sums go on after the kill: the survivor polled the whole fleet, the
    # dead one's polls still count, its gauges do not (expected polls/s: 200).
    main = doc["main"]
    assert main["completed_polls"] > 200 * 3 and main["ticks_stored"] > 0
    assert main["scheduled_polls"] == pytest.approx(200 * main["elapsed_s"], rel=0.05)
    logs = tmp_path / "state" / "bench-logs"
    assert "cluster" in (logs / "serve-0.log").read_text()
    out = capsys.readouterr().out
    assert "== failover: kill -9 of one cluster instance ==" in out
    assert "largest gap per device, max / p99" in out


def test_overload_ratio_compares_the_largest_overload_with_the_fleet_held() -> None:
    def step(devices: int, held: bool, per_s: float, overload: bool = False) -> SweepStep:
        return SweepStep(devices, held, None, None, None, polls_ok_per_s=per_s,
                         overload=overload)

    steps = [step(1000, True, 160.0), step(2000, True, 330.0), step(4000, False, 500.0),
             step(3000, False, 480.0), step(4000, False, 450.0, overload=True),
             step(8000, False, 300.0, overload=True)]
    assert overload_ratio(steps, 2000) == 300.0 / 330.0  # the worst step past the limit
    assert overload_ratio(steps[:-2], 2000) is None  # no step past the limit
    assert overload_ratio(steps, None) is None
    report = render_sweep(steps, 2000)
    lines = report.splitlines()
    assert lines[-1].startswith("  past the limit: 90.9%")
    assert lines[-3].split()[:2] == ["8,000", "past"] and lines[1].split()[:2] == ["1,000", "held"]
