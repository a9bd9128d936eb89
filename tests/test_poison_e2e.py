"""Poison readings end to end, through a real ``poller serve``.

Good simulated gateways of every driver poll beside poisoned ones (every
poison kind of the simulator, forced per device): a device time of 2^64-1 or
in microseconds, NaN, Infinity, 1e308, negative values, a meter whose totals
request fails. Before the start, the test also leaves a closed spool segment
of lines no driver made (a tick of 2^64-1, bad JSON, a row Postgres refuses),
which catch-up loads: the second line of defence. ``serve`` runs as a
subprocess and is stopped with SIGTERM; then Postgres, the S3 archive, Redis
and the spool are read:

- every reading served by a good device is in Postgres once and in the archive;
- a poisoned device's readings are there with the bad field null (a failed
  totals request: demand kept, totals null), counted per device under the
  outcome that names why, and by driver in ``/metrics``;
- only the test's own lines are quarantined, each with its reason, and the
  good lines around them load; the loader's lag comes back down and no
  segment is left unloaded.

Then the measurement of issue 13: one EAGLE answering a ``TimeStamp`` of
``0xffffffffffffffff`` beside two good ones. Last, what the first test found:
a loader that never caught up since the start showed no lag at all.
"""

from __future__ import annotations

import asyncio
import collections
import gzip
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from poller import keys, sealing
from poller.archive.naming import archive_key
from poller.archive.s3 import ArchiveStore
from poller.clock import FakeClock
from poller.config import IngestSettings, Settings
from poller.ingest.pgload import PgLoader
from poller.ingest.pipeline import Ingest
from poller.ingest.spool import Spool
from poller.migrate import migrate
from poller.netpolicy import NetPolicy
from poller.registry import Registry
from poller.segment import segment_name
from poller.simulator.faults import Fault
from poller.simulator.fleet import credentials_for
from poller.simulator.main import Simulator, SimulatorConfig
from poller.simulator.payloads import http_json_options, http_json_url
from tests.servicefix import service_env, settings_of, wait_for
from tests.stackfix import RunningStack, fresh_database_url

SEED = 13
INTERVAL_S = 0.5
POLL_FOR_S = 4.0
U64_MAX = 2**64 - 1
NO_READING = "no reading"
"""The field of a device whose poison leaves no number to keep at all."""


@dataclass(frozen=True)
class Case:
    driver: str
    fault: Fault | None
    nulled: str | None
    """The field stored as null in every reading (``totals``: both meter
    totals; NO_READING: the poll stores nothing); None for a good device."""
    outcome: str | None
    """What each poll of the device is counted under besides ``ok``."""


def _good(driver: str) -> Case:
    return Case(driver, None, None, None)


