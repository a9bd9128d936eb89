"""Stopping background tasks without trusting cancellation to arrive.

A cancel can be lost on its way into a task: on Python 3.11
``asyncio.wait_for`` returns its inner result when the cancel and the
result meet, and a timeout context can turn the cancel into a timeout that a
retry loop handles. A stop that then awaits the task waits forever (seen
once: a test's shutdown hung until a signal woke it). Stops therefore cancel
and wait a bounded time; each loop also checks a stopping flag of its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

log = logging.getLogger("poller")


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
