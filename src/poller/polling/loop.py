"""One device's polling loop: schedule, exchange, timeout, back-off, outcome.

The loop is a small state machine driven by callbacks rather than a task per
device: the wheel calls :meth:`DeviceLoop.fire` at each tick, the transport
calls :meth:`DeviceLoop._on_done` with each answer. At 100k devices a task
wake-up and a future per poll cost more CPU than the HTTP exchange itself
(NOTES-performance: 61 µs against 20-28 µs per poll); the bench measures it.

Life of a loop: ``start()`` schedules the first tick; every tick starts one
poll unless one is in flight (never two); a finished poll schedules the next
tick on the device's phase grid, skipping ticks it overran (never bursting),
further out after failures (exponential back-off, capped, jittered) or after
rejected credentials (``auth_failed_interval_s``). ``stop()`` is idempotent and
its awaitable resolves once no poll of this device is in flight.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from typing import TYPE_CHECKING, Any, Protocol

from poller.drivers.base import (
    DeviceSession,
    HttpRequest,
    HttpResponse,
    Outcome,
    PollFailure,
    Sample,
)
from poller.drivers.bounds import Flawed
from poller.polling import schedule
from poller.polling.stats import OK_INDEX, OUTCOME_INDEX
from poller.polling.target import DeviceState, Target
from poller.reading import Reading
from poller.transport.errors import (
    TransportConnectError,
    TransportProtocolError,
    TransportQueueTimeout,
    TransportTimeout,
)

if TYPE_CHECKING:
    from poller.polling.pool import DevicePool

log = logging.getLogger("poller.polling")

_I_TIMEOUT = OUTCOME_INDEX[Outcome.TIMEOUT]
_I_CONNECT = OUTCOME_INDEX[Outcome.CONNECT_ERROR]
_I_UNPARSEABLE = OUTCOME_INDEX[Outcome.UNPARSEABLE]
_I_TOTALS_FAILED = OUTCOME_INDEX[Outcome.TOTALS_FAILED]
_MAX_ERROR_LEN = 200
_new_tuple = tuple.__new__


class CallbackTransport(Protocol):
    """What a loop needs of a transport: prepare once, start with a callback."""

    def prepared(self, request: HttpRequest) -> Any: ...

    def start(self, prepared: Any, deadline: float, on_done: Any,
              headers: bytes | None = None) -> None: ...


class DeviceLoop:
    __slots__ = (
        "_counts", "_in_flight", "_index", "_interval", "_own", "_phase", "_polls",
        "_pool", "_prep_request", "_prepared", "_session", "_stop_waiter", "_stopped", "_timeout",
        "_timeout_for", "_transport", "target",
    )

    def __init__(self, pool: DevicePool, target: Target, session: DeviceSession,
                 transport: CallbackTransport, interval_s: float, phase_s: float) -> None:
        self._pool = pool
        self.target = target
        self._session = session
        self._transport = transport
        self._interval = interval_s
        self._phase = phase_s
        self._index = 0
        self._polls = 0
        self._in_flight = False
        self._stopped = False
        self._stop_waiter: asyncio.Future[None] | None = None
        self._prep_request: HttpRequest | None = None
        self._prepared: Any = None
        self._own: bytes | None = None
        """With a repeating session on the fast transport, ``_prepared`` is the
        template every device shares and these are the device's own headers."""
        self._counts = pool.stats.driver_outcomes(target.record.driver)
        self._timeout_for = -1.0
        """The pool's timeout setting ``_timeout`` was computed for."""
        self._timeout = 0.0

    @property
    def in_flight(self) -> bool:
        return self._in_flight

    @property
    def next_tick_at(self) -> float:
        """Wall time of the scheduled (or current) tick."""
        return schedule.tick_time(self._index, self._interval, self._phase)

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        interval, phase = self._interval, self._phase
        index = schedule.next_tick_index(self._pool.wall_now(), interval, phase)
        latest = self.target.latest  # kept from the loop this one replaces
        if latest is not None and schedule.tick_time(index, interval, phase) <= latest.tick_at:
            # The wall clock went back since that reading: never a tick_at again
            # that may be stored already (see DevicePool on clock steps).
            after = schedule.next_tick_index(latest.tick_at, interval, phase)
            if schedule.tick_time(after, interval, phase) <= latest.tick_at:
                after += 1
            self._pool.stats.tick_conflicts += after - index
            self.target.skipped_ticks += after - index
            index = after
        self._schedule(index)

    def reanchor(self, now_wall: float, step_s: float, scheduled: bool) -> None:
        """The wall clock stepped by ``step_s`` and the pool took the new
        offset; ``scheduled``: the loop was in the wheel (the pool drained it)
        and must be put back.

        A tick index is never used twice. After a backward step the ticks that
        come round again, up to the ones already used, are not polled
        (counted as conflicts); after a forward step the ticks jumped over
        are skipped (counted), as after an overrun. A poll in flight or
        waiting for a slot finishes first and schedules itself as usual."""
        if self._stopped:
            return
        interval, phase = self._interval, self._phase
        upcoming = self._index if scheduled or not self._in_flight else self._index + 1
        due_before = schedule.next_tick_index(now_wall - step_s, interval, phase)
        due_now = schedule.next_tick_index(now_wall, interval, phase)
        pool, target = self._pool, self.target
        if due_now < due_before:
            again = min(due_before, upcoming) - due_now
            if again > 0:
                pool.stats.tick_conflicts += again
                target.skipped_ticks += again
        if not scheduled:
            return
        if due_now > upcoming:
            pool.stats.skipped_ticks += due_now - upcoming
            target.skipped_ticks += due_now - upcoming
            upcoming = due_now
        self._schedule(upcoming)

    def stop(self) -> asyncio.Future[None]:
        """Stop polling; the future resolves when no poll is in flight."""
        self._stopped = True
        self.target.state = DeviceState.STOPPED
        if self._stop_waiter is None:
            self._stop_waiter = asyncio.get_running_loop().create_future()
            if not self._in_flight:
                self._stop_waiter.set_result(None)
        return self._stop_waiter

    # -- the tick path --------------------------------------------------------

    def _schedule(self, index: int) -> None:
        self._index = index
        pool = self._pool
        pool.wheel.add(index * self._interval + self._phase - pool.wall_offset, self)

    def _deadline(self) -> float:
        """When the current poll must end, a monotonic instant: recomputed
        rather than kept (a float and a slot, 32 B a device, for 60 ns a poll);
        never more than a timeout away, should the wall clock have stepped
        back since the poll began."""
        pool = self._pool
        return min(self._index * self._interval + self._phase - pool.wall_offset,
                   pool.loop_time()) + self._timeout

    def fire(self) -> None:
        """A tick is due (called by the wheel)."""
        if self._stopped:
            return
        pool = self._pool
        if not pool.sink.accepting:
            # Storage cannot take more: skip this tick rather than hold
            # readings nobody can keep. Counted, never silent.
            pool.stats.backpressure_skips += 1
            self.target.skipped_ticks += 1
            self._schedule(self._index + 1)
            return
        if pool.in_flight >= pool.max_in_flight:
            pool.wait_for_slot(self)
            return
        self.begin()

    def begin(self) -> None:
        pool = self._pool
        if pool.timeout_s != self._timeout_for:  # first poll, or a SIGHUP changed it
            self._timeout_for = pool.timeout_s
            self._timeout = pool.timeout_for(self._interval)
        due = self._index * self._interval + self._phase - pool.wall_offset
        pool.stats.lateness.record(pool.loop_time() - due)
        pool.stats.polls_started += 1
        pool.in_flight += 1
        self._in_flight = True
        self._polls += 1
        with_totals = self._polls % pool.totals_every == 1 or pool.totals_every == 1
        try:
            # Bytes kept without the request they came from: the session
            # repeats its first request (see _send), so ask it to start again.
            if self._prep_request is None and self._prepared is not None and \
                    self._session.repeat(with_totals):  # type: ignore[attr-defined]
                self._transport.start(self._prepared, due + self._timeout, self._on_done,
                                      self._own)
                return
            request = self._session.begin(with_totals)
        except Exception as exc:  # a driver bug must not escape into the wheel
            self._finish_failure(_I_UNPARSEABLE, f"driver error: {type(exc).__name__}")
            return
        self._send(request, due + self._timeout, True)

    def _send(self, request: HttpRequest, deadline: float, first: bool = False) -> None:
        if request is self._prep_request:
            prepared = self._prepared
        else:
            prepared = self._transport.prepared(request)
            if first:
                # Keep the bytes of the request that starts each poll; a
                # follow-up (totals, every tenth poll) is prepared when sent
                # rather than held by every device (400 B a device saved for
                # 0.3 µs a poll). A session that can ``repeat`` its first
                # request is asked that; others are matched by the identity of
                # the request object they return (they reuse it).
                if not hasattr(type(self._session), "repeat"):
                    self._prepared, self._prep_request = prepared, request
                else:  # the fast transport shares all but the device's headers
                    shared = getattr(self._transport, "shared", None)
                    self._prepared, self._own = (prepared, None) if shared is None \
                        else shared(prepared)
        self._transport.start(prepared, deadline, self._on_done)

    def _on_done(self, result: HttpResponse | BaseException) -> None:
        if isinstance(result, BaseException):
            self._on_transport_error(result)
            return
        try:
            step = self._session.feed(result)
        except PollFailure as failure:
            self._finish_failure(OUTCOME_INDEX[failure.outcome], failure.message)
            return
        except Exception as exc:  # a driver bug is an unparseable answer, not a crash
            self._finish_failure(_I_UNPARSEABLE, f"driver error: {type(exc).__name__}")
            return
        if isinstance(step, HttpRequest):
            self._send(step, self._deadline())  # a follow-up shares the poll's deadline
            return
        self._keep(step, None)

    def _keep(self, step: Sample, totals_failure: str | None) -> None:
        """Store the poll's reading, its fields bounded (drivers/bounds.py);
        ``totals_failure``: why its totals follow-up failed, if it did."""
        pool = self._pool
        target = self.target
        received = pool.loop_time() + pool.wall_offset
        # schedule.tick_time and Reading(...), inlined: this runs per poll.
        tick_at = round((self._index * self._interval + self._phase) * 1e6) / 1e6
        flawed = pool.bounds.check(step, tick_at)
        if flawed is not None:
            step = flawed.sample
        reading = _new_tuple(Reading, (target.record.id, tick_at, step.device_at, received,
                                       step.demand_w, step.delivered_wh, step.received_wh,
                                       step.price, target.record.cloud_id))
        pool.sink_accept(reading)
        target.latest = reading
        self._counts[OK_INDEX] += 1
        target.readings += 1
        if target.first_reading_at is None:
            target.first_reading_at = received
        target.last_reading_at = received
        target.last_poll_at = received
        if target.state is not DeviceState.OK:
            self._transition(DeviceState.OK, "ok", None)
        elif target.last_error is not None or target.consecutive_failures:
            # The last poll kept a flawed reading (see _note_flaws), or failed.
            target.last_outcome, target.last_error = "ok", None
            target.consecutive_failures = 0
        if flawed is not None or totals_failure is not None:
            self._note_flaws(flawed, totals_failure)
        if not target.dirty:  # pool.mark_dirty, inlined
            target.dirty = True
            pool.dirty.append(target)
        self._end_poll(received, 0.0)

    def _note_flaws(self, flawed: Flawed | None, totals_failure: str | None) -> None:
        """Count what a kept reading lacks, beside its OK, and say it in the
        device's last outcome and error until its next clean poll."""
        target = self.target
        counts = self._counts
        notes: list[str] = []
        if totals_failure is not None:
            target.count_failure(_I_TOTALS_FAILED)
            counts[_I_TOTALS_FAILED] += 1
            notes.append("totals: " + totals_failure)
        outcome = Outcome.TOTALS_FAILED.value
        if flawed is not None:
            for reason in flawed.outcomes:
                index = OUTCOME_INDEX[reason]
                target.count_failure(index)
                counts[index] += 1
            if totals_failure is None:
                outcome = flawed.outcomes[0].value
            notes.append(flawed.message)
        target.last_outcome = outcome
        target.last_error = "; ".join(notes)[:_MAX_ERROR_LEN]

    def _on_transport_error(self, exc: BaseException) -> None:
        if isinstance(exc, TransportQueueTimeout):
            partial = self._session.partial()
            if partial is not None:
                # The totals follow-up waited too long for a connection: our
                # overload, so the demand is kept and the lost totals counted
                # fleet-wide only; like a skipped tick, it blames no device.
                self._counts[_I_TOTALS_FAILED] += 1
                self._keep(partial, None)
                return
            # Nothing reached the device: we are overloaded. Skip the tick
            # (counted) instead of blaming the device and backing it off.
            pool = self._pool
            pool.stats.skipped_ticks += 1
            self.target.skipped_ticks += 1
            self._end_poll(pool.wall_now(), 0.0)
            return
        if isinstance(exc, TransportTimeout):
            self._finish_failure(_I_TIMEOUT, "no answer within the poll timeout")
        elif isinstance(exc, TransportConnectError):
            self._finish_failure(_I_CONNECT, str(exc)[:_MAX_ERROR_LEN])
        elif isinstance(exc, TransportProtocolError):
            self._finish_failure(_I_UNPARSEABLE, str(exc)[:_MAX_ERROR_LEN])
        else:
            self._finish_failure(_I_CONNECT, f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_LEN])

    def _finish_failure(self, index: int, message: str) -> None:
        partial = self._session.partial()
        if partial is not None:  # only the totals follow-up failed: keep the demand
            self._keep(partial, message)
            return
        pool = self._pool
        target = self.target
        target.count_failure(index)
        self._counts[index] += 1
        now = pool.wall_now()
        target.last_poll_at = now
        target.consecutive_failures += 1
        outcome = pool.outcome_names[index]
        if outcome == Outcome.AUTH_REJECTED.value:
            state = DeviceState.AUTH_FAILED
            delay = pool.auth_failed_interval_s
        else:
            state = DeviceState.FAILING
            # Back off from the interval, doubling per consecutive failure,
            # capped, with jitter so a fleet that failed together does not
            # come back together. The first failure waits no longer than usual.
            exp = min(target.consecutive_failures - 1, 30)
            base = min(pool.backoff_max_s, self._interval * (2.0**exp))
            delay = 0.0 if exp == 0 else base * (0.5 + random.random() / 2)
        if state is not target.state or outcome != target.last_outcome:
            self._transition(state, outcome, message)
        else:
            target.last_error = message
        pool.mark_dirty(target)
        self._end_poll(now, delay)

    def _transition(self, state: DeviceState, outcome: str, message: str | None) -> None:
        target = self.target
        target.last_outcome = outcome
        target.last_error = message
        if self._stopped:
            return  # a poll that ends after stop() leaves the device stopped
        previous = target.state
        target.state = state
        counts = self._pool.state_counts
        counts[previous] -= 1
        counts[state] += 1
        self._pool.index.moved(target.record.id, previous, state)
        if state is DeviceState.OK:
            target.consecutive_failures = 0
        target.state_changed = True
        # One line per state change, never one per poll; a first success is
        # the normal start, not news.
        if previous is not state and not (previous is DeviceState.PENDING
                                          and state is DeviceState.OK):
            self._pool.log_transition(target.cloud_id, previous.value, state.value, outcome,
                                      message)

    def _end_poll_stopped(self) -> None:
        if self._stop_waiter is not None and not self._stop_waiter.done():
            self._stop_waiter.set_result(None)
        self._pool.slot_freed()

    def _end_poll(self, now_wall: float, delay_s: float) -> None:
        pool = self._pool
        self._in_flight = False
        pool.in_flight -= 1
        if self._stopped:
            self._end_poll_stopped()
            return
        following = self._index + 1
        if delay_s > 0:
            index = schedule.first_tick_at_or_after(now_wall + delay_s, self._interval,
                                                    self._phase)
            if index < following:
                index = following
        else:
            # schedule.next_tick_index, inlined: this runs per poll.
            index = math.floor((now_wall - self._phase) / self._interval) + 1
            if index > following:
                skipped = index - following
                self.target.skipped_ticks += skipped
                pool.stats.skipped_ticks += skipped
            else:
                index = following
        self._schedule(index)
        if pool.waiting_loops:
            pool.slot_freed()
