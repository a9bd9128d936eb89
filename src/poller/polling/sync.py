"""Keeps the device pool in step with the registry while serving.

Changes arrive as Postgres notifications (``registry.CHANNEL``, payload: the
cloud id), applied within a fraction of a second; a periodic full resync
compares versions (id, updated_at) as a safety net for anything missed while
the listening connection was down. Only changed devices are fetched and their
credentials opened. With Postgres down, polling goes on with the devices it
has.

With ``shard`` k/n the watcher keeps only the devices whose id % n == k:
n instances with shards 0/n .. n-1/n share one registry and poll every device
exactly once between them, each on its own event loop (and its own core).
In a cluster (``poller.cluster``) the watcher keeps the devices its
``assignment`` gives this instance; ``reassign`` applies a new view at once.

The watching loop runs under a :class:`~poller.tasks.Supervisor` (the
service's, when given): an error it does not expect (a snapshot that cannot
be written, a bug) restarts it with back-off, counted, and a restart
resyncs at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping

import asyncpg

from poller import heap
from poller.clock import Clock
from poller.cluster.ring import Assignment
from poller.config import EVERY_DEVICE, Shard
from poller.drivers.base import DeviceSpec
from poller.polling.pool import DevicePool
from poller.registry import CHANNEL, RESYNC_ALL, DeviceRecord, Registry
from poller.sealing import SecretBox
from poller.tasks import Supervisor

log = logging.getLogger("poller.polling")
_DEBOUNCE_S = 0.05
_RETRY_MAX_S = 30.0
_SLICE = 2000
_SLICE_POLLING = 250
"""Devices a resync starts per step once the pool polls: about 10 ms of work,
then a turn of the event loop. A bulk registration beside a polled fleet
(``poller import``, 10,000 a batch) in steps of 2000 held the loop for
30-240 ms a step, and every poll due meanwhile waited (``poller bench
--import-devices``)."""
_FREEZE_AFTER = 1000
"""Devices started by one resync (the first, or a bulk registration) after
which the heap is frozen out of the cyclic GC."""
Wanted = tuple[DeviceRecord, DeviceSpec]


class RegistryWatcher:
    def __init__(self, database_url: str, box: SecretBox, pool: DevicePool,
                 resync_interval_s: float, *, shard: Shard = EVERY_DEVICE,
                 on_resync: Callable[[asyncpg.Connection], Awaitable[object]] | None = None,
                 clock: Clock | None = None, supervisor: Supervisor | None = None) -> None:
        self._url = database_url
        self._clock = clock if clock is not None else pool.clock
        self._supervisor = supervisor if supervisor is not None else \
            Supervisor(clock=self._clock)
        self._runs = 0
        self._on_resync = on_resync
        self._changed_since_resync = True
        """The pool changed since ``on_resync`` last ran (or it never ran)."""
        self._shard = shard
        self.assignment: Assignment | None = None
        """The cluster's assignment in force (None: not in a cluster)."""
        self.applied: Assignment | None = None
        """The assignment the last full resync made the pool match."""
        self._box = box
        self._pool = pool
        self.resync_interval_s = resync_interval_s
        self._conn: asyncpg.Connection | None = None
        self._changed: set[str] = set()
        self._wake = asyncio.Event()
        self.resyncs = 0
        self.connected = False
        self._stopping = False

    async def start(self, initial: Mapping[int, tuple[DeviceRecord, DeviceSpec]] | None = None,
                    ) -> None:
        """Load every device once (fails loudly if Postgres is down), then watch.

        With ``initial`` (the registry snapshot, when Postgres is down) poll
        those devices at once and connect in the background."""
        if initial is None:
            await self._connect()
            await self._full_resync()
        else:
            owns = self.owns
            mine = [(i, e) for i, e in initial.items() if owns(i)]
            self._update(mine, bulk=len(mine) >= _FREEZE_AFTER)
            self._wake.set()  # connect now, not a resync period from now
        self._supervisor.spawn("registry-watcher", self._run)

    def owns(self, device_id: int) -> bool:
        assignment = self.assignment
        return self._shard.owns(device_id) and (assignment is None or
                                                assignment.owns(device_id))

    def reassign(self, assignment: Assignment) -> None:
        """Poll what ``assignment`` gives this instance, from the next turn
        of the watcher (a full resync, at once)."""
        self.assignment = assignment
        self._changed.add(RESYNC_ALL)
        self._wake.set()

    async def stop(self) -> None:
        self._stopping = True
        await self._supervisor.stop()
        await self._disconnect()

    async def _connect(self) -> None:
        conn = await asyncpg.connect(self._url, timeout=10)
        await conn.add_listener(CHANNEL, self._on_notify)
        conn.add_termination_listener(self._on_lost)
        self._conn = conn
        self.connected = True

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        self.connected = False
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await conn.close(timeout=2)

    def _on_notify(self, conn: object, pid: int, channel: str, payload: object) -> None:
        self._changed.add(str(payload))  # a str from asyncpg; its stubs say object
        self._wake.set()

    def _resync_soon(self) -> bool:
        return RESYNC_ALL in self._changed

    def _on_lost(self, conn: object) -> None:
        self.connected = False
        self._wake.set()

    async def _run(self) -> None:
        clock = self._clock
        self._runs += 1
        # After a crash, whatever it left half-applied is put right at once.
        next_resync = clock.monotonic() + (self.resync_interval_s if self._runs == 1 else 0.0)
        failures = 0
        while not self._stopping:
            await clock.wait(max(0.0, next_resync - clock.monotonic()), self._wake)
            self._wake.clear()
            if self._stopping:
                return
            try:
                if self._conn is None or self._conn.is_closed():
                    await self._disconnect()
                    await self._connect()
                    log.info("registry watcher reconnected")
                    next_resync = 0.0  # notifications may have been missed
                if clock.monotonic() >= next_resync or self._resync_soon():
                    self._changed.clear()
                    await self._full_resync()
                    next_resync = clock.monotonic() + self.resync_interval_s
                elif self._changed:
                    await clock.sleep(_DEBOUNCE_S)  # gather a burst of changes
                    changed, self._changed = list(self._changed), set()
                    await self._apply(changed)
                failures = 0
            except (OSError, TimeoutError, asyncpg.PostgresError,
                    asyncpg.InterfaceError) as exc:
                failures += 1
                delay = min(_RETRY_MAX_S, 0.5 * 2**failures) * (0.5 + random.random() / 2)
                if failures == 1:
                    log.warning("registry watcher lost Postgres (%s); polling goes on with "
                                "the devices it has", type(exc).__name__)
                await self._disconnect()
                await clock.sleep(delay)
                self._wake.set()

    def _update(self, entries: Iterable[tuple[int, Wanted | None]], *, bulk: bool,
                level: int = logging.INFO) -> None:
        """Apply wanted states to the pool.

        A bulk (the start, a bulk registration) is built with the cyclic GC
        paused and then frozen out of its reach (see poller.heap): at 100k
        devices each full collection walked a million live objects. A plain
        ``def`` on purpose: the pause cannot span an await, during which
        every other task would run without the collector."""
        update = self._pool.update
        with heap.building("the device pool", level=level) if bulk \
                else contextlib.nullcontext():
            for device_id, entry in entries:
                update(device_id, entry)

    async def _apply(self, cloud_ids: list[str]) -> None:
        assert self._conn is not None
        registry = Registry(self._conn, self._box)
        owns = self.owns
        versions = {i: v for i, v in (await registry.versions(cloud_ids)).items() if owns(i)}
        wanted_ids = [i for i, v in versions.items() if v is not None]
        specs = await registry.specs(ids=wanted_ids) if wanted_ids else {}
        for device_id in versions:
            if self._pool.update(device_id, specs.get(device_id)):
                self._changed_since_resync = True

    async def _full_resync(self) -> None:
        assert self._conn is not None
        registry = Registry(self._conn, self._box)
        # Polling already: each O(fleet) step below is followed by a turn of
        # the loop (at 100k devices each is tens of ms), new devices start in
        # small steps.
        polling = bool(self._pool.loops)
        assignment = self.assignment
        versions = await registry.versions(shard=self._shard)
        await _turn(polling)
        if assignment is not None:
            versions = {i: v for i, v in versions.items() if assignment.owns(i)}
            await _turn(polling)
        running = {i: lp.target.record.updated_at for i, lp in self._pool.loops.items()}
        running.update({i: t.record.updated_at for i, t in self._pool.rejected.items()})
        await _turn(polling)
        changed = [i for i, v in versions.items() if running.get(i) != v]
        await _turn(polling)
        if changed or running.keys() - versions.keys():
            self._changed_since_resync = True
        for device_id in running:
            if device_id not in versions:
                self._pool.update(device_id, None)
        bulk = len(changed) >= _FREEZE_AFTER
        # In slices: at 100k devices one query and one dict of every record
        # and opened secret is a peak the process keeps as RSS afterwards.
        step = _SLICE_POLLING if polling else _SLICE
        for start in range(0, len(changed), step):
            ids = changed[start:start + step]
            specs = await registry.specs(ids=ids)
            self._update(((i, specs.get(i)) for i in ids), bulk=bulk, level=logging.DEBUG)
        if bulk:
            log.info("%d device(s) started or changed, frozen out of the cyclic GC "
                     "in %d part(s)", len(changed), -(-len(changed) // step))
        self.resyncs += 1
        self.applied = assignment
        if self._on_resync is not None and self._changed_since_resync:
            await self._on_resync(self._conn)
            self._changed_since_resync = False


async def _turn(polling: bool) -> None:
    """Let the polls due run, if there are any."""
    if polling:
        await asyncio.sleep(0)
