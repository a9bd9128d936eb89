"""Keeping a process's per-device objects out of the cyclic GC.

A poller (or a simulator) holds a few long-lived objects per device. CPython
collects the oldest generation when it has grown by a quarter, and each full
collection then walks every one of them: at 100k devices about a million
objects, a pause of 160 ms in the poller (170 ms in the simulator), every
few seconds, and every poll due meanwhile waits through it (measured with
gc.callbacks). :func:`freeze` moves what exists into the permanent
generation, which no collection walks; reference counting still frees those
objects. Call it once the fleet is built.

Raising the young thresholds as well was tried and dropped: it saved about
1 % of CPU in a healthy run, and wherever reference cycles pile up (under
overload, abandoned connects made them until they were fixed) it turns many
short collections into a few of up to 750 ms.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Iterator

from poller.polling.stats import LogHistogram

log = logging.getLogger("poller.heap")


def freeze(what: str, *, collect: bool = True, level: int = logging.INFO) -> None:
    """Freeze the heap out of the collector's reach.

    ``collect`` first runs a full collection so that no garbage is frozen
    (a pause as long as one full collection of what is not frozen yet);
    without it, garbage cycles alive at this moment stay for good, which
    only a process that makes few of them (the simulator) can afford."""
    started = time.perf_counter()
    if collect:
        gc.collect()
    gc.freeze()
    # Counting walks every frozen object: 28 ms at 100k devices, once per
    # slice of a bulk registration, for a log line. Only when it is shown.
    if log.isEnabledFor(level):
        log.log(level, "froze %d objects (%s) out of the cyclic GC in %.0f ms",
                gc.get_freeze_count(), what, (time.perf_counter() - started) * 1000)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic collector off for a block, and back on however it ends.

    For synchronous code only: while the collector is off it is off for
    every task the event loop runs, so a block that awaited would leave it
    off for as long as the await lasts, for everyone. Keep the ``with`` in a
    plain ``def``, where no ``await`` can be written."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def building(what: str, *, level: int = logging.INFO) -> Iterator[None]:
    """Build a large long-lived graph with the collector off, then freeze it
    (see :func:`gc_paused`: synchronous code only).

    While 50k devices' loops are built, full collections ran every second or
    so, each walking everything built so far (80 ms growing to 300 ms, a
    dozen of them at start-up, measured), while the first polls were due.
    One collection of what the block built replaces them. A build that
    must await between parts (the pool's, fetching devices in slices) calls
    this once per part: each part is then collected once and frozen, and no
    collection walks it again."""
    with gc_paused():
        yield
    freeze(what, level=level)


class PauseWatch:
    """How long the cyclic collector holds the process, per generation.

    Installed on ``gc.callbacks`` for as long as a ``serve`` runs; ``/metrics``
    reads it (``poller_gc_*``) and ``poller bench`` reports the full
    collections of its window. A pause of the collector is a pause of every
    poll due meanwhile, which lateness shows but cannot explain by itself.
    About a microsecond per collection, and the collector runs a few dozen
    times a second at most."""

    __slots__ = ("_cpu_started", "_started", "collections", "full", "full_cpu_s", "seconds")

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.full = LogHistogram()
        """Pauses of the full (generation 2) collections, wall time."""
        self.full_cpu_s = 0.0
        """CPU time of the full collections: on a busy machine a pause is
        longer than the work, and this tells the two apart."""
        self._started = 0.0
        self._cpu_started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        # perf_counter, not the clock seam: this measures time spent, it
        # schedules nothing.
        generation = info["generation"]
        if phase == "start":
            if generation == 2:
                self._cpu_started = time.thread_time()
            self._started = time.perf_counter()
            return
        paused = time.perf_counter() - self._started
        self.collections[generation] += 1
        self.seconds[generation] += paused
        if generation == 2:
            self.full.record(paused)
            self.full_cpu_s += time.thread_time() - self._cpu_started


_watch: PauseWatch | None = None


def pauses() -> PauseWatch | None:
    """The watch installed by :func:`watching_pauses`, if one is."""
    return _watch


@contextlib.contextmanager
def watching_pauses() -> Iterator[PauseWatch]:
    """Time the collector's passes for the block (one watch per process: the
    collector is the process's; an inner block shares the outer watch)."""
    global _watch
    if _watch is not None:
        yield _watch
        return
    watch = _watch = PauseWatch()
    gc.callbacks.append(watch)
    try:
        yield watch
    finally:
        gc.callbacks.remove(watch)
        _watch = None
