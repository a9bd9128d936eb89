"""The device registry: who is polled, how, and with which sealed credentials.

Every change commits in one transaction together with a ``NOTIFY`` on
:data:`CHANNEL`, so a running ``serve`` picks it up at once; nothing is ever
half-written. Records returned from here never carry a secret.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from ipaddress import ip_address
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import asyncpg
import orjson

from poller.config import EVERY_DEVICE, Shard
from poller.db import Conn
from poller.drivers import get_driver
from poller.drivers.base import DeviceSpec
from poller.drivers.eagle_cloud import DEFAULT_CLOUD_BASE_URL
from poller.errors import ConflictError, NotFoundError, SecretKeyError, UsageError
from poller.netpolicy import NetPolicy, literal_address
from poller.sealing import SecretBox
from poller.sealing import load_key as sealing_load_key

log = logging.getLogger("poller.registry")
CHANNEL = "poller_devices"
RESYNC_ALL = "*"
"""Notification payload asking a running serve for a full resync."""
DRIVER_NAMES = ("eagle-cloud", "eagle-local", "http-json")
EAGLE_DRIVERS = ("eagle-cloud", "eagle-local")
_EAGLE_ID_RE = re.compile(r"^[0-9a-fA-F]{6}$")
_GENERIC_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
_EMAIL_RE = re.compile(r"^[^@\s<>\"',;]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+$")
MIN_INTERVAL_S = 0.1
MAX_INTERVAL_S = 86400.0
RESOLVE_TIMEOUT_S = 5.0
"""How long registration waits for a device's host name to resolve."""
_DEFAULT_POLICY = NetPolicy.default()

_COLUMNS = ("id, cloud_id, email, driver, url, options, interval_s, enabled, "
            "created_at, updated_at")


class Row(Protocol):
    """A registry row read by column name: an asyncpg Record (which is not a
    Mapping: it iterates values), or a dict decoded from the snapshot."""

    def __getitem__(self, column: str, /) -> Any: ...


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """A registered device as operators see it: no credentials, ever."""

    id: int
    cloud_id: str
    email: str
    driver: str
    url: str | None
    options: dict[str, Any]
    interval_s: float
    enabled: bool
    created_at: datetime
    updated_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "cloud_id": self.cloud_id, "email": self.email,
            "driver": self.driver, "url": self.url, "options": self.options,
            "interval_s": self.interval_s, "enabled": self.enabled,
            "created_at": self.created_at.isoformat(), "updated_at": self.updated_at.isoformat(),
        }


_NO_OPTIONS: dict[str, Any] = {}
"""Shared by every record without options; records are never mutated."""


def _record(row: Row) -> DeviceRecord:
    options = row["options"]
    if isinstance(options, str):
        options = orjson.loads(options)
    url = row["url"]
    interval = float(row["interval_s"])
    if len(_INTERVALS) < 1024:
        interval = _INTERVALS.setdefault(interval, interval)
    created, updated = row["created_at"], row["updated_at"]
    if created == updated:  # never changed since it was added: one datetime (48 B)
        created = updated
    # Driver names, shared endpoint URLs and intervals repeat across a fleet:
    # one object each instead of one per device.
    return DeviceRecord(row["id"], row["cloud_id"], row["email"], sys.intern(row["driver"]),
                        None if url is None else sys.intern(url), options or _NO_OPTIONS,
                        interval, row["enabled"], created, updated)


_INTERVALS: dict[float, float] = {}


# -- validation -------------------------------------------------------------

def check_driver(driver: str) -> str:
    if driver not in DRIVER_NAMES:
        raise UsageError(f"unknown driver {driver!r} (expected one of {', '.join(DRIVER_NAMES)})")
    return driver


def check_cloud_id(cloud_id: str, driver: str) -> str:
    # fullmatch: with match() and "$" a trailing newline would pass.
    if driver in EAGLE_DRIVERS:
        if not _EAGLE_ID_RE.fullmatch(cloud_id):
            raise UsageError(f"malformed cloud id {cloud_id!r}: a Rainforest cloud id is "
                             "6 hexadecimal digits, such as 00ce69")
        return cloud_id.lower()
    if not _GENERIC_ID_RE.fullmatch(cloud_id):
        raise UsageError(f"malformed device id {cloud_id!r}: expected 1-64 of "
                         "A-Z a-z 0-9 _ . : - starting with a letter or digit")
    return normalise_id(cloud_id)


