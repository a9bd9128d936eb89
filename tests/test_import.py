"""Registering fleets (issue 16) against the real stack: ``poller import`` from
CSV, NDJSON and the Rainforest Logger's Redis, ``POST /api/users:import``,
``poller export-users`` and the round trip, batches written whole or not at
all, a running watcher picking each batch up from one notification, and no
password in any output, answer or log."""

from __future__ import annotations

import asyncio
import doctest
import io
import json
import logging
import os
import pty
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import redis

from poller import fleetfile, importcmd, migrate, sealing
from poller.cli import build_parser
from poller.config import PollingSettings
from poller.errors import UsageError
from poller.importer import Importer, ImportOptions, ImportReport
from poller.netpolicy import DEFAULT_DENIED_NETWORKS, LOOPBACK_NETWORKS, NetPolicy
from poller.polling.memsink import MemorySink
from poller.polling.pool import DevicePool
from poller.polling.sync import RegistryWatcher
from poller.registry import CHANNEL, RESYNC_ALL, DeviceRecord, Registry
from poller.stack import pg_bin_dir
from poller.transport import FastHttpClient
from tests.apiview import ADMIN_TOKEN, READ_TOKEN, ApiServer, api_server
from tests.stackfix import RunningStack, fresh_database_url

P = "Canary-" + uuid.uuid4().hex[:12]
"""Every device password here starts with this: found in no output, ever."""
DEFAULT_POLICY = NetPolicy.default()
LOOPBACK = NetPolicy.from_lists(allowed=LOOPBACK_NETWORKS, denied=DEFAULT_DENIED_NETWORKS)
LOGGER_DB = 14
"""The Logger's records live in a Valkey database of their own."""


def test_fleetfile_examples() -> None:
    result = doctest.testmod(fleetfile)
    assert result.failed == 0 and result.attempted >= 5


# -- the importer against Postgres ---------------------------------------------

async def _import(url: str, key: bytes, data: bytes, fmt: str, *, update: bool = False,
                  dry_run: bool = False, batch_rows: int = 10_000,
                  policy: NetPolicy = DEFAULT_POLICY) -> ImportReport:
    conn = await asyncpg.connect(url)
    try:
        await migrate.migrate(conn)
        options = ImportOptions(update=update, dry_run=dry_run, batch_rows=batch_rows)
        return await Importer(conn, sealing.SecretBox(key), policy, options).run(
            fleetfile.parse(data, fmt))
    finally:
        await conn.close()


