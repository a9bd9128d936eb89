"""The cluster: rendezvous hashing, the lease fence, and real ``poller serve``
processes sharing one fleet, failing over and handing over.

Gaps and double polls are measured on the simulator's record of poll
arrivals, per device. Every member gives a device the same phase, so a tick
polled by two members shows as two arrivals a few milliseconds apart; one
member alone never polls a device twice within half an interval.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from poller.check import WARNING, Thresholds, _cluster_grade, run_check
from poller.clock import FakeClock, LoopClock
from poller.cluster.lease import FENCE_RETRY_S, FencedWheel, Lease
from poller.cluster.membership import Membership
from poller.cluster.ring import Assignment
from poller.config import ClusterSettings, load
from poller.errors import ConfigError
from poller.simulator.main import Simulator, SimulatorConfig
from tests.servicefix import Key, register, service_env, settings_of
from tests.stackfix import RunningStack, fresh_database_url

# -- rendezvous hashing -------------------------------------------------------------

FLEET = range(1, 6001)


def _owners(members: tuple[str, ...]) -> dict[int, str]:
    """Each device's owner as every member computes it; exactly one each."""
    views = [Assignment(members, me) for me in members]
    owners = {}
    for device_id in FLEET:
        claimed = [a.me for a in views if a.owns(device_id)]
        assert len(claimed) == 1, (device_id, claimed)
        owners[device_id] = claimed[0]
    return owners


def test_rendezvous_balances_and_every_member_computes_the_same_owner() -> None:
    members = ("p-a", "p-b", "p-c")
    owners = _owners(members)
    share = len(FLEET) / len(members)
    for m in members:
        assert abs(list(owners.values()).count(m) - share) < 0.08 * share
    assert _owners(("p-c", "p-a", "p-b")) == owners  # the view's order does not matter
    assert not any(Assignment(members, "p-z").owns(i) for i in FLEET)  # not a member: nothing


def test_a_join_moves_about_a_quarter_and_a_leave_only_the_leavers() -> None:
    three = _owners(("p-a", "p-b", "p-c"))
    four = _owners(("p-a", "p-b", "p-c", "p-d"))
    moved = [i for i in FLEET if three[i] != four[i]]
    assert {four[i] for i in moved} == {"p-d"}  # only to the newcomer
    assert 0.21 < len(moved) / len(FLEET) < 0.29
    two = _owners(("p-a", "p-c"))
    assert [i for i in FLEET if three[i] != two[i]] == [i for i in FLEET if three[i] == "p-b"]


# -- the lease and the fenced wheel ---------------------------------------------------


class _Tick:
    def __init__(self, clock: FakeClock, fired: list[float]) -> None:
        self.clock, self.fired = clock, fired

    def fire(self) -> None:
        self.fired.append(self.clock.monotonic())


def test_a_paused_instance_polls_nothing_until_its_lease_is_renewed() -> None:
    clock = FakeClock(monotonic=100.0)
    lease = Lease(1.0)
    fired: list[float] = []
    resumed: list[float] = []
    wheel = FencedWheel(clock, 0.02, lease.valid, lambda: resumed.append(clock.monotonic()))
    lease.renewed(sent_at=100.0)
    wheel.add(100.5, _Tick(clock, fired))
    clock.advance(0.6)
    assert fired == [pytest.approx(100.5)]
    # SIGSTOP: the process runs nothing for 3 s, then its timers come due late.
    wheel.add(100.8, _Tick(clock, fired))
    clock.stall(3.0)
    clock.advance(0.0)
    assert fired == [pytest.approx(100.5)] and wheel.fences == 1
    clock.advance(1.0)  # still no renewal: nothing, and held once
    assert len(fired) == 1 and wheel.fences == 1 and not resumed
    lease.renewed(sent_at=clock.monotonic())  # the heartbeat rejoined
    clock.advance(FENCE_RETRY_S + 0.02)
    assert resumed and len(fired) == 1  # the stale tick is handed back, never polled late


