"""The polling engine against the real simulator over loopback.

Time is a FakeClock the tests move (poller.clock): the pool, its wheel and
the transport's deadlines all run on it, so ticks, back-off, timeouts and
clock steps happen exactly when a test says. Only the exchanges with the
simulator take real time, and the rig waits for those (``Rig.settle``)
before it moves the clock on, so no result depends on how busy the machine
is. The tick arithmetic itself is tested in test_schedule.py.
"""

from __future__ import annotations

import asyncio
import collections
import doctest
import gc
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from poller import heap
from poller.clock import FakeClock
from poller.config import PollingSettings
from poller.drivers.base import DeviceSpec
from poller.http import HttpRequest, HttpResponse
from poller.polling import context, schedule, stats
from poller.polling.adapt import FetchAdapter
from poller.polling.memsink import MemorySink, PlainSink
from poller.polling.pool import DevicePool
from poller.polling.stats import OUTCOMES
from poller.polling.target import DeviceState
from poller.reading import RECEIVED_AT, TICK_AT, Reading
from poller.registry import DeviceRecord
from poller.simulator.faults import Fault
from poller.simulator.fleet import credentials_for
from poller.simulator.main import Simulator, SimulatorConfig
from poller.simulator.payloads import http_json_options, http_json_url
from poller.transport import AiohttpClient, FastHttpClient
from poller.transport.prepared import PreparedRequest
from tests import sources

SEED = 3
T0 = datetime(2026, 1, 1, tzinfo=UTC)
STEP_S = 0.05
"""How far the rig moves the clock between waits for the simulator: less
than any timeout here, so a poll never times out while its answer is on the
way, only when the device withholds it."""
SETTLE_S = 10.0


class Rig:
    def __init__(self, sim: Simulator, pool: DevicePool, fast: FastHttpClient, sink: MemorySink,
                 port: int, clock: FakeClock) -> None:
        self.sim, self.pool, self.fast, self.sink, self.port = sim, pool, fast, sink, port
        self.clock = clock

    async def settle(self, pool: DevicePool | None = None,
                     client: FastHttpClient | None = None) -> None:
        """Wait, in real time, until nothing can happen without the clock
        moving: no connect under way, and every request on a connection is
        one the simulator withholds (a hanging device); the rest has been
        answered, or waits for a connection until a deadline passes."""
        pool = pool or self.pool
        client = client or self.fast
        deadline = time.monotonic() + SETTLE_S
        while True:
            stats = client.stats()
            on_wire = stats.in_flight - stats.waiters - stats.connecting
            # Requests withheld so far, less those that timed out (the only
            # way one ends); other timeouts (after a stall) make this an
            # underestimate, hence the floor.
            withheld = self.sim.stats()["fault_hang"] - pool.stats.outcome_counts()["timeout"]
            if stats.connecting == 0 and on_wire <= max(0, withheld):
                return
            assert time.monotonic() < deadline, f"the simulator did not answer: {stats}"
            await asyncio.sleep(0.001)  # real time: the simulator is answering

    async def run(self, seconds: float, pool: DevicePool | None = None,
                  client: FastHttpClient | None = None) -> None:
        """Let ``seconds`` of fake time pass, a step at a time, each step's
        exchanges with the simulator finished before the next."""
        await self.settle(pool, client)
        for _ in range(round(seconds / STEP_S)):
            self.clock.advance(STEP_S)
            await self.settle(pool, client)

    def entry(self, index: int, cloud_id: str, interval_s: float,
              version: datetime = T0, password: str | None = None,
              ) -> tuple[DeviceRecord, DeviceSpec]:
        email, secret = credentials_for(cloud_id, SEED)
        url = f"http://127.0.0.1:{self.port}"
        rec = DeviceRecord(index, cloud_id, email, "eagle-cloud", url, {}, interval_s, True,
                           T0, version)
        return rec, DeviceSpec(index, cloud_id, email, password or secret, url, {})

    def fleet(self, n: int, interval_s: float) -> dict[int, tuple[DeviceRecord, DeviceSpec]]:
        return {i + 1: self.entry(i + 1, cid, interval_s)
                for i, cid in enumerate(self.sim.cloud_ids()[:n])}

    def json_entry(self, index: int, cloud_id: str, interval_s: float,
                   ) -> tuple[DeviceRecord, DeviceSpec]:
        """The simulator's device ``cloud_id`` as an http-json meter."""
        email, secret = credentials_for(cloud_id, SEED)
        url = http_json_url(f"http://127.0.0.1:{self.port}", cloud_id)
        options = http_json_options()
        rec = DeviceRecord(index, cloud_id, email, "http-json", url, options, interval_s, True,
                           T0, T0)
        return rec, DeviceSpec(index, cloud_id, email, secret, url, options)

    def by_device(self) -> dict[int, list[float]]:
        out: dict[int, list[float]] = collections.defaultdict(list)
        for r in self.sink.readings:
            out[r.device_id].append(r.tick_at)
        return out


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    sim = Simulator(SimulatorConfig(devices=200, seed=SEED, record_served=True))
    port = await sim.start()
    settings = PollingSettings(interval_s=0.5, timeout_s=0.3, backoff_max_s=2.0,
                               auth_failed_interval_s=30.0, totals_every=3)
    # Wall time near the real one: the simulator stamps its answers with the
    # real time, and the drivers bound a device's time by the poll's.
    clock = FakeClock(wall=float(int(time.time())), monotonic=5000.0)
    fast = FastHttpClient(max_connections_per_host=64, clock=clock)
    general = AiohttpClient()
    adapter = FetchAdapter(general, clock)
    sink = MemorySink()
    pool = DevicePool(settings, sink, {"eagle-cloud": fast, "eagle-local": fast,
                                       "http-json": adapter}, seed="test", clock=clock)
    await pool.start()
    try:
        yield Rig(sim, pool, fast, sink, port, clock)
    finally:
        clock.advance(1.0)  # past every deadline: nothing waits on a withheld answer
        await pool.stop(2.0)
        await adapter.close()
        await fast.close()
        await general.close()
        await sim.stop()


