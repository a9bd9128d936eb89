"""One device's polling loop: schedule, exchange, timeout, back-off, outcome.

The loop is a small state machine driven by callbacks rather than a task per
device: the wheel calls :meth:`DeviceLoop.fire` at each tick, the transport
calls :meth:`DeviceLoop._on_done` with each answer. At 100k devices a task
wake-up and a future per poll cost more CPU than the HTTP exchange itself
(NOTES-performance: 61 µs against 20-28 µs per poll); the bench measures it.
Beyond its own device a loop reads and writes only its pool's
:class:`~poller.polling.context.LoopContext`, never the pool.

Life of a loop: ``start()`` schedules the first tick; every tick starts one
poll unless one is in flight (never two); a finished poll schedules the next
tick on the device's phase grid, skipping ticks it overran (never bursting),
further out after failures (exponential back-off, capped, jittered) or after
rejected credentials (``auth_failed_interval_s``). ``stop()`` is idempotent and
its awaitable resolves once no poll of this device is in flight.

How a poll's first request is sent is decided once, when the loop is made: a
:class:`~poller.drivers.base.RepeatingSession` is asked to ``repeat`` and the
loop sends the wire bytes it kept from the first poll; any other session is
asked to ``begin`` and the kept bytes are reused when it returns the same
request object again.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any, Protocol

from poller.drivers.base import (
    DeviceSession,
    Outcome,
    PollFailure,
    RepeatingSession,
    Sample,
    is_repeating,
)
from poller.drivers.bounds import Flawed
from poller.http import HttpRequest, HttpResponse
from poller.polling import schedule
from poller.polling.context import LoopContext
from poller.polling.stats import OK_INDEX, OUTCOME_INDEX, OUTCOMES
from poller.polling.target import DeviceState, Target
from poller.transport.errors import (
    TransportConnectError,
    TransportProtocolError,
    TransportQueueTimeout,
    TransportTimeout,
)

log = logging.getLogger("poller.polling")

_I_TIMEOUT = OUTCOME_INDEX[Outcome.TIMEOUT]
_I_CONNECT = OUTCOME_INDEX[Outcome.CONNECT_ERROR]
_I_UNPARSEABLE = OUTCOME_INDEX[Outcome.UNPARSEABLE]
_I_TOTALS_FAILED = OUTCOME_INDEX[Outcome.TOTALS_FAILED]
_I_AUTH_REJECTED = OUTCOME_INDEX[Outcome.AUTH_REJECTED]
_OUTCOME_NAMES = tuple(o.value for o in OUTCOMES)
_MAX_ERROR_LEN = 200
_REFUSED = TransportQueueTimeout("every connection busy and the queue for one full")
"""One error for every refusal: nothing refers to it but this module."""


class CallbackTransport(Protocol):
    """What a loop needs of a transport: prepare once, start with a callback."""

    def prepared(self, request: HttpRequest) -> Any: ...

    def shared(self, prepared: Any) -> tuple[Any, bytes | None]:
        """``(template, headers)``: ``start(template, ..., headers=headers)``
        sends ``prepared``. A transport that shares templates between devices
        returns the device's own header lines; one that does not returns
        ``(prepared, None)``."""
        ...

    def start(self, prepared: Any, deadline: float, on_done: Any,
              headers: bytes | None = None) -> bool | None:
        """False: refused at once, nothing sent, ``on_done`` never called
        (the transport's queue is full: our overload)."""
        ...


class DeviceLoop:
    __slots__ = (
        "_counts", "_ctx", "_in_flight", "_index", "_interval", "_own", "_phase", "_polls",
        "_prep_request", "_prepared", "_repeater", "_session", "_shed_run", "_stopping",
        "_timeout", "_timeout_for", "_transport", "target",
    )

    def __init__(self, ctx: LoopContext, target: Target, session: DeviceSession,
                 transport: CallbackTransport, interval_s: float, phase_s: float) -> None:
        self._ctx = ctx
        self.target = target
        self._session = session
        self._repeater: RepeatingSession | None = session if is_repeating(session) else None
        """The session again when it repeats its first request (the strategy,
        decided here once), else None."""
        self._transport = transport
        self._interval = interval_s
        self._phase = phase_s
        self._index = 0
        self._polls = 0
        self._in_flight = False
        self._stopping: asyncio.Future[None] | None = None
        """Set by ``stop()``: resolves once no poll is in flight."""
        self._prep_request: HttpRequest | None = None
        """The request ``_prepared`` was made from (sessions that do not repeat)."""
        self._prepared: Any = None
        self._own: bytes | None = None
        """With a repeating session on a transport that shares templates,
        ``_prepared`` is the template and these are the device's own headers."""
        self._counts = ctx.stats.driver_outcomes(target.record.driver)
        self._timeout_for = -1.0
        """The timeout setting ``_timeout`` was computed for."""
        self._timeout = 0.0
        self._shed_run = 0
        """Ticks of this device shed in a row (see ``_begin``)."""

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        interval, phase = self._interval, self._phase
        index = schedule.next_tick_index(self._ctx.wall_now(), interval, phase)
        latest = self.target.latest  # kept from the loop this one replaces
        if latest is not None and schedule.tick_time(index, interval, phase) <= latest[1]:
            # The wall clock went back since that reading: never a tick_at again
            # that may be stored already (see DevicePool on clock steps).
            after = schedule.next_tick_index(latest[1], interval, phase)
            if schedule.tick_time(after, interval, phase) <= latest[1]:
                after += 1
            self._ctx.stats.tick_conflicts += after - index
            self.target.skipped_ticks += after - index
            index = after
        self._schedule(index)

    def reanchor(self, now_wall: float, step_s: float, scheduled: bool) -> None:
        """The wall clock stepped by ``step_s`` and the pool took the new
        offset (``ctx.wall_offset``); ``scheduled``: the loop was in the wheel
        (the pool drained it) and must be put back.

        A tick index is never used twice. After a backward step the ticks that
        come round again, up to the ones already used, are not polled
        (counted as conflicts); after a forward step the ticks jumped over
        are skipped (counted), as after an overrun. A poll in flight or
        waiting for a slot finishes first and schedules itself as usual."""
        if self._stopping is not None:
            return
        interval, phase = self._interval, self._phase
        upcoming = self._index if scheduled or not self._in_flight else self._index + 1
        due_before = schedule.next_tick_index(now_wall - step_s, interval, phase)
        due_now = schedule.next_tick_index(now_wall, interval, phase)
        stats, target = self._ctx.stats, self.target
        if due_now < due_before:
            again = min(due_before, upcoming) - due_now
            if again > 0:
                stats.tick_conflicts += again
                target.skipped_ticks += again
        if not scheduled:
            return
        if due_now > upcoming:
            stats.skipped_ticks += due_now - upcoming
            target.skipped_ticks += due_now - upcoming
            upcoming = due_now
        self._schedule(upcoming)

    def stop(self) -> asyncio.Future[None]:
        """Stop polling; the future resolves when no poll is in flight."""
        self.target.state = DeviceState.STOPPED
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_future()
            if not self._in_flight:
                self._stopping.set_result(None)
        return self._stopping

    # -- the tick path --------------------------------------------------------

    def _schedule(self, index: int) -> None:
        self._index = index
        self._ctx.wheel.add(self._due(), self)

    def _due(self) -> float:
        """When the current tick is due, a monotonic instant: computed from
        the tick index rather than kept (a float and a slot a device); the one
        place that turns a tick into clock time."""
        return self._index * self._interval + self._phase - self._ctx.wall_offset

    def _deadline(self) -> float:
        """When the current poll must end, a monotonic instant: never more
        than a timeout away, should the wall clock have stepped back since
        the poll began."""
        return min(self._due(), self._ctx.monotonic()) + self._timeout

    def fire(self) -> None:
        """A tick is due (called by the wheel)."""
        if self._stopping is not None:
            return
        ctx = self._ctx
        if not ctx.sink.accepting:
            # Storage cannot take more: skip this tick rather than hold
            # readings nobody can keep. Counted, never silent.
            ctx.stats.backpressure_skips += 1
            self.target.skipped_ticks += 1
            self._schedule(self._index + 1)
            return
        limiter = ctx.limiter
        if limiter.in_flight >= limiter.max_in_flight:
            limiter.waiting.append(self)  # SlotLimiter.admit resumes it
            return
        self._begin()

    def resume(self) -> None:
        """A slot freed up for this loop's due tick (called by the limiter)."""
        if self._stopping is None and not self._in_flight:
            self._begin()

    def _begin(self) -> None:
        ctx = self._ctx
        if ctx.timeout_s != self._timeout_for:  # first poll, or a SIGHUP changed it
            self._timeout_for = ctx.timeout_s
            self._timeout = ctx.timeout_for(self._interval)
        due = self._due()
        late = ctx.monotonic() - due
        # Overload: a tick that comes due this late is not polled at all,
        # rather than sent to miss its deadline. The bar rises with each tick
        # of this device shed in a row, so sheds spread over the fleet
        # instead of starving the devices whose phase meets the busy moments;
        # it never passes half the timeout, so a poll sent has time left.
        bar = ctx.shed_after_s * (self._shed_run + 1)
        if bar > self._timeout * 0.5:
            bar = self._timeout * 0.5
        if late > bar:
            self._shed(late + due + ctx.wall_offset)
            return
        self._shed_run = 0
        stats = ctx.stats
        stats.lateness.record(late)
        stats.polls_started += 1
        ctx.limiter.in_flight += 1
        self._in_flight = True
        self._polls += 1
        totals_every = ctx.totals_every
        with_totals = self._polls % totals_every == 1 or totals_every == 1
        try:
            repeater = self._repeater
            if repeater is not None and self._prepared is not None and \
                    repeater.repeat(with_totals):
                if self._transport.start(self._prepared, due + self._timeout, self._on_done,
                                         self._own) is False:
                    self._refused()
                return
            request = self._session.begin(with_totals)
        except Exception as exc:  # a driver bug must not escape into the wheel
            self._finish_failure(_I_UNPARSEABLE, f"driver error: {type(exc).__name__}")
            return
        self._send(request, due + self._timeout, True)

    def _shed(self, now_wall: float) -> None:
        """Skip the due tick (counted) and schedule the next one to come."""
        self._shed_run += 1
        stats, target = self._ctx.stats, self.target
        stats.shed_ticks += 1
        target.skipped_ticks += 1
        following = self._index + 1
        index = schedule.next_tick_index(now_wall, self._interval, self._phase)
        if index > following:  # whole ticks went by meanwhile
            stats.skipped_ticks += index - following
            target.skipped_ticks += index - following
        else:
            index = following
        self._schedule(index)

    def _send(self, request: HttpRequest, deadline: float, first: bool = False) -> None:
        if request is self._prep_request:
            prepared = self._prepared
        else:
            prepared = self._transport.prepared(request)
            if first:
                # Keep the bytes of the request that starts each poll; a
                # follow-up (totals, every tenth poll) is prepared when sent
                # rather than held by every device (400 B a device saved for
                # 0.3 µs a poll). A repeating session is asked to ``repeat``
                # (see _begin), and a transport that shares templates keeps
                # one for all devices; others are matched by the identity of
                # the request object they return (they reuse it).
                if self._repeater is None:
                    self._prepared, self._prep_request = prepared, request
                else:
                    self._prepared, self._own = self._transport.shared(prepared)
        if self._transport.start(prepared, deadline, self._on_done) is False:
            self._refused()

    def _refused(self) -> None:
        """The transport turned the request away at once: as a wait for a
        connection that ran out (see ``_on_transport_error``), without the
        trip through the event loop."""
        self._on_transport_error(_REFUSED)

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
        ctx = self._ctx
        target = self.target
        received = ctx.monotonic() + ctx.wall_offset
        tick_at = schedule.tick_time(self._index, self._interval, self._phase)
        flawed = ctx.bounds.check(step, tick_at)
        if flawed is not None:
            step = flawed.sample
        # An exact tuple in Reading's field order, not a Reading: the one
        # object serves the sink and the device's latest, and the collector
        # untracks it at its first pass (a Reading, a subclass, it never
        # does: held as Readings, every device's latest was walked by every
        # full collection, pauses of 100-330 ms at 100,000 devices). Typed
        # Any, not PlainReading: compiled, a fixed tuple type is held
        # unboxed and boxed anew at each use, two tuples a poll.
        reading: Any = (target.record.id, tick_at, step.device_at, received, step.demand_w,
                        step.delivered_wh, step.received_wh, step.price, target.record.cloud_id)
        ctx.accept(reading)
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
        ctx.dirty.mark(target)
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
            ctx = self._ctx
            ctx.stats.skipped_ticks += 1
            self.target.skipped_ticks += 1
            self._end_poll(ctx.wall_now(), 0.0)
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
        ctx = self._ctx
        target = self.target
        target.count_failure(index)
        self._counts[index] += 1
        now = ctx.wall_now()
        # Failures are data for the rollups too (poll_failures): one row,
        # keyed by the tick as a reading would be.
        ctx.failed(target.record.id, schedule.tick_time(self._index, self._interval, self._phase),
                   index, now)
        target.last_poll_at = now
        target.consecutive_failures += 1
        outcome = _OUTCOME_NAMES[index]
        if index == _I_AUTH_REJECTED:
            state = DeviceState.AUTH_FAILED
            delay = ctx.auth_failed_interval_s
        else:
            state = DeviceState.FAILING
            # Back off from the interval, doubling per consecutive failure,
            # capped, with jitter so a fleet that failed together does not
            # come back together. The first failure waits no longer than usual.
            exp = min(target.consecutive_failures - 1, 30)
            base = min(ctx.backoff_max_s, self._interval * (2.0**exp))
            delay = 0.0 if exp == 0 else base * (0.5 + random.random() / 2)
        if state is not target.state or outcome != target.last_outcome:
            self._transition(state, outcome, message)
        else:
            target.last_error = message
            # Same state, one more failure in a row: the pool re-ranks it
            # (GET /api/fleet/failing); a poll that keeps a reading pays nothing.
            ctx.on_state_change(target, state, outcome, message)
        ctx.dirty.mark(target)
        self._end_poll(now, delay)

    def _transition(self, state: DeviceState, outcome: str, message: str | None) -> None:
        target = self.target
        target.last_outcome = outcome
        target.last_error = message
        if self._stopping is not None:
            return  # a poll that ends after stop() leaves the device stopped
        previous = target.state
        target.state = state
        if state is DeviceState.OK:
            target.consecutive_failures = 0
        target.state_changed = True
        self._ctx.on_state_change(target, previous, outcome, message)

    def _end_poll_stopped(self, stopping: asyncio.Future[None]) -> None:
        if not stopping.done():
            stopping.set_result(None)
        self._ctx.limiter.admit()

    def _end_poll(self, now_wall: float, delay_s: float) -> None:
        limiter = self._ctx.limiter
        self._in_flight = False
        limiter.in_flight -= 1
        if self._stopping is not None:
            self._end_poll_stopped(self._stopping)
            return
        following = self._index + 1
        if delay_s > 0:
            index = schedule.first_tick_at_or_after(now_wall + delay_s, self._interval,
                                                    self._phase)
            if index < following:
                index = following
        else:
            index = schedule.next_tick_index(now_wall, self._interval, self._phase)
            if index > following:
                skipped = index - following
                self.target.skipped_ticks += skipped
                self._ctx.stats.skipped_ticks += skipped
            else:
                index = following
        self._schedule(index)
        if limiter.waiting:
            limiter.admit()