def test_a_renewal_counts_from_when_it_was_sent() -> None:
    lease = Lease(1.0)
    lease.renewed(sent_at=10.0)  # the answer may come late; the store counted from receipt
    assert lease.valid(10.99) and not lease.valid(11.0)


def test_while_the_store_is_down_the_lease_holds_between_failed_attempts() -> None:
    clock = FakeClock(monotonic=0.0)
    lease = Lease(1.0)
    fired: list[float] = []
    wheel = FencedWheel(clock, 0.02, lease.valid, lambda: None)
    lease.renewed(sent_at=0.0)
    for step in range(1, 6):  # a heartbeat every 0.25 s, each finding the store down
        lease.unreachable(tried_at=step * 0.25)
    wheel.add(1.4, _Tick(clock, fired))
    clock.advance(1.5)
    assert fired and wheel.fences == 0  # polling goes on with the last view
    clock.stall(2.0)  # ... but a pause during the outage still fences
    wheel.add(clock.monotonic(), _Tick(clock, fired))
    clock.advance(0.05)
    assert len(fired) == 1 and wheel.fences == 1


async def test_a_hung_store_holds_the_lease_between_attempts(stack: RunningStack) -> None:
    """A store that hangs (the stack's Valkey, stopped with SIGSTOP) costs
    every heartbeat its timeout; the lease must hold across the attempts all
    the same, or each attempt's end would fence a batch of ticks (skipped)."""
    pid = stack.stack.status()["valkey"].pid
    assert pid is not None
    clock = LoopClock()
    member = Membership(ClusterSettings(enabled=True, name=f"t{uuid.uuid4().hex[:10]}",
                                        heartbeat_s=0.25, lease_s=1.0),
                        "p-a", stack.info.redis_url, clock)
    await member.start()
    try:
        assert member.store_up and member.view == ("p-a",)
        os.kill(pid, signal.SIGSTOP)
        try:
            looks = lapsed = 0
            until = clock.monotonic() + 3.0
            while clock.monotonic() < until:  # what the fenced wheel asks, every ms
                looks += 1
                lapsed += not member.lease.valid(clock.monotonic())
                await asyncio.sleep(0.001)
            assert not member.store_up
        finally:
            os.kill(pid, signal.SIGCONT)
        assert lapsed == 0, f"the lease lapsed at {lapsed} of {looks} looks"
        deadline = clock.monotonic() + 5.0
        while not member.store_up:  # the store answers again, and is renewed
            assert clock.monotonic() < deadline, "the store did not come back"
            await asyncio.sleep(0.05)
        assert member.view == ("p-a",)
    finally:
        await member.close()


def test_cluster_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"polling\.shard"):
        load(config_path=None, env={"POLLER_CLUSTER_ENABLED": "true",
                                    "POLLER_POLLING_SHARD": "0/2"})
    with pytest.raises(ConfigError, match=r"cluster\.lease_s"):
        load(config_path=None, env={"POLLER_CLUSTER_HEARTBEAT_S": "2",
                                    "POLLER_CLUSTER_LEASE_S": "3"})
    with pytest.raises(ConfigError, match=r"cluster\.name"):
        load(config_path=None, env={"POLLER_CLUSTER_NAME": "a b"})


def test_check_warns_of_a_missing_member() -> None:
    graded = _cluster_grade({"enabled": True, "store_up": True,
                             "missing": [{"id": "p-c", "last_seen_s_ago": 12.0}]})
    assert graded == [(WARNING, "cluster member p-c missing for 12 s")]
    assert _cluster_grade({"enabled": True, "store_up": True, "missing": []}) == []
    assert _cluster_grade({"enabled": False}) == []


# -- real processes -----------------------------------------------------------------