def test_context_docstring_examples() -> None:
    result = doctest.testmod(context)
    assert result.attempted > 0 and result.failed == 0


def test_stats_docstring_examples() -> None:
    result = sources.testmod(stats)
    assert result.attempted > 0 and result.failed == 0


async def test_polls_spread_evenly_and_on_the_phase_grid(rig: Rig) -> None:
    interval = 0.5
    rig.pool.sync(rig.fleet(100, interval))
    await rig.run(interval * 6.2)
    ticks = rig.by_device()
    assert len(ticks) == 100
    phases = []
    for device_id, seen in ticks.items():
        cloud_id = rig.pool.loops[device_id].target.cloud_id
        ph = schedule.phase(cloud_id, "test", interval)
        phases.append(ph)
        # Every tick is phase + k * interval, consecutive k: no drift, no gap.
        ks = [round((t - ph) / interval) for t in seen]
        for t, k in zip(seen, ks, strict=True):
            assert abs(t - schedule.tick_time(k, interval, ph)) < 1e-6
        assert ks == list(range(ks[0], ks[0] + len(ks)))
        assert len(ks) >= 5
    # Spread: 100 phases over the interval leave no gap wider than a quarter of it.
    phases.sort()
    gaps = [b - a for a, b in itertools.pairwise(phases)]
    gaps.append(phases[0] + interval - phases[-1])
    assert max(gaps) < interval / 4
    # Sent when due: never early, at most one wheel slot (20 ms) late.
    lateness = rig.pool.stats.lateness
    assert lateness.count == sum(len(seen) for seen in ticks.values())
    assert 0.0 <= lateness.max < 0.02
    # Each tick is one poll the device saw: none lost, none repeated.
    for device_id, seen in ticks.items():
        cloud_id = rig.pool.loops[device_id].target.cloud_id
        assert rig.sim.records.polls_of(cloud_id) == len(seen)


async def test_readings_carry_values_the_simulator_served(rig: Rig) -> None:
    rig.pool.sync(rig.fleet(20, 0.5))
    await rig.run(1.6)
    served: dict[str, list[float | None]] = collections.defaultdict(list)
    for s in rig.sim.served():
        if s.demand_w is not None:
            served[s.cloud_id].append(s.demand_w)
    assert rig.sink.readings
    got: dict[str, list[float | None]] = collections.defaultdict(list)
    with_totals = 0
    for r in rig.sink.readings:
        assert r.device_at is not None
        got[r.cloud_id].append(r.demand_w)
        if r.delivered_wh is not None:
            with_totals += 1
    # Every reading is one the device served, in order, and every answer
    # served was received (the rig waits for them).
    assert set(got) == set(served)
    for cloud_id, values in got.items():
        assert values == pytest.approx(served[cloud_id])
    assert with_totals >= 20  # the first poll of each device reads the totals


