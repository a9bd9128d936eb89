"""This instance as a member of its cluster: lease, view, assignment, handoff.

Life of a member:

* ``start()`` joins: one heartbeat puts its lease in the store and reads the
  live members; their sorted ids are the *view*, and the assignment
  (:class:`~poller.cluster.ring.Assignment`) is what the registry watcher
  polls. With the store down at start, the view last written to
  ``STATE_DIR/cluster-view-INSTANCE.json`` stands in (none: nothing is polled until
  the store answers, since guessing would poll devices twice).
* ``attach()`` links the polling engine: view changes go to the watcher,
  which starts and stops the difference at once (within one heartbeat).
* A member joins the others' views once it reports (in its status document)
  the view it applied: a joiner polls its share first, then the others let
  go of it, so a join never leaves a device unpolled.
* Every ``heartbeat_s`` the lease is renewed and the view read again. A
  member whose lease ran out leaves the view (kill -9, a cut-off host, a
  process stopped past its lease); one that comes back rejoins.
* ``leave()`` (SIGTERM) hands over before polling stops: the lease is
  removed, then the member keeps polling until every other member reports
  (in its status document) a view without it, bounded by
  ``handoff_timeout_s``. A device is then polled twice for at most a
  heartbeat, in the same ticks (the phase seed is the cluster's), so the
  second reading of a tick is the same row: nothing is missed, nothing
  stored twice.

Store outages: the lease is held while the store cannot be reached
(:class:`~poller.cluster.lease.Lease`); the view stays as it was. When the
store answers again, members of the last view get one lease period to renew
before they are dropped, so a store restarted empty moves no device.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import orjson
from redis.exceptions import RedisError

from poller.clock import Clock
from poller.cluster.lease import Lease
from poller.cluster.ring import Assignment
from poller.cluster.store import Beat, MembershipStore
from poller.config import ClusterSettings
from poller.snapshot import write_atomically
from poller.tasks import Supervisor

log = logging.getLogger("poller.cluster")
VIEW_FILE = "cluster-view-{}.json"
_STORE_ERRORS = (RedisError, OSError, TimeoutError)


class Watcher(Protocol):
    """What membership needs of the registry watcher."""

    assignment: Assignment | None
    applied: Assignment | None

    def reassign(self, assignment: Assignment) -> None: ...


class Pool(Protocol):
    """What membership reads of the device pool."""

    @property
    def loops(self) -> Mapping[int, Any]: ...

    @property
    def rejected(self) -> Mapping[int, Any]: ...

    @property
    def wheel(self) -> object: ...


class Membership:
    """This instance's membership; ``status()`` is what the API shows."""

    def __init__(self, settings: ClusterSettings, me: str, redis_url: str, clock: Clock, *,
                 state_dir: Path | None = None, supervisor: Supervisor | None = None,
                 started_at: float = 0.0) -> None:
        self.settings = settings
        self.me = me
        self._clock = clock
        # A store that hangs (stopped, a route dropped) costs every attempt its
        # timeout, and an attempt holds the lease for lease_s from its start:
        # two attempts back to back must fit in a lease with room to spare, or
        # the lease lapses at the end of each and fences a batch of ticks
        # (skipped, never polled late). A quarter of the lease (lease_s >=
        # 2 heartbeat_s) leaves at least a quarter spare.
        self._store = MembershipStore(redis_url, settings.name,
                                      timeout_s=max(0.05, settings.lease_s / 4))
        self.lease = Lease(settings.lease_s)
        self._view_path = state_dir / VIEW_FILE.format(me) if state_dir is not None else None
        self._supervisor = supervisor if supervisor is not None else Supervisor(clock=clock)
        self.view: tuple[str, ...] = ()
        self.assignment = Assignment((), me)
        self.members: dict[str, dict[str, Any]] = {}
        """Live members' status documents, as of the last heartbeat."""
        self.missing: dict[str, float] = {}
        """Members seen before but holding no lease now -> seconds since last seen."""
        self.store_up = False
        self._back_at = -float("inf")
        """Monotonic instant the store answered after failing (or at the first join)."""
        self._watcher: Watcher | None = None
        self._pool: Pool | None = None
        self._leaving = False
        self._joined = False
        self._last_beat_at = -float("inf")
        self.api_url = ""
        """Set by the service once its API listens: shown to the other members."""
        self._doc_base = {"host": socket.gethostname(), "pid": os.getpid(),
                          "started_at": started_at}
        self.view_changes = 0
        self.rejoins = 0
        self.handoffs_out = 0
        """Devices this instance gave to others at view changes."""
        self.handoffs_in = 0
        """Devices this instance took from others at view changes."""
        self._pending_in: tuple[Assignment, int] | None = None

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Join: the first view, or the one kept from the last run while the
        store is down. Never fails for want of the store."""
        self._back_at = self._clock.monotonic()
        if not await self._beat_once():
            view = await asyncio.to_thread(self._read_view)
            if view and self.me in view:
                self._apply_view(view, "from the view kept on disk: the membership store "
                                 "does not answer")
            else:
                log.warning("cluster %s: the membership store does not answer and no view "
                            "is kept: polling starts once it answers", self.settings.name)
        self._supervisor.spawn("cluster-heartbeat", self._run)

    def attach(self, watcher: Watcher, pool: Pool) -> None:
        """Link the polling engine, before it starts: it polls the assignment."""
        self._watcher = watcher
        self._pool = pool
        watcher.assignment = self.assignment

    async def leave(self, deadline: float) -> None:
        """Hand this instance's devices over, then stop the heartbeat; polling
        goes on meanwhile (the caller stops it after). Bounded by
        ``handoff_timeout_s`` and the monotonic ``deadline``. Idempotent."""
        if self._leaving:
            return
        self._leaving = True
        await self._supervisor.stop()
        clock = self._clock
        until = min(deadline, clock.monotonic() + self.settings.handoff_timeout_s)
        waited_from = clock.monotonic()
        while True:
            beat = await self._try_beat(leaving=True)
            if beat is None:
                log.warning("cluster %s: the membership store does not answer: leaving "
                            "without a handoff (the others keep their view until it "
                            "answers)", self.settings.name)
                return
            waiting = sorted(m for m, doc in beat.members.items()
                             if self.me in (doc.get("view") or [self.me]))
            if not waiting:
                log.info("cluster %s: devices handed over to %d member(s) in %.2f s",
                         self.settings.name, len(beat.members),
                         clock.monotonic() - waited_from)
                return
            if clock.monotonic() >= until:
                log.warning("cluster %s: %s did not confirm the handoff in time; stopping "
                            "anyway (their leases will tell them)", self.settings.name,
                            ", ".join(waiting))
                return
            await clock.sleep(min(self.settings.heartbeat_s / 2,
                                  max(0.0, until - clock.monotonic())))

    async def close(self) -> None:
        await self._supervisor.stop()
        self.lease.drop()
        with contextlib.suppress(*_STORE_ERRORS):
            await self._store.close()

    # -- the heartbeat --------------------------------------------------------

    async def _run(self) -> None:
        clock = self._clock
        period = self.settings.heartbeat_s
        while not self._leaving:
            began = clock.monotonic()
            await self._beat_once()
            await clock.sleep(max(0.0, period - (clock.monotonic() - began)))

    async def _try_beat(self, *, leaving: bool = False) -> Beat | None:
        sent = self._clock.monotonic()
        try:
            beat = await self._store.beat(self.me, self.settings.lease_s, self._doc(),
                                          leaving=leaving)
        except _STORE_ERRORS as exc:
            self.lease.unreachable(sent)
            if self.store_up or not self._joined:
                log.warning("cluster %s: membership store unreachable (%s); keeping the view "
                            "of %d member(s) and polling on; no failover until it answers",
                            self.settings.name, type(exc).__name__, len(self.view))
            self.store_up = False
            self._joined = True
            return None
        if not self.store_up:
            self._back_at = self._clock.monotonic()
        self.store_up = True
        self.lease.renewed(sent)
        self._last_beat_at = sent
        return beat

    async def _beat_once(self) -> bool:
        """One heartbeat; False when the store did not answer."""
        first = not self._joined
        beat = await self._try_beat()
        if beat is None:
            return False
        self._joined = True
        if not beat.was_member and not first:
            self.rejoins += 1
            log.warning("cluster %s: this instance's lease had ended (the process was "
                        "paused, or cut off from the store); rejoined", self.settings.name)
        self.members = beat.members
        self.missing = {m: max(0.0, (beat.store_now_ms - at) / 1000)
                        for m, at in beat.missing.items()}
        # A member counts for the others once it polls its share (its status
        # says which view it applied): until then they keep its devices, so a
        # joiner still loading the registry leaves no device unpolled.
        live = {m for m, doc in beat.members.items()
                if m == self.me or doc.get("view") is not None}
        if self._clock.monotonic() - self._back_at < self.settings.lease_s:
            # The store just came back (or this instance just started): members
            # of the last view get one lease to renew before their devices move.
            live.update(self.view)
        view = tuple(sorted(live))
        if view != self.view:
            self._apply_view(view, "")
            await self._keep_view()
        self._count_taken()
        return True

    def _apply_view(self, view: tuple[str, ...], why: str) -> None:
        old = self.view
        assignment = Assignment(view, self.me)
        self.view, self.assignment = view, assignment
        self.view_changes += 1
        pool, watcher = self._pool, self._watcher
        if pool is not None and watcher is not None:
            held = list(pool.loops) + list(pool.rejected)
            out = sum(1 for i in held if not assignment.owns(i))
            self.handoffs_out += out
            self._pending_in = (assignment, len(held) - out)
            watcher.reassign(assignment)
        joined, left = sorted(set(view) - set(old)), sorted(set(old) - set(view))
        log.info("cluster %s: view of %d member(s)%s%s%s", self.settings.name, len(view),
                 f", joined: {', '.join(joined)}" if joined else "",
                 f", left: {', '.join(left)}" if left else "", f" ({why})" if why else "")

    async def _keep_view(self) -> None:
        """Write the view for the next start, should the store be down then."""
        if self._view_path is None:
            return
        try:
            await asyncio.to_thread(write_atomically, self._view_path,
                                    orjson.dumps(list(self.view)))
        except OSError as exc:
            log.warning("cluster: could not keep the view in %s: %s", self._view_path, exc)

    def _count_taken(self) -> None:
        """Once the watcher applied a view change: the devices it took over."""
        pending, watcher, pool = self._pending_in, self._watcher, self._pool
        if pending is None or watcher is None or pool is None or watcher.applied is not \
                pending[0]:
            return
        self._pending_in = None
        self.handoffs_in += max(0, len(pool.loops) + len(pool.rejected) - pending[1])

    def _read_view(self) -> tuple[str, ...]:
        if self._view_path is None:
            return ()
        try:
            data = orjson.loads(self._view_path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return ()
        if not isinstance(data, list) or not all(isinstance(m, str) for m in data):
            return ()
        return tuple(sorted(data))

    def _doc(self) -> dict[str, Any]:
        watcher, pool = self._watcher, self._pool
        applied = watcher.applied if watcher is not None else None
        devices = len(pool.loops) + len(pool.rejected) if pool is not None else 0
        return {**self._doc_base, "view": list(applied.members) if applied else None,
                "devices": devices, "api": self.api_url, "leaving": self._leaving}

    # -- what the API shows ---------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = self._clock.monotonic()
        members = []
        for name in sorted(set(self.view) | set(self.members)):
            doc = self.members.get(name, {})
            view = doc.get("view")
            members.append({
                "id": name, "devices": doc.get("devices"), "api": doc.get("api") or None,
                "host": doc.get("host"), "live": name in self.members,
                "agrees": view is not None and tuple(view) == self.view,
            })
        return {
            "enabled": True, "name": self.settings.name, "me": self.me,
            "view": list(self.view), "members": members,
            "missing": [{"id": m, "last_seen_s_ago": round(age, 3)}
                        for m, age in sorted(self.missing.items())],
            "store_up": self.store_up, "lease_valid": self.lease.valid(now),
            "heartbeat_age_s": round(max(0.0, now - self._last_beat_at), 3)
            if self._last_beat_at > -float("inf") else None,
            "view_changes": self.view_changes, "rejoins": self.rejoins,
            "handoffs_in": self.handoffs_in, "handoffs_out": self.handoffs_out,
            "fences": self.fences(),
        }

    def fences(self) -> int:
        """Times polling was held for want of a valid lease."""
        pool = self._pool
        return int(getattr(pool.wheel, "fences", 0)) if pool is not None else 0
