"""The device pool: the running loops, synced against the wanted devices.

``sync()`` compares the registry's wanted devices with the running loops and
starts, stops or restarts the difference (a restart when a device's
registration changed, e.g. new credentials after ``auth_failed``). The pool
also owns what all loops share, in a :class:`~poller.polling.context.LoopContext`
it builds and writes: the timing wheel, the global cap on polls in flight, the
fleet statistics and the settings loops read per poll. It reads its loops
only through their public methods (``start``, ``stop``, ``reanchor``).

Time: ticks are wall-clock instants (``schedule``), timers and deadlines are
monotonic instants, both read from the one injected :class:`~poller.clock.Clock`.
The pool converts with ``wall_offset = wall - monotonic`` (kept in the loops'
context), taken at start and checked every second: when the wall clock steps
(the two disagree by more than ``CLOCK_STEP_S`` with the offset last taken),
the pool takes the new offset and puts every loop back at its next tick by
the new wall time. A tick index is never used twice by a device, so a
backward step produces no reading whose ``(device_id, tick_at)`` is already
stored: the ticks it would repeat are not polled, and counted
(``tick_conflicts``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from poller.clock import Clock, LoopClock, TimerHandle
from poller.cluster.lease import FencedWheel
from poller.config import PollingSettings
from poller.drivers import get_driver
from poller.drivers.base import DeviceSpec, Driver
from poller.polling import schedule
from poller.polling.context import DirtyQueue, LoopContext, ReadingSink
from poller.polling.index import TargetIndex
from poller.polling.loop import CallbackTransport, DeviceLoop
from poller.polling.target import DeviceState, Target
from poller.registry import DeviceRecord
from poller.wheel import TimingWheel

log = logging.getLogger("poller.polling")
_LOG_BUDGET = 20
CLOCK_STEP_S = 1.0
"""Wall and monotonic time drifting apart by more than this is a step."""
_CLOCK_CHECK_S = 1.0


__all__ = ["CLOCK_STEP_S", "DevicePool", "ReadingSink", "SyncResult"]


@dataclass(frozen=True, slots=True)
class SyncResult:
    started: int
    stopped: int
    restarted: int
    rejected: int


class DevicePool:
    def __init__(
        self,
        settings: PollingSettings,
        sink: ReadingSink,
        transports: Mapping[str, CallbackTransport],
        *,
        seed: str,
        clock: Clock | None = None,
        wheel_resolution_s: float = 0.02,
        fence: Callable[[float], bool] | None = None,
    ) -> None:
        self.settings = settings
        self._fence = fence
        """In a cluster: is the lease valid at this monotonic instant? Read
        once per batch of ticks (poller.cluster.lease.FencedWheel)."""
        self._transports = transports
        self._seed = seed
        self.clock = clock if clock is not None else LoopClock()
        self._now: Callable[[], float] = self.clock.monotonic
        """The clock's monotonic reader, bound once."""
        self._ctx = LoopContext(settings, sink, self._now, self._state_changed)
        """What the loops share; the pool writes it, the loops read it."""
        self.stats = self._ctx.stats
        self._wheel_resolution_s = wheel_resolution_s
        self._drivers: dict[str, Driver] = {}
        self.loops: dict[int, DeviceLoop] = {}
        self._polls_per_s = 0.0
        """Sum of 1 / interval over the loops, kept as they start and stop:
        /metrics reads it every scrape, and a walk over 100k loops costs 6 ms."""
        self.rejected: dict[int, Target] = {}
        self._stopping: set[asyncio.Future[None]] = set()
        self.state_counts: collections.Counter[DeviceState] = collections.Counter()
        self.index = TargetIndex()
        """Targets by cloud id and by state: what the API looks up, never a walk."""
        self._log_window_at = 0.0
        self._log_count = 0
        self._log_suppressed = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clock_check: TimerHandle | None = None

    def apply_settings(self, settings: PollingSettings) -> None:
        """New timeout, back-off, cadence and cap; running loops use them from
        their next poll."""
        self.settings = settings
        self._ctx.apply(settings)

    def log_transition(self, cloud_id: str, previous: str, state: str, outcome: str,
                       message: str | None) -> None:
        """Log a device's state change, at most ``_LOG_BUDGET`` lines a second:
        when a whole fleet fails at once (its cloud is down) a line per device
        would cost more than the polls. The rest are counted and summarised."""
        now = self._now()
        if now - self._log_window_at >= 1.0:
            if self._log_suppressed:
                log.warning("%d more device state change(s) not logged in the last second "
                            "(GET /api/devices?state=... lists them)", self._log_suppressed)
            self._log_window_at = now
            self._log_count = 0
            self._log_suppressed = 0
        if self._log_count >= _LOG_BUDGET:
            self._log_suppressed += 1
            return
        self._log_count += 1
        log.info("device %s: %s -> %s (%s)%s", cloud_id, previous, state, outcome,
                 f": {message}" if message else "")

    def _state_changed(self, target: Target, previous: DeviceState, outcome: str,
                       message: str | None) -> None:
        """A loop's device went from ``previous`` to ``target.state`` (or
        only its outcome or its failures in a row changed): refile, recount,
        and say so."""
        state = target.state
        self.index.moved(target, previous)
        if previous is state:
            return  # only its outcome or its failures in a row: re-ranked, no news
        counts = self.state_counts
        counts[previous] -= 1
        counts[state] += 1
        # One line per state change, never one per poll; a first success is
        # the normal start, not news.
        if not (previous is DeviceState.PENDING and state is DeviceState.OK):
            self.log_transition(target.cloud_id, previous.value, state.value, outcome, message)

    def set_sink(self, sink: ReadingSink) -> None:
        """Replace the sink; only before ``start()``."""
        self._ctx.set_sink(sink)

    # -- what the service reads -------------------------------------------------

    def timeout_for(self, interval_s: float) -> float:
        """The time budget of a poll of a device polled every ``interval_s``."""
        return self._ctx.timeout_for(interval_s)

    @property
    def dirty(self) -> DirtyQueue:
        """Targets changed since the live-state writer last drained them."""
        return self._ctx.dirty

    @property
    def in_flight(self) -> int:
        return self._ctx.limiter.in_flight

    @property
    def waiting(self) -> int:
        """Due polls waiting for the in-flight cap."""
        return len(self._ctx.limiter.waiting)

    @property
    def wheel(self) -> TimingWheel:
        return self._ctx.wheel

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        clock = self.clock
        self._ctx.wall_offset = clock.wall() - clock.monotonic()
        if self._fence is None:
            self._ctx.wheel = TimingWheel(clock, self._wheel_resolution_s)
        else:
            self._ctx.wheel = FencedWheel(clock, self._wheel_resolution_s, self._fence,
                                          self._resume_after_fence)
        self._clock_check = clock.call_later(_CLOCK_CHECK_S, self._check_clock)

    def _check_clock(self) -> None:
        clock = self.clock
        offset = clock.wall() - clock.monotonic()
        if abs(offset - self._ctx.wall_offset) > CLOCK_STEP_S:
            self._reanchor(offset)
        self._clock_check = clock.call_later(_CLOCK_CHECK_S, self._check_clock)

    def _resume_after_fence(self) -> None:
        """The lease is valid again after polling was fenced (a pause, a
        rejoin): every loop goes to its next tick by the wall time now; the
        ticks due meanwhile are skipped (counted), never polled late."""
        ctx = self._ctx
        now_wall = ctx.wall_now()
        scheduled = set(ctx.wheel.drain())
        for device_loop in self.loops.values():
            device_loop.reanchor(now_wall, 0.0, device_loop in scheduled)

    def _reanchor(self, offset: float) -> None:
        """The wall clock stepped: take the new offset and put every loop
        back at its next tick by the new wall time (a walk over the fleet,
        once per step)."""
        ctx = self._ctx
        step_s = offset - ctx.wall_offset
        ctx.wall_offset = offset
        stats = self.stats
        stats.clock_steps += 1
        conflicts, skipped = stats.tick_conflicts, stats.skipped_ticks
        now_wall = ctx.wall_now()
        scheduled = set(ctx.wheel.drain())
        for device_loop in self.loops.values():
            device_loop.reanchor(now_wall, step_s, device_loop in scheduled)
        log.warning("wall clock stepped %+.3f s; polling re-anchored to the new time: "
                    "%d tick(s) jumped over, %d not polled again because their "
                    "readings exist already", step_s, stats.skipped_ticks - skipped,
                    stats.tick_conflicts - conflicts)

    def sync(self, wanted: Mapping[int, tuple[DeviceRecord, DeviceSpec]]) -> SyncResult:
        """Make the running loops match ``wanted`` (device id -> record, spec)."""
        counts = collections.Counter[str]()
        for device_id in [*self.loops, *self.rejected]:
            if device_id not in wanted:
                counts[self.update(device_id, None)] += 1
        for device_id, entry in wanted.items():
            counts[self.update(device_id, entry)] += 1
        return SyncResult(counts["started"], counts["stopped"], counts["restarted"],
                          counts["rejected"])

    def update(self, device_id: int, entry: tuple[DeviceRecord, DeviceSpec] | None) -> str:
        """Apply one device's wanted state; say what changed (``""``: nothing)."""
        current = self.loops.get(device_id)
        previous = current.target if current is not None else self.rejected.get(device_id)
        if entry is None:
            gone = self.rejected.pop(device_id, None)
            if gone is not None:
                self.state_counts[gone.state] -= 1
                self.index.remove(gone)
            if current is None:
                return ""
            self._stop_loop(device_id)
            return "stopped"
        record, spec = entry
        if previous is not None and previous.record.updated_at == record.updated_at:
            return ""
        target = Target(record)
        if previous is not None:
            target.inherit(previous)
        if current is not None:
            self._stop_loop(device_id)
        elif previous is not None:
            del self.rejected[device_id]
            self.state_counts[previous.state] -= 1
            self.index.remove(previous)
        made = self._make_loop(target, spec)
        if made is None:
            return "rejected"
        self.loops[device_id] = made
        self._polls_per_s += 1.0 / record.interval_s
        self.state_counts[target.state] += 1
        self.index.add(target)
        made.start()
        return "restarted" if current is not None else "started"

    def _make_loop(self, target: Target, spec: DeviceSpec) -> DeviceLoop | None:
        record = target.record
        try:
            driver = self._driver(record.driver)
            session = driver.session(spec)
            transport = self._transports[record.driver]
        except (ValueError, KeyError) as exc:
            target.state = DeviceState.FAILING
            target.last_outcome = "config_error"
            target.last_error = str(exc)[:200]
            self.rejected[record.id] = target
            self.state_counts[target.state] += 1
            self.index.add(target)
            self._ctx.dirty.mark(target)
            log.warning("device %s not polled: %s", record.cloud_id, target.last_error)
            return None
        phase = schedule.phase(record.cloud_id, self._seed, record.interval_s)
        return DeviceLoop(self._ctx, target, session, transport, record.interval_s, phase)

    def _driver(self, name: str) -> Driver:
        driver = self._drivers.get(name)
        if driver is None:
            driver = get_driver(name, cloud_base_url=self.settings.cloud_base_url)
            self._drivers[name] = driver
        return driver

    def _stop_loop(self, device_id: int) -> None:
        device_loop = self.loops.pop(device_id)
        self._polls_per_s = self._polls_per_s - 1.0 / device_loop.target.record.interval_s \
            if self.loops else 0.0
        self.state_counts[device_loop.target.state] -= 1
        self.index.remove(device_loop.target)
        waiter = device_loop.stop()
        if self._fence is None:
            self._ctx.dirty.mark(device_loop.target)
        # In a cluster (fenced) a stop is mostly a handoff: the member taking
        # the device writes its state to Redis, and a "stopped" written after
        # it by the member letting go would stay there, stale, until the new
        # owner's next change. A disabled or removed device shows as such from
        # its registration, whatever Redis holds.
        self._stopping.add(waiter)
        waiter.add_done_callback(self._stopping.discard)

    async def stop(self, timeout_s: float) -> int:
        """Stop every loop; wait up to ``timeout_s`` for polls in flight.

        Returns the number of polls still in flight at the deadline (their
        answers, if they come, are dropped with the transports)."""
        for device_id in list(self.loops):
            self._stop_loop(device_id)
        self._ctx.limiter.waiting.clear()
        pending = [f for f in self._stopping if not f.done()]
        if pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*pending), timeout_s)
        if self._clock_check is not None:
            self._clock_check.cancel()
            self._clock_check = None
        if self._loop is not None:
            self._ctx.wheel.close()
        return self._ctx.limiter.in_flight

    def targets(self) -> list[Target]:
        return [lp.target for lp in self.loops.values()] + list(self.rejected.values())

    def target(self, device_id: int) -> Target | None:
        """The target of a device in the pool (polled, or refused by its driver)."""
        device_loop = self.loops.get(device_id)
        return device_loop.target if device_loop is not None else self.rejected.get(device_id)

    def most_failing(self, limit: int) -> list[int]:
        """Ids of the failing and auth_failed devices with the most failures in
        a row, most first (ties: lower id first), at most ``limit``: read off
        the index's ranking, O(limit) at any fleet size."""
        return self.index.most_failing(limit)

    def target_by_cloud_id(self, cloud_id: str) -> Target | None:
        device_id = self.index.device_id(cloud_id)
        return None if device_id is None else self.target(device_id)

    def expected_polls_per_s(self) -> float:
        return self._polls_per_s

    def devices_by_state(self) -> dict[str, int]:
        """Devices per state, kept as states change: no walk over the fleet."""
        counts = self.state_counts
        return {s.value: counts[s] for s in DeviceState}