async def test_latest_readings_leave_the_collectors_reach(rig: Rig) -> None:
    # Every device's latest reading lives an interval, and the sink's until a
    # flush: long enough to reach the oldest generation, where each full
    # collection would walk all of them. One exact tuple a poll serves both,
    # in either build.
    plain = PlainSink()
    rig.pool.set_sink(plain)
    rig.pool.sync(rig.fleet(20, 0.5))
    await rig.run(1.6)
    latest = [lp.target.latest for lp in rig.pool.loops.values()]
    assert all(r is not None for r in latest)
    last_stored = {r[0]: r for r in plain.readings}
    assert len(last_stored) == 20
    assert all(r is last_stored[r[0]] for r in latest if r is not None)
    assert all(type(r) is tuple and len(r) == len(Reading._fields) for r in plain.readings)
    with heap.watching_pauses() as watch:
        gc.collect()
        assert watch.collections[2] >= 1 and watch.full.count >= 1
        assert watch.seconds[2] > 0.0 and watch.full_cpu_s > 0.0
    assert heap.pauses() is None
    assert not any(gc.is_tracked(r) for r in latest)
    assert not any(gc.is_tracked(r) for r in plain.readings)


def test_reading_indexes_name_the_fields() -> None:
    assert Reading._fields[TICK_AT] == "tick_at"
    assert Reading._fields[RECEIVED_AT] == "received_at"


class RecordingTransport:
    """The fast client, with a record of what the loops ask of it."""

    def __init__(self, inner: FastHttpClient) -> None:
        self.inner = inner
        self.prepared_from: list[HttpRequest] = []
        self.shared_calls = 0
        self.sent: list[tuple[PreparedRequest, bytes | None]] = []

    def prepared(self, request: HttpRequest) -> PreparedRequest:
        self.prepared_from.append(request)
        return self.inner.prepared(request)

    def shared(self, prepared: PreparedRequest) -> tuple[PreparedRequest, bytes]:
        self.shared_calls += 1
        return self.inner.shared(prepared)

    def start(self, prepared: PreparedRequest, deadline: float,
              on_done: Callable[[HttpResponse | BaseException], Any],
              headers: bytes | None = None) -> None:
        self.sent.append((prepared, headers))
        self.inner.start(prepared, deadline, on_done, headers)


async def test_each_session_kind_keeps_its_first_request_as_wire_bytes(rig: Rig) -> None:
    """eagle-cloud sessions repeat their first request: after a device's first
    poll the loop sends the bytes it kept, a template shared by every device
    plus the device's own headers, and nothing is prepared again but the
    totals follow-ups. http-json sessions do not repeat: they return the same
    request each poll, whose bytes are prepared once and sent whole."""
    recording = RecordingTransport(rig.fast)
    pool = DevicePool(rig.pool.settings, rig.sink, {"eagle-cloud": recording,
                                                    "http-json": recording},
                      seed="test", clock=rig.clock)
    await pool.start()
    cloud_ids = rig.sim.cloud_ids()
    fleet = {i: rig.entry(i, cloud_ids[i], 0.5) for i in range(1, 6)}
    fleet.update({i: rig.json_entry(i, cloud_ids[i], 0.5) for i in range(6, 11)})
    try:
        pool.sync(fleet)
        await rig.run(2.2, pool)
        # Taken while nothing is in flight (the rig settled), before the
        # clean-up below moves the clock on.
        readings = list(rig.sink.readings)
        sent = list(recording.sent)
        prepared_from = list(recording.prepared_from)
        shared_calls = recording.shared_calls
    finally:
        rig.clock.advance(1.0)
        await pool.stop(1.0)
    polls = collections.Counter(r.device_id for r in readings)
    assert set(polls) == set(fleet) and min(polls.values()) >= 4  # repeated polls
    totals = collections.Counter(r.device_id for r in readings
                                 if r.delivered_wh is not None and r.device_id <= 5)
    assert all(totals[d] >= 2 for d in range(1, 6))  # every third poll: first, fourth

    demand = [(p, h) for p, h in sent if b"get_instantaneous_demand" in p.raw]
    assert len(demand) == sum(polls[d] for d in range(1, 6))
    # A device's first poll sends the request as its session made it; every
    # later one the template the whole fleet shares, with the device's own
    # headers beside it.
    kept = [(p, h) for p, h in demand if h is not None]
    assert len(demand) - len(kept) == 5
    assert len({id(p) for p, _ in kept}) == 1
    own = {h for _, h in kept}
    assert len(own) == 5
    assert all(h is not None and sum(cloud_ids[d].encode() in h for d in range(1, 6)) == 1
               for h in own)
    assert shared_calls == 5  # once a device, at its first poll
    cloud_prepared = [r for r in prepared_from if "post_manager" in r.url]
    assert len(cloud_prepared) == 5 + sum(totals.values())  # first polls and follow-ups

    json_sent = [(p, h) for p, h in sent if b"post_manager" not in p.raw]
    assert len(json_sent) == sum(polls[d] for d in range(6, 11))
    assert all(h is None for _, h in json_sent)
    assert len({id(p) for p, _ in json_sent}) == 5  # each device's own bytes, reused
    assert len([r for r in prepared_from if "post_manager" not in r.url]) == 5


