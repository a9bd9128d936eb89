"""The C allocator's policy for a process that runs for weeks (glibc only).

What a soak showed (10,000 devices, heap censuses ten minutes apart, see
:mod:`poller.memtrace`): Python's own heap levels off within minutes (live
objects by type and allocated blocks flat, the bounded caches full), yet RSS
kept creeping, because glibc's heaps grew around free space they kept:
malloc's free bytes and arena size rose while its bytes in use did not, and
``malloc_trim`` on the running process gave back megabytes at once. Two
things feed it:

- Large transient buffers (a flush's NDJSON and its gzip member, a COPY
  stream, a Redis pipeline, a 16 MiB S3 part) start above the 128 KiB mmap
  threshold, but glibc raises that threshold to the largest such block freed
  (up to 32 MiB); from then on they are carved out of the heaps, and the
  long-lived blocks allocated around them keep the space from going back.
  A fixed threshold (setting it turns the raising off) keeps them mapped and
  unmapped, never left in a heap.
- Free space inside a heap goes back to the system only from its top.
  :func:`trim` every minute returns the free pages inside the heaps too
  (``malloc_trim(0)`` walks the free chunks: well under a millisecond here).

Arenas are capped at two (the event loop's, and one shared by the worker
threads: spool writes, catch-up reads, S3 parts) instead of eight per core,
each holding free space of its own.

Only the CLI applies it (``serve``): it is a property of the process, like
its signal handlers.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("poller.allocator")

# <malloc.h>
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


@dataclass(frozen=True, slots=True)
class MallocPolicy:
    mmap_threshold_bytes: int = 128 * 1024
    """Blocks from this size up are mapped on their own and unmapped on free."""
    arena_max: int = 2
    trim_every_s: float = 60.0


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _libc() -> Any:
    """glibc, or None (musl, macOS): the policy is then left alone."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not all(hasattr(libc, f) for f in ("mallopt", "malloc_trim", "mallinfo2")):
        return None
    libc.mallinfo2.restype = _MallInfo2
    return libc


_LIBC = _libc()


def apply(policy: MallocPolicy) -> bool:
    """Set the mmap threshold and the arena cap; False when not glibc (or
    glibc refused a value)."""
    if _LIBC is None:
        log.info("malloc policy not applied: not glibc")
        return False
    ok = bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, policy.mmap_threshold_bytes)) and \
        bool(_LIBC.mallopt(_M_ARENA_MAX, policy.arena_max))
    if ok:
        log.info("malloc: blocks from %d KiB mapped on their own, %d arenas, free pages "
                 "returned every %g s", policy.mmap_threshold_bytes // 1024, policy.arena_max,
                 policy.trim_every_s)
    else:
        log.warning("glibc refused the malloc policy %s", policy)
    return ok


def trim() -> bool:
    """Give the free pages of every heap back to the system; True when some
    memory was released."""
    return _LIBC is not None and bool(_LIBC.malloc_trim(0))


def stats() -> dict[str, int] | None:
    """glibc's totals over all arenas: ``in_use`` bytes handed out, ``free``
    bytes held but not in use, ``arena`` bytes of the heaps, ``mmapped``
    large blocks. None off glibc."""
    if _LIBC is None:
        return None
    info = _LIBC.mallinfo2()
    return {"arena": info.arena, "mmapped": info.hblkhd, "in_use": info.uordblks,
            "free": info.fordblks, "top_pad": info.keepcost}


async def trim_every(interval_s: float) -> None:
    """:func:`trim` every ``interval_s`` until cancelled."""
    if _LIBC is None:
        return
    while True:
        await asyncio.sleep(interval_s)
        trim()