_TIME = ("device_at", "device_time_out_of_range")
_NOT_FINITE = ("demand_w", "value_not_finite")
_HUGE = ("demand_w", "value_out_of_range")
_NEGATIVE_TOTAL = ("delivered_wh", "value_out_of_range")
FLEET: list[Case] = [
    _good("eagle-cloud"), _good("eagle-cloud"), _good("eagle-cloud"),
    _good("eagle-local"), _good("eagle-local"),
    _good("http-json"), _good("http-json"),
    Case("eagle-cloud", Fault.TIMESTAMP_MAX, *_TIME),
    Case("eagle-cloud", Fault.TIMESTAMP_US, *_TIME),
    Case("eagle-cloud", Fault.VALUE_HUGE, *_HUGE),
    # The cloud's demand is signed hex: its "negative" is -2^63 W.
    Case("eagle-cloud", Fault.VALUE_NEGATIVE, *_HUGE),
    # The cloud sends the word where hex is due: no demand, so no reading.
    Case("eagle-cloud", Fault.VALUE_NAN, NO_READING, "unparseable"),
    Case("eagle-cloud", Fault.VALUE_INFINITY, NO_READING, "unparseable"),
    Case("eagle-cloud", Fault.TOTALS_MALFORMED, "totals", "totals_failed"),
    Case("eagle-cloud", Fault.TOTALS_5XX, "totals", "totals_failed"),
    Case("eagle-cloud", Fault.TOTALS_HANG, "totals", "totals_failed"),
    Case("eagle-local", Fault.TIMESTAMP_MAX, *_TIME),
    Case("eagle-local", Fault.TIMESTAMP_US, *_TIME),
    Case("eagle-local", Fault.VALUE_NAN, *_NOT_FINITE),
    Case("eagle-local", Fault.VALUE_INFINITY, *_NOT_FINITE),
    Case("eagle-local", Fault.VALUE_HUGE, *_HUGE),
    Case("eagle-local", Fault.VALUE_NEGATIVE, *_NEGATIVE_TOTAL),
    Case("http-json", Fault.TIMESTAMP_MAX, *_TIME),
    Case("http-json", Fault.TIMESTAMP_US, *_TIME),
    Case("http-json", Fault.VALUE_NAN, *_NOT_FINITE),
    Case("http-json", Fault.VALUE_INFINITY, *_NOT_FINITE),
    Case("http-json", Fault.VALUE_HUGE, *_HUGE),
    Case("http-json", Fault.VALUE_NEGATIVE, *_NEGATIVE_TOTAL),
]
RowKey = tuple[int, float]
"""device id, tick_at (Unix seconds, to the millisecond)."""
Values = tuple[float | None, float | None, float | None, float | None, float | None]
"""device_at, demand_w, delivered_wh, received_wh, price."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ms(t: float) -> float:
    return round(t, 3)


@dataclass
class Run:
    """A registered fleet against a simulator, and how to run ``serve`` on it."""

    sim: Simulator
    settings: Settings
    env: dict[str, str]
    api: str
    cases: dict[str, Case]
    """cloud id -> what it serves."""
    ids: dict[str, int]
    """cloud id -> device id."""
    log: Path

    async def serve(self, seconds: float) -> tuple[str, dict[str, dict[str, Any]]]:
        """Run ``poller serve`` until it has polled for ``seconds`` and its
        loader has caught up, stop it with SIGTERM; returns /metrics and the
        devices' status as the API showed them just before the stop."""
        with self.log.open("ab") as out:  # the child has its own copy
            proc = subprocess.Popen([sys.executable, "-m", "poller", "serve"],
                                    env={**os.environ, **self.env},
                                    stdout=out, stderr=subprocess.STDOUT)
        try:
            await wait_for(lambda: bool(self.sim.served()) or proc.poll() is not None, 60,
                           "serve polls")
            assert proc.poll() is None, self.tail()
            await asyncio.sleep(seconds)
            metrics, statuses = await self._scrape()
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait, 30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert code == 0, self.tail()
        return metrics, statuses

    async def _scrape(self) -> tuple[str, dict[str, dict[str, Any]]]:
        async with aiohttp.ClientSession() as http:
            # The loader keeps up: its lag (the oldest reading not committed)
            # stays below a few flushes. A member it could not load would
            # hold it (and the lag) back for good.
            deadline = time.monotonic() + 15
            while True:
                async with http.get(f"{self.api}/metrics") as resp:
                    assert resp.status == 200
                    metrics = await resp.text()
                if _metric(metrics, "poller_ingest_lag_seconds") <= 1.0:
                    break
                assert time.monotonic() < deadline, "the loader's lag did not come down"
                await asyncio.sleep(0.1)
            statuses = {}
            for cid in self.cases:
                async with http.get(f"{self.api}/api/devices/{cid}") as resp:
                    assert resp.status == 200
                    statuses[cid] = (await resp.json())["status"]
        return metrics, statuses

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


MakeRun = Callable[..., Awaitable[Run]]


