"""Doctests of compiled modules: doctest finds no examples in the functions
and methods mypyc compiled (they are not Python functions to it), so their
examples run on the module's source instead."""

from __future__ import annotations

import doctest
import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def doctest_target(module: ModuleType) -> ModuleType:
    """``module`` itself when it runs from its source; for a compiled one, a
    fresh module of the same name run from its ``.py`` file (not put in
    ``sys.modules``: everyone else keeps the compiled one)."""
    origin = module.__file__ or ""
    if origin.endswith(".py"):
        return module
    source = Path(origin).parent / (module.__name__.rpartition(".")[2] + ".py")
    spec = importlib.util.spec_from_file_location(module.__name__, source)
    assert spec is not None and spec.loader is not None, source
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    return copy


def testmod(module: ModuleType, optionflags: int = 0) -> doctest.TestResults:
    """``doctest.testmod`` of ``module``'s examples, compiled or not."""
    target = doctest_target(module)
    if target is module:
        return doctest.testmod(module, optionflags=optionflags)
    # doctest takes a class for the module's own only when sys.modules says
    # so: the source's copy stands in while its examples run.
    name = module.__name__
    sys.modules[name] = target
    try:
        return doctest.testmod(target, optionflags=optionflags)
    finally:
        sys.modules[name] = module
