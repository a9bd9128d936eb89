"""Schema migrations: numbered SQL files applied once each, in order.

``schema/NNN_name.sql`` files are applied each in its own transaction and
recorded in ``schema_migrations`` with a checksum. A session advisory lock
serialises concurrent migrators: the second waits, then finds nothing to do.
An applied file that has since changed is an error, never silently re-run.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from poller.errors import PollerError

if TYPE_CHECKING:  # db imports this module
    from poller.db import Conn

_LOCK_KEY = 7419030
_NAME_RE = re.compile(r"^(\d{3,})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


class MigrationError(PollerError):
    pass


def schema_dir() -> Path:
    override = os.environ.get("POLLER_SCHEMA_DIR")
    if override:
        return Path(override)
    return Path(str(resources.files("poller") / "schema"))


def discover(directory: Path | None = None) -> list[Migration]:
    directory = directory or schema_dir()
    if not directory.is_dir():
        # The wheel carries the SQL as package data (pyproject's package-data).
        raise MigrationError(f"{directory}: no schema directory; this install lacks "
                             "poller/schema/*.sql (reinstall poller, or set "
                             "POLLER_SCHEMA_DIR to a directory of NNN_name.sql files)")
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME_RE.match(path.name)
        if not match:
            raise MigrationError(f"{path}: migration files are named NNN_lower_case.sql")
        found.append(Migration(int(match.group(1)), path.name, path.read_text("utf-8")))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"{directory}: two migration files share a number")
    if not found:
        raise MigrationError(f"{directory}: no migration files")
    return found


async def migrate(conn: Conn, migrations: list[Migration] | None = None) -> list[str]:
    """Apply pending migrations; return the names applied (empty: up to date)."""
    migrations = migrations if migrations is not None else discover()
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    integer PRIMARY KEY,
                   name       text NOT NULL,
                   checksum   text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())""")
        rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
        done = {r["version"]: r for r in rows}
        for m in migrations:
            row = done.get(m.version)
            if row is not None:
                if row["checksum"] != m.checksum:
                    raise MigrationError(
                        f"{m.name} changed after it was applied (as {row['name']}); "
                        "add a new migration instead of editing an applied one")
                continue
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    m.version, m.name, m.checksum)
            applied_now.append(m.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied_now


async def ensure_partitions(conn: Conn, days_ahead: int = 3) -> int:
    """Create daily ``readings`` partitions from yesterday to ``days_ahead``."""
    made: int = await conn.fetchval(
        "SELECT poller_ensure_partitions((now() AT TIME ZONE 'UTC')::date - 1, $1)",
        days_ahead + 2)
    # And those of the rollups and failed polls (schema/005), when migrated.
    if await conn.fetchval("SELECT to_regproc('poller_ensure_rollup_partitions') IS NOT NULL"):
        made += await conn.fetchval(
            "SELECT poller_ensure_rollup_partitions((now() AT TIME ZONE 'UTC')::date - 1, $1)",
            days_ahead + 2)
    return made
