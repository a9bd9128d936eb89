"""Background tasks: a task that loses its cancel cannot hang a stop; a task
that fails is restarted with back-off and counted; a fatal one is reported."""

from __future__ import annotations

import asyncio
import time

import pytest

from poller.clock import FakeClock, settle
from poller.tasks import FatalTaskError, Supervisor, cancel_and_wait


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


# -- the supervisor -------------------------------------------------------------


async def test_a_failing_task_is_restarted_with_growing_back_off_and_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    sup = Supervisor(backoff_base_s=2.0, backoff_max_s=8.0, healthy_after_s=100.0, clock=clock)
    started: list[float] = []
    release = asyncio.Event()

    async def flaky() -> None:
        started.append(clock.monotonic())
        if len(started) <= 4:
            raise RuntimeError(f"boom {len(started)}")
        await release.wait()

    sup.spawn("flaky", flaky)
    await settle()
    delays = []
    for failures in range(1, 5):
        assert len(started) == failures and sup.restarts == {"flaky": failures}
        due = clock.next_at()
        assert due is not None
        delays.append(due - clock.monotonic())
        await clock.run(delays[-1])
    assert len(started) == 5 and sup.restarts == {"flaky": 4}
    # Equal jitter around 2, 4, 8 and then the 8 s cap.
    for delay, ceiling in zip(delays, (2.0, 4.0, 8.0, 8.0), strict=True):
        assert ceiling / 2 <= delay <= ceiling, delays
    assert "background task flaky failed (4 in a row)" in caplog.text
    assert "RuntimeError: boom 4" in caplog.text
    assert not sup.failed.is_set()
    await sup.stop()
    assert sup.restarts == {"flaky": 4}


async def _to_next_timer(clock: FakeClock) -> None:
    due = clock.next_at()
    assert due is not None
    await clock.run(due - clock.monotonic())


async def test_a_run_that_lasted_starts_the_back_off_afresh() -> None:
    clock = FakeClock()
    sup = Supervisor(backoff_base_s=1.0, backoff_max_s=64.0, healthy_after_s=30.0, clock=clock)
    runs = 0
    fail_now = asyncio.Event()

    async def task() -> None:
        nonlocal runs
        runs += 1
        if runs == 3:
            await fail_now.wait()  # a long healthy run, then a failure
        raise RuntimeError("boom")

    sup.spawn("task", task)
    await settle()
    await _to_next_timer(clock)
    await _to_next_timer(clock)
    assert runs == 3
    await clock.run(60.0)
    fail_now.set()
    await settle()
    due = clock.next_at()
    assert due is not None and due - clock.monotonic() <= 1.0  # not 8 s: back to the base
    await sup.stop()


async def test_a_fatal_error_is_reported_and_not_restarted(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    sup = Supervisor(clock=clock)
    calls = 0

    async def doomed() -> None:
        nonlocal calls
        calls += 1
        raise FatalTaskError("instance id 'x' is in use by host h pid 1")

    async def steady() -> None:
        await asyncio.Event().wait()

    sup.spawn("steady", steady)
    sup.spawn("doomed", doomed)
    await asyncio.wait_for(sup.failed.wait(), 5)
    await clock.run(3600.0)
    assert calls == 1 and sup.restarts == {"steady": 0, "doomed": 0}
    assert isinstance(sup.failure, FatalTaskError)
    assert "in use by host h pid 1" in str(sup.failure)
    assert "background task doomed cannot go on" in caplog.text
    await sup.stop()
    with pytest.raises(RuntimeError, match="stopping"):
        sup.spawn("late", steady)


def test_task_restarts_are_exposed_as_a_counter_per_task() -> None:
    from typing import Any, cast

    from prometheus_client import generate_latest

    from poller.api.metrics import make_registry
    from poller.sealing import SecretBox, generate_key
    from tests.apiview import FakeFleetView, fixed_snapshot, settings_with

    view = FakeFleetView(settings_with(), SecretBox(generate_key()), cast(Any, None), None,
                         snapshot=fixed_snapshot(task_restarts={"database": 3, "heartbeat": 0}))
    text = generate_latest(make_registry(view)).decode()
    assert 'poller_task_restarts_total{task="database"} 3.0' in text
    assert 'poller_task_restarts_total{task="heartbeat"} 0.0' in text
