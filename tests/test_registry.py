"""Migrations and the device registry against the real embedded Postgres, and
the CLI commands end to end (exit codes, one-line errors, no secret anywhere)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from poller import migrate, sealing
from poller.errors import ConflictError, NotFoundError, SecretKeyError, UsageError
from poller.registry import Registry
from poller.stack import pg_bin_dir
from tests.stackfix import RunningStack, fresh_database_url

PASSWORD = "Plaintext-Canary-7c1d9e"


async def _migrated(url: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(url)
    await migrate.migrate(conn)
    return conn


async def test_migrations_apply_once_in_order(fresh_db: str) -> None:
    conn = await asyncpg.connect(fresh_db)
    try:
        first = await migrate.migrate(conn)
        assert first == [m.name for m in migrate.discover()]
        assert await migrate.migrate(conn) == []  # idempotent
        versions = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in versions] == [m.version for m in migrate.discover()]
        parts = await conn.fetchval(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'readings'::regclass")
        assert parts >= 4  # partitions created ahead
        assert await migrate.ensure_partitions(conn, days_ahead=10) > 0
    finally:
        await conn.close()


async def test_concurrent_migrators_do_not_collide(fresh_db: str) -> None:
    conns = [await asyncpg.connect(fresh_db) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate.migrate(c) for c in conns))
        applied = [name for r in results for name in r]
        assert sorted(applied) == sorted(m.name for m in migrate.discover())
    finally:
        for c in conns:
            await c.close()


async def test_changed_applied_migration_is_refused(fresh_db: str, tmp_path: Path) -> None:
    conn = await _migrated(fresh_db)
    try:
        edited = [migrate.Migration(m.version, m.name, m.sql + "\n-- edited")
                  for m in migrate.discover()]
        with pytest.raises(migrate.MigrationError, match="changed after it was applied"):
            await migrate.migrate(conn, edited)
    finally:
        await conn.close()


async def test_registry_round_trip_and_rejections(fresh_db: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    conn = await _migrated(fresh_db)
    box = sealing.SecretBox(sealing.generate_key())
    reg = Registry(conn, box)
    try:
        rec = await reg.add("00CE69", email="owner@example.com", driver="eagle-cloud", url=None,
                            interval_s=6, options={}, secret=PASSWORD)
        assert rec.cloud_id == "00ce69"
        # A device never changed holds one datetime for both (48 B a device).
        assert rec.created_at is rec.updated_at
        with pytest.raises(ConflictError, match="already registered"):
            await reg.add("00ce69", email="owner@example.com", driver="eagle-cloud", url=None,
                          interval_s=6, options={}, secret=PASSWORD)
        for bad in (dict(cloud_id="xyz"), dict(email="not-an-email"),
                    dict(url="ftp://host"), dict(url="http://user:pw@host"),
                    dict(driver="nope"), dict(interval_s=0)):
            args: dict[str, Any] = dict(cloud_id="00ab12", email="a@b.example",
                                        driver="eagle-cloud", url=None, interval_s=6.0,
                                        options={}, secret=PASSWORD)
            args.update(bad)
            cid = args.pop("cloud_id")
            with pytest.raises(UsageError):
                await reg.add(str(cid), **args)
        updated = await reg.update("00ce69", interval_s=10, secret="new-secret")
        assert updated.interval_s == 10
        assert updated.updated_at > updated.created_at == rec.created_at
        specs = await reg.specs()
        assert specs[rec.id][1].secret == "new-secret"
        assert [r.cloud_id for r in await reg.listing()] == ["00ce69"]
        await reg.remove("00ce69")
        assert await reg.listing() == []
        with pytest.raises(NotFoundError):
            await reg.remove("00ce69")
        with pytest.raises(NotFoundError):
            await reg.update("00ce69", interval_s=3)
        sealed = await conn.fetchval("SELECT sealed_secret FROM devices WHERE id = $1", rec.id)
        assert sealed is None  # wiped on removal
        again = await reg.add("00ce69", email="owner@example.com", driver="eagle-cloud",
                              url=None, interval_s=6, options={}, secret=PASSWORD)
        assert again.id != rec.id  # re-registration is a new device; old readings keep theirs
        # A wrong key: the device is skipped with a clear error, the rest goes on.
        wrong = Registry(conn, sealing.SecretBox(sealing.generate_key()))
        assert await wrong.specs() == {}
        assert "sealed with another key" in caplog.text
        sealed = await conn.fetchval("SELECT sealed_secret FROM devices WHERE id = $1", again.id)
        with pytest.raises(SecretKeyError, match="another key"):
            sealing.SecretBox(sealing.generate_key()).open(
                sealed, cloud_id="00ce69", driver="eagle-cloud", url=None)
    finally:
        await conn.close()


async def _sealed(conn: asyncpg.Connection, cloud_id: str) -> bytes:
    sealed: bytes = await conn.fetchval(
        "SELECT sealed_secret FROM devices WHERE cloud_id = $1 AND removed_at IS NULL", cloud_id)
    return sealed


async def test_moving_a_device_needs_its_password_again(fresh_db: str) -> None:
    conn = await _migrated(fresh_db)
    box = sealing.SecretBox(sealing.generate_key())
    reg = Registry(conn, box)
    try:
        rec = await reg.add("00ab12", email="a@b.example", driver="eagle-local",
                            url="http://192.168.1.50", interval_s=6, options={}, secret=PASSWORD)
        old = await _sealed(conn, "00ab12")
        for change in (dict(url="http://192.168.1.51"), dict(url="https://192.168.1.50"),
                       dict(clear_url=True, driver="eagle-cloud"), dict(driver="http-json")):
            with pytest.raises(UsageError, match="needs its password again") as caught:
                await reg.update("00ab12", **change)
            assert "never sent to a new address" in str(caught.value)
        after = await reg.get("00ab12")
        assert (after.url, after.driver, after.updated_at) == (rec.url, rec.driver,
                                                               rec.updated_at)
        assert await _sealed(conn, "00ab12") == old
        # What does not move the password needs none (the same URL given again too).
        await reg.update("00ab12", interval_s=10, url="http://192.168.1.50")
        # With the password: moved, and the old value does not open for the new URL.
        await reg.update("00ab12", url="http://192.168.1.51", secret="new-" + PASSWORD)
        new = await _sealed(conn, "00ab12")
        with pytest.raises(SecretKeyError, match="driver or URL changed"):
            box.open(old, cloud_id="00ab12", driver="eagle-local", url="http://192.168.1.51")
        assert box.open(new, cloud_id="00ab12", driver="eagle-local",
                        url="http://192.168.1.51") == "new-" + PASSWORD
        assert (await reg.specs())[rec.id][1].secret == "new-" + PASSWORD
        # A row whose URL was changed behind the registry's back (SQL) is skipped:
        # its password would go to the new address.
        await conn.execute("UPDATE devices SET url = 'http://10.66.0.1' WHERE id = $1", rec.id)
        assert await reg.specs() == {}
    finally:
        await conn.close()


def _legacy(key: bytes, secret: str, cloud_id: str) -> bytes:
    """A secret as format 1 sealed it: bound to the device's id only."""
    nonce = os.urandom(12)
    return (b"\x01" + sealing.key_id(key) + nonce
            + AESGCM(key).encrypt(nonce, secret.encode(), cloud_id.encode()))