async def test_overrun_skips_ticks_and_never_bursts(rig: Rig) -> None:
    interval = 0.3
    rig.pool.sync(rig.fleet(20, interval))
    await rig.run(0.7)
    assert rig.pool.stats.skipped_ticks == 0
    before = len(rig.sink.readings)
    rig.clock.stall(interval * 4)  # the event loop stalls: ticks are missed
    await rig.run(0.9)
    ticks = rig.by_device()
    # Each device polled its overdue tick once, then skipped the three or
    # four it missed, then went on with the grid: never a burst.
    assert 20 * 3 <= rig.pool.stats.skipped_ticks <= 20 * 4
    for seen in ticks.values():
        assert len(seen) == len(set(seen))
        assert seen == sorted(seen)
    after = len(rig.sink.readings) - before
    assert after <= 20 * (1 + 0.9 / interval + 1)


@pytest.mark.parametrize(
    ("fault", "outcome", "state"),
    [
        (Fault.AUTH, "auth_rejected", DeviceState.AUTH_FAILED),
        (Fault.HTTP_5XX, "http_error", DeviceState.FAILING),
        (Fault.HANG, "timeout", DeviceState.FAILING),
        (Fault.MALFORMED, "unparseable", DeviceState.FAILING),
        (Fault.RESET, "connect_error", DeviceState.FAILING),
        (Fault.OFFLINE, "connect_error", DeviceState.FAILING),
    ],
)
async def test_fault_gives_outcome_state_and_spares_the_rest(
        rig: Rig, fault: Fault, outcome: str, state: DeviceState) -> None:
    interval = 0.3
    fleet = rig.fleet(30, interval)
    bad = [fleet[i][0].cloud_id for i in (1, 2, 3)]
    rig.sim.set_faults({fault: bad})
    rig.pool.sync(fleet)
    await rig.run(2.0)
    targets = {t.cloud_id: t for t in rig.pool.targets()}
    for cloud_id in bad:
        t = targets[cloud_id]
        assert t.state is state, (cloud_id, t.state, t.last_outcome, t.last_error)
        assert t.last_outcome == outcome
        assert t.readings == 0
        if state is DeviceState.AUTH_FAILED:
            # Polled once, then left alone for auth_failed_interval_s.
            assert t.failures is not None and sum(t.failures) == 1
        else:
            # Backing off: fewer polls than ticks.
            assert t.failures is not None and 1 <= sum(t.failures) < 2.0 / interval
        # Each failed poll reached the sink once, on its tick (for the rollups).
        mine = [f for f in rig.sink.failures if f[0] == t.record.id]
        assert len(mine) == sum(t.failures)
        assert {OUTCOMES[f[2]].value for f in mine} == {outcome}
        assert len({f[1] for f in mine}) == len(mine)
    ticks = rig.by_device()
    healthy = [i for i, (rec, _) in fleet.items() if rec.cloud_id not in bad]
    for device_id in healthy:
        seen = ticks[device_id]
        assert len(seen) >= int(2.0 / interval) - 1, device_id
        ks = [round((t - seen[0]) / interval) for t in seen]
        assert ks == list(range(len(ks))), "a healthy device missed a tick"
    assert rig.pool.stats.outcome_counts()[outcome] >= 3
    _assert_state_counts(rig)
    # The dashboard's "most failing": these three, most failures in a row first.
    worst = rig.pool.most_failing(10)
    ranked = sorted((targets[c] for c in bad),
                    key=lambda t: (-t.consecutive_failures, t.record.id))
    assert worst == [t.record.id for t in ranked]
    assert rig.pool.most_failing(2) == worst[:2]