async def _devices(url: str) -> dict[str, asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT * FROM devices WHERE removed_at IS NULL")
        return {r["cloud_id"]: r for r in rows}
    finally:
        await conn.close()


async def _listing(url: str) -> list[DeviceRecord]:
    conn = await asyncpg.connect(url)
    try:
        return await Registry(conn, sealing.SecretBox(bytes(32))).listing()
    finally:
        await conn.close()


def _secret(key: bytes, row: asyncpg.Record) -> str:
    return sealing.SecretBox(key).open(row["sealed_secret"], cloud_id=row["cloud_id"],
                                       driver=row["driver"], url=row["url"])


def _refusals(report: ImportReport) -> dict[int | str, str]:
    return {r.where.ref: r.reason for r in report.refused}


def _no_password(*texts: str) -> None:
    for text in texts:
        assert P not in text, text


CSV = f"""cloud_id,email,password,driver,url,interval_s,fields
00AB01,owner1@example.com,{P}-1,,,,
00ab02,owner2@example.com,{P}-2,eagle-local,http://192.168.1.50,10,
meter-1,,{P}-3,http-json,http://10.0.0.7/status,,demand_w=/power/watts
zz,a@b.example,{P}-4,,,,
00ab03,{P}-5,{P}-5,,,,
00ab04,a@b.example,,,,,
00ab05,a@b.example,{P}-6,eagle-local,http://127.0.0.1/,,
00ab01,a@b.example,{P}-7,,,,
00ab06,a@b.example,{P}-8,,,,,extra
00ab07,a@b.example,{P}-9,,,abc,
meter-2,,{P}-10,http-json,http://10.0.0.8/,,
00ab08,owner8@example.com,{P}-11,,,,
""".encode()


async def test_csv_good_and_bad_rows_each_bad_row_named(fresh_db: str) -> None:
    key = sealing.generate_key()
    report = await _import(fresh_db, key, CSV, "csv")
    refused = _refusals(report)
    assert sorted(refused) == [5, 6, 7, 8, 9, 10, 11, 12]
    assert "malformed cloud id 'zz'" in refused[5]
    assert "malformed email '<password>'" in refused[6]  # a password in the wrong column
    assert "needs its password" in refused[7]
    assert "127.0.0.1" in refused[8] and "denied_networks" in refused[8]
    assert "already given at line 2" in refused[9]
    assert refused[10] == "8 value(s) for 7 columns"
    assert "interval_s" in refused[11]
    assert "fields" in refused[12]
    _no_password(json.dumps(report.to_json()), *report.details(), report.summary())
    # No good row lost, each as its row says, its password sealed.
    devices = await _devices(fresh_db)
    assert sorted(devices) == ["00ab01", "00ab02", "00ab08", "meter-1"]
    assert [e.where.ref for e in report.added] == [2, 3, 4, 13]
    assert devices["00ab02"]["driver"] == "eagle-local" and devices["00ab02"]["interval_s"] == 10
    assert devices["00ab01"]["interval_s"] == 6 and devices["00ab01"]["url"] is None
    assert orjson.loads(devices["meter-1"]["options"]) == {
        "fields": {"demand_w": "/power/watts"}}
    assert {cid: _secret(key, row) for cid, row in devices.items()} == {
        "00ab01": f"{P}-1", "00ab02": f"{P}-2", "meter-1": f"{P}-3", "00ab08": f"{P}-11"}
    assert not report.complete and report.batches_written == report.batches == 1

    # The same file again changes nothing: not a row, not a timestamp.
    again = await _import(fresh_db, key, CSV, "csv", update=True)
    assert (len(again.added), len(again.changed), again.unchanged) == (0, 0, 4)
    assert again.rows_written == 0 and again.batches == 0
    after = await _devices(fresh_db)
    assert {c: r["updated_at"] for c, r in after.items()} == \
        {c: r["updated_at"] for c, r in devices.items()}
    assert {c: r["sealed_secret"] for c, r in after.items()} == \
        {c: r["sealed_secret"] for c, r in devices.items()}


async def test_ndjson_mixed_then_update_only_with_update(fresh_db: str) -> None:
    key = sealing.generate_key()
    lines = [
        {"cloud_id": "00ac01", "email": "a@b.example", "password": f"{P}-1"},
        "not json",
        {"cloud_id": "00ac02", "email": "a@b.example", "password": f"{P}-2", "colour": "red"},
        {"cloud_id": "00ac03", "email": "a@b.example", "password": f"{P}-3",
         "interval_s": "6"},
        {"cloud_id": "00ac04", "email": "a@b.example", "install_code": f"{P}-4",
         "driver": "eagle-local", "url": "http://192.168.1.60"},
        [1, 2],
        {"cloud_id": "00ac05", "email": "a@b.example", "password": f"{P}-5\nmore"},
        {"cloud_id": "00ac06", "email": "a@b.example\u0000", "password": f"{P}-6"},
    ]
    data = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines).encode()
    report = await _import(fresh_db, key, data, "ndjson")
    refused = _refusals(report)
    assert sorted(refused) == [2, 3, 4, 6, 7, 8]
    assert "not valid JSON" in refused[2] and "'colour'" in refused[3]
    assert "interval_s" in refused[4] and "JSON object" in refused[6]
    assert "one line" in refused[7] and "NUL" in refused[8]
    _no_password(json.dumps(report.to_json()), *report.details())
    before = await _devices(fresh_db)
    assert sorted(before) == ["00ac01", "00ac04"]
    assert _secret(key, before["00ac04"]) == f"{P}-4"  # install_code: the same secret

    change = "\n".join(json.dumps(x) for x in [
        {"cloud_id": "00AC01", "interval_s": 12.5},                        # no password: kept
        {"cloud_id": "00ac04", "url": "http://192.168.1.61"},              # moved: needs it
        {"cloud_id": "00ac04", "password": "dup"},
    ]).encode()
    dry = await _import(fresh_db, key, change, "ndjson")
    assert [(e.cloud_id, e.fields) for e in dry.existing] == [("00ac01", ("interval_s",))]
    assert "needs its password again" in _refusals(dry)[2]
    assert "already given at line 2" in _refusals(dry)[3]
    assert await _devices(fresh_db) == before  # without --update: reported, not touched

    updated = await _import(fresh_db, key, change, "ndjson", update=True)
    assert [(e.cloud_id, e.fields) for e in updated.changed] == [("00ac01", ("interval_s",))]
    after = await _devices(fresh_db)
    assert after["00ac01"]["interval_s"] == 12.5
    assert after["00ac01"]["sealed_secret"] == before["00ac01"]["sealed_secret"]
    assert after["00ac04"] == before["00ac04"]

    moved = json.dumps({"cloud_id": "00ac04", "url": "http://192.168.1.61",
                        "install_code": f"{P}-new"}).encode()
    report = await _import(fresh_db, key, moved, "ndjson", update=True)
    assert [(e.cloud_id, e.fields) for e in report.changed] == [("00ac04", ("url", "password"))]
    row = (await _devices(fresh_db))["00ac04"]
    assert row["url"] == "http://192.168.1.61" and _secret(key, row) == f"{P}-new"
    same = await _import(fresh_db, key, moved, "ndjson", update=True)
    assert same.unchanged == 1 and not same.changed  # the password compared, not resealed