async def test_format_1_secrets_are_sealed_again_bound_to_driver_and_url(
        fresh_db: str) -> None:
    key = sealing.generate_key()
    box = sealing.SecretBox(key)
    conn = await _migrated(fresh_db)
    reg = Registry(conn, box)
    try:
        enabled = await reg.add("00ab01", email="a@b.example", driver="eagle-local",
                                url="http://192.168.1.50", interval_s=6, options={},
                                secret="x")
        await reg.add("00ab02", email="a@b.example", driver="eagle-cloud", url=None,
                      interval_s=6, options={}, secret="x", enabled=False)
        await reg.add("00ab03", email="a@b.example", driver="eagle-cloud", url=None,
                      interval_s=6, options={}, secret="x", enabled=False)
        for cid, sealed in (("00ab01", _legacy(key, "pw-1", "00ab01")),
                            ("00ab02", _legacy(key, "pw-2", "00ab02")),
                            ("00ab03", _legacy(sealing.generate_key(), "pw-3", "00ab03"))):
            await conn.execute("UPDATE devices SET sealed_secret = $2 WHERE cloud_id = $1",
                               cid, sealed)
        assert await Registry.legacy_secrets(conn) == 3
        before = await reg.get("00ab01")
        # serve's load opens it and stores it in format 2, without a registry change.
        assert (await reg.specs())[enabled.id][1].secret == "pw-1"
        now = await _sealed(conn, "00ab01")
        assert not box.is_legacy(now)
        assert box.open(now, cloud_id="00ab01", driver="eagle-local",
                        url="http://192.168.1.50") == "pw-1"
        assert (await reg.get("00ab01")).updated_at == before.updated_at
        # The rest (disabled devices): what poller migrate runs. One does not open.
        assert await reg.reseal_legacy() == (1, 1)
        assert box.open(await _sealed(conn, "00ab02"), cloud_id="00ab02",
                        driver="eagle-cloud", url=None) == "pw-2"
        assert await Registry.legacy_secrets(conn) == 1
        assert box.is_legacy(await _sealed(conn, "00ab03"))
    finally:
        await conn.close()


def _cli(args: list[str], env: dict[str, str], stdin: str | None = None,
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "poller", *args], input=stdin,
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=120)


