"""Registering whole fleets: the plan and the write behind ``poller import``
and ``POST /api/users:import``.

An import runs in two passes. The *plan* checks every row the way
``add-user`` and the API do (:func:`poller.registry.check_device`, the URL
policy, a moved device needing its password) and compares it with what is
registered: each row is to be added, changed, left unchanged, left as it is
because it exists and ``update`` is off, or refused with its reason. A dry
run stops there. The *write* then takes the plan a batch at a time: each
batch is one transaction (rows COPYed into a temporary table, one set-based
INSERT and one UPDATE, one ``NOTIFY`` for a running ``serve``), so a batch is
written whole or not at all. A device someone else registered or changed
since the plan fails its batch, which is rolled back; running the import
again is safe, since a row that matches the registry changes nothing.

Passwords are sealed before they reach Postgres, compared with the sealed
ones by opening those, and never copied into a report.

    >>> options = ImportOptions(update=True, dry_run=False)
    >>> report = await Importer(conn, box, policy, options).run(
    ...     fleetfile.parse(data, "csv"))  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from poller.db import Conn
from poller.errors import PollerError, SecretKeyError, UsageError
from poller.fleetfile import BadRow, FleetRow, Parsed, Where, scrub
from poller.netpolicy import NetPolicy
from poller.registry import (
    CHANNEL,
    RESYNC_ALL,
    DeviceRecord,
    Registry,
    check_device,
    check_move,
    check_url_addresses,
    normalise_id,
)
from poller.sealing import SecretBox

DEFAULT_DRIVER = "eagle-cloud"
_YIELD_EVERY = 500
"""Rows handled between two yields to the event loop (a few ms of work):
inside ``serve`` an import must not hold up the polls due meanwhile."""
_LOOKUP_ROWS = 2000
"""Rows looked up in the registry per query."""
_RESOLVE_AT_ONCE = 32
_COMPARED = ("email", "driver", "url", "interval_s", "enabled", "options")

_TEMP_SQL = """
CREATE TEMP TABLE poller_import (
    cloud_id text NOT NULL, email text NOT NULL, driver text NOT NULL, url text,
    options jsonb NOT NULL, sealed_secret bytea, interval_s real NOT NULL,
    enabled boolean NOT NULL, seen_updated_at timestamptz
) ON COMMIT DROP"""
_TEMP_COLUMNS = ("cloud_id", "email", "driver", "url", "options", "sealed_secret",
                 "interval_s", "enabled", "seen_updated_at")
# A row already registered (by someone else, since the plan) is not
# inserted: the count tells, and the batch is rolled back.
_INSERT_SQL = """
WITH added AS (
    INSERT INTO devices (cloud_id, email, driver, url, options, sealed_secret, interval_s,
                         enabled)
    SELECT cloud_id, email, driver, url, options, sealed_secret, interval_s, enabled
    FROM poller_import WHERE seen_updated_at IS NULL
    ON CONFLICT (cloud_id) WHERE removed_at IS NULL DO NOTHING
    RETURNING 1)
SELECT count(*) FROM added"""
# Only a device still as the plan saw it (same updated_at) is changed.
_UPDATE_SQL = """
WITH changed AS (
    UPDATE devices d
    SET email = i.email, driver = i.driver, url = i.url, options = i.options,
        sealed_secret = coalesce(i.sealed_secret, d.sealed_secret),
        interval_s = i.interval_s, enabled = i.enabled, updated_at = now()
    FROM poller_import i
    WHERE i.seen_updated_at IS NOT NULL AND d.cloud_id = i.cloud_id
      AND d.removed_at IS NULL AND d.updated_at = i.seen_updated_at
    RETURNING 1)