def _assert_state_counts(rig: Rig) -> None:
    recount = collections.Counter(t.state.value for t in rig.pool.targets())
    assert rig.pool.devices_by_state() == {s.value: recount[s.value] for s in DeviceState}


async def test_recovery_on_first_success(rig: Rig) -> None:
    fleet = rig.fleet(5, 0.3)
    cid = fleet[1][0].cloud_id
    rig.sim.set_faults({Fault.HTTP_5XX: [cid]})
    rig.pool.sync(fleet)
    await rig.run(1.0)
    assert rig.pool.loops[1].target.state is DeviceState.FAILING
    rig.sim.set_faults({Fault.HTTP_5XX: []})
    await rig.run(2.5)  # back-off is capped at 2 s in this rig
    t = rig.pool.loops[1].target
    assert t.state is DeviceState.OK
    assert t.consecutive_failures == 0
    assert t.readings >= 1


async def test_changed_credentials_restart_an_auth_failed_device(rig: Rig) -> None:
    fleet = rig.fleet(3, 0.3)
    rec = fleet[1][0]
    fleet[1] = rig.entry(1, rec.cloud_id, 0.3, password="wrong-password")
    rig.pool.sync(fleet)
    await rig.run(0.8)
    assert rig.pool.loops[1].target.state is DeviceState.AUTH_FAILED
    fixed = rig.entry(1, rec.cloud_id, 0.3, version=replace(rec).updated_at.replace(year=2027))
    result = rig.pool.sync({**fleet, 1: fixed})
    assert result.restarted == 1
    await rig.run(0.8)
    t = rig.pool.loops[1].target
    assert t.state is DeviceState.OK
    assert t.failures is not None and any(t.failures)  # failure history kept


async def test_sync_starts_and_stops_the_difference(rig: Rig) -> None:
    fleet = rig.fleet(10, 0.3)
    assert rig.pool.sync(fleet).started == 10
    assert rig.pool.sync(fleet).started == 0  # idempotent
    smaller = {k: v for k, v in fleet.items() if k > 4}
    res = rig.pool.sync(smaller)
    assert res.stopped == 4 and res.started == 0
    assert sorted(rig.pool.loops) == sorted(smaller)
    assert rig.pool.expected_polls_per_s() == pytest.approx(6 / 0.3)
    _assert_state_counts(rig)
    rig.pool.sync({})
    assert rig.pool.expected_polls_per_s() == 0.0
    rig.pool.sync(smaller)
    await rig.run(0.7)
    assert {r.device_id for r in rig.sink.readings[-6:]} <= set(smaller)


async def test_config_error_is_data_not_a_crash(rig: Rig) -> None:
    rec, spec = rig.entry(1, "f00001", 0.3)
    bad_rec = replace(rec, driver="eagle-local", url=None)
    bad_spec = replace(spec, url=None)
    res = rig.pool.sync({1: (bad_rec, bad_spec)})
    assert res.rejected == 1
    t = rig.pool.rejected[1]
    assert t.last_outcome == "config_error"
    _assert_state_counts(rig)
    rig.pool.sync({1: (bad_rec, bad_spec)})
    rig.pool.sync({1: (replace(bad_rec, updated_at=T0.replace(year=2027)), bad_spec)})
    _assert_state_counts(rig)
    assert rig.pool.devices_by_state()["failing"] == 1
    rig.pool.sync({})
    assert sum(rig.pool.devices_by_state().values()) == 0
    assert t.last_error