@pytest.fixture
async def make_run(stack: RunningStack, tmp_path: Path) -> AsyncIterator[MakeRun]:
    """Start a simulator serving ``fleet`` (faults forced), register it in a
    database of its own; ``extra`` settings go to serve's environment."""
    sims: list[Simulator] = []

    async def make(fleet: list[Case], **extra: str) -> Run:
        sim = Simulator(SimulatorConfig(devices=len(fleet), seed=SEED, record_served=True))
        sims.append(sim)
        port = await sim.start()
        api_port = _free_port()
        env = service_env(stack.info, fresh_database_url(stack.info), tmp_path / "state",
                          "poison", POLLER_API_PORT=str(api_port),
                          POLLER_POLLING_RESYNC_INTERVAL_S="5", **extra)
        settings = settings_of(env)
        client = aioredis.from_url(settings.redis.url)
        try:
            await client.flushdb()
        finally:
            await client.aclose()
        cases = dict(zip(sim.cloud_ids(), fleet, strict=True))
        ids = await _register(settings, f"http://127.0.0.1:{port}", cases)
        forced: dict[Fault, list[str]] = collections.defaultdict(list)
        for cid, case in cases.items():
            if case.fault is not None:
                forced[case.fault].append(cid)
        sim.set_faults(forced)
        return Run(sim, settings, env, f"http://127.0.0.1:{api_port}", cases, ids,
                   tmp_path / "serve.log")

    try:
        yield make
    finally:
        for sim in sims:
            await sim.stop()


async def _register(settings: Settings, base: str, cases: dict[str, Case]) -> dict[str, int]:
    conn = await asyncpg.connect(settings.database.url)
    try:
        await migrate(conn)
        registry = Registry(conn, sealing.SecretBox(sealing.load_key(settings.state_dir)),
                            NetPolicy.from_settings(settings.polling))
        ids = {}
        for cid, case in cases.items():
            email, secret = credentials_for(cid, SEED)
            url, options = base, {}
            if case.driver == "http-json":
                url, options = http_json_url(base, cid), http_json_options()
            record = await registry.add(cid, email=email, driver=case.driver, url=url,
                                        interval_s=INTERVAL_S, options=options, secret=secret)
            ids[cid] = record.id
        return ids
    finally:
        await conn.close()


# --- what is stored, read back --------------------------------------------------


def _values(device_at: float | None, demand: float | None, delivered: float | None,
            received: float | None, price: float | None) -> Values:
    return (None if device_at is None else _ms(device_at), demand, delivered, received, price)


