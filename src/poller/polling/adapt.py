"""Drive a coroutine transport (``fetch``) through the loops' callback API.

Used for the general http-json driver on aiohttp: it pays a task per poll,
which the EAGLE fast path avoids.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from poller.clock import Clock, LoopClock
from poller.http import HttpRequest, HttpResponse
from poller.transport import Transport

OnDone = Callable[[HttpResponse | BaseException], None]


class FetchAdapter:
    __slots__ = ("_now", "_tasks", "_transport")

    def __init__(self, transport: Transport, clock: Clock | None = None) -> None:
        self._transport = transport
        self._now = (clock if clock is not None else LoopClock()).monotonic
        self._tasks: set[asyncio.Task[None]] = set()

    def prepared(self, request: HttpRequest) -> Any:
        return request

    def shared(self, prepared: Any) -> tuple[Any, bytes | None]:
        # Nothing shared between devices: a request is kept whole.
        return prepared, None

    def start(self, prepared: Any, deadline: float, on_done: OnDone,
              headers: bytes | None = None) -> None:
        # ``headers`` comes from ``shared``: always None here. ``deadline`` is
        # on the clock's monotonic scale; aiohttp takes the time left.
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._run(prepared, max(0.001, deadline - self._now()), on_done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, request: HttpRequest, timeout_s: float, on_done: OnDone) -> None:
        try:
            response = await self._transport.fetch(request, timeout_s)
        except Exception as exc:  # handed to the loop, which classifies it
            on_done(exc)
            return
        on_done(response)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
