"""The ranking behind ``GET /api/fleet/failing``: exact after failures,
recoveries, moves between failing and auth_failed, restarts and removals,
and read at the cost of the page asked for, not of the number failing.

The ranking is checked against a sort of the pool's targets (the rule: most
failures in a row first, ties by the lower id), over a real pool polling
the simulator on a FakeClock (test_polling's rig), and over the index alone
under any sequence of changes (Hypothesis).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import hypothesis
from hypothesis import strategies as st

from poller.polling.index import TargetIndex
from poller.polling.pool import DevicePool
from poller.polling.target import DeviceState, Target
from poller.registry import DeviceRecord
from poller.simulator.faults import Fault
from tests.test_polling import T0, Rig, rig  # noqa: F401

RANKED = (DeviceState.FAILING, DeviceState.AUTH_FAILED)


def by_sorting(targets: list[Target]) -> list[int]:
    """The ranking as a sort of every target would give it."""
    failing = [t for t in targets if t.state in RANKED]
    failing.sort(key=lambda t: (-t.consecutive_failures, t.record.id))
    return [t.record.id for t in failing]


def assert_ranked(pool: DevicePool) -> dict[int, Target]:
    """The pool's ranking is the sort's, at every limit; the targets by id."""
    truth = by_sorting(pool.targets())
    assert pool.most_failing(1000) == truth
    for limit in (1, 2, 5):
        assert pool.most_failing(limit) == truth[:limit]
    return {t.record.id: t for t in pool.targets()}


async def test_the_ranking_follows_failures_recoveries_moves_and_stops(
        rig: Rig) -> None:  # noqa: F811
    pool, sim = rig.pool, rig.sim
    # Credentials rejected are tried again soon, so that a device can leave
    # auth_failed within the test.
    pool.apply_settings(replace(pool.settings, auth_failed_interval_s=0.6))
    fleet = rig.fleet(12, 0.3)
    cid = {i: entry[0].cloud_id for i, entry in fleet.items()}
    sim.set_faults({Fault.HTTP_5XX: [cid[2]]})
    pool.sync(fleet)
    await rig.run(1.5)
    assert assert_ranked(pool)[2].consecutive_failures >= 3

    # More fail, some with rejected credentials; 2 has failed longest.
    sim.set_faults({Fault.HTTP_5XX: [cid[i] for i in (2, 3, 4, 5)],
                    Fault.AUTH: [cid[7], cid[8]]})
    await rig.run(1.0)
    targets = assert_ranked(pool)
    ranked = pool.most_failing(100)
    assert sorted(ranked) == [2, 3, 4, 5, 7, 8] and ranked[0] == 2
    assert targets[7].state is DeviceState.AUTH_FAILED

    # 3 recovers and leaves the ranking; the others keep failing.
    sim.set_faults({Fault.HTTP_5XX: [cid[i] for i in (2, 4, 5)]})
    await rig.run(2.5)
    targets = assert_ranked(pool)
    assert targets[3].state is DeviceState.OK and 3 not in pool.most_failing(100)

    # 4 goes from failing to auth_failed, 7 from auth_failed to failing: each
    # keeps counting its failures in a row, and is ranked by the new count.
    before = {i: targets[i].consecutive_failures for i in (4, 7)}
    sim.set_faults({Fault.HTTP_5XX: [cid[i] for i in (2, 5, 7)], Fault.AUTH: [cid[4], cid[8]]})
    await rig.run(2.5)
    targets = assert_ranked(pool)
    assert targets[4].state is DeviceState.AUTH_FAILED
    assert targets[7].state is DeviceState.FAILING
    assert all(targets[i].consecutive_failures > before[i] for i in (4, 7))

    # 5 is removed, 8 restarts (new credentials: its count starts afresh),
    # and a device its driver refuses is failing with no failure yet: last.
    wanted = {i: e for i, e in fleet.items() if i != 5}
    wanted[8] = rig.entry(8, cid[8], 0.3, version=T0 + timedelta(seconds=1))
    record, spec = rig.entry(13, sim.cloud_ids()[12], 0.3)
    wanted[13] = (replace(record, driver="no-such-driver"), spec)
    pool.sync(wanted)
    targets = assert_ranked(pool)
    ranked = pool.most_failing(100)
    assert 5 not in ranked and 5 not in targets
    assert targets[8].state is DeviceState.PENDING and 8 not in ranked
    assert ranked[-1] == 13 and targets[13].consecutive_failures == 0
    await rig.run(1.0)
    targets = assert_ranked(pool)
    assert targets[8].state is DeviceState.AUTH_FAILED
    assert 1 <= targets[8].consecutive_failures < targets[2].consecutive_failures


def _target(device_id: int) -> Target:
    record = DeviceRecord(device_id, f"{device_id:06x}", "e@example.com", "eagle-cloud",
                          None, {}, 10.0, True, T0, T0)
    return Target(record)


def _failing_index(n: int) -> TargetIndex:
    """An index of ``n`` failing devices, 1 to 50 failures in a row each."""
    index = TargetIndex()
    for device_id in range(1, n + 1):
        target = _target(device_id)
        index.add(target)
        target.state = DeviceState.FAILING
        target.consecutive_failures = 1 + device_id * 7919 % 50
        index.moved(target, DeviceState.PENDING)
    return index


def test_the_ranking_costs_the_page_not_the_number_failing() -> None:
    """Before, a request sorted up to 50,000 devices of each failing state
    (20 ms of the event loop); now it hands out what it returns, whether a
    thousand devices fail or twenty thousand."""
    visited: list[int] = []
    for n in (1_000, 20_000):
        index = _failing_index(n)
        before = index.visited
        worst = index.most_failing(10)
        visited.append(index.visited - before)
        # The worst have 50 failures in a row; among them, the lowest ids.
        assert worst == [i for i in range(1, n + 1) if 1 + i * 7919 % 50 == 50][:10]
    assert visited == [10, 10]


@hypothesis.given(st.lists(st.tuples(st.integers(1, 8), st.sampled_from(
    ["remove", "fail", "auth", "ok"])), min_size=1, max_size=200),
    st.integers(1, 10))
@hypothesis.settings(max_examples=80, deadline=None)
def test_the_index_ranks_as_a_sort_under_any_changes(
        changes: list[tuple[int, str]], limit: int) -> None:
    """Each change as the pool and a loop make it: a device removed (stopped:
    the pool removes it before the loop marks it stopped), a poll that fails
    (failing) or has its credentials rejected (auth_failed), one that keeps
    a reading (ok, the count reset); a device not in the pool is added
    (pending) first, which after a removal is a restart."""
    index = TargetIndex()
    targets: dict[int, Target] = {}
    for device_id, change in changes:
        target = targets.get(device_id)
        if target is None:
            targets[device_id] = target = _target(device_id)
            index.add(target)
        if change == "remove":
            index.remove(targets.pop(device_id))
        else:
            previous = target.state
            if change == "ok":
                target.state, target.consecutive_failures = DeviceState.OK, 0
            else:
                target.consecutive_failures += 1
                target.state = (DeviceState.AUTH_FAILED if change == "auth"
                                else DeviceState.FAILING)
            index.moved(target, previous)
        truth = by_sorting(list(targets.values()))
        assert index.most_failing(len(targets) + 1) == truth
        assert index.most_failing(limit) == truth[:limit]
    for state in DeviceState:
        assert index.page(state, 0, 100) == sorted(
            i for i, t in targets.items() if t.state is state)
