"""Poison readings: values no meter reads are stored as null, counted, and the
rest of the reading is kept; a failed totals follow-up keeps the demand.

The bounds are unit-tested here; then every driver is polled by the real
polling loop against the simulator's poison faults, and what the loop kept
is COPYed into a real ``readings`` table.
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poller import config
from poller.config import PollingSettings
from poller.drivers.base import DeviceSpec, Outcome, Sample
from poller.drivers.bounds import SampleBounds
from poller.errors import ConfigError
from poller.ingest.pgcopy import as_source, encode_rows
from poller.migrate import ensure_partitions, migrate
from poller.polling.adapt import FetchAdapter
from poller.polling.memsink import MemorySink
from poller.polling.pool import DevicePool
from poller.polling.stats import OUTCOME_INDEX
from poller.polling.target import DeviceState, Target
from poller.reading import READING_COLUMNS, Reading
from poller.registry import DeviceRecord
from poller.simulator.faults import Fault
from poller.simulator.fleet import credentials_for
from poller.simulator.main import Simulator, SimulatorConfig
from poller.simulator.payloads import http_json_options, http_json_url
from poller.transport import AiohttpClient, FastHttpClient

T_POLL = 1_800_000_000.0
BOUNDS = SampleBounds(device_time_max_behind_s=1000, device_time_max_ahead_s=100,
                      max_demand_w=50_000, max_total_wh=1e9, max_price=10)
GOOD = Sample(T_POLL - 5, -1200.0, 5e6, 1e3, 0.25)


def test_a_good_sample_passes_unchanged() -> None:
    assert BOUNDS.check(GOOD, T_POLL) is None
    assert BOUNDS.check(Sample(None, None, None, None, None), T_POLL) is None
    # The limits themselves are inside.
    edge = Sample(T_POLL - 1000, -50_000.0, 0.0, 1e9, -10.0)
    assert BOUNDS.check(edge, T_POLL) is None
    assert BOUNDS.check(Sample(T_POLL + 100, 50_000.0, 1e9, 0.0, 10.0), T_POLL) is None


@pytest.mark.parametrize(
    ("field", "value", "outcome"),
    [
        ("device_at", T_POLL - 1000.5, Outcome.DEVICE_TIME_OUT_OF_RANGE),
        ("device_at", T_POLL + 100.5, Outcome.DEVICE_TIME_OUT_OF_RANGE),
        ("device_at", 2.0**64 + 946_684_800, Outcome.DEVICE_TIME_OUT_OF_RANGE),  # EAGLE 2**64-1
        ("device_at", T_POLL * 1e6, Outcome.DEVICE_TIME_OUT_OF_RANGE),  # microseconds
        ("device_at", T_POLL / 1e3, Outcome.DEVICE_TIME_OUT_OF_RANGE),  # seconds read as ms
        ("device_at", math.nan, Outcome.DEVICE_TIME_OUT_OF_RANGE),
        ("demand_w", math.nan, Outcome.VALUE_NOT_FINITE),
        ("demand_w", math.inf, Outcome.VALUE_NOT_FINITE),
        ("demand_w", -math.inf, Outcome.VALUE_NOT_FINITE),
        ("demand_w", 1e308, Outcome.VALUE_OUT_OF_RANGE),
        ("demand_w", -50_000.5, Outcome.VALUE_OUT_OF_RANGE),
        ("delivered_wh", -0.001, Outcome.VALUE_OUT_OF_RANGE),
        ("delivered_wh", 1e9 + 1, Outcome.VALUE_OUT_OF_RANGE),
        ("received_wh", -1234.5, Outcome.VALUE_OUT_OF_RANGE),
        ("received_wh", math.nan, Outcome.VALUE_NOT_FINITE),
        ("price", 11.0, Outcome.VALUE_OUT_OF_RANGE),
        ("price", -math.inf, Outcome.VALUE_NOT_FINITE),
    ],
)
def test_each_bound_nulls_its_field_and_names_why(field: str, value: float,
                                                  outcome: Outcome) -> None:
    flawed = BOUNDS.check(GOOD._replace(**{field: value}), T_POLL)
    assert flawed is not None
    assert flawed.sample == GOOD._replace(**{field: None})  # the rest is kept
    assert flawed.outcomes == (outcome,)
    assert flawed.message.startswith("stored as null: " + field)
    assert len(flawed.message) <= 200


def test_several_flaws_are_each_named_once() -> None:
    poisoned = Sample(T_POLL * 1e6, math.nan, -1.0, math.inf, 1e308)
    flawed = BOUNDS.check(poisoned, T_POLL)
    assert flawed is not None
    assert flawed.sample == Sample(None, None, None, None, None)
    assert flawed.outcomes == (Outcome.DEVICE_TIME_OUT_OF_RANGE, Outcome.VALUE_NOT_FINITE,
                               Outcome.VALUE_OUT_OF_RANGE)
    assert len(flawed.message) <= 200


def test_limits_must_be_positive_and_finite() -> None:
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="max_demand_w"):
            SampleBounds(device_time_max_behind_s=1, device_time_max_ahead_s=1,
                         max_demand_w=bad, max_total_wh=1, max_price=1)


floats = st.none() | st.floats(allow_nan=True, allow_infinity=True, width=64)


@settings(max_examples=500, deadline=None)
@given(st.builds(Sample, floats, floats, floats, floats, floats),
       st.floats(min_value=0, max_value=4e9))
def test_what_passes_is_within_bounds_and_nothing_else_changes(sample: Sample,
                                                              poll_at: float) -> None:
    flawed = BOUNDS.check(sample, poll_at)
    kept = sample if flawed is None else flawed.sample
    device_at, demand, delivered, received, price = kept
    assert device_at is None or poll_at - 1000 <= device_at <= poll_at + 100
    assert demand is None or abs(demand) <= 50_000
    assert delivered is None or 0 <= delivered <= 1e9
    assert received is None or 0 <= received <= 1e9
    assert price is None or abs(price) <= 10
    for before, after in zip(sample, kept, strict=True):
        assert after is None or after is before
    if flawed is not None:
        assert flawed.outcomes and any(a is None and b is not None
                                       for a, b in zip(kept, sample, strict=True))


def test_the_bounds_are_configuration_keys() -> None:
    keys = {key for key, _, _ in config.describe_keys()}
    for name in ("device_time_max_behind_s", "device_time_max_ahead_s", "max_demand_w",
                 "max_total_wh", "max_price"):
        assert f"polling.{name}" in keys
    settings = config.load(config_path=None, env={"POLLER_POLLING_MAX_DEMAND_W": "250000"})
    assert settings.polling.max_demand_w == 250_000
    defaults = SampleBounds.from_settings(PollingSettings())
    # A microsecond time or an EAGLE TimeStamp of 2**64-1 never passes the defaults,
    # a stale cloud answer of a week ago does.
    assert defaults.check(GOOD._replace(device_at=T_POLL * 1e6), T_POLL) is not None
    assert defaults.check(GOOD._replace(device_at=T_POLL - 7 * 86400), T_POLL) is None
    with pytest.raises(ConfigError, match=r"polling\.max_demand_w"):
        config.load(config_path=None, env={"POLLER_POLLING_MAX_DEMAND_W": "0"})
    with pytest.raises(ConfigError, match=r"polling\.device_time_max_ahead_s"):
        # Above a century a stored time could leave Postgres' range.
        config.load(config_path=None, env={"POLLER_POLLING_DEVICE_TIME_MAX_AHEAD_S": "1e15"})


# --- through the polling loop, against the simulator ---------------------------

SEED = 5
T0 = datetime(2026, 1, 1, tzinfo=UTC)
INTERVAL_S = 0.5

# (driver, fault or None, the field the loop must null, the outcome counted)
CASES: list[tuple[str, Fault | None, str | None, str | None]] = [
    ("eagle-cloud", None, None, None),
    ("eagle-cloud", None, None, None),
    ("eagle-cloud", Fault.TIMESTAMP_MAX, "device_at", "device_time_out_of_range"),
    ("eagle-cloud", Fault.TIMESTAMP_US, "device_at", "device_time_out_of_range"),
    ("eagle-cloud", Fault.VALUE_HUGE, "demand_w", "value_out_of_range"),
    ("eagle-cloud", Fault.VALUE_NEGATIVE, "demand_w", "value_out_of_range"),
    ("eagle-cloud", Fault.TOTALS_MALFORMED, "totals", "totals_failed"),
    ("eagle-cloud", Fault.TOTALS_5XX, "totals", "totals_failed"),
    ("eagle-cloud", Fault.TOTALS_HANG, "totals", "totals_failed"),
    ("eagle-local", None, None, None),
    ("eagle-local", Fault.TIMESTAMP_MAX, "device_at", "device_time_out_of_range"),
    ("eagle-local", Fault.VALUE_NAN, "demand_w", "value_not_finite"),
    ("eagle-local", Fault.VALUE_INFINITY, "demand_w", "value_not_finite"),
    ("eagle-local", Fault.VALUE_HUGE, "demand_w", "value_out_of_range"),
    ("eagle-local", Fault.VALUE_NEGATIVE, "delivered_wh", "value_out_of_range"),
    ("http-json", None, None, None),
    ("http-json", Fault.TIMESTAMP_MAX, "device_at", "device_time_out_of_range"),
    ("http-json", Fault.TIMESTAMP_US, "device_at", "device_time_out_of_range"),
    ("http-json", Fault.VALUE_NAN, "demand_w", "value_not_finite"),
    ("http-json", Fault.VALUE_INFINITY, "demand_w", "value_not_finite"),
    ("http-json", Fault.VALUE_HUGE, "demand_w", "value_out_of_range"),
    ("http-json", Fault.VALUE_NEGATIVE, "delivered_wh", "value_out_of_range"),
]


class Rig:
    def __init__(self, sim: Simulator, pool: DevicePool, sink: MemorySink, port: int) -> None:
        self.sim, self.pool, self.sink, self.port = sim, pool, sink, port

    def entry(self, device_id: int, driver: str) -> tuple[DeviceRecord, DeviceSpec]:
        cloud_id = self.sim.cloud_ids()[device_id]
        email, secret = credentials_for(cloud_id, SEED)
        base = f"http://127.0.0.1:{self.port}"
        url, options = base, {}
        if driver == "http-json":
            url, options = http_json_url(base, cloud_id), http_json_options()
        rec = DeviceRecord(device_id, cloud_id, email, driver, url, options, INTERVAL_S, True,
                           T0, T0)
        return rec, DeviceSpec(device_id, cloud_id, email, secret, url, options)

    def readings_of(self, device_id: int) -> list[Reading]:
        return [r for r in self.sink.readings if r.device_id == device_id]

    def target(self, device_id: int) -> Target:
        return self.pool.loops[device_id].target


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    sim = Simulator(SimulatorConfig(devices=50, seed=SEED, record_served=True))
    port = await sim.start()
    # Totals on every poll, so each poll of a totals fault meets it.
    settings = PollingSettings(interval_s=INTERVAL_S, timeout_s=0.3, backoff_max_s=2.0,
                               auth_failed_interval_s=30.0, totals_every=1)
    fast = FastHttpClient(max_connections_per_host=64)
    general = AiohttpClient()
    adapter = FetchAdapter(general)
    sink = MemorySink()
    pool = DevicePool(settings, sink, {"eagle-cloud": fast, "eagle-local": fast,
                                       "http-json": adapter}, seed="poison")
    await pool.start()
    try:
        yield Rig(sim, pool, sink, port)
    finally:
        await pool.stop(2.0)
        await adapter.close()
        await fast.close()
        await general.close()
        await sim.stop()


def _nulled(reading: Reading, field: str) -> bool:
    if field == "totals":
        return reading.delivered_wh is None and reading.received_wh is None
    return bool(getattr(reading, field) is None)


async def _load(url: str, readings: list[Reading]) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
        await ensure_partitions(conn)
        status = await conn.copy_to_table(
            "readings", source=as_source(encode_rows(readings)), format="binary",
            columns=READING_COLUMNS)
        assert status == f"COPY {len(readings)}"
        return list(await conn.fetch("SELECT * FROM readings ORDER BY device_id, tick_at"))
    finally:
        await conn.close()


async def test_poison_is_stored_as_null_counted_and_loads(rig: Rig, fresh_db: str) -> None:
    fleet = {i: rig.entry(i, driver) for i, (driver, _, _, _) in enumerate(CASES)}
    forced: dict[Fault, list[str]] = collections.defaultdict(list)
    for i, (_, fault, _, _) in enumerate(CASES):
        if fault is not None:
            forced[fault].append(fleet[i][0].cloud_id)
    rig.sim.set_faults(forced)
    rig.pool.sync(fleet)
    await asyncio.sleep(INTERVAL_S * 5.2)
    served_demand: dict[str, list[float | None]] = collections.defaultdict(list)
    for s in rig.sim.served():
        if s.demand_w is not None:
            served_demand[s.cloud_id].append(s.demand_w)

    by_driver = rig.pool.stats.driver_outcome_counts()
    for i, (driver, fault, field, outcome) in enumerate(CASES):
        readings = rig.readings_of(i)
        target = rig.target(i)
        what = f"{driver} {fault}"
        # Every poll kept its reading: no failed poll, so never backed off.
        assert len(readings) >= 4, what
        assert target.state is DeviceState.OK, (what, target.last_error)
        assert target.consecutive_failures == 0
        if field is None:
            assert target.failures is None, what
            assert all(r.device_at is not None and r.demand_w is not None
                       and r.delivered_wh is not None for r in readings), what
            continue
        assert outcome is not None
        assert all(_nulled(r, field) for r in readings), what
        # ... and only that field: the rest of the reading is kept.
        if field != "demand_w":
            assert all(r.demand_w is not None for r in readings), what
        if field != "device_at":
            assert all(r.device_at is not None for r in readings), what
        if field not in ("totals", "delivered_wh"):
            assert all(r.delivered_wh is not None for r in readings), what
        # Counted per device and per driver, and named on the device.
        assert target.failures is not None, what
        assert target.failures[OUTCOME_INDEX[Outcome(outcome)]] == len(readings), what
        assert sum(target.failures) == len(readings), what  # nothing else counted
        assert by_driver[(driver, outcome)] >= len(readings)
        assert target.last_outcome == outcome, what
        assert target.last_error and len(target.last_error) <= 200
        assert target.snapshot()["failures"] == {outcome: len(readings)}
        if field == "totals":
            # The demand kept is the one the device served, poll after poll.
            cloud_id = target.cloud_id
            assert [r.demand_w for r in readings] == \
                pytest.approx(served_demand[cloud_id][: len(readings)])
    kept = list(rig.sink.readings)
    assert rig.pool.stats.outcome_counts()["ok"] == len(kept)

    # Nothing the loop kept can stop the loader: it all COPYs into readings.
    rows = await _load(fresh_db, kept)
    assert len(rows) == len(kept)
    assert {row["device_id"] for row in rows} == set(range(len(CASES)))


async def test_a_clean_poll_clears_the_flaw_from_the_device(rig: Rig) -> None:
    rec, spec = rig.entry(1, "http-json")
    rig.sim.set_faults({Fault.VALUE_NAN: [rec.cloud_id]})
    rig.pool.sync({1: (rec, spec)})
    await asyncio.sleep(INTERVAL_S * 2.2)
    target = rig.target(1)
    assert target.last_outcome == "value_not_finite"
    assert target.last_error is not None and "demand_w nan" in target.last_error
    flawed = len(rig.readings_of(1))
    rig.sim.set_faults({Fault.VALUE_NAN: []})
    await asyncio.sleep(INTERVAL_S * 2.2)
    assert target.last_outcome == "ok" and target.last_error is None
    later = rig.readings_of(1)[flawed + 1:]
    assert later and all(r.demand_w is not None for r in later)
    assert target.failures is not None
    assert target.failures[OUTCOME_INDEX[Outcome.VALUE_NOT_FINITE]] >= flawed


async def test_a_meter_without_totals_loses_no_reading_at_the_default_cadence(
    rig: Rig,
) -> None:
    # Totals every third poll (the default is every tenth): the other polls
    # are plain demand polls; the totals polls keep their demand too.
    rig.pool.apply_settings(PollingSettings(interval_s=INTERVAL_S, timeout_s=0.3,
                                            backoff_max_s=2.0, totals_every=3))
    fleet = {i: rig.entry(i, "eagle-cloud") for i in (1, 2)}
    rig.sim.set_faults({Fault.TOTALS_5XX: [fleet[1][0].cloud_id]})
    rig.pool.sync(fleet)
    await asyncio.sleep(INTERVAL_S * 7.2)
    broken, healthy = rig.readings_of(1), rig.readings_of(2)
    assert len(broken) >= 6 and abs(len(broken) - len(healthy)) <= 1
    assert all(r.delivered_wh is None and r.demand_w is not None for r in broken)
    assert sum(r.delivered_wh is not None for r in healthy) >= 2
    totals_polls = math.ceil(len(broken) / 3)
    failures = rig.target(1).failures
    assert failures is not None
    assert failures[OUTCOME_INDEX[Outcome.TOTALS_FAILED]] == totals_polls
    assert sum(failures) == totals_polls
    assert rig.target(1).state is DeviceState.OK
    # Only the totals requests failed (one more may be in flight).
    assert rig.sim.stats()["fault_totals_5xx"] in (totals_polls, totals_polls + 1)