async def _readings(url: str) -> collections.Counter[tuple[RowKey, Values]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT * FROM readings")
    finally:
        await conn.close()
    return collections.Counter(
        ((r["device_id"], _ms(r["tick_at"].timestamp())),
         _values(None if r["device_at"] is None else r["device_at"].timestamp(), r["demand_w"],
                 r["delivered_wh"], r["received_wh"], r["price"]))
        for r in rows)


def _from_line(doc: dict[str, Any]) -> tuple[RowKey, Values]:
    return ((doc["device_id"], _ms(doc["tick_at"])),
            _values(doc["device_at"], doc["demand_w"], doc["delivered_wh"], doc["received_wh"],
                    doc["price"]))


async def _archive(settings: Settings, stack: RunningStack) -> dict[str, bytes]:
    """Every archived segment's decompressed NDJSON, by key."""
    s = settings
    store = ArchiveStore(stack.info.s3_endpoint_url, s.s3.bucket, s.s3.region, "", "")
    await store.start()
    try:
        return {key: gzip.decompress(await store.get(key))
                for key, _ in await store.list_keys(f"{s.s3.prefix}/readings/")}
    finally:
        await store.close()


async def _live_state(settings: Settings) -> dict[str, dict[str, Any]]:
    client = aioredis.from_url(settings.redis.url)
    try:
        state = await client.hgetall(keys.STATE)
    finally:
        await client.aclose()
    return {k.decode() if isinstance(k, bytes) else k: orjson.loads(v)
            for k, v in state.items()}


def _metric(text: str, name: str, **labels: str) -> float:
    found = [sample.value for family in text_string_to_metric_families(text)
             for sample in family.samples
             if sample.name == name and all(sample.labels.get(k) == v
                                            for k, v in labels.items())]
    return sum(found)


def _polls_by_driver(text: str) -> dict[tuple[str, str], float]:
    return {(s.labels["driver"], s.labels["outcome"]): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "poller_polls_total" and s.value}


async def _unloaded_segments(settings: Settings) -> list[str]:
    """Segment files left in the spool whose checkpoint is short of their end."""
    spool = Path(settings.state_dir) / "spool"
    conn = await asyncpg.connect(settings.database.url)
    try:
        checkpoints = {r["segment"]: r["end_offset"] for r in await conn.fetch(
            "SELECT segment, end_offset FROM ingest_checkpoints WHERE instance_id = $1",
            settings.instance_id)}
    finally:
        await conn.close()
    return [p.name for p in sorted(spool.iterdir())
            if p.name.endswith(".ndjson.gz.open")
            or (p.name.endswith(".ndjson.gz") and checkpoints.get(p.name) != p.stat().st_size)]


# --- the test's own segment: lines no driver made ---------------------------------


@dataclass(frozen=True)
class Injected:
    name: str
    ndjson: bytes
    good: list[tuple[RowKey, Values]]
    refused: dict[int, str]
    """line -> what its reason in the quarantine must say."""


def _inject_segment(settings: Settings, device_id: int) -> Injected:
    """A closed spool segment of the hour before this one, as a crashed
    earlier life would have left it: good lines of ``device_id`` between lines
    no driver writes, which the encoder or Postgres refuses."""
    hour = (int(time.time()) // 3600 - 1) * 3600

    def line(tick: float, *, device: int = device_id, device_at: float | None = None,
             demand: str = "230.5") -> bytes:
        return (b'{"device_id":%d,"tick_at":%r,"device_at":%r,"received_at":%r,'
                b'"demand_w":%s,"delivered_wh":1000.0,"received_wh":null,"price":null,'
                b'"cloud_id":"injected"}'
                % (device, tick, tick - 0.5 if device_at is None else device_at, tick + 0.25,
                   demand.encode()))

    members: list[list[tuple[bytes, str | None]]] = [
        [
            (line(hour + 60), None),
            (line(U64_MAX), "tick_at 18446744073709551615 is outside"),
            (line(hour + 66, device_at=U64_MAX), "device_at 18446744073709551615 is outside"),
            (line(hour + 72, device_at=(hour + 72) * 1e6), "device_at"),
            (line(hour + 78), None),
        ],
        [
            (line(hour + 84, demand="NaN"), "not JSON"),
            (line(hour + 90, device=666), "CheckViolationError"),
            (b'{"device_id": 3, "tick_at": %d}' % (hour + 96), "not a reading: no received_at"),
            (b"\x00 not a reading at all", "not JSON"),
            (line(hour + 102), None),
        ],
    ]
    spool = Path(settings.state_dir) / "spool"
    spool.mkdir(parents=True, exist_ok=True)
    name = segment_name(settings.instance_id, hour, 1)
    refused: dict[int, str] = {}
    good: list[tuple[RowKey, Values]] = []
    ndjson = b""
    body = b""
    n = 0
    for member in members:
        text = b"".join(raw + b"\n" for raw, _ in member)
        ndjson += text
        body += gzip.compress(text)
        for raw, reason in member:
            n += 1
            if reason is None:
                good.append(_from_line(orjson.loads(raw)))
            else:
                refused[n] = reason
    (spool / name).write_bytes(body)
    return Injected(name, ndjson, good, refused)


async def _refuse_device_666(url: str) -> None:
    """A rule of this database's own, for a line that only Postgres refuses."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("ALTER TABLE readings ADD CONSTRAINT no_666 CHECK (device_id <> 666)")
    finally:
        await conn.close()


async def _quarantine(url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch("SELECT * FROM readings_quarantine ORDER BY segment, line"))
    finally:
        await conn.close()


# --- the tests -------------------------------------------------------------------------


def _by_device(rows: collections.Counter[tuple[RowKey, Values]],
               ) -> dict[int, list[Values]]:
    out: dict[int, list[Values]] = collections.defaultdict(list)
    for ((device_id, _), values), n in rows.items():
        out[device_id].extend([values] * n)
    return out


Served = collections.Counter[tuple[str, int, float]]


def _served(sim: Simulator) -> Served:
    """(cloud id, device time, demand) of each demand answer served."""
    return collections.Counter((s.cloud_id, s.device_at, round(s.demand_w, 3))
                               for s in sim.served() if s.demand_w is not None)


def _as_served(run: Run, rows: collections.Counter[tuple[RowKey, Values]],
               cloud_ids: set[str]) -> Served:
    """The rows of ``cloud_ids`` as :func:`_served` keys them."""
    device_of = {v: k for k, v in run.ids.items()}
    out: Served = collections.Counter()
    for ((device_id, _), values), n in rows.items():
        cid = device_of[device_id]
        if cid in cloud_ids:
            assert values[0] is not None and values[1] is not None
            out[(cid, int(values[0]), round(values[1], 3))] += n
    return out


def _assert_nulled(case: Case, values: list[Values], what: str) -> None:
    device_at, demand, delivered, received, _ = zip(*values, strict=True)
    null = {"device_at": [device_at], "demand_w": [demand], "delivered_wh": [delivered],
            "totals": [delivered, received]}[case.nulled or ""]
    for column in null:
        assert all(v is None for v in column), what
    # ... and only it: the rest of each reading is kept.
    kept = {"device_at": device_at, "demand_w": demand, "delivered_wh": delivered}
    for name, column in kept.items():
        if name != case.nulled and not (case.nulled == "totals" and name == "delivered_wh"):
            assert all(v is not None for v in column), (what, name)


async def test_poison_never_blocks_storage_through_serve(make_run: MakeRun,
                                                         stack: RunningStack) -> None:
    run = await make_run(FLEET, POLLER_POLLING_TOTALS_EVERY="1")
    db_url = run.settings.database.url
    await _refuse_device_666(db_url)
    first_good = next(cid for cid, c in run.cases.items() if c.fault is None)
    injected = _inject_segment(run.settings, run.ids[first_good])

    metrics, statuses = await run.serve(POLL_FOR_S)

    rows = await _readings(db_url)
    assert not [k for k, n in rows.items() if n > 1], "a reading stored twice"
    by_key = {key: values for key, values in rows}
    assert len(by_key) == len(rows), "a (device, tick) stored twice"

    # The test's own segment: its good lines loaded, every other line
    # quarantined with its reason; nothing a device served is there.
    for key, values in injected.good:
        assert by_key.get(key) == values, key
        del rows[(key, values)]
    quarantined = await _quarantine(db_url)
    assert [(q["segment"], q["line"]) for q in quarantined] == \
        [(injected.name, n) for n in sorted(injected.refused)]
    lines = injected.ndjson.split(b"\n")
    for q in quarantined:
        assert injected.refused[q["line"]] in q["reason"], (q["line"], q["reason"])
        # The line as written (a NUL, which text cannot hold, shown escaped).
        assert q["raw"] == lines[q["line"] - 1].decode().replace("\x00", "\\x00")
        assert q["instance_id"] == run.settings.instance_id
    assert _metric(metrics, "poller_rows_quarantined_total") == len(injected.refused)

    # Every good device's reading, and the demand of a meter whose totals
    # fail, is in Postgres as served: nothing lost, nothing invented.
    served = _served(run.sim)
    stored = _as_served(run, rows, {cid for cid, c in run.cases.items()
                                    if c.nulled in (None, "totals")})
    assert sum(served.values()) >= 10 * 6
    assert stored == served, (f"missing {sum((served - stored).values())}, "
                              f"extra {sum((stored - served).values())}")

    # Per device: as many readings as polls reached the device, each with
    # the bad field null and counted under why (Redis has the final counts).
    live = await _live_state(run.settings)
    per_device = _by_device(rows)
    for cid, case in run.cases.items():
        what = f"{cid} {case.driver} {case.fault}"
        readings = per_device.get(run.ids[cid], [])
        polls = run.sim.records.polls_of(cid)
        doc = live[cid]
        status = statuses[cid]
        if case.nulled == NO_READING:
            assert polls >= 1 and readings == [], what
            assert doc["failures"] == {case.outcome: polls}, what
            assert doc["total_events_logged"] == 0, what
            continue
        assert len(readings) == polls == doc["total_events_logged"], what
        assert polls >= 5, what
        if case.fault is None:
            assert doc["failures"] == {}, what
            assert status["failures"] == {} and status["last_outcome"] == "ok", what
            assert all(None not in v[:3] for v in readings), what
            continue
        _assert_nulled(case, readings, what)
        assert doc["failures"] == {case.outcome: polls}, what
        assert doc["state"] == "stopped", what
        assert status["last_outcome"] == case.outcome, what
        assert status["state"] == "ok", what
        assert 0 < status["failures"][case.outcome] <= polls, what

    # /metrics counts each reason by driver, and nothing else went wrong.
    expected: collections.Counter[tuple[str, str]] = collections.Counter()
    for cid, case in run.cases.items():
        if case.outcome is not None:
            expected[(case.driver, case.outcome)] += live[cid]["failures"][case.outcome]
    by_driver = _polls_by_driver(metrics)
    assert {k for k in by_driver if k[1] != "ok"} == set(expected)
    for driver_outcome, final in expected.items():
        # Scraped before the last polls.
        assert 0 < by_driver[driver_outcome] <= final, driver_outcome

    # The archive holds every reading once, as Postgres has it, and the
    # test's segment exactly as written; the spool kept nothing unloaded.
    archive = await _archive(run.settings, stack)
    ours = archive_key(run.settings.s3.prefix, injected.name)
    assert archive.pop(ours) == injected.ndjson
    archived = collections.Counter(_from_line(orjson.loads(raw)) for data in archive.values()
                                   for raw in data.splitlines())
    assert archived == rows, (f"missing {sum((rows - archived).values())}, "
                              f"extra {sum((archived - rows).values())}")
    assert await _unloaded_segments(run.settings) == []
    assert "loader step failed" not in run.tail()


async def test_one_eagle_with_a_timestamp_of_2_64_stops_nothing(make_run: MakeRun,
                                                               stack: RunningStack) -> None:
    # Issue 13, measured: one EAGLE answering TimeStamp 0xffffffffffffffff
    # beside two good gateways left the good ones 1 row of 6 and serve
    # exited 1 on SIGTERM.
    fleet = [_good("eagle-cloud"), Case("eagle-cloud", Fault.TIMESTAMP_MAX, *_TIME),
             _good("eagle-cloud")]
    run = await make_run(fleet)
    await run.serve(POLL_FOR_S)  # asserts exit code 0

    rows = await _readings(run.settings.database.url)
    good_one, bad_one, good_two = run.sim.cloud_ids()
    served = _served(run.sim)
    assert sum(served.values()) >= 2 * 6
    assert _as_served(run, rows, {good_one, good_two}) == served
    poisoned = _by_device(rows)[run.ids[bad_one]]
    assert len(poisoned) == run.sim.records.polls_of(bad_one) >= 6
    assert all(v[0] is None and v[1] is not None for v in poisoned)
    assert await _quarantine(run.settings.database.url) == []
    archive = await _archive(run.settings, stack)
    archived = collections.Counter(_from_line(orjson.loads(raw)) for data in archive.values()
                                   for raw in data.splitlines())
    assert archived == rows
    assert await _unloaded_segments(run.settings) == []


async def test_a_loader_that_never_caught_up_since_the_start_shows_its_lag(
        tmp_path: Path) -> None:
    # A start is behind from the outset (the loader catches up from the spool
    # first); that was undated, so while the first catch-up kept failing (a
    # member it could not load, Postgres out of reach) the lag read 0 s and
    # /readyz said ready. Postgres is out of reach here: a closed port.
    clock = FakeClock()
    spool = Spool(tmp_path / "spool", "t", clock.wall)
    loader = PgLoader("postgresql://127.0.0.1:1/unused", "t", spool, timeout_s=2.0)
    ingest = Ingest(IngestSettings(flush_interval_s=2.0), spool, loader, None, None, clock)
    await ingest.start()
    try:
        await clock.run(30.0)
        assert ingest.rows_committed == 0 and not ingest.postgres_up
        assert ingest.ingest_lag_s() == pytest.approx(30.0, abs=0.5)
    finally:
        await ingest.stop(clock.monotonic() + 5)