def check_email(email: str, driver: str) -> str:
    if not email and driver not in EAGLE_DRIVERS:
        return ""
    if len(email) > 254 or not _EMAIL_RE.fullmatch(email):
        raise UsageError(f"malformed email {email!r}: expected an address such as "
                         "name@example.com")
    return email


def check_url(url: str | None, driver: str) -> str | None:
    if url is None or url == "":
        if driver != "eagle-cloud":
            raise UsageError(f"driver {driver} needs --url (the device's address)")
        return None
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise UsageError(f"malformed URL {url!r}: the port is not a number 1-65535") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"malformed URL {url!r}: expected http(s)://host[:port][/path]")
    if parts.username is not None or parts.password is not None:
        raise UsageError("URLs may not carry credentials (they would show in listings); "
                         "give the password at the prompt or with --password-stdin")
    if port == 0 or any(c.isspace() for c in url):
        raise UsageError(f"malformed URL {url!r}")
    return url


def check_url_policy(url: str | None, policy: NetPolicy) -> str | None:
    """Refuse (UsageError) a URL whose host ``policy`` refuses as written: an
    address it denies, a metadata service's name, a legacy numeric form.
    ``url`` as :func:`check_url` returns it. Returns the host name still to
    resolve, None if there is none."""
    if url is None:
        return None
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    refusal = policy.host_refusal(host, port)
    if refusal is not None:
        raise UsageError(f"URL {url!r} refused: {refusal}")
    if literal_address(host) is not None or policy.trusts(host, port):
        return None
    return host


async def check_url_addresses(url: str | None, policy: NetPolicy, cloud_id: str) -> None:
    """:func:`check_url_policy`, then every address the host name resolves to
    now: one that the policy refuses refuses the URL.

    A name that does not resolve now is accepted with a warning: registration
    may run where the device's name is unknown (an admin host, split DNS, a
    gateway not installed yet), and refusing it would protect nothing, since
    a name can change what it resolves to after any check. The check that
    holds is the transports': every connection, made to an address the policy
    allows or not at all."""
    host = check_url_policy(url, policy)
    if host is None:
        return
    assert url is not None
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        reason = getattr(exc, "strerror", None) or "no answer in time"
        log.warning("device %s: %s does not resolve now (%s); registered anyway, each "
                    "connection is checked against polling.allowed_networks and "
                    "polling.denied_networks when it is made", cloud_id, host, reason)
        return
    for info in infos:
        address = str(info[4][0])
        refusal = policy.address_refusal(ip_address(address))
        if refusal is not None:
            raise UsageError(f"URL {url!r} refused: {host} resolves to {address}; {refusal}")


def check_interval(interval_s: float) -> float:
    if not (MIN_INTERVAL_S <= interval_s <= MAX_INTERVAL_S):
        raise UsageError(f"interval must be between {MIN_INTERVAL_S:g} and "
                         f"{MAX_INTERVAL_S:g} seconds, got {interval_s:g}")
    return interval_s


def check_secret(secret: str) -> str:
    if not secret:
        raise UsageError("the device password or install code is empty")
    if len(secret) > 256 or any(c in secret for c in "\r\n\x00"):
        raise UsageError("the device password must be one line of at most 256 characters")
    return secret


def check_options(driver: str, cloud_id: str, email: str, url: str | None,
                  options: dict[str, Any], secret: str | None) -> dict[str, Any]:
    """Refuse now what the driver would refuse when polling starts: http-json
    fields, scales, method and body, a password an HTTP header cannot carry.
    The driver's own ``session()`` decides, so the two never disagree.
    ``secret`` None: the stored one, already checked when it was set."""
    if secret is not None:
        check_secret(secret)
    spec = DeviceSpec(0, cloud_id, email, "x" if secret is None else secret, url, options)
    try:
        get_driver(driver, cloud_base_url=DEFAULT_CLOUD_BASE_URL).session(spec)
    except (ValueError, TypeError) as exc:
        # Driver messages name the field, never the value (it may be the secret).
        raise UsageError(f"device {cloud_id} ({driver}): {exc}") from None
    return options