async def test_a_batch_that_fails_is_written_not_at_all(fresh_db: str) -> None:
    """A failure in the middle of a batch (Postgres refusing one row, by a
    trigger of this test's own database) leaves nothing of that batch; the
    batches before it stay, the ones after are not tried; importing again
    once the cause is gone completes it."""
    key = sealing.generate_key()
    conn = await asyncpg.connect(fresh_db)
    try:
        await migrate.migrate(conn)
        await conn.execute("""
            CREATE FUNCTION refuse_00ad05() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.cloud_id = '00ad05' THEN RAISE EXCEPTION 'refused by the test'; END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER refuse_00ad05 BEFORE INSERT ON devices
                FOR EACH ROW EXECUTE FUNCTION refuse_00ad05();""")
    finally:
        await conn.close()
    rows = "\n".join(f"00ad0{i},o@example.com,{P}-{i}" for i in range(1, 8))
    data = f"cloud_id,email,password\n{rows}\n".encode()
    report = await _import(fresh_db, key, data, "csv", batch_rows=3)
    assert (report.batches, report.batches_written, report.rows_written) == (3, 1, 3)
    assert report.error is not None and report.error_code == "database"
    assert "batch 2 of 3 (line 5 to line 7)" in report.error
    assert "refused by the test" in report.error
    assert sorted(await _devices(fresh_db)) == ["00ad01", "00ad02", "00ad03"]

    conn = await asyncpg.connect(fresh_db)
    try:
        await conn.execute("DROP TRIGGER refuse_00ad05 ON devices")
    finally:
        await conn.close()
    again = await _import(fresh_db, key, data, "csv", batch_rows=3)
    assert again.complete and again.unchanged == 3 and len(again.added) == 4
    assert sorted(await _devices(fresh_db)) == [f"00ad0{i}" for i in range(1, 8)]


async def test_a_running_watcher_picks_up_each_batch_from_one_notification(
        fresh_db: str) -> None:
    key = sealing.generate_key()
    conn = await asyncpg.connect(fresh_db)
    await migrate.migrate(conn)
    notes: list[str] = []
    await conn.add_listener(CHANNEL, lambda *args: notes.append(str(args[3])))
    client = FastHttpClient()
    pool = DevicePool(PollingSettings(), MemorySink(), {"eagle-cloud": client}, seed="s")
    await pool.start()
    # A resync period far longer than the test: only a notification brings devices.
    watcher = RegistryWatcher(fresh_db, sealing.SecretBox(key), pool, 3600.0)
    try:
        await watcher.start()
        assert len(pool.loops) == 0
        rows = "\n".join(f"{0xd00000 + i:06x},o@example.com,{P},http://127.0.0.1:9"
                         for i in range(25))
        report = await _import(fresh_db, key, f"cloud_id,email,password,url\n{rows}\n"
                               .encode(), "csv", batch_rows=10, policy=LOOPBACK)
        assert report.complete and report.batches_written == 3
        deadline = time.monotonic() + 10.0
        while len(pool.loops) < 25 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(pool.loops) == 25
        assert notes == [RESYNC_ALL] * 3  # one a batch, none a row
    finally:
        await watcher.stop()
        await pool.stop(1.0)
        await client.close()
        await conn.close()


