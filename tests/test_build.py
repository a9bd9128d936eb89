"""The compiled build and its pure-Python fallback (poller.build, setup.py).

The suite as a whole runs on whichever build is installed (the compiled one
in `make test`, the pure one in `make test-minver`); these tests check the
choice itself, each in a fresh interpreter, since it is made once per
process when poller is first imported."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import poller
from poller import build
from poller.bench import hotpath

PACKAGE = Path(poller.__file__).resolve().parent

REPORT = """
import importlib, json
from poller import build
files = {m: importlib.import_module(m).__file__ for m in build.COMPILED_MODULES}
print(json.dumps({"kind": build.build_kind(), "files": files}))
"""


def run(*, pure: bool = False, path: Path | None = None) -> tuple[str, dict[str, str]]:
    """``(build_kind(), {module: file})`` in a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if k != build.PURE_ENV}
    if pure:
        env[build.PURE_ENV] = "1"
    if path is not None:
        env["PYTHONPATH"] = str(path)
    done = subprocess.run([sys.executable, "-c", REPORT], env=env, capture_output=True,
                          text=True, timeout=60, cwd=path)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    return report["kind"], report["files"]


def compiled(files: dict[str, str]) -> list[str]:
    return sorted(m for m, f in files.items() if not f.endswith(".py"))


def test_version_says_which_build_runs() -> None:
    env = {k: v for k, v in os.environ.items() if k != build.PURE_ENV}
    plain = subprocess.run([sys.executable, "-m", "poller", "--version"], env=env,
                           capture_output=True, text=True, timeout=60)
    pure = subprocess.run([sys.executable, "-m", "poller", "--version"],
                          env={**env, build.PURE_ENV: "1"}, capture_output=True, text=True,
                          timeout=60)
    assert plain.returncode == pure.returncode == 0, plain.stderr + pure.stderr
    assert plain.stdout.startswith(f"poller {poller.__version__}, compiled (mypyc, "), plain.stdout
    assert pure.stdout.strip() == f"poller {poller.__version__}, pure Python (POLLER_PURE=1)"


def test_the_install_compiled_every_per_poll_module() -> None:
    # The README asks for a C compiler, and with one setup.py compiles: a
    # build that fell back to plain Python (mypyc failed, headers missing)
    # fails here rather than running slow unnoticed.
    kind, files = run()
    assert kind.startswith("compiled"), kind
    assert compiled(files) == sorted(build.COMPILED_MODULES)


def test_pure_runs_every_module_from_its_source() -> None:
    kind, files = run(pure=True)
    assert kind == "pure Python (POLLER_PURE=1)"
    assert sorted(files) == sorted(build.COMPILED_MODULES)
    assert compiled(files) == []


def test_a_source_changed_since_the_build_runs_as_source(tmp_path: Path) -> None:
    # An editable install being edited: the edit runs, never the stale
    # build, until `make install` compiles again; all modules or none.
    root = tmp_path / "tree"
    shutil.copytree(PACKAGE, root / "poller", ignore=shutil.ignore_patterns("__pycache__"))
    for lib in PACKAGE.parent.glob("*__mypyc*"):
        shutil.copy2(lib, root / lib.name)
    kind, files = run(path=root)
    assert kind.startswith("compiled") and files["poller.reading"].startswith(str(root))
    edited = root / "poller" / "reading.py"
    edited.write_text(edited.read_text() + "\n# edited after the build\n")
    kind, files = run(path=root)
    assert kind == "pure Python (compiled build is stale: reading.py changed since the build)"
    assert compiled(files) == []
    assert files["poller.reading"] == str(edited)


def test_the_hot_path_harness_times_every_case(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    # bench.hotpath is how compiled and pure are compared part by part: it
    # must keep running on whichever build this is (one quick repeat).
    out = tmp_path / "hot.json"
    assert hotpath.main(["--repeat", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["build"] == build.build_kind()
    assert sorted(result["us_per_op"]) == sorted(hotpath.cases())
    assert all(0 < us < 10_000 for us in result["us_per_op"].values()), result
    assert capsys.readouterr().out.startswith(f"build: {build.build_kind()}\n")


def test_no_plain_python_class_extends_a_compiled_one() -> None:
    # A compiled class's methods call each other directly: a plain-Python
    # subclass's overrides would be skipped without a word (as Dialer's
    # _open was, before transport.dial was compiled with transport.pools).
    # A base and its subclasses are compiled together or not at all.
    for info in pkgutil.walk_packages(poller.__path__, "poller."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    compiled = set(build.COMPILED_MODULES)
    found: list[str] = []
    for name in compiled:
        for base in vars(importlib.import_module(name)).values():
            if isinstance(base, type) and base.__module__ == name:
                subclasses: list[type] = base.__subclasses__()
                found += [f"{sub.__module__}.{sub.__qualname__}({base.__qualname__})"
                          for sub in subclasses if sub.__module__ not in compiled]
    assert found == []
