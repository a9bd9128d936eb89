"""Pytest fixtures for the embedded stack: one real stack per test session.

tests/conftest.py lists this module in `pytest_plugins`, so every test module
has `stack` and `fresh_db` without importing them. Do not import the fixtures
into a test module: pytest would take the import for a fixture of that module
alone and start (and keep until the session ends) a whole second stack for it,
some 10 s and three more server processes per module.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from poller.stack import EmbeddedStack, StackInfo, create_database


@dataclass(frozen=True)
class RunningStack:
    """The session's stack and the URLs its `up()` returned."""

    stack: EmbeddedStack
    info: StackInfo


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """PostgreSQL, Valkey and SeaweedFS S3 for the whole session, always torn down."""
    embedded = EmbeddedStack(tmp_path_factory.mktemp("stack"), progress=print)
    try:
        yield RunningStack(embedded, embedded.up())
    finally:
        embedded.down()


def fresh_database_url(info: StackInfo) -> str:
    """Create a new, empty, uniquely named database on the stack's server; return its URL."""
    return create_database(info.database_url, f"t_{uuid.uuid4().hex[:16]}")


@pytest.fixture
def fresh_db(stack: RunningStack) -> str:
    """URL of an empty database of its own for one test (e.g. to run migrations)."""
    return fresh_database_url(stack.info)
