"""Shared test set-up: every async test runs on uvloop, as the service does."""

from __future__ import annotations

import pytest
import uvloop

pytest_plugins = ["tests.stackfix"]


@pytest.fixture(scope="session")
def event_loop_policy() -> uvloop.EventLoopPolicy:
    return uvloop.EventLoopPolicy()
