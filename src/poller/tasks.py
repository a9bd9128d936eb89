"""Background tasks: supervised while they run, stopped without trusting
cancellation to arrive.

A cancel can be lost on its way into a task: on Python 3.11
``asyncio.wait_for`` returns its inner result when the cancel and the
result meet, and a timeout context can turn the cancel into a timeout that a
retry loop handles. A stop that then awaits the task waits forever (seen
once: a test's shutdown hung until a signal woke it). Stops therefore cancel
and wait a bounded time; each loop also checks a stopping flag of its own.

No background task dies silently: a :class:`Supervisor` restarts one that
raised, with capped back-off, and counts the restarts (``/metrics``). A task
that cannot go on raises :class:`FatalTaskError`; the supervisor then stops
restarting anything and reports the failure, and ``serve`` exits non-zero so
that systemd starts the process afresh. A task spawned with ``give_up_after``
is taken to be unable to go on once it failed that many times in a row.

A part whose tasks must stop at its own place in the shutdown order (ingest
after polling, say) takes a :meth:`Supervisor.child`: stopped on its own,
counted and failing with its parent.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from poller.clock import Clock, LoopClock
from poller.errors import PollerError

log = logging.getLogger("poller")

TaskFactory = Callable[[], Coroutine[Any, Any, None]]
"""Makes a fresh run of a background task (a restart calls it again)."""


class FatalTaskError(PollerError):
    """A background task cannot go on; the process must exit and be restarted."""


async def cancel_and_wait(tasks: Iterable[asyncio.Task[None]], timeout_s: float = 5.0) -> None:
    """Cancel ``tasks`` and wait up to ``timeout_s`` for them to end; a task
    still running then is named in the log and left behind."""
    tasks = [t for t in tasks if not t.done()]
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        log.warning("task %s did not end %.0f s after it was cancelled; left behind",
                    task.get_name(), timeout_s)
        task.cancel()


class Supervisor:
    """Owns background tasks: restarts one that raised, with capped back-off.

    >>> sup = Supervisor()                            # doctest: +SKIP
    >>> sup.spawn("partition-keeper", keeper.run)      # doctest: +SKIP
    >>> await sup.failed.wait()                        # doctest: +SKIP
    >>> await sup.stop()                               # doctest: +SKIP

    ``spawn`` takes a factory (``keeper.run``), not a coroutine: a restart
    calls it again.

    ``restarts`` counts restarts by task name (0 from the spawn on). A run
    that lasted ``healthy_after_s`` starts the back-off afresh. A task that
    returns is finished and not restarted.
    """

    def __init__(self, *, backoff_base_s: float = 1.0, backoff_max_s: float = 60.0,
                 healthy_after_s: float = 60.0, clock: Clock | None = None) -> None:
        if not 0 < backoff_base_s <= backoff_max_s:
            raise ValueError("need 0 < backoff_base_s <= backoff_max_s")
        self._base_s = backoff_base_s
        self._max_s = backoff_max_s
        self._healthy_after_s = healthy_after_s
        self._clock = clock if clock is not None else LoopClock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._parent: Supervisor | None = None
        self.restarts: dict[str, int] = {}
        self.failure: FatalTaskError | None = None
        """The first fatal error; ``failed`` is set with it."""
        self.failed = asyncio.Event()

    def child(self) -> Supervisor:
        """A supervisor with its own tasks and :meth:`stop`, whose restarts
        count in this one's ``restarts`` and whose fatal failure is this one's."""
        sub = Supervisor(backoff_base_s=self._base_s, backoff_max_s=self._max_s,
                         healthy_after_s=self._healthy_after_s, clock=self._clock)
        sub.restarts = self.restarts
        sub._parent = self
        return sub

    def spawn(self, name: str, factory: TaskFactory, *,
              give_up_after: int | None = None) -> None:
        """Run ``factory()`` as task ``name``, restarting it when it raises.

        ``give_up_after``: that many failures in a row make it fatal."""
        if self._stopping:
            raise RuntimeError(f"cannot spawn {name!r}: the supervisor is stopping")
        if name in self.restarts:
            raise ValueError(f"a task named {name!r} is already supervised")
        if give_up_after is not None and give_up_after < 1:
            raise ValueError(f"give_up_after must be >= 1, got {give_up_after}")
        self.restarts[name] = 0
        task = asyncio.create_task(self._supervise(name, factory, give_up_after), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self, timeout_s: float = 5.0, *, grace_s: float = 0.0) -> None:
        """Stop restarting; give the tasks ``grace_s`` to end on their own
        (their owner asked them to), then cancel the rest and wait (bounded)
        for them to end. Idempotent."""
        self._stopping = True
        if grace_s > 0 and self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace_s)
        await cancel_and_wait(self._tasks, timeout_s)

    async def _supervise(self, name: str, factory: TaskFactory,
                         give_up_after: int | None) -> None:
        failures = 0
        while not self._stopping:
            started = self._clock.monotonic()
            try:
                await factory()
                return
            except FatalTaskError as exc:
                self._fail(name, exc)
                return
            except Exception as exc:
                if self._stopping:
                    return
                if self._clock.monotonic() - started >= self._healthy_after_s:
                    failures = 0
                failures += 1
                if give_up_after is not None and failures >= give_up_after:
                    log.exception("background task %s failed", name)
                    self._fail(name, FatalTaskError(
                        f"{name} failed {failures} times in a row; last: "
                        f"{type(exc).__name__}: {exc}"))
                    return
                self.restarts[name] += 1
                delay = self._delay(failures)
                log.exception("background task %s failed (%d in a row); restarting in %.1f s",
                              name, failures, delay)
            await self._clock.sleep(delay)

    def _delay(self, failures: int) -> float:
        ceiling = min(self._max_s, self._base_s * 2.0 ** min(failures - 1, 32))
        # Equal jitter: tasks that failed together do not restart together.
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def _fail(self, name: str, exc: FatalTaskError) -> None:
        log.error("background task %s cannot go on: %s", name, exc)
        sup: Supervisor | None = self
        while sup is not None:
            if sup.failure is None:
                sup.failure = exc
            sup.failed.set()
            sup = sup._parent
