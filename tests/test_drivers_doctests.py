"""The drivers' docstring examples run as tests: pytest collects only tests/,
so without this file they would go stale unnoticed."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import poller.drivers
from tests import sources

MODULES = sorted(f"poller.drivers.{m.name}" for m in pkgutil.iter_modules(poller.drivers.__path__))


def test_every_driver_module_is_found() -> None:
    assert {"poller.drivers.bounds", "poller.drivers.response",
            "poller.drivers.eagle_local"} <= set(MODULES)


@pytest.mark.parametrize("name", ["poller.drivers", *MODULES])
def test_docstring_examples(name: str) -> None:
    result = sources.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