INTERVAL_S = 2.0
DEVICES = 3000
SEED = 18
SLACK_S = 0.3
"""Dispatch lateness of two polls on a shared two-core machine."""
_API_RE = re.compile(rb"API on (http://[0-9.]+:[0-9]+)")


class Member:
    """One ``poller serve`` the test started (and stops, by its pid only)."""

    def __init__(self, name: str, env: dict[str, str], logs: Path) -> None:
        self.name, self.env, self.logs = name, env, logs
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.log = self.logs / f"{self.name}-{self.starts}.log"
        self.url = ""
        self.proc = subprocess.Popen([sys.executable, "-m", "poller", "serve"],
                                     env={**os.environ, **self.env},
                                     stdout=self.log.open("wb"), stderr=subprocess.STDOUT)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    async def fleet(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        if not self.url:
            found = _API_RE.search(self.log.read_bytes())
            assert self.running, self.tail()
            if found is None:
                raise _NotYet
            self.url = found[1].decode()
        async with http.get(self.url + "/api/fleet") as resp:
            doc: dict[str, Any] = await resp.json()
            return doc

    async def owned(self, http: aiohttp.ClientSession) -> set[str]:
        """The cloud ids this member polls (its pool's devices in state ok)."""
        found: set[str] = set()
        after = 0
        while True:
            async with http.get(f"{self.url}/api/devices",
                                params={"state": "ok", "limit": "1000",
                                        "after": str(after)}) as resp:
                page = await resp.json()
            found.update(d["cloud_id"] for d in page["devices"])
            if page["next_after"] is None:
                return found
            after = page["next_after"]

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return await asyncio.to_thread(self.proc.wait, 60)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process dies only once resumed
            self.proc.kill()
            self.proc.wait()


class _NotYet(Exception):
    pass


async def _converged(http: aiohttp.ClientSession, live: list[Member],
                     within_s: float = 40.0) -> dict[str, dict[str, Any]]:
    """Wait until every live member has the view of exactly the live members,
    all agree, and their devices add up to the fleet, each polled (ok)."""
    want = sorted(m.name for m in live)
    deadline = time.monotonic() + within_s
    last: Any = None
    while True:
        try:
            docs = {m.name: await m.fleet(http) for m in live}
            last = {n: (d["cluster"]["view"], d["devices"], d["devices_by_state"].get("ok"))
                    for n, d in docs.items()}
            if all(d["cluster"]["view"] == want and d["cluster"]["store_up"]
                   and all(x["agrees"] for x in d["cluster"]["members"] if x["live"])
                   and d["devices_by_state"].get("ok") == d["devices"]
                   for d in docs.values()) \
                    and sum(d["devices"] for d in docs.values()) == DEVICES:
                return docs
        except (_NotYet, aiohttp.ClientError):
            pass
        assert time.monotonic() < deadline, f"no agreement on {want} in {within_s:g} s: {last}"
        await asyncio.sleep(0.2)


def _arrivals(sim: Simulator, since: float, until: float) -> dict[str, list[float]]:
    """Each device's arrivals in [since, until], with the last one before."""
    out = {}
    for cid in sim.cloud_ids():
        times = sim.arrivals(cid)
        before = [t for t in times if t < since]
        out[cid] = before[-1:] + [t for t in times if since <= t <= until]
    return out


def _max_gap(sim: Simulator, since: float, until: float,
             skip: frozenset[str] = frozenset()) -> tuple[float, str]:
    """The longest time a device (not in ``skip``) went unpolled in the
    window (until its end)."""
    worst, who = 0.0, ""
    for cid, times in _arrivals(sim, since, until).items():
        if cid in skip:
            continue
        assert times, f"{cid} never polled"
        points = [*times, until]
        gap = max(b - a for a, b in itertools.pairwise(points))
        if gap > worst:
            worst, who = gap, cid
    return worst, who


def _doubled(sim: Simulator, since: float, until: float) -> dict[str, list[float]]:
    """Device -> arrival times of ticks it was polled twice (by two members)."""
    out = {}
    for cid, times in _arrivals(sim, since, until).items():
        twice = [b for a, b in itertools.pairwise(times)
                 if b - a < INTERVAL_S / 2 and a >= since]
        if twice:
            out[cid] = twice
    return out


async def _sleep_until(t: float) -> None:
    await asyncio.sleep(max(0.0, t - time.time()))


def _served_since(sim: Simulator, offset: int) -> collections.Counter[Key]:
    """Readings the simulator served from position ``offset`` of its record."""
    return collections.Counter((s.cloud_id, s.device_at, round(s.demand_w, 3))
                               for s in sim.served(offset) if s.demand_w is not None)


async def _stored_since(database_url: str, since: float) -> collections.Counter[Key]:
    """The readings in Postgres whose device time is ``since`` or later."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT d.cloud_id, r.device_at, r.demand_w FROM readings r "
            "JOIN devices d ON d.id = r.device_id WHERE r.device_at >= to_timestamp($1)",
            since)
    finally:
        await conn.close()
    return collections.Counter((r["cloud_id"], int(r["device_at"].timestamp()),
                                round(r["demand_w"], 3)) for r in rows)


OUTAGE_S = 15.0
"""How long the membership store stays down, a member dying 2 s into it."""


async def _store_outage_with_a_death(stack: RunningStack, sim: Simulator,
                                     http: aiohttp.ClientSession, db_url: str,
                                     survivors: list[Member], dead: Member) -> None:
    everyone = [*survivors, dead]
    theirs = frozenset(await dead.owned(http))
    assert theirs, "the member to kill polls nothing"
    before = {m.name: await m.fleet(http) for m in everyone}
    view = sorted(m.name for m in everyone)
    served_from = len(sim.served())
    outage = time.time()
    await asyncio.to_thread(stack.stack.stop_component, "valkey")
    try:
        await asyncio.sleep(2.0)
        docs = {m.name: await m.fleet(http) for m in everyone}
        assert not any(doc["cluster"]["store_up"] for doc in docs.values())
        assert sum(doc["devices"] for doc in docs.values()) == DEVICES
        dead.kill()
        killed = time.time()
        await _sleep_until(outage + OUTAGE_S)
        now = time.time()
        for m in survivors:
            assert m.running, m.tail()
            cluster = (await m.fleet(http))["cluster"]
            assert not cluster["store_up"] and cluster["lease_valid"], cluster
            assert cluster["view"] == view, cluster  # the dead one cannot be told gone
            assert cluster["fences"] == before[m.name]["cluster"]["fences"], cluster
        # The survivors' devices missed no tick; the dead one's were not taken.
        gap, who = _max_gap(sim, outage, now, skip=theirs)
        assert gap < 1.5 * INTERVAL_S, f"{who} missed a tick with the store down ({gap:.2f} s)"
        taken = [cid for cid in theirs if any(killed + 1.0 < t for t in sim.arrivals(cid))]
        assert not taken, f"taken over with no store to say the owner is gone: {taken[:5]}"
    finally:
        await asyncio.to_thread(stack.stack.start_component, "valkey")
    back = time.time()
    docs = await _converged(http, survivors)
    seen = docs[survivors[0].name]["cluster"]
    assert dead.name in {x["id"] for x in seen["missing"]}, seen
    await _sleep_until(back + 3 * INTERVAL_S + SLACK_S)
    now = time.time()
    # Each of the dead member's devices: its first poll since the death.
    taken_at = {cid: min((t for t in sim.arrivals(cid) if t > killed + 1.0), default=now)
                for cid in theirs}
    late = {cid: round(at - back, 2) for cid, at in taken_at.items()
            if at > back + 2 * INTERVAL_S + SLACK_S}
    assert not late, f"{len(late)} of the dead member's devices not taken over in time: " \
        f"{sorted(late.items(), key=lambda kv: -kv[1])[:5]}"
    gap, who = _max_gap(sim, back + 2 * INTERVAL_S + SLACK_S, now)
    assert gap < 1.5 * INTERVAL_S, f"{who} missed a tick after the takeover ({gap:.2f} s)"
    gap, who = _max_gap(sim, outage, now, skip=theirs)
    assert gap < 1.5 * INTERVAL_S, f"{who} missed a tick as the store came back ({gap:.2f} s)"
    assert not _doubled(sim, outage, now), "store outage with a death: a device polled twice"
    for m in survivors:  # nothing failed, so nothing could have counted towards giving up
        assert m.running, m.tail()
        fleet = await m.fleet(http)
        assert fleet["task_restarts"] == before[m.name]["task_restarts"], fleet["task_restarts"]

    # Every reading served in the episode is in Postgres once, but those the
    # dead member had not stored when it died (its last flush, or its last poll).
    want = _served_since(sim, served_from)
    assert sum(want.values()) > DEVICES * OUTAGE_S / INTERVAL_S / 2, sum(want.values())
    assert max(want.values()) == 1, "a tick served twice"
    since = min(device_at for _, device_at, _ in want)
    flush_s = float(dead.env["POLLER_INGEST_FLUSH_INTERVAL_S"])
    deadline = time.monotonic() + 20.0
    while True:
        lost = want - await _stored_since(db_url, since)
        unexplained = [k for k in lost if k[0] not in theirs
                       or not killed - flush_s - INTERVAL_S - 2.0 <= k[1] <= killed + 1.0]
        if not unexplained:
            break
        assert time.monotonic() < deadline, f"{len(unexplained)} readings lost: " \
            f"{sorted(unexplained)[:5]} (killed at {killed:.1f})"
        await asyncio.sleep(0.5)
    assert sum(lost.values()) <= len(theirs) * 3, sum(lost.values())


async def test_instances_share_the_fleet_fail_over_and_hand_over(
        stack: RunningStack, tmp_path: Path) -> None:
    sim = Simulator(SimulatorConfig(devices=DEVICES, seed=SEED, arrivals_kept=256,
                                    record_served=True))
    await sim.start()
    db_url = fresh_database_url(stack.info)
    base = service_env(
        stack.info, db_url, tmp_path / "state", "p-x",
        POLLER_CLUSTER_ENABLED="true", POLLER_CLUSTER_NAME=f"t{uuid.uuid4().hex[:10]}",
        POLLER_CLUSTER_HEARTBEAT_S="0.25", POLLER_CLUSTER_LEASE_S="1.0",
        POLLER_CLUSTER_HANDOFF_TIMEOUT_S="5", POLLER_POLLING_TIMEOUT_S="1.5",
        POLLER_ROLLUPS_ENABLED="false")
    await register(settings_of(base), sim, SEED, INTERVAL_S)
    names = ("p-a", "p-b", "p-c", "p-d")
    members = {n: Member(n, {**base, "POLLER_INSTANCE_ID": n}, tmp_path) for n in names}
    a, b, c, d = (members[n] for n in names)
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    try:
        for m in (a, b, c):
            m.start()
        await _converged(http, [a, b, c], within_s=60)
        t0 = time.time()
        await asyncio.sleep(2 * INTERVAL_S)
        assert not _doubled(sim, t0, time.time()), "steady state: a device polled twice"

        # The API of any member answers for any device: b's, as seen from a.
        theirs = sorted(await b.owned(http))[0]
        async with http.get(f"{a.url}/api/devices/{theirs}") as resp:
            doc = await resp.json()
        assert doc["state"] == "ok" and doc["status_source"] == "cluster", doc
        async with http.get(f"{a.url}/api/devices", params={"limit": "1000"}) as resp:
            listed = {d["cloud_id"]: d for d in (await resp.json())["devices"]}
        assert listed[theirs]["state"] == "ok"
        assert not any(d["state"] == "unpolled" for d in listed.values())

        # kill -9: the survivors poll every one of its devices within 2 intervals.
        died = time.time()
        c.kill()
        await _converged(http, [a, b])
        await _sleep_until(died + 3 * INTERVAL_S + 1)
        gap, who = _max_gap(sim, died, time.time())
        assert gap <= 2 * INTERVAL_S + SLACK_S, f"{who} unpolled for {gap:.2f} s after kill -9"
        settled = died + 2 * INTERVAL_S
        assert not _doubled(sim, settled, time.time()), "after failover: polled twice"
        code, line = await asyncio.to_thread(run_check, a.url, None, Thresholds(), 5.0)
        assert code == WARNING and "cluster member p-c missing" in line, line

        # SIGSTOP past the lease, then SIGCONT: the paused one polls nothing
        # until it has rejoined; no device polled twice for more than an interval.
        assert b.proc is not None
        paused = time.time()
        b.proc.send_signal(signal.SIGSTOP)
        await asyncio.sleep(2.5)
        b.proc.send_signal(signal.SIGCONT)
        docs = await _converged(http, [a, b])
        await asyncio.sleep(2 * INTERVAL_S)
        now = time.time()
        twice = _doubled(sim, paused, now)
        spans = {cid: ts[-1] - ts[0] for cid, ts in twice.items()}
        assert max(spans.values(), default=0.0) <= INTERVAL_S + SLACK_S, \
            max(spans.items(), key=lambda kv: kv[1])
        # And none left behind: every device polled in the last two intervals. (The
        # issue's bound for a pause is on double polls, above; the gap of a
        # device handed back to the resumed member is not bounded here: on a
        # busy 2-core machine its rejoin can take longer than the interval.)
        unpolled = [cid for cid, times in _arrivals(sim, paused, now).items()
                    if not times or times[-1] < now - 2 * INTERVAL_S - SLACK_S]
        assert not unpolled, unpolled[:5]
        b_cluster = docs["p-b"]["cluster"]
        assert b_cluster["rejoins"] >= 1 and b_cluster["fences"] >= 1, b_cluster

        # The killed one comes back, then a fourth joins: about a quarter moves,
        # all of it to the newcomer.
        c.start()
        await _converged(http, [a, b, c])
        before = {m.name: await m.owned(http) for m in (a, b, c)}
        d.start()
        await _converged(http, [a, b, c, d])
        after = {m.name: await m.owned(http) for m in (a, b, c, d)}
        assert sum(map(len, after.values())) == DEVICES == len(set().union(*after.values()))
        moved = {cid for n, cids in before.items() for cid in cids - after[n]}
        assert moved == after["p-d"]
        assert 0.18 < len(moved) / DEVICES < 0.32, len(moved)

        # Rolling SIGTERM restart of three: no device misses a tick.
        rolling = time.time()
        for m in (a, b, c):
            assert await m.stop() == 0, m.tail()
            m.start()
            await _converged(http, [a, b, c, d])
        gap, who = _max_gap(sim, rolling, time.time())
        assert gap < 1.5 * INTERVAL_S, f"{who} missed a tick in the rolling restart ({gap:.2f} s)"

        # The membership store (Valkey) stopped, and a member killed (-9) while
        # it is away. No one can tell the dead from the silent: every survivor
        # keeps its last view and polls its own devices on (the lease holds
        # between failed attempts), the dead member's wait; once the store is
        # back they move within two intervals (one lease for the last view's
        # members to renew, a heartbeat, the next tick). Nothing is polled
        # twice, nothing lost but what the dead had not stored, and no
        # background task fails, so serve outlives an outage of any length.
        await _store_outage_with_a_death(stack, sim, http, db_url, [a, b, c], d)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(stack.stack.start_component, "valkey")
        await http.close()
        for m in members.values():
            m.kill()
        await sim.stop()