async def test_our_own_overload_skips_ticks_and_blames_no_device(rig: Rig) -> None:
    # One connection for the whole fleet and a device that answers late:
    # the others' polls expire in our queue before anything is sent.
    one = FastHttpClient(max_connections_per_host=1, clock=rig.clock)
    pool = DevicePool(rig.pool.settings, rig.sink, {"eagle-cloud": one}, seed="test",
                      clock=rig.clock)
    await pool.start()
    try:
        fleet = rig.fleet(20, 0.5)
        hanging = range(1, 6)
        rig.sim.set_faults({Fault.HANG: [fleet[i][0].cloud_id for i in hanging]})
        pool.sync(fleet)
        await rig.run(2.0, pool, one)
        assert pool.stats.skipped_ticks > 0
        assert pool.stats.outcome_counts()["timeout"] > 0  # the hanging ones, sent
        for device_id, lp in pool.loops.items():
            if device_id not in hanging:
                assert lp.target.state is not DeviceState.FAILING, lp.target.last_error
                assert lp.target.failures is None
    finally:
        rig.clock.advance(1.0)
        await pool.stop(1.0)
        await one.close()


# -- wall-clock steps -----------------------------------------------------------


def _assert_no_tick_twice(rig: Rig) -> None:
    for seen in rig.by_device().values():
        assert seen == sorted(set(seen)), "a device stored a tick twice or out of order"


async def test_forward_wall_step_reanchors_once_and_skips_the_jumped_ticks(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    interval = 0.5
    rig.pool.sync(rig.fleet(10, interval))
    await rig.run(1.5)
    stepped_at = rig.clock.wall()
    before = len(rig.sink.readings)
    caplog.set_level(logging.WARNING, logger="poller.polling")
    rig.clock.step_wall(3600.0)  # NTP corrects a clock an hour slow
    await rig.run(3.0)
    stats = rig.pool.stats
    assert stats.clock_steps == 1
    steps_logged = [r for r in caplog.records if "wall clock stepped" in r.getMessage()]
    assert len(steps_logged) == 1 and "+3600" in steps_logged[0].getMessage()
    # Within a second the ticks follow the new wall time; an hour of ticks was
    # jumped over (counted), and nothing fired in a burst to catch up.
    new = rig.sink.readings[before:]
    assert new[-1].tick_at > stepped_at + 3600.0
    assert abs(new[-1].received_at - rig.clock.wall()) < 2 * interval
    assert stats.skipped_ticks >= 10 * (3600.0 / interval - 1)
    assert len(new) <= 10 * (3.0 / interval + 1)
    assert stats.lateness.max < 0.02  # nothing fired late after the re-anchor
    assert stats.tick_conflicts == 0
    _assert_no_tick_twice(rig)


async def test_backward_wall_step_never_repeats_a_tick_and_counts_what_it_skips(
        rig: Rig) -> None:
    interval = 0.5
    fleet = rig.fleet(10, interval)
    rig.pool.sync(fleet)
    await rig.run(1.5)
    last_before = {d: seen[-1] for d, seen in rig.by_device().items()}
    rig.clock.step_wall(-2.0)  # set back two seconds: four ticks come round again
    await rig.run(1.0)  # the step is seen within a second
    stats = rig.pool.stats
    assert stats.clock_steps == 1
    # Each device leaves out the four ticks that come round again, less one
    # if the step came while its tick was due and not yet sent (that tick it
    # has no reading of: it is sent, two seconds on).
    assert 10 * 3 <= stats.tick_conflicts <= 10 * 4
    conflicts = stats.tick_conflicts
    # A device restarted inside that window (its registration changed) keeps
    # to the rule too: its first tick comes after its last reading.
    rec, _ = fleet[1]
    restarted = rig.entry(1, rec.cloud_id, interval, version=T0.replace(year=2027))
    assert rig.pool.sync({**fleet, 1: restarted}).restarted == 1
    await rig.run(3.0)
    _assert_no_tick_twice(rig)
    ticks = rig.by_device()
    for device_id, last in last_before.items():
        after = [t for t in ticks[device_id] if t > last]
        assert after, f"device {device_id} stopped polling after the step"
    # The restarted loop began after its last reading: a few more left out.
    assert stats.tick_conflicts > conflicts
    assert sum(t.skipped_ticks for t in rig.pool.targets()) == stats.tick_conflicts


async def test_a_drift_under_a_second_is_not_a_step(rig: Rig) -> None:
    rig.pool.sync(rig.fleet(5, 0.5))
    await rig.run(1.0)
    rig.clock.step_wall(0.6)
    await rig.run(1.0)
    rig.clock.step_wall(-0.3)  # both against the offset taken at start: 0.6, then 0.3
    await rig.run(1.5)
    assert rig.pool.stats.clock_steps == 0
    assert rig.pool.stats.tick_conflicts == 0
    _assert_no_tick_twice(rig)