def test_cli_registry_commands_and_no_plaintext_anywhere(stack: RunningStack,
                                                         tmp_path: Path) -> None:
    db_url = fresh_database_url(stack.info)
    env = {"POLLER_STATE_DIR": str(tmp_path / "state"), "POLLER_DATABASE_URL": db_url,
           "POLLER_REDIS_URL": stack.info.redis_url,
           "POLLER_S3_ENDPOINT_URL": stack.info.s3_endpoint_url, "POLLER_LOG_LEVEL": "debug"}
    logs: list[str] = []

    def run(args: list[str], stdin: str | None = None, code: int = 0) -> str:
        out = _cli(args, env, stdin)
        logs.append(out.stdout + out.stderr)
        assert out.returncode == code, (args, out.stdout, out.stderr)
        return out.stdout + out.stderr

    run(["add-user", "00ce69", "--email", "owner@example.com", "--password-stdin"],
        PASSWORD + "\n")
    assert "already registered" in run(
        ["add-user", "00ce69", "--email", "owner@example.com", "--password-stdin"],
        PASSWORD + "\n", code=2)
    for bad in (["add-user", "zz", "--email", "a@b.example", "--password-stdin"],
                ["add-user", "00ab12", "--email", "nope", "--password-stdin"],
                ["add-user", "00ab12", "--email", "a@b.example", "--url", "http://h:99999",
                 "--password-stdin"],
                ["update-user", "00ab99", "--interval", "5"],
                ["remove-user", "00ab99"],
                ["add-user", "00ab12", "--email", "a@b.example", "--interval", "-1",
                 "--password-stdin"]):
        text = run(bad, PASSWORD + "\n", code=2)
        assert text.strip().count("\n") == 0, text  # one line
    # Without a terminal and without --password-stdin there is no password.
    assert "--password-stdin" in run(["add-user", "00ab12", "--email", "a@b.example"], "",
                                     code=2)
    listing = json.loads(run(["list-users", "--json"]))
    assert [d["cloud_id"] for d in listing] == ["00ce69"]
    assert "secret" not in json.dumps(listing)
    run(["update-user", "00ce69", "--interval", "12", "--disable"])
    assert json.loads(run(["list-users", "--json"]))[0]["interval_s"] == 12
    assert "00ce69" in run(["list-users"])
    run(["remove-user", "00ce69"])
    run(["add-user", "00ce69", "--email", "owner@example.com", "--password-stdin"],
        PASSWORD + "\n")

    dump = subprocess.run([str(pg_bin_dir() / "pg_dump"), "--data-only", db_url],
                          capture_output=True, timeout=120, check=True).stdout
    assert b"00ce69" in dump  # the dump is real
    assert PASSWORD.encode() not in dump
    client = redis.Redis.from_url(stack.info.redis_url)
    try:
        for key in client.scan_iter(count=1000):
            value = client.dump(key)
            assert value is None or PASSWORD.encode() not in value
    finally:
        client.close()
    assert all(PASSWORD not in text for text in logs)
    key_file = tmp_path / "state" / sealing.KEY_FILE_NAME
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"


def test_cli_moves_a_device_only_with_its_password_and_migrate_reseals(
        stack: RunningStack, tmp_path: Path) -> None:
    db_url = fresh_database_url(stack.info)
    state = tmp_path / "state"
    env = {"POLLER_STATE_DIR": str(state), "POLLER_DATABASE_URL": db_url,
           "POLLER_REDIS_URL": stack.info.redis_url,
           "POLLER_S3_ENDPOINT_URL": stack.info.s3_endpoint_url}

    def run(args: list[str], stdin: str | None = None, code: int = 0) -> str:
        out = _cli(args, env, stdin)
        assert out.returncode == code, (args, out.stdout, out.stderr)
        assert PASSWORD not in out.stdout + out.stderr
        return out.stdout + out.stderr

    run(["add-user", "00ab12", "--email", "a@b.example", "--driver", "eagle-local",
         "--url", "http://192.168.1.50", "--password-stdin"], PASSWORD + "\n")
    for move in (["--url", "http://192.168.1.66"], ["--driver", "http-json"]):
        text = run(["update-user", "00ab12", *move], code=2)
        assert text.strip().count("\n") == 0, text  # one line
        assert "needs its password again" in text and "--password-stdin" in text
    assert json.loads(run(["list-users", "--json"]))[0]["url"] == "http://192.168.1.50"
    run(["update-user", "00ab12", "--url", "http://192.168.1.66", "--password-stdin"],
        PASSWORD + "\n")
    assert json.loads(run(["list-users", "--json"]))[0]["url"] == "http://192.168.1.66"

    # A secret left in format 1 (sealed before the URL was bound): migrate seals it again.
    key = sealing.load_key(state, env={}, create=False)

    async def make_legacy() -> bytes:
        conn = await asyncpg.connect(db_url)
        try:
            await conn.execute("UPDATE devices SET sealed_secret = $1 WHERE cloud_id = '00ab12'",
                               _legacy(key, PASSWORD, "00ab12"))
            return await _sealed(conn, "00ab12")
        finally:
            await conn.close()

    async def sealed_now() -> bytes:
        conn = await asyncpg.connect(db_url)
        try:
            return await _sealed(conn, "00ab12")
        finally:
            await conn.close()

    assert sealing.SecretBox.is_legacy(asyncio.run(make_legacy()))
    assert "sealed 1 device secret(s) again" in run(["migrate"])
    resealed = asyncio.run(sealed_now())
    assert sealing.SecretBox(key).open(resealed, cloud_id="00ab12", driver="eagle-local",
                                       url="http://192.168.1.66") == PASSWORD
    assert "sealed" not in run(["migrate"])  # once