# -- the command line -------------------------------------------------------------

def _env(stack: RunningStack, tmp_path: Path) -> dict[str, str]:
    return {"POLLER_STATE_DIR": str(tmp_path / "state"),
            "POLLER_DATABASE_URL": fresh_database_url(stack.info),
            "POLLER_REDIS_URL": stack.info.redis_url,
            "POLLER_S3_ENDPOINT_URL": stack.info.s3_endpoint_url, "POLLER_LOG_LEVEL": "debug"}


class Cli:
    """``python -m poller`` with an environment; every output kept."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = {**os.environ, **env}
        self.outputs: list[str] = []

    def __call__(self, *args: str, stdin: bytes | None = None, code: int = 0) -> str:
        out = subprocess.run([sys.executable, "-m", "poller", *args], input=stdin,
                             capture_output=True, env=self.env, timeout=120)
        text = out.stdout.decode() + out.stderr.decode()
        self.outputs.append(text)
        assert out.returncode == code, (args, text)
        return out.stdout.decode()


def test_cli_round_trip_export_and_reimport(stack: RunningStack, tmp_path: Path) -> None:
    env = _env(stack, tmp_path)
    cli = Cli(env)
    fleet = tmp_path / "fleet.csv"
    fleet.write_bytes(CSV)
    fleet.chmod(0o644)
    report = json.loads(cli("import", str(fleet), "--apply", "--json", code=1))
    assert report["counts"] == {"added": 4, "changed": 0, "unchanged": 0, "existing": 0,
                                "refused": 8}
    assert [r["line"] for r in report["refused"]] == [5, 6, 7, 8, 9, 10, 11, 12]
    assert "every user of this machine can read it" in cli.outputs[-1]

    csv_out = tmp_path / "out.csv"
    cli("export-users", "--output", str(csv_out))
    assert csv_out.read_text().splitlines() == [
        "cloud_id,email,driver,url,interval_s,enabled,options",
        "00ab01,owner1@example.com,eagle-cloud,,6,true,",
        "00ab02,owner2@example.com,eagle-local,http://192.168.1.50,10,true,",
        'meter-1,,http-json,http://10.0.0.7/status,6,true,"{""fields"":{""demand_w"":'
        '""/power/watts""}}"',
        "00ab08,owner8@example.com,eagle-cloud,,6,true,"]
    # The export imports again as it is: nothing changes.
    text = cli("import", str(csv_out), "--update", "--apply")
    assert "unchanged 4" in text and "nothing to write" in text

    # As NDJSON (what the command writes with -o x.ndjson), reviewed and edited,
    # then imported with --update: only the edit changes.
    db_url = env["POLLER_DATABASE_URL"]
    nd_out = io.StringIO()
    fleetfile.write_export(asyncio.run(_listing(db_url)), "ndjson", nd_out)
    exported = [json.loads(line) for line in nd_out.getvalue().splitlines()]
    assert [d["cloud_id"] for d in exported] == ["00ab01", "00ab02", "meter-1", "00ab08"]
    exported[3]["interval_s"] = 30
    key = sealing.load_key(tmp_path / "state", env={}, create=False)
    edited = "".join(json.dumps(d) + "\n" for d in exported).encode()
    report = asyncio.run(_import(db_url, key, edited, "ndjson", update=True)).to_json()
    assert [(c["cloud_id"], c["fields"]) for c in report["changed"]] == \
        [("00ab08", ["interval_s"])]
    assert report["counts"]["unchanged"] == 3
    devices = asyncio.run(_devices(db_url))
    assert devices["00ab08"]["interval_s"] == 30
    assert _secret(key, devices["00ab08"]) == f"{P}-11"  # kept through the round trip

    # A terminal attached (a person watching): a dry run unless --apply.
    one = f"cloud_id,email,password\n00ab09,a@b.example,{P}-12\n".encode()
    assert "would add 1" in _with_terminal(env, ["import", "-"], one)
    assert "00ab09" not in asyncio.run(_devices(env["POLLER_DATABASE_URL"]))
    bad = tmp_path / "bad.csv"
    bad.write_text("cloud_id,colour\n")
    for args, message in ((["import"], "give a FILE"),
                          (["import", str(bad)], "unknown column(s) 'colour'"),
                          (["import", "--from-redis", "redis://:pw@127.0.0.1:1/0"],
                           "POLLER_IMPORT_REDIS_PASSWORD")):
        # Refused before any server is touched (and in-process: no start-up to pay).
        with pytest.raises(UsageError, match=re.escape(message)):
            importcmd.read_source(build_parser().parse_args(args))

    dump = subprocess.run([str(pg_bin_dir() / "pg_dump"), "--data-only",
                           env["POLLER_DATABASE_URL"]], capture_output=True, timeout=120,
                          check=True).stdout
    assert b"00ab08" in dump and P.encode() not in dump
    _no_password(*cli.outputs, csv_out.read_text(), nd_out.getvalue())


def _with_terminal(env: dict[str, str], args: list[str], stdin: bytes) -> str:
    """Run the CLI with standard output on a pseudo-terminal (a person watching)."""
    master, slave = pty.openpty()
    try:
        out = subprocess.run([sys.executable, "-m", "poller", *args], input=stdin,
                             stdout=slave, stderr=slave, env={**os.environ, **env},
                             timeout=120)
        os.close(slave)
        slave = -1
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the other side is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    text = b"".join(chunks).decode()
    assert out.returncode == 0, text
    assert "dry run" in text and "--apply" in text
    return text


def _logger_url(stack: RunningStack) -> str:
    return f"{stack.info.redis_url.rsplit('/', 1)[0]}/{LOGGER_DB}"


@pytest.fixture
def logger_keys(stack: RunningStack) -> Iterator[tuple[str, redis.Redis]]:
    """A key prefix of this test's own in the Logger's database, its keys removed after."""
    client = redis.Redis.from_url(_logger_url(stack))
    prefix = uuid.uuid4().hex[:3]
    try:
        yield prefix, client
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


def test_logger_records_from_redis(stack: RunningStack, tmp_path: Path,
                                   logger_keys: tuple[str, redis.Redis]) -> None:
    prefix, client = logger_keys
    good = {f"{prefix}001": (f"{P}-a", 2725, 1443274732.39435, 1443277732.933939),
            f"{prefix}002": (f"{P}-b", 5, 1443274000.0, 1443274600.5)}
    for cid, (pw, events, first, last) in good.items():
        client.set(cid, json.dumps({"cloud_id": cid, "user_email": f"u{cid}@example.com",
                                    "user_pw": pw, "total_events_logged": events,
                                    "first_timestamp": first, "last_timestamp": last}))
    client.set(f"{prefix}003", f"not json {P}")
    client.set(f"{prefix}004", json.dumps({"cloud_id": f"{prefix}005", "user_email":
                                           "x@example.com", "user_pw": f"{P}-c"}))
    client.set(f"{prefix}006", json.dumps({"cloud_id": f"{prefix}006", "user_email": f"{P}-d",
                                           "user_pw": f"{P}-d"}))
    client.hset(f"{prefix}007", "user_pw", f"{P}-e")
    env = _env(stack, tmp_path)
    cli = Cli(env)
    source = ["--from-redis", _logger_url(stack), "--match", f"{prefix}*"]
    report = json.loads(cli("import", *source, "--json", code=1))
    assert report["dry_run"] is False  # no terminal: it writes
    assert sorted(e["cloud_id"] for e in report["added"]) == sorted(good)
    refused = {r["key"]: r["reason"] for r in report["refused"]}
    assert sorted(refused) == [f"{prefix}00{i}" for i in (3, 4, 6, 7)]
    assert "not JSON" in refused[f"{prefix}003"]
    assert f"names cloud id '{prefix}005'" in refused[f"{prefix}004"]
    assert "'<password>'" in refused[f"{prefix}006"]
    assert "not a string value" in refused[f"{prefix}007"]

    devices = asyncio.run(_devices(env["POLLER_DATABASE_URL"]))
    assert sorted(devices) == sorted(good)
    for cid, (_, events, first, last) in good.items():
        d = devices[cid]
        assert (d["driver"], d["url"], d["email"]) == ("eagle-cloud", None,
                                                       f"u{cid}@example.com")
        assert orjson.loads(d["options"]) == {"history": {
            "source": "rainforest-logger", "total_events_logged": events,
            "first_timestamp": first, "last_timestamp": last}}
    key = sealing.load_key(tmp_path / "state", env={}, create=False)
    assert {cid: _secret(key, devices[cid]) for cid in good} == \
        {cid: pw for cid, (pw, *_) in good.items()}

    again = json.loads(cli("import", *source, "--json", code=1))
    assert again["counts"]["unchanged"] == 2 and again["rows_written"] == 0
    _no_password(*cli.outputs)


# -- the API --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(stack: RunningStack) -> Iterator[ApiServer]:
    with api_server(fresh_database_url(stack.info), stack.info.redis_url) as srv:
        yield srv


def _post(server: ApiServer, body: bytes, query: str = "", *, token: str | None = ADMIN_TOKEN,
          content_type: str = "application/json") -> tuple[int, Any]:
    reply = server.request("POST", f"/api/users:import{query}", token=token, body=body,
                           headers={"Content-Type": content_type})
    return reply.status, reply.json()


def test_api_import_json_and_ndjson(server: ApiServer,
                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    base = uuid.uuid4().hex[:4]
    rows = [{"cloud_id": f"{base}0{i}", "email": "a@b.example", "password": f"{P}-{i}"}
            for i in range(1, 4)]
    rows.append({"cloud_id": f"{base}09", "email": f"{P}-9", "password": f"{P}-9"})
    texts: list[str] = []
    status, doc = _post(server, orjson.dumps(rows), "?dry_run=true")
    texts.append(json.dumps(doc))
    assert status == 200 and doc["dry_run"] and doc["counts"]["added"] == 3
    assert doc["refused"] == [{"item": 4, "cloud_id": f"{base}09",
                               "reason": "malformed email '<password>': expected an address "
                                         "such as name@example.com"}]
    assert server.request("GET", f"/api/devices/{base}01", token=READ_TOKEN).status == 404

    status, doc = _post(server, orjson.dumps(rows))
    texts.append(json.dumps(doc))
    assert status == 200 and doc["counts"]["added"] == 3 and doc["rows_written"] == 3
    ndjson = "\n".join(json.dumps(r) for r in [
        {"cloud_id": f"{base}01", "interval_s": 20},
        {"cloud_id": f"{base}04", "email": "d@b.example", "password": f"{P}-4"}, {}])
    status, doc = _post(server, ndjson.encode(), "?update=true",
                        content_type="application/x-ndjson")
    texts.append(json.dumps(doc))
    assert status == 200, doc
    assert [(c["line"], c["cloud_id"], c["fields"]) for c in doc["changed"]] == \
        [(1, f"{base}01", ["interval_s"])]
    assert [a["line"] for a in doc["added"]] == [2]
    assert doc["refused"][0]["line"] == 3 and doc["refused"][0]["reason"] == "no cloud_id"
    got = server.request("GET", f"/api/devices/{base}01", token=READ_TOKEN).json()
    assert got["interval_s"] == 20
    texts.append(json.dumps(got))
    _no_password(*texts, caplog.text)


def test_api_import_limits_and_tokens(server: ApiServer) -> None:
    row = orjson.dumps([{"cloud_id": "00ae01", "email": "a@b.example", "password": f"{P}"}])
    status, doc = _oversized(server, 8 * 1024 * 1024 + 1)
    assert status == 413 and doc["error"]["code"] == "body_too_large"
    assert "several requests" in doc["error"]["message"]
    assert _post(server, row, token=None)[0] == 401
    status, doc = _post(server, row, token=READ_TOKEN)
    assert status == 403 and "admin token" in doc["error"]["message"]
    assert _post(server, row, content_type="text/plain")[0] == 415
    assert _post(server, row, "?update=maybe")[0] == 400
    assert _post(server, row, "?colour=red")[0] == 400
    status, doc = _post(server, b"[{]")
    assert status == 400 and "not valid JSON" in doc["error"]["message"]
    assert server.request("GET", "/api/devices/00ae01", token=READ_TOKEN).status == 404


def _oversized(server: ApiServer, length: int) -> tuple[int, Any]:
    """Announce a body of ``length`` bytes, send a little of it, read the answer:
    the API refuses it from its Content-Length, before reading it."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"POST /api/users:import HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                     f"Authorization: Bearer {ADMIN_TOKEN}\r\n"
                     "Content-Type: application/json\r\n"
                     f"Content-Length: {length}\r\nConnection: close\r\n\r\n[".encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
        head, _, body = answer.partition(b"\r\n\r\n")
        fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
        while len(body) < int(fields[b"Content-Length"]):
            body += sock.recv(65536)
    return int(head.split()[1]), orjson.loads(body)