SELECT count(*) FROM changed"""


@dataclass(frozen=True, slots=True)
class ImportOptions:
    update: bool = False
    """Change existing devices that differ (else they are only reported)."""
    dry_run: bool = True
    batch_rows: int = 10_000
    """Rows per transaction (and per notification to ``serve``)."""
    default_interval_s: float = 6.0
    """The interval of a new device whose row gives none."""
    write_timeout_s: float | None = None
    """Postgres cancels a batch's statement that runs longer (None: the
    connection's own setting). The API's connections cancel at
    ``api.statement_timeout_s``, a bound for reads, not for a bulk write."""

    def __post_init__(self) -> None:
        if self.batch_rows < 1:
            raise UsageError("the batch size must be at least 1 row")


@dataclass(frozen=True, slots=True)
class Entry:
    """A row that adds, changes or would change a device; ``fields``: what differs."""

    where: Where
    cloud_id: str
    fields: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {**self.where.to_json(), "cloud_id": self.cloud_id, "fields": list(self.fields)}


@dataclass(slots=True)
class ImportReport:
    """What an import did (or, in a dry run, would do). Never holds a secret."""

    dry_run: bool
    update: bool
    rows: int = 0
    added: list[Entry] = field(default_factory=list)
    changed: list[Entry] = field(default_factory=list)
    unchanged: int = 0
    existing: list[Entry] = field(default_factory=list)
    """Devices that differ from their row, left as they are (no ``update``)."""
    refused: list[BadRow] = field(default_factory=list)
    batches: int = 0
    batches_written: int = 0
    rows_written: int = 0
    error: str | None = None
    """Why a batch was not written (it and the batches after it); None: all were."""
    error_code: str | None = None
    """``conflict``: someone else changed the registry meanwhile; ``database``:
    Postgres failed or refused the batch."""
    elapsed_s: float = 0.0

    @property
    def complete(self) -> bool:
        """Every row imported or already as it is: nothing refused, nothing failed."""
        return not self.refused and self.error is None

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run, "update": self.update, "rows": self.rows,
            "counts": {"added": len(self.added), "changed": len(self.changed),
                       "unchanged": self.unchanged, "existing": len(self.existing),
                       "refused": len(self.refused)},
            "added": [e.to_json() for e in self.added],
            "changed": [e.to_json() for e in self.changed],
            "existing": [e.to_json() for e in self.existing],
            "refused": [r.to_json() for r in self.refused],
            "batches": self.batches, "batches_written": self.batches_written,
            "rows_written": self.rows_written, "error": self.error,
            "error_code": self.error_code,
            "elapsed_s": round(self.elapsed_s, 3),
        }

    def summary(self) -> str:
        """One line: what was (or would be) done."""
        verbs = ("would add", "would change") if self.dry_run else ("added", "changed")
        line = (f"{self.rows:,} row(s): {verbs[0]} {len(self.added):,}, {verbs[1]} "
                f"{len(self.changed):,}, unchanged {self.unchanged:,}, existing and left as "
                f"they are {len(self.existing):,}, refused {len(self.refused):,}")
        if self.dry_run:
            return line + " (dry run: nothing written)"
        if not self.batches:
            return line + "; nothing to write"
        return line + f"; {self.batches_written} of {self.batches} batch(es) written"

    def details(self) -> list[str]:
        """A line per refused row and per device that differs (never per added one)."""
        lines = [f"{r.where}: refused{f' ({r.cloud_id})' if r.cloud_id else ''}: {r.reason}"
                 for r in self.refused]
        lines += [f"{e.where}: {e.cloud_id} exists and differs in {', '.join(e.fields)}; "
                  "left as it is (--update changes it)" for e in self.existing]
        verb = "would change" if self.dry_run else "changed"
        lines += [f"{e.where}: {e.cloud_id}: {verb} {', '.join(e.fields)}"
                  for e in self.changed]
        if self.error is not None:
            lines.append(f"error: {self.error}")
        return lines


class ImportFailed(PollerError):
    """A batch that was not written (rolled back whole)."""


class Pace:
    """``await pace.tick()`` once per row: every :data:`_YIELD_EVERY` rows it
    lets the event loop run whatever else is due."""

    __slots__ = ("_n",)

    def __init__(self) -> None:
        self._n = 0

    async def tick(self) -> None:
        self._n += 1
        if self._n % _YIELD_EVERY == 0:
            await asyncio.sleep(0)


@dataclass(slots=True)
class _Batch:
    first: Where
    last: Where
    records: list[tuple[Any, ...]] = field(default_factory=list)
    """Rows for the temporary table (:data:`_TEMP_COLUMNS`)."""
    adds: int = 0
    changes: int = 0


@dataclass(frozen=True, slots=True)
class _Checked:
    """A row merged with what is registered, every check passed but the URL's
    addresses."""

    row: FleetRow
    current: tuple[DeviceRecord, bytes] | None
    cloud_id: str
    email: str
    driver: str
    url: str | None
    interval_s: float
    enabled: bool
    options: dict[str, Any]


class Importer:
    """Plans and writes one import over one connection.

    ``policy`` decides which device URLs may be registered, as for
    :class:`~poller.registry.Registry`; ``progress`` gets a line now and then
    (the CLI prints it on stderr)."""

    def __init__(self, conn: Conn, box: SecretBox, policy: NetPolicy, options: ImportOptions,
                 progress: Callable[[str], None] | None = None) -> None:
        self._conn = conn
        self._box = box
        self._policy = policy
        self._options = options
        self._progress = progress or (lambda line: None)
        self._url_refusals: dict[str, str | None] = {}
        """URL -> why the policy refuses it (None: allowed), resolved once each."""
        self._pace = Pace()

    async def run(self, parsed: Sequence[Parsed]) -> ImportReport:
        """Plan ``parsed`` (a fleet file's rows, in order), and write it unless
        this is a dry run. The report says what happened; a batch that failed
        is in ``report.error`` (nothing of it, nor of the batches after it,
        was written)."""
        began = time.monotonic()
        opts = self._options
        report = ImportReport(dry_run=opts.dry_run, update=opts.update, rows=len(parsed))
        rows = await self._unique(parsed, report)
        batches: list[_Batch] = []
        for start in range(0, len(rows), opts.batch_rows):
            batch = await self._plan(rows[start:start + opts.batch_rows], report)
            if batch.records:
                batches.append(batch)
            self._progress(f"import: checked {min(start + opts.batch_rows, len(rows)):,} of "
                           f"{len(rows):,} row(s)")
        report.refused.sort(key=_order)
        report.batches = len(batches)
        if not opts.dry_run:
            for n, batch in enumerate(batches, 1):
                try:
                    await self._write(batch)
                except (ImportFailed, asyncpg.PostgresError, asyncpg.InterfaceError,
                        OSError) as exc:
                    raced = isinstance(exc, ImportFailed)
                    reason = str(exc) if raced else f"{type(exc).__name__}: {exc}"
                    report.error_code = "conflict" if raced else "database"
                    report.error = (f"batch {n} of {len(batches)} ({batch.first} to "
                                    f"{batch.last}) was not written, nor any after it: "
                                    f"{reason}; importing again is safe")
                    break
                report.batches_written += 1
                report.rows_written += len(batch.records)
                self._progress(f"import: wrote batch {n} of {len(batches)} "
                               f"({report.rows_written:,} device(s) so far)")
        report.elapsed_s = time.monotonic() - began
        return report

    async def _unique(self, parsed: Sequence[Parsed], report: ImportReport) -> list[FleetRow]:
        """The good rows, each cloud id once: a later row for an id already
        given is refused (which of the two was meant is not ours to guess)."""
        seen: dict[str, Where] = {}
        rows: list[FleetRow] = []
        for item in parsed:
            await self._pace.tick()
            if isinstance(item, BadRow):
                report.refused.append(item)
                continue
            key = normalise_id(item.cloud_id)
            if key in seen:
                report.refused.append(BadRow(item.where, scrub(item.cloud_id, item.secret),
                                             f"cloud id already given at {seen[key]}"))
                continue
            seen[key] = item.where
            rows.append(item)
        return rows

    async def _plan(self, rows: list[FleetRow], report: ImportReport) -> _Batch:
        registry = Registry(self._conn, self._box)
        checked: list[_Checked] = []
        for start in range(0, len(rows), _LOOKUP_ROWS):
            part = rows[start:start + _LOOKUP_ROWS]
            current = await registry.existing([normalise_id(r.cloud_id) for r in part])
            for row in part:
                await self._pace.tick()
                try:
                    checked.append(self._check(row, current.get(normalise_id(row.cloud_id))))
                except UsageError as exc:
                    report.refused.append(_refusal(row, str(exc)))
        await self._resolve({c.url: c.cloud_id for c in checked
                             if c.url is not None and _new_url(c)})
        batch = _Batch(rows[0].where, rows[-1].where)
        for c in checked:
            await self._pace.tick()
            refusal = self._url_refusals.get(c.url) if _new_url(c) and c.url else None
            if refusal is not None:
                report.refused.append(_refusal(c.row, refusal))
                continue
            self._diff(c, batch, report)
        return batch

    def _check(self, row: FleetRow, current: tuple[DeviceRecord, bytes] | None) -> _Checked:
        """``row`` over what is registered (a field the row leaves out keeps
        its registered value, or the default of a new device), checked."""
        rec = current[0] if current is not None else None
        given = row.given
        if rec is None and row.secret is None:
            raise UsageError("a new device needs its password (a password or install_code "
                             "column)")

        def pick(name: str, default: Any) -> Any:
            if name in given:
                return getattr(row, name)
            return getattr(rec, name) if rec is not None else default

        options: dict[str, Any] = pick("options", {})
        if "fields" in given:
            options = {**options, "fields": row.fields}
        cloud_id, email, driver, url, interval_s = check_device(
            row.cloud_id, email=pick("email", ""), driver=pick("driver", DEFAULT_DRIVER),
            url=pick("url", None),
            interval_s=pick("interval_s", self._options.default_interval_s),
            options=options, secret=row.secret)
        if rec is not None:
            check_move(rec, driver, url, row.secret)
        enabled: bool = pick("enabled", True)
        return _Checked(row, current, cloud_id, email, driver, url, interval_s, enabled,
                        options)

    async def _resolve(self, urls: dict[str, str]) -> None:
        """What the policy says of each new URL's addresses (``urls``: URL ->
        a cloud id using it, for the log), at most :data:`_RESOLVE_AT_ONCE`
        resolving at once. A fleet shares few URLs: each is resolved once."""
        todo = [(u, cid) for u, cid in urls.items() if u not in self._url_refusals]
        gate = asyncio.Semaphore(_RESOLVE_AT_ONCE)

        async def one(url: str, cloud_id: str) -> None:
            async with gate:
                try:
                    await check_url_addresses(url, self._policy, cloud_id)
                except UsageError as exc:
                    self._url_refusals[url] = str(exc)
                else:
                    self._url_refusals[url] = None

        if todo:
            await asyncio.gather(*(one(u, cid) for u, cid in todo))

    def _diff(self, c: _Checked, batch: _Batch, report: ImportReport) -> None:
        """Sort a checked row into the report, and into ``batch`` if it writes."""
        row = c.row
        writing = not self._options.dry_run
        options_json = orjson.dumps(c.options).decode()
        if c.current is None:
            report.added.append(Entry(row.where, c.cloud_id))
            batch.adds += 1
            if writing:
                batch.records.append((c.cloud_id, c.email, c.driver, c.url, options_json,
                                      self._seal(c), c.interval_s, c.enabled, None))
            return
        rec, sealed = c.current
        differs = [name for name in _COMPARED if not _same(name, getattr(c, name),
                                                           getattr(rec, name))]
        if row.secret is not None and not self._same_secret(sealed, rec, row.secret):
            differs.append("password")
        if not differs:
            report.unchanged += 1
            return
        entry = Entry(row.where, c.cloud_id, tuple(differs))
        if not self._options.update:
            report.existing.append(entry)
            return
        report.changed.append(entry)
        batch.changes += 1
        if writing:
            # A new password is sealed afresh, bound to the device's (maybe new)
            # driver and URL; without one the sealed password stays (check_move
            # made sure neither moved).
            batch.records.append((c.cloud_id, c.email, c.driver, c.url, options_json,
                                  self._seal(c) if row.secret is not None else None,
                                  c.interval_s, c.enabled, rec.updated_at))

    def _seal(self, c: _Checked) -> bytes:
        assert c.row.secret is not None
        return self._box.seal(c.row.secret, cloud_id=c.cloud_id, driver=c.driver, url=c.url)

    def _same_secret(self, sealed: bytes, rec: DeviceRecord, secret: str) -> bool:
        try:
            return self._box.open(sealed, cloud_id=rec.cloud_id, driver=rec.driver,
                                  url=rec.url) == secret
        except SecretKeyError:  # sealed with another key: the row's password replaces it
            return False

    async def _write(self, batch: _Batch) -> None:
        conn = self._conn
        async with conn.transaction():
            if self._options.write_timeout_s is not None:
                await conn.execute("SELECT set_config('statement_timeout', $1, true)",
                                   f"{max(1, round(self._options.write_timeout_s * 1000))}")
            await conn.execute(_TEMP_SQL)
            await conn.copy_records_to_table("poller_import", records=self._paced(batch),
                                             columns=_TEMP_COLUMNS)
            await conn.execute("ANALYZE poller_import")
            added = await conn.fetchval(_INSERT_SQL)
            changed = await conn.fetchval(_UPDATE_SQL)
            if added != batch.adds or changed != batch.changes:
                raise ImportFailed(
                    f"{batch.adds - added + batch.changes - changed} device(s) were "
                    "registered, changed or removed by someone else since the rows were "
                    "checked")
            # One notification a batch: a running serve resyncs once for all of it.
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, RESYNC_ALL)

    async def _paced(self, batch: _Batch) -> AsyncIterator[tuple[Any, ...]]:
        # COPY encodes a plain list in one go, without a pause between rows.
        for record in batch.records:
            await self._pace.tick()
            yield record


def _new_url(c: _Checked) -> bool:
    """Is ``c``'s URL one to check against the policy (as ``update`` does:
    a new device's, or one that changes)?"""
    return c.url is not None and (c.current is None or c.current[0].url != c.url)


def _same(name: str, new: Any, old: Any) -> bool:
    if name == "interval_s":  # a Postgres real: compare as 4-byte floats
        return bool(struct.pack("<f", new) == struct.pack("<f", old))
    return bool(new == old)


def _refusal(row: FleetRow, reason: str) -> BadRow:
    return BadRow(row.where, scrub(row.cloud_id, row.secret), scrub(reason, row.secret) or "")


def _order(bad: BadRow) -> tuple[int, str]:
    ref = bad.where.ref
    return (ref, "") if isinstance(ref, int) else (0, ref)

