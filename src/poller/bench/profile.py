"""``poller bench --profile``: where the poller's CPU goes, sampled by py-spy.

py-spy reads the serve process's stacks from outside (no instrumentation,
no slowdown of the process measured) for the measured window and writes
collapsed stacks, one line per distinct stack with its sample count. The
summary attributes each sample twice: to the function running at the leaf
("self") and to an area of the poller named by a frame on its stack, so a
report can say "responses 46 %, Redis live state 23 %" and which functions
inside.

Only samples of busy threads count (``--nonblocking`` without ``--idle``):
percentages are of the CPU the process used, not of the wall clock.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# First match wins, checked from the outermost frame inwards per area order.
AREAS: tuple[tuple[str, str], ...] = (
    ("TimingWheel._run", "ticks and sends"),
    ("HttpConnection.data_received", "responses: HTTP, driver, reading"),
    ("LiveState.", "Redis live state"),
    ("Spool.", "spool: encode, gzip, fsync (thread)"),
    ("PgLoader.", "Postgres loader"),
    ("RequestHandler.", "API and /metrics"),
    ("RegistryWatcher.", "registry sync"),
)
OTHER = "event loop, syscalls and the rest"


@dataclass(frozen=True, slots=True)
class Profile:
    available: bool
    reason: str | None
    path: str | None
    """The collapsed stacks py-spy wrote (flamegraph.pl / speedscope input)."""
    samples: int
    areas: list[tuple[str, float]]
    """Area, % of samples; largest first."""
    top_self: list[tuple[str, float]]
    """Function (file:line of the leaf frame), % of samples; largest first."""


def find_py_spy() -> str | None:
    """py-spy installed next to this Python (the dev extra), else on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


def _frame_name(frame: str) -> str:
    """``func (pkg/dir/file.py:12)`` -> ``func (dir/file.py)``: lines would
    split one function into many rows."""
    name, _, where = frame.partition(" (")
    if not where:
        return name
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({'/'.join(path.split('/')[-2:])})"


def summarize(collapsed: str, top: int = 15) -> tuple[int, list[tuple[str, float]],
                                                     list[tuple[str, float]]]:
    """(samples, areas, top self functions) of py-spy's raw (collapsed) output."""
    areas: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        leaves[_frame_name(frames[-1])] += n
        for marker, area in AREAS:
            if marker in stack:
                areas[area] += n
                break
        else:
            areas[OTHER] += n
    if not total:
        return 0, [], []

    def share(counter: collections.Counter[str], limit: int) -> list[tuple[str, float]]:
        return [(k, round(100.0 * v / total, 1)) for k, v in counter.most_common(limit)]

    return total, share(areas, len(AREAS) + 1), share(leaves, top)


class Recorder:
    """One py-spy run against ``pid`` for ``seconds``; :meth:`finish` waits."""

    def __init__(self, pid: int, seconds: float, path: Path, rate_hz: int = 100) -> None:
        self.path = path
        self._proc: subprocess.Popen[bytes] | None = None
        self._reason: str | None = None
        exe = find_py_spy()
        if exe is None:
            self._reason = "py-spy not found (it comes with the dev extra: make install)"
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
             "--rate", str(rate_hz), "--format", "raw", "--nonblocking",
             "--output", str(path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def finish(self, timeout_s: float = 60.0) -> Profile:
        proc = self._proc
        if proc is None:
            return Profile(False, self._reason, None, 0, [], [])
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return Profile(False, "py-spy did not finish in time", None, 0, [], [])
        if not self.path.exists():
            detail = err.decode(errors="replace").strip().splitlines()
            why = detail[-1] if detail else f"exit status {proc.returncode}"
            return Profile(False, f"py-spy failed: {why}", None, 0, [], [])
        samples, areas, top = summarize(self.path.read_text(errors="replace"))
        return Profile(True, None, str(self.path), samples, areas, top)


def render(profile: Profile) -> list[str]:
    if not profile.available:
        return [f"  not recorded: {profile.reason}"]
    out = [f"  {profile.samples:,} samples of the busy threads, stacks in {profile.path}",
           "  by area:"]
    out += [f"    {pct:5.1f} %  {area}" for area, pct in profile.areas]
    out.append("  by function (self):")
    out += [f"    {pct:5.1f} %  {name}" for name, pct in profile.top_self]
    return out