def check_device(cloud_id: str, *, email: str, driver: str, url: str | None,
                 interval_s: float, options: dict[str, Any], secret: str | None,
                 ) -> tuple[str, str, str, str | None, float]:
    """Every check of a registration that needs no server (all of
    :meth:`Registry.add`'s but resolving the URL's host): the normalised
    ``(cloud_id, email, driver, url, interval_s)``. ``secret`` None: the
    stored one is kept. ``poller import`` checks each row with it."""
    driver = check_driver(driver)
    cloud_id = check_cloud_id(cloud_id, driver)
    email = check_email(email, driver)
    url = check_url(url, driver)
    interval_s = check_interval(interval_s)
    check_options(driver, cloud_id, email, url, options, secret)
    return cloud_id, email, driver, url, interval_s


def check_move(current: DeviceRecord, driver: str, url: str | None,
               secret: str | None) -> None:
    """Refuse to point a stored password at a new URL or driver: moving a
    device needs its password again (the sealed one is bound to both)."""
    if secret is None and (url != current.url or driver != current.driver):
        what = "URL" if url != current.url else "driver"
        raise UsageError(
            f"changing the {what} of {current.cloud_id} needs its password again "
            "(update-user --change-password or --password-stdin; \"password\" in "
            "the API or the import file): a stored password is never sent to a new address")


async def sealed_count(conn: Conn) -> int:
    """Devices holding sealed credentials (removal wipes them): while any do,
    a lost key file must not be replaced by a new key (:func:`load_key`)."""
    count: int = await conn.fetchval(
        "SELECT count(*) FROM devices WHERE sealed_secret IS NOT NULL")
    return count


async def registry_key(conn: Conn, state_dir: Path) -> bytes:
    """The sealing key for this registry (:func:`poller.sealing.load_key`),
    refusing to make a new one while the registry holds sealed credentials."""
    return sealing_load_key(state_dir, sealed=await sealed_count(conn))


# -- operations -------------------------------------------------------------

