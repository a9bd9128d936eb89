"""The cyclic GC pause around a bulk build: it ends with its block, however
the block ends (that it never spans an await: test_watcher.py)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from poller import heap


@pytest.fixture
def collector_on() -> Iterator[None]:
    """The collector on for the test, and as it was afterwards, nothing frozen."""
    enabled = gc.isenabled()
    gc.enable()
    try:
        yield
    finally:
        gc.unfreeze()
        if not enabled:
            gc.disable()


class BadEntry(Exception):
    pass


def test_a_pause_ends_with_its_block_even_when_the_block_raises(collector_on: None) -> None:
    with pytest.raises(BadEntry), heap.gc_paused():
        assert not gc.isenabled()
        raise BadEntry("a device the pool could not take")
    assert gc.isenabled()


def test_a_pause_inside_a_pause_leaves_the_collector_to_the_outer_one(
        collector_on: None) -> None:
    with heap.gc_paused():
        with heap.gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner block found it off, and left it off
    assert gc.isenabled()
    gc.disable()  # off for reasons of its own: a pause does not turn it on
    with heap.gc_paused():
        pass
    assert not gc.isenabled()


def test_a_build_that_raises_turns_the_collector_back_on_and_freezes_nothing(
        collector_on: None) -> None:
    frozen = gc.get_freeze_count()
    with pytest.raises(BadEntry), heap.building("a graph that failed half-way"):
        raise BadEntry("half-way")
    assert gc.isenabled()
    assert gc.get_freeze_count() == frozen
