"""Fixtures over the stack's real Postgres and S3, for tests that stage
segments and readings themselves: a migrated database of their own and an
archive client. conftest.py registers them for every test module; a module
may define its own under the same name."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from poller.archive.s3 import ArchiveStore
from tests.apiview import migrated_pool
from tests.stackfix import RunningStack, fresh_database_url
from tests.test_archive import make_store


@pytest.fixture
async def store(stack: RunningStack) -> AsyncIterator[ArchiveStore]:
    store = make_store(stack)
    await store.start()
    yield store
    await store.close()


@pytest.fixture
async def pool(stack: RunningStack) -> AsyncIterator[asyncpg.Pool]:
    """A freshly migrated database of the test's own."""
    pool = await migrated_pool(fresh_database_url(stack.info))
    yield pool
    await pool.close()
