"""Which build of poller runs: the per-poll modules compiled, or all plain Python.

``pip install`` (setup.py) compiles :data:`COMPILED_MODULES` with mypyc when
a C compiler and Python's headers are present and ``POLLER_PURE`` is not
set; otherwise they install as the plain Python they are. The compiled
modules are these same files, so both builds behave alike and the test
suite runs on either.

At run time the plain Python files win over a compiled build when
``POLLER_PURE=1`` is set (the suite's pure subset uses it) and when any of
the files changed since the build (an editable install being edited: the
edits run, not a stale build; ``make install`` rebuilds). The choice is made
once, when :mod:`poller` is first imported (:func:`choose`), and is all or
nothing: compiled modules call each other directly, so a mix would run two
copies of their classes.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

COMPILER = "mypyc"

COMPILED_MODULES: tuple[str, ...] = (
    "poller.reading",
    "poller.http",
    "poller.polling.loop",
    "poller.polling.schedule",
    "poller.polling.stats",
    "poller.polling.target",
    "poller.transport.connection",
    "poller.transport.dial",
    "poller.transport.fasthttp",
    "poller.transport.hostpool",
    "poller.transport.pools",
    "poller.transport.prepared",
    "poller.drivers.bounds",
    "poller.drivers.eagle_cloud",
    "poller.drivers.eagle_local",
    "poller.drivers.hexcodec",
    "poller.drivers.response",
    "poller.segment",
    # The device simulator's request path: the bench's fleet answers from
    # the same build, so that it costs less than the poller it measures.
    "poller.simulator.server",
    "poller.simulator.gateway",
    "poller.simulator.payloads",
    "poller.simulator.responses",
    "poller.simulator.fleet",
    "poller.simulator.faults",
    "poller.simulator.records",
)
"""The per-poll path (issue 19): the device loop, the connection protocol
and the pools around it, the EAGLE drivers' parsers, the reading record and
the spool's encoder; and the simulator's side of each request.

A compiled class cannot be subclassed by plain Python (its methods call each
other directly), so a module whose classes are subclassed elsewhere stays
out, and a subclass comes in with its base: ``poller.wheel``
(``cluster.lease.FencedWheel``) and ``poller.ingest.livestate`` (a test's
recording subclass) stay plain Python, where ``bench.hotpath`` measured no
gain for them anyway; ``transport.dial`` comes in with ``transport.pools``.
``polling.context`` (``DirtyQueue`` subclasses ``list``) and
``ingest.pgcopy`` (an async generator) are beyond what mypyc compiles."""

FINGERPRINT_MODULE = "poller._build_fingerprint"
"""Written by setup.py into the build: ``SOURCES``, the SHA-256 of each
compiled module's source, to tell a stale build from a current one."""

PURE_ENV = "POLLER_PURE"

_SRC = Path(__file__).resolve().parent.parent
_state: dict[str, str] = {}


def source_path(module: str, root: Path = _SRC) -> Path:
    """The ``.py`` file of ``module`` under ``root`` (the directory holding ``poller``)."""
    return root.joinpath(*module.split(".")).with_suffix(".py")


def source_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _PureFinder(importlib.abc.MetaPathFinder):
    """Imports the compiled modules from their ``.py`` files."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in COMPILED_MODULES:
            return None
        source = source_path(fullname)
        if not source.is_file():
            return None
        return importlib.util.spec_from_file_location(fullname, source)


def _is_extension(module: str) -> bool:
    """Whether a compiled ``module`` lies beside its source. Looked up on
    disk, not through the import system, which would import the packages."""
    source = source_path(module)
    return any(source.with_suffix(suffix).is_file()
               for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def _stale() -> str | None:
    """Why the compiled build does not match the sources, or None."""
    try:
        fingerprint = importlib.import_module(FINGERPRINT_MODULE)
    except ImportError:
        return "no fingerprint of the build"
    built: dict[str, str] = fingerprint.SOURCES
    for module in COMPILED_MODULES:
        source = source_path(module)
        if source.is_file() and built.get(module) != source_digest(source):
            return f"{source.name} changed since the build"
    return None


def choose() -> None:
    """Decide once between the compiled modules and their sources (called
    by ``poller/__init__.py`` before anything else of poller is imported)."""
    if _state:
        return
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        _state["kind"], _state["why"] = "pure", f"{PURE_ENV}={os.environ[PURE_ENV]}"
    elif not any(_is_extension(module) for module in COMPILED_MODULES):
        _state["kind"], _state["why"] = "pure", "not compiled at install"
    else:
        stale = _stale()
        if stale is None:
            _state["kind"], _state["why"] = "compiled", COMPILER
            return
        _state["kind"], _state["why"] = "pure", f"compiled build is stale: {stale}"
    if _state["kind"] == "pure" and any(_is_extension(m) for m in COMPILED_MODULES):
        sys.meta_path.insert(0, _PureFinder())


def is_compiled() -> bool:
    choose()
    return _state["kind"] == "compiled"


def build_kind() -> str:
    """``compiled (mypyc, 25 modules)`` or ``pure Python (why)``: what
    ``poller --version`` says."""
    choose()
    if _state["kind"] == "compiled":
        return f"compiled ({_state['why']}, {len(COMPILED_MODULES)} modules)"
    return f"pure Python ({_state['why']})"


if __name__ == "__main__":
    # The Makefile's list of what a rebuild depends on (no poller import).
    print(" ".join(os.path.relpath(source_path(m)) for m in COMPILED_MODULES))
