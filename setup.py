"""Compiles the per-poll modules with mypyc at install; everything else is in
pyproject.toml.

The modules are poller.build.COMPILED_MODULES, the same Python files the
pure build runs. They are compiled when a C compiler and Python's headers
are present and POLLER_PURE is not set; otherwise (or when mypyc fails) the
install goes on as plain Python and says why on stderr (pip -v shows it;
``poller --version`` says which build runs). A pure install leaves alone a
compiled build that an editable tree holds already: another virtualenv of
the same tree may run it (``make test-minver``'s runs beside ``make
test``'s); ``POLLER_PURE=1`` at run time sets it aside, ``make clean``
removes it.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

from setuptools import setup

HERE = Path(__file__).resolve().parent
SRC = HERE / "src"


def _build_module() -> ModuleType:
    """src/poller/build.py, loaded by path: poller itself is not importable yet."""
    spec = importlib.util.spec_from_file_location("_poller_build", SRC / "poller" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _say(message: str) -> None:
    print(f"poller setup: {message}", file=sys.stderr)


def _compiler_problem() -> str | None:
    """Why no extension can be built here (a C file including Python.h is
    compiled to find out), or None."""
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").is_file():
        return f"no Python.h in {include} (install the Python development headers)"
    # The compiler the extensions are built with: $CC, else Python's own.
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    if not cc or shutil.which(cc[0]) is None:
        return f"no C compiler ({' '.join(cc) or 'cc'} not found)"
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.c"
        probe.write_text("#include <Python.h>\nint probe(void) { return PY_MAJOR_VERSION; }\n")
        done = subprocess.run([*cc, "-c", str(probe), "-I", include, "-o", str(probe) + ".o"],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            return f"the C compiler failed on a probe: {done.stderr.strip()[-300:]}"
    return None


def _write_fingerprint(build: ModuleType) -> None:
    lines = ['"""Written by setup.py: the sources the compiled modules were built from."""',
             "", "SOURCES = {"]
    for module in build.COMPILED_MODULES:
        digest = build.source_digest(build.source_path(module, SRC))
        lines.append(f"    {module!r}: {digest!r},")
    lines.append("}")
    (SRC / "poller" / "_build_fingerprint.py").write_text("\n".join(lines) + "\n")


# What setup.py runs for without building: pip's metadata steps and an
# sdist need no extensions, and mypyc would type-check each time.
_METADATA_ONLY = {"egg_info", "dist_info", "sdist"}


def ext_modules() -> list[Any]:
    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
    if command in _METADATA_ONLY:
        return []
    build = _build_module()
    pure = os.environ.get(build.PURE_ENV, "")
    why = f"{build.PURE_ENV}={pure}" if pure not in ("", "0") else _compiler_problem()
    if why is None:
        try:
            from mypyc.build import mypycify
        except ImportError:
            why = "mypyc is not installed (it comes with mypy)"
    if why is not None:
        _say(f"installing the pure-Python build: {why}")
        return []
    paths = [str(build.source_path(m, SRC).relative_to(HERE)) for m in build.COMPILED_MODULES]
    _say(f"compiling {len(paths)} modules with mypyc")
    # mypyc type-checks first, with pyproject.toml's [tool.mypy] (strict). pip
    # builds before it installs the dependencies, so of these only what the
    # build requires is there (pyproject.toml: the compiled modules' own
    # third-party imports): the other modules' imports are taken as Any and
    # their errors left to `make lint`, so a fresh machine compiles the same.
    options = ["--ignore-missing-imports", "--follow-imports=silent"]
    try:
        extensions: list[Any] = mypycify([*options, *paths], opt_level="3")
    except SystemExit as exc:  # mypy's errors end in SystemExit
        _say(f"mypyc failed ({exc}); installing the pure-Python build")
        return []
    _write_fingerprint(build)
    return extensions


setup(ext_modules=ext_modules())
