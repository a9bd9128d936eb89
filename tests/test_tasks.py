"""Stopping background tasks: a task that loses its cancel cannot hang a stop."""

from __future__ import annotations

import asyncio
import time

import pytest

from poller.tasks import cancel_and_wait


async def test_a_task_that_swallows_its_cancel_does_not_hang_the_stop(
        caplog: pytest.LogCaptureFixture) -> None:
    ended: list[str] = []

    async def obedient() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            ended.append("obedient")

    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():  # what a lost cancel looks like from outside
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue

    tasks = [asyncio.create_task(obedient(), name="obedient"),
             asyncio.create_task(stubborn(), name="stubborn")]
    await asyncio.sleep(0)
    started = time.monotonic()
    await cancel_and_wait(tasks, timeout_s=0.3)
    assert time.monotonic() - started < 5  # bounded, where `await task` waits for ever
    assert ended == ["obedient"] and tasks[0].cancelled()
    assert not tasks[1].done()
    assert "task stubborn did not end" in caplog.text
    release.set()
    await tasks[1]