class Registry:
    """Device registry operations over one connection.

    >>> reg = Registry(conn, SecretBox(key), NetPolicy.from_settings(s.polling))  # doctest: +SKIP
    >>> await reg.add("00ce69", email="a@b.example", driver="eagle-cloud",
    ...               url=None, interval_s=6, options={}, secret="...")  # doctest: +SKIP

    ``policy`` decides which device URLs may be registered (default: the
    built-in one, which refuses loopback, link-local and the like).
    """

    def __init__(self, conn: Conn, box: SecretBox,
                 policy: NetPolicy | None = None) -> None:
        self._conn = conn
        self._box = box
        self._policy = policy if policy is not None else _DEFAULT_POLICY

    async def add(self, cloud_id: str, *, email: str, driver: str, url: str | None,
                  interval_s: float, options: dict[str, Any], secret: str,
                  enabled: bool = True) -> DeviceRecord:
        cloud_id, email, driver, url, interval_s = check_device(
            cloud_id, email=email, driver=driver, url=url, interval_s=interval_s,
            options=options, secret=check_secret(secret))
        await check_url_addresses(url, self._policy, cloud_id)
        sealed = self._box.seal(secret, cloud_id=cloud_id, driver=driver, url=url)
        async with self._conn.transaction():
            try:
                row = await self._conn.fetchrow(
                    f"""INSERT INTO devices (cloud_id, email, driver, url, options,
                                             sealed_secret, interval_s, enabled)
                        VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8)
                        RETURNING {_COLUMNS}""",
                    cloud_id, email, driver, url, orjson.dumps(options).decode(), sealed,
                    interval_s, enabled)
            except asyncpg.UniqueViolationError:
                raise ConflictError(f"device {cloud_id} is already registered "
                                    "(use update-user to change it)") from None
            assert row is not None  # INSERT ... RETURNING returns the row it inserted
            await self._notify(cloud_id)
        return _record(row)

    async def update(self, cloud_id: str, *, email: str | None = None,
                     driver: str | None = None, url: str | None = None, clear_url: bool = False,
                     interval_s: float | None = None, enabled: bool | None = None,
                     options: dict[str, Any] | None = None,
                     secret: str | None = None) -> DeviceRecord:
        async with self._conn.transaction():
            row = await self._conn.fetchrow(
                f"SELECT {_COLUMNS}, sealed_secret FROM devices WHERE cloud_id = $1 "
                "AND removed_at IS NULL FOR UPDATE", normalise_id(cloud_id))
            if row is None:
                raise NotFoundError(f"no device {cloud_id!r} is registered")
            current = _record(row)
            new_driver = check_driver(driver) if driver is not None else current.driver
            check_cloud_id(current.cloud_id, new_driver)
            new_email = check_email(email if email is not None else current.email, new_driver)
            new_url = check_url(None if clear_url else (url if url is not None else current.url),
                                new_driver)
            new_interval = check_interval(interval_s) if interval_s is not None \
                else current.interval_s
            check_move(current, new_driver, new_url, secret)
            check_options(new_driver, current.cloud_id, new_email, new_url,
                          current.options if options is None else options, secret)
            if new_url != current.url:
                await check_url_addresses(new_url, self._policy, current.cloud_id)
            sets = ["email = $2", "driver = $3", "url = $4", "interval_s = $5", "enabled = $6",
                    "options = $7::jsonb", "updated_at = now()"]
            args: list[Any] = [current.cloud_id, new_email, new_driver, new_url, new_interval,
                               current.enabled if enabled is None else enabled,
                               orjson.dumps(current.options if options is None else options)
                               .decode()]
            sealed: bytes | None = None
            if secret is not None:
                sealed = self._box.seal(check_secret(secret), cloud_id=current.cloud_id,
                                        driver=new_driver, url=new_url)
            elif row["sealed_secret"] is not None and self._box.is_legacy(row["sealed_secret"]):
                sealed = self._reseal(row)
            if sealed is not None:
                sets.append("sealed_secret = $8")
                args.append(sealed)
            row = await self._conn.fetchrow(
                f"UPDATE devices SET {', '.join(sets)} WHERE cloud_id = $1 "
                f"AND removed_at IS NULL RETURNING {_COLUMNS}", *args)
            assert row is not None  # locked FOR UPDATE above: still there
            await self._notify(current.cloud_id)
        return _record(row)

    async def remove(self, cloud_id: str) -> DeviceRecord:
        """Stop polling a device and wipe its credentials; its readings stay."""
        async with self._conn.transaction():
            row = await self._conn.fetchrow(
                f"""UPDATE devices SET removed_at = now(), updated_at = now(),
                           enabled = false, sealed_secret = NULL
                    WHERE cloud_id = $1 AND removed_at IS NULL RETURNING {_COLUMNS}""",
                normalise_id(cloud_id))
            if row is None:
                raise NotFoundError(f"no device {cloud_id!r} is registered")
            await self._notify(row["cloud_id"])
        return _record(row)

    async def get(self, cloud_id: str) -> DeviceRecord:
        row = await self._conn.fetchrow(
            f"SELECT {_COLUMNS} FROM devices WHERE cloud_id = $1 AND removed_at IS NULL",
            normalise_id(cloud_id))
        if row is None:
            raise NotFoundError(f"no device {cloud_id!r} is registered")
        return _record(row)

    async def listing(self, *, limit: int | None = None, after_id: int = 0) -> list[DeviceRecord]:
        rows = await self._conn.fetch(
            f"SELECT {_COLUMNS} FROM devices WHERE removed_at IS NULL AND id > $1 "
            "ORDER BY id LIMIT $2", after_id, limit)
        return [_record(r) for r in rows]

    async def by_ids(self, ids: list[int]) -> list[DeviceRecord]:
        """The registered (not removed) devices among ``ids``, by id."""
        rows = await self._conn.fetch(
            f"SELECT {_COLUMNS} FROM devices WHERE removed_at IS NULL "
            "AND id = ANY($1::bigint[]) ORDER BY id", ids)
        return [_record(r) for r in rows]

    async def existing(self, cloud_ids: list[str]) -> dict[str, tuple[DeviceRecord, bytes]]:
        """The registered devices among ``cloud_ids`` (as stored, see
        :func:`normalise_id`) with their sealed secrets, by cloud id: what
        ``poller import`` compares its rows with."""
        rows = await self._conn.fetch(
            f"SELECT {_COLUMNS}, sealed_secret FROM devices WHERE removed_at IS NULL "
            "AND cloud_id = ANY($1::text[])", cloud_ids)
        return {r["cloud_id"]: (_record(r), r["sealed_secret"]) for r in rows}

    async def specs(self, *, ids: list[int] | None = None,
                    cloud_ids: list[str] | None = None,
                    ) -> dict[int, tuple[DeviceRecord, DeviceSpec]]:
        """Enabled devices with their credentials opened, for the poller only.

        ``ids`` / ``cloud_ids`` narrow the query; by default: every device."""
        where, args = "", list[object]()
        if ids is not None:
            where, args = " AND id = ANY($1::bigint[])", [ids]
        elif cloud_ids is not None:
            where, args = " AND cloud_id = ANY($1::text[])", [cloud_ids]
        rows = await self._conn.fetch(
            f"SELECT {_COLUMNS}, sealed_secret FROM devices "
            f"WHERE removed_at IS NULL AND enabled{where} ORDER BY id", *args)
        out = {}
        legacy: list[tuple[int, bytes, bytes]] = []
        for row in rows:
            opened = open_row(row, self._box)
            if opened is not None:
                rec, spec = opened
                out[rec.id] = opened
                if self._box.is_legacy(row["sealed_secret"]):
                    legacy.append((rec.id, self._box.seal(spec.secret, cloud_id=rec.cloud_id,
                                                          driver=rec.driver, url=rec.url),
                                   row["sealed_secret"]))
        if legacy:
            await self._store_resealed(legacy)
        return out

    @staticmethod
    async def legacy_secrets(conn: Conn) -> int:
        """How many registered devices hold a secret in format 1 (no key needed)."""
        count: int = await conn.fetchval(
            "SELECT count(*) FROM devices WHERE removed_at IS NULL "
            "AND sealed_secret IS NOT NULL AND get_byte(sealed_secret, 0) = 1")
        return count

    async def reseal_legacy(self) -> tuple[int, int]:
        """Seal every format-1 secret (bound to the device's id only) again in
        format 2, bound to its driver and URL as registered now: ``(sealed
        again, left as they are because they do not open with this key)``.

        ``poller migrate`` runs it; ``serve`` does the same for each device it
        loads (:meth:`specs`) and an update for the device it changes."""
        rows = await self._conn.fetch(
            f"SELECT {_COLUMNS}, sealed_secret FROM devices WHERE removed_at IS NULL "
            "AND sealed_secret IS NOT NULL AND get_byte(sealed_secret, 0) = 1")
        done = [(row["id"], sealed, row["sealed_secret"])
                for row in rows if (sealed := self._reseal(row)) is not None]
        if done:
            await self._store_resealed(done)
        return len(done), len(rows) - len(done)

    def _reseal(self, row: Row) -> bytes | None:
        """A format-1 secret of ``row`` in format 2; None if it does not open."""
        try:
            secret = self._box.open(row["sealed_secret"], cloud_id=row["cloud_id"],
                                    driver=row["driver"], url=row["url"])
        except SecretKeyError as exc:
            log.warning("device %s: its secret is left in format 1: %s", row["cloud_id"], exc)
            return None
        return self._box.seal(secret, cloud_id=row["cloud_id"], driver=row["driver"],
                              url=row["url"])

    async def _store_resealed(self, resealed: list[tuple[int, bytes, bytes]]) -> None:
        # Only where the old value is still there: a concurrent update wins.
        # updated_at stays: nothing a running serve polls with has changed.
        try:
            await self._conn.executemany(
                "UPDATE devices SET sealed_secret = $2 WHERE id = $1 AND sealed_secret = $3",
                resealed)
        except asyncpg.PostgresError as exc:  # a read-only replica, say: polling goes on
            log.warning("could not store %d secret(s) sealed again in format 2: %s",
                        len(resealed), exc)
        else:
            log.info("sealed %d secret(s) again, bound to driver and URL", len(resealed))

    async def sealed_rows(self, *, shard: Shard = EVERY_DEVICE) -> list[asyncpg.Record]:
        """What :meth:`specs` reads of every enabled device, secrets still
        sealed (for the registry snapshot); ``shard`` as in :meth:`versions`."""
        rows: list[asyncpg.Record] = await self._conn.fetch(
            f"SELECT {_COLUMNS}, sealed_secret FROM devices "
            "WHERE removed_at IS NULL AND enabled AND id % $2 = $1 ORDER BY id", shard.k, shard.n)
        return rows

    async def versions(self, cloud_ids: list[str] | None = None, *,
                       shard: Shard = EVERY_DEVICE) -> dict[int, datetime | None]:
        """Device id -> ``updated_at`` of every enabled device (None: not wanted,
        for rows named in ``cloud_ids`` that are removed or disabled).
        ``shard`` keeps the devices whose id % n == k."""
        if cloud_ids is None:
            rows = await self._conn.fetch(
                "SELECT id, updated_at FROM devices WHERE removed_at IS NULL AND enabled "
                "AND id % $2 = $1", shard.k, shard.n)
            return {r["id"]: r["updated_at"] for r in rows}
        rows = await self._conn.fetch(
            "SELECT id, updated_at, removed_at IS NULL AND enabled AS wanted FROM devices "
            "WHERE cloud_id = ANY($1::text[])", cloud_ids)
        return {r["id"]: (r["updated_at"] if r["wanted"] else None) for r in rows}

    async def upsert_many(self, entries: Sequence[tuple[str, str, str, str | None, float, str]],
                          ) -> int:
        """Register or refresh many devices in one transaction (fleet tooling:
        the simulator, the bench). Each entry: (cloud_id, email, driver, url,
        interval_s, secret). One notification tells a running serve to resync."""
        rows = []
        checked: set[str] = set()
        for cloud_id, email, driver, url, interval_s, secret in entries:
            driver = check_driver(driver)
            cloud_id = check_cloud_id(cloud_id, driver)
            url = check_url(url, driver)
            if url is not None and url not in checked:  # a fleet shares a few URLs
                await check_url_addresses(url, self._policy, cloud_id)
                checked.add(url)
            rows.append((cloud_id, check_email(email, driver), driver, url,
                         self._box.seal(check_secret(secret), cloud_id=cloud_id, driver=driver,
                                        url=url),
                         check_interval(interval_s)))
        async with self._conn.transaction():
            await self._conn.executemany(
                """INSERT INTO devices (cloud_id, email, driver, url, sealed_secret, interval_s)
                   VALUES ($1, $2, $3, $4, $5, $6)
                   ON CONFLICT (cloud_id) WHERE removed_at IS NULL DO UPDATE
                   SET email = EXCLUDED.email, driver = EXCLUDED.driver, url = EXCLUDED.url,
                       sealed_secret = EXCLUDED.sealed_secret,
                       interval_s = EXCLUDED.interval_s, enabled = true, updated_at = now()""",
                rows)
            await self._notify(RESYNC_ALL)
        return len(rows)

    async def _notify(self, cloud_id: str) -> None:
        await self._conn.execute("SELECT pg_notify($1, $2)", CHANNEL, cloud_id)


def open_row(row: Row, box: SecretBox) -> tuple[DeviceRecord, DeviceSpec] | None:
    """A registry row with its sealed secret as the poller's record and spec;
    None (logged) when the secret does not open with this key."""
    rec = _record(row)
    try:
        secret = box.open(row["sealed_secret"], cloud_id=rec.cloud_id, driver=rec.driver,
                          url=rec.url)
    except SecretKeyError as exc:
        # One unreadable secret must not stop the rest of the fleet.
        log.error("device %s skipped: %s", rec.cloud_id, exc)
        return None
    return rec, DeviceSpec(rec.id, rec.cloud_id, rec.email, secret, rec.url, rec.options)


def normalise_id(cloud_id: str) -> str:
    """A device id as the registry stores it: EAGLE ids in lower case."""
    return cloud_id.lower() if _EAGLE_ID_RE.match(cloud_id) else cloud_id
