"""Where the heap grows: snapshots of a running ``serve`` and the difference
between two of them.

SIGUSR2 makes ``serve`` write to ``STATE_DIR/tracemalloc/``:

- always, a *census* (``.census.json``, well under a second at 10,000
  devices): live objects by type, the largest containers, the interpreter's
  allocated blocks and glibc's malloc figures (in use against held). Cheap
  enough for a soak at full size; it tells a growing Python heap (blocks and
  some type's count climb) from allocator fragmentation (blocks flat, RSS
  and malloc's free bytes climb).
- when tracing, a tracemalloc snapshot (``.tracemalloc``): every live block
  by the file and line that allocated it. Tracing is Python's own switch,
  ``PYTHONTRACEMALLOC=N`` (N frames kept per block) in the environment of
  ``poller serve``; it starts before the first import and needs no
  configuration key. It costs several times the poller's CPU: at 10,000
  devices on a busy machine the loop falls behind, so trace a smaller fleet.

``poller bench --soak-hours H --soak-snapshots MINUTES`` sends the signal on
a schedule. Then::

    python -m poller.memtrace OLD NEW      # two .tracemalloc or two .census.json

prints the top 20 growers (by file:line, or by type).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import heapq
import logging
import os
import pickle
import sys
import time
import tracemalloc
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from poller import allocator

log = logging.getLogger("poller.memtrace")

SUBDIR = "tracemalloc"
SUFFIX = ".tracemalloc"
CENSUS_SUFFIX = ".census.json"
_LARGEST = 30
# Allocations of the tracer itself and of the import machinery say nothing
# about the service.
_IGNORED = (
    tracemalloc.Filter(False, tracemalloc.__file__),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
    tracemalloc.Filter(False, "<unknown>"),
)


def snapshot_dir(state_dir: Path) -> Path:
    return Path(state_dir) / SUBDIR


def _path(directory: Path, suffix: str, clock: float | None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    at = time.time() if clock is None else clock
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(at)) + f".{int(at * 1000) % 1000:03d}Z"
    return directory / f"serve-{os.getpid()}-{stamp}{suffix}"


def _publish(tmp: Path, path: Path) -> Path:
    # Under its final name only once complete: a reader never sees half of one.
    os.replace(tmp, path)
    return path


def dump_snapshot(directory: Path, *, clock: float | None = None) -> Path:
    """Write a tracemalloc snapshot to ``directory``; its path. The name
    sorts by time: ``serve-PID-YYYYmmddTHHMMSS.mmmZ.tracemalloc``."""
    if not tracemalloc.is_tracing():
        raise RuntimeError("tracemalloc is not tracing: start with PYTHONTRACEMALLOC=N")
    path = _path(directory, SUFFIX, clock)
    tmp = path.with_name(path.name + ".tmp")
    tracemalloc.take_snapshot().dump(str(tmp))
    return _publish(tmp, path)


# -- census -----------------------------------------------------------------------

def _proc_status() -> dict[str, int]:
    found: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "Threads"):
                parts = rest.split()
                found[key] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    return found


def _hint(obj: Any) -> str:
    """A few characters that help recognise a container in the next census."""
    try:
        if isinstance(obj, dict):
            first = next(iter(obj), None)
            return f"key {first!r}"[:80]
        item = next(iter(obj), None)
        return f"item {type(item).__qualname__}"
    except (RuntimeError, TypeError):
        return ""


def _attributes(obj: Any) -> list[tuple[str, Any]]:
    names: list[str] = []
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        names.extend([slots] if isinstance(slots, str) else slots)
    found = [(n, getattr(obj, n)) for n in names if n != "__dict__" and hasattr(obj, n)]
    found.extend(getattr(obj, "__dict__", {}).items())
    return found


class _Largest:
    """The ``n`` longest containers seen, each once, without keeping a list
    of them all (the walk must not grow the heap it measures)."""

    def __init__(self, n: int) -> None:
        self._n = n
        self._heap: list[tuple[int, int, int]] = []  # (len, order, id)
        self._held: dict[int, tuple[Any, str | None]] = {}
        self._order = 0

    def offer(self, obj: Any, owner: str | None) -> None:
        key = id(obj)
        held = self._held.get(key)
        if held is not None:
            if owner is not None:  # Owner.attribute says more than a first key
                self._held[key] = (obj, owner)
            return
        n = len(obj)
        if len(self._heap) >= self._n and n <= self._heap[0][0]:
            return
        self._order += 1
        entry = (n, self._order, key)
        if len(self._heap) < self._n:
            heapq.heappush(self._heap, entry)
        else:
            del self._held[heapq.heappushpop(self._heap, entry)[2]]
        self._held[key] = (obj, owner)

    def described(self) -> list[dict[str, Any]]:
        found = []
        for n, _, key in sorted(self._heap, reverse=True):
            obj, owner = self._held[key]
            found.append({"type": type(obj).__qualname__, "len": n,
                          "hint": owner if owner is not None else _hint(obj)})
        return found


def census() -> dict[str, Any]:
    """Live objects by type and the largest containers, with the allocator's
    figures. Walks every object the cyclic GC tracks (strings, bytes and
    numbers are not, but the containers holding them are). A dict or list of
    atomic values only (``{segment: offset}``) is not tracked either: the
    attributes of poller's own objects are looked at for those, and named
    ``Owner.attribute``. Runs a full collection first (tens of milliseconds
    at 10,000 devices): the counts are of live objects."""
    started = time.perf_counter()
    # The process as it was, before this walk's own allocations.
    proc, malloc, blocks = _proc_status(), allocator.stats(), sys.getallocatedblocks()
    # Frozen objects (the device pool, see poller.heap) are invisible to
    # gc.get_objects(): thaw them for the walk, then collect and freeze again
    # as poller.heap.freeze() does after a bulk change.
    frozen = gc.get_freeze_count()
    # What a full collection walks: the tracked objects not frozen (garbage
    # included), by type. Where pauses come from, as the census is where
    # memory goes.
    walked = Counter(_type_name(type(obj)) for obj in gc.get_objects())
    if frozen:
        gc.unfreeze()
    try:
        gc.collect()
        objects = gc.get_objects()
    finally:
        if frozen:
            gc.freeze()
    types: Counter[str] = Counter()
    largest = _Largest(_LARGEST)
    container = (dict, list, set, deque)
    for obj in objects:
        cls = type(obj)
        name = _type_name(cls)
        types[name] += 1
        module = name.rpartition(".")[0] if "." in name else name
        if isinstance(obj, container):
            largest.offer(obj, None)
        elif module.startswith("poller."):
            for name, value in _attributes(obj):
                if isinstance(value, container):
                    largest.offer(value, f"{cls.__qualname__}.{name}")
    doc = {
        "pid": os.getpid(), "at": time.time(), "proc": proc, "allocated_blocks": blocks,
        "gc_objects": len(objects), "gc_frozen": frozen, "malloc": malloc,
        "traced_bytes": tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing()
        else None,
        "types": dict(types.most_common()), "largest": largest.described(),
        "walked_by_full_gc": dict(walked.most_common()),
    }
    del objects
    doc["seconds"] = time.perf_counter() - started
    return doc


def _type_name(cls: type) -> str:
    module = cls.__module__
    if not isinstance(module, str):  # a class whose __module__ is a descriptor
        module = "?"
    return f"{module}.{cls.__qualname__}"


def dump_census(directory: Path, *, clock: float | None = None) -> Path:
    path = _path(directory, CENSUS_SUFFIX, clock)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(orjson.dumps(census(), option=orjson.OPT_INDENT_2))
    return _publish(tmp, path)


def on_signal(state_dir: Path) -> list[Path]:
    """SIGUSR2 in ``serve``: a census, and a tracemalloc snapshot if tracing.
    Never raises for a full disk: a diagnostic must not stop the service."""
    directory = snapshot_dir(state_dir)
    written: list[Path] = []
    started = time.perf_counter()
    try:
        if tracemalloc.is_tracing():
            written.append(dump_snapshot(directory))
        written.append(dump_census(directory))
    except OSError as exc:
        log.error("SIGUSR2: could not write a heap snapshot: %s", exc)
        return written
    log.info("SIGUSR2: heap %s in %.1f s%s", ", ".join(p.name for p in written),
             time.perf_counter() - started,
             "" if tracemalloc.is_tracing() else
             " (no tracemalloc snapshot: start serve with PYTHONTRACEMALLOC=N for one)")
    return written


# -- differences --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Growth:
    """What one place (a source line, a traceback or a type) holds more of,
    from one snapshot to the next."""

    where: str
    size_diff_bytes: int
    """0 for a census, which counts objects, not bytes."""
    count_diff: int
    size_bytes: int
    """Held at the newer snapshot (0 for a census)."""
    traceback: tuple[str, ...] = ()
    """Innermost frame last, as the traceback module prints them."""


def growers(old: tracemalloc.Snapshot, new: tracemalloc.Snapshot, *, top: int = 20,
            key: str = "lineno") -> list[Growth]:
    """The ``top`` places that grew most from ``old`` to ``new``, largest
    first; places that shrank are left out. ``key``: ``lineno`` or
    ``traceback`` (the whole stack, when traced with more than one frame)."""
    old = old.filter_traces(_IGNORED)
    new = new.filter_traces(_IGNORED)
    stats = [s for s in new.compare_to(old, key) if s.size_diff > 0]
    stats.sort(key=lambda s: s.size_diff, reverse=True)
    found: list[Growth] = []
    for s in stats[:top]:
        frame = s.traceback[0]
        found.append(Growth(f"{frame.filename}:{frame.lineno}", s.size_diff, s.count_diff,
                            s.size, tuple(f"{f.filename}:{f.lineno}"
                                          for f in reversed(s.traceback))))
    return found


def census_growers(old: dict[str, Any], new: dict[str, Any], *,
                   top: int = 20) -> list[Growth]:
    """Types whose live count grew most between two censuses."""
    before: dict[str, int] = old["types"]
    diffs = [(n - before.get(name, 0), name, n) for name, n in new["types"].items()]
    diffs.sort(reverse=True)
    return [Growth(name, 0, diff, 0) for diff, name, _ in diffs[:top] if diff > 0]


def render(found: Sequence[Growth], *, stacks: bool = False) -> str:
    lines = [f"{'grew':>12} {'blocks':>9} {'now':>12}  where"]
    for g in found:
        lines.append(f"{_kib(g.size_diff_bytes, sign=True):>12} {g.count_diff:>+9,} "
                     f"{_kib(g.size_bytes):>12}  {g.where}")
        if stacks and len(g.traceback) > 1:
            lines.extend(f"{'':>36}  {frame}" for frame in g.traceback[:-1])
    total = sum(g.size_diff_bytes for g in found)
    lines.append(f"{_kib(total, sign=True):>12} in these {len(found)} place(s)")
    return "\n".join(lines) + "\n"


def render_census(old: dict[str, Any], new: dict[str, Any], *, top: int = 20) -> str:
    hours = max(new["at"] - old["at"], 1e-9) / 3600

    def line(label: str, a: int | None, b: int | None, unit: str = "") -> str:
        if a is None or b is None:
            return f"  {label:22} -"
        per_h = (b - a) / hours
        if unit == "B":
            return (f"  {label:22} {a / 2**20:10.2f} -> {b / 2**20:10.2f} MiB  "
                    f"({per_h / 2**20:+.3f} MiB/h)")
        return f"  {label:22} {a:>12,} -> {b:>12,}  ({per_h:+,.0f}/h)"

    om, nm = old.get("malloc") or {}, new.get("malloc") or {}
    op, np_ = old.get("proc", {}), new.get("proc", {})
    out = [f"census {hours:.2f} h apart",
           line("VmRSS", op.get("VmRSS"), np_.get("VmRSS"), "B"),
           line("RssAnon", op.get("RssAnon"), np_.get("RssAnon"), "B"),
           line("malloc in use", om.get("in_use"), nm.get("in_use"), "B"),
           line("malloc free (held)", om.get("free"), nm.get("free"), "B"),
           line("malloc mmapped", om.get("mmapped"), nm.get("mmapped"), "B"),
           line("python blocks", old["allocated_blocks"], new["allocated_blocks"]),
           line("gc objects", old["gc_objects"], new["gc_objects"]),
           line("threads", op.get("Threads"), np_.get("Threads")),
           "", f"{'more':>10}  {'now':>10}  type"]
    for g in census_growers(old, new, top=top):
        out.append(f"{g.count_diff:>+10,}  {new['types'][g.where]:>10,}  {g.where}")
    before = {(c["type"], c["hint"]): c["len"] for c in old.get("largest", [])}
    out += ["", "largest containers now (length, then: in the older census)"]
    for c in new.get("largest", [])[:top]:
        was = before.get((c["type"], c["hint"]))
        out.append(f"  {c['len']:>10,}  {'' if was is None else f'(was {was:,})':>16}  "
                   f"{c['type']} {c['hint']}")
    return "\n".join(out) + "\n"


def _kib(n: int, *, sign: bool = False) -> str:
    return f"{n / 1024:{'+' if sign else ''},.1f} KiB"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m poller.memtrace",
        description="Show where the heap grew between two snapshots of poller serve "
                    "(two .tracemalloc or two .census.json files; SIGUSR2 writes them).")
    parser.add_argument("old", type=Path, help="the earlier snapshot")
    parser.add_argument("new", type=Path, help="the later snapshot")
    parser.add_argument("--top", type=int, default=20, help="how many places (default 20)")
    parser.add_argument("--traceback", action="store_true",
                        help="group by whole stack and print it (snapshots traced with "
                        "PYTHONTRACEMALLOC above 1)")
    args = parser.parse_args(argv)
    try:
        if args.old.name.endswith(CENSUS_SUFFIX):
            sys.stdout.write(render_census(orjson.loads(args.old.read_bytes()),
                                           orjson.loads(args.new.read_bytes()), top=args.top))
            return 0
        old = tracemalloc.Snapshot.load(str(args.old))
        new = tracemalloc.Snapshot.load(str(args.new))
    except (OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as exc:
        print(f"memtrace: cannot read a snapshot: {exc}", file=sys.stderr)
        return 2
    found = growers(old, new, top=args.top, key="traceback" if args.traceback else "lineno")
    sys.stdout.write(render(found, stacks=args.traceback))
    return 0


if __name__ == "__main__":
    sys.exit(main())
