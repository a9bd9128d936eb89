"""This instance's lease, as it can know it locally, and the wheel it fences.

The store (Redis) keeps each member's lease expiry on its own clock; this
side keeps a conservative copy on the loop's monotonic clock: a renewal
*sent* at ``t`` is good until ``t + duration_s``, and the store, having
received it no earlier than ``t``, expires it no earlier than that. So when
the local copy says valid, no other member can have taken this instance's
devices yet (clock rates aside), and a process that was stopped (SIGSTOP, a
VM paused, a long swap) finds its lease expired on its first look and polls
nothing until a heartbeat has put it back in the view.

While the store cannot be reached the lease is held for ``duration_s``
after each failed attempt: every member keeps its last view and goes on
polling (no failover until the store is back), and a process that stops
during the outage still finds its last attempt too old when it resumes.

    >>> lease = Lease(3.0)
    >>> lease.valid(0.0)
    False
    >>> lease.renewed(sent_at=10.0); lease.valid(12.9), lease.valid(13.0)
    (True, False)
    >>> lease.unreachable(tried_at=14.0); lease.valid(16.5), lease.valid(17.5)
    (True, False)
"""

from __future__ import annotations

import math
from collections.abc import Callable

from poller.clock import Clock
from poller.wheel import TimingWheel

FENCE_RETRY_S = 0.05
"""How often a fenced wheel looks at the lease again."""


class Lease:
    __slots__ = ("duration_s", "unreachable_at", "until")

    def __init__(self, duration_s: float) -> None:
        self.duration_s = duration_s
        self.until = -math.inf
        """Monotonic instant the lease ends, from the last renewal's send time."""
        self.unreachable_at = -math.inf
        """Monotonic instant of the last attempt that found the store down."""

    def renewed(self, sent_at: float) -> None:
        self.until = sent_at + self.duration_s
        self.unreachable_at = -math.inf

    def unreachable(self, tried_at: float) -> None:
        self.unreachable_at = tried_at

    def valid(self, now: float) -> bool:
        return now < self.until or now - self.unreachable_at < self.duration_s

    def drop(self) -> None:
        """Hold nothing any more (a leave has finished)."""
        self.until = self.unreachable_at = -math.inf


class FencedWheel(TimingWheel):
    """A timing wheel whose batches fire only under a valid lease.

    The lease is read once per batch, on the clock the batch is judged by.
    A fenced batch fires nothing and stays put; the wheel looks again every
    ``FENCE_RETRY_S``. When the lease is valid again, ``on_resume`` runs in
    place of the stale batch: the pool puts every loop at its next tick
    (the ticks missed while fenced are skipped and counted, never polled late).
    """

    __slots__ = ("_held", "_on_resume", "_valid", "fences")

    def __init__(self, clock: Clock, resolution_s: float, valid: Callable[[float], bool],
                 on_resume: Callable[[], None]) -> None:
        super().__init__(clock, resolution_s)
        self._valid = valid
        self._on_resume = on_resume
        self._held = False
        self.fences = 0
        """Times a batch was held for want of a valid lease (each pause counts once)."""

    def _run(self) -> None:
        if self._valid(self._now()):
            if self._held:
                self._held = False
                self._timer = None
                self._on_resume()  # drains this wheel and fills it again
                return
            super()._run()
            return
        if not self._held:
            self._held = True
            self.fences += 1
        self._timer = None
        self._arm(math.ceil((self._now() + FENCE_RETRY_S) / self._res))
