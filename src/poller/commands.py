"""What each ``poller`` sub-command does, given settings and parsed flags."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from poller import config, endpoints, sealing
from poller.cliutil import print_json, read_password, run_async, settings_from
from poller.config import Settings
from poller.errors import PollerError, UsageError

if TYPE_CHECKING:  # imported where used at run time: the CLI starts without them
    from poller.db import Conn
    from poller.registry import Registry


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# -- stack, config, keys ------------------------------------------------------

def stack(settings: Settings, args: argparse.Namespace) -> int:
    st = endpoints.embedded_stack(settings, progress)
    if args.action == "up":
        info = st.up()
        print(f"database  {info.database_url}\nredis     {info.redis_url}\n"
              f"s3        {info.s3_endpoint_url}  (bucket {info.bucket})")
        return 0
    if args.action == "down":
        st.down()
        return 0
    healthy = True
    for name, status in st.status().items():
        pid = f"pid {status.pid}" if status.pid else ""
        print(f"{name:9} {status.state:9} {status.url or '-':60} {pid}")
        healthy = healthy and status.state in ("running", "external")
    return 0 if healthy else 3


def config_show(settings: Settings, args: argparse.Namespace) -> int:
    if args.keys:
        for key, env, help in config.describe_keys():
            print(f"{key:34} {env:40} {help}")
        return 0
    doc = config.as_dict(settings)
    if args.json:
        print_json(doc)
    else:
        sys.stdout.write(config.to_toml(doc))
    return 0


def secret_key(settings: Settings, args: argparse.Namespace) -> int:
    print(sealing.encode_key(sealing.generate_key()))
    return 0


# -- database-backed commands -------------------------------------------------

def _with_db(settings: Settings, body: Callable[[Conn], Awaitable[int]]) -> int:
    """Run ``body(conn)`` on a migrated database connection."""
    from poller import db, migrate

    url = endpoints.resolve(settings, progress=progress).database_url

    async def run() -> int:
        conn = await db.connect(url)
        try:
            await migrate.migrate(conn)
            return await body(conn)
        finally:
            await conn.close()

    return run_async(run())


def migrate(settings: Settings, args: argparse.Namespace) -> int:
    async def body(conn: Conn) -> int:
        from poller.registry import Registry

        # _with_db has migrated already; report what is there.
        rows = await conn.fetch("SELECT name FROM schema_migrations ORDER BY version")
        print(f"schema up to date: {len(rows)} migration(s), last {rows[-1]['name']}")
        if await Registry.legacy_secrets(conn):
            # Secrets sealed before the URL was bound: bind each to its
            # device's driver and URL as registered now.
            done, left = await (await _registry(conn, settings)).reseal_legacy()
            print(f"sealed {done} device secret(s) again, bound to driver and URL"
                  + (f"; {left} do not open with this key and were left" if left else ""))
        return 0

    return _with_db(settings, body)


async def _registry(conn: Conn, settings: Settings) -> Registry:
    from poller.netpolicy import NetPolicy
    from poller.registry import Registry, registry_key

    return Registry(conn, sealing.SecretBox(await registry_key(conn, settings.state_dir)),
                    NetPolicy.from_settings(settings.polling))


def _fields(args: argparse.Namespace) -> dict[str, Any] | None:
    if not args.field:
        return None
    fields: dict[str, str] = {}
    for item in args.field:
        name, sep, pointer = item.partition("=")
        if not sep or not pointer.startswith("/"):
            raise UsageError(f"--field expects NAME=/json/pointer, got {item!r}")
        fields[name] = pointer
    return {"fields": fields}


def add_user(settings: Settings, args: argparse.Namespace) -> int:
    from poller.netpolicy import NetPolicy
    from poller.registry import (
        check_cloud_id,
        check_driver,
        check_email,
        check_options,
        check_url,
        check_url_policy,
    )

    # Validate everything before asking for a password or touching a server
    # (what the URL's name resolves to is checked on registering).
    driver = check_driver(args.driver)
    check_cloud_id(args.cloud_id, driver)
    check_email(args.email or "", driver)
    check_url_policy(check_url(args.url, driver), NetPolicy.from_settings(settings.polling))
    options = _fields(args) or {}
    check_options(driver, args.cloud_id, args.email or "", args.url, options, None)
    secret = read_password(args, confirm=True)
    interval = args.interval if args.interval is not None else settings.polling.interval_s

    async def body(conn: Conn) -> int:
        rec = await (await _registry(conn, settings)).add(
            args.cloud_id, email=args.email or "", driver=driver, url=args.url,
            interval_s=interval, options=options, secret=secret)
        print(f"registered {rec.cloud_id} (id {rec.id}, {rec.driver}, every {rec.interval_s:g} s)")
        return 0

    return _with_db(settings, body)


def update_user(settings: Settings, args: argparse.Namespace) -> int:
    secret = None
    if args.change_password or args.password_stdin:
        secret = read_password(args, confirm=True)

    async def body(conn: Conn) -> int:
        rec = await (await _registry(conn, settings)).update(
            args.cloud_id, email=args.email, driver=args.driver, url=args.url,
            clear_url=args.clear_url, interval_s=args.interval, enabled=args.enabled,
            options=_fields(args), secret=secret)
        print(f"updated {rec.cloud_id}")
        return 0

    return _with_db(settings, body)


def remove_user(settings: Settings, args: argparse.Namespace) -> int:
    async def body(conn: Conn) -> int:
        from poller.registry import Registry

        # Removal needs no key: it wipes the sealed secret without opening it.
        rec = await Registry(conn, _NoBox()).remove(args.cloud_id)
        print(f"removed {rec.cloud_id} (its readings are kept)")
        return 0

    return _with_db(settings, body)


def list_users(settings: Settings, args: argparse.Namespace) -> int:
    async def body(conn: Conn) -> int:
        from poller.registry import Registry

        records = await Registry(conn, _NoBox()).listing()
        if args.json:
            print_json([r.to_json() for r in records])
            return 0
        header = f"{'CLOUD_ID':10} {'DRIVER':12} {'INTERVAL':>8} {'ENABLED':7} {'EMAIL':30} URL"
        print(header)
        for r in records:
            print(f"{r.cloud_id:10} {r.driver:12} {r.interval_s:>8g} "
                  f"{'yes' if r.enabled else 'no':7} {r.email:30} {r.url or '-'}")
        print(f"{len(records)} device(s)", file=sys.stderr)
        return 0

    return _with_db(settings, body)


class _NoBox(sealing.SecretBox):
    """For commands that never seal or open a secret: they need no key."""

    def __init__(self) -> None:
        super().__init__(bytes(32))

    def seal(self, plaintext: str, *, cloud_id: str, driver: str, url: str | None) -> bytes:
        raise AssertionError("this command does not seal secrets")

    def open(self, sealed: bytes, *, cloud_id: str, driver: str, url: str | None) -> str:
        raise AssertionError("this command does not open secrets")


def import_users(settings: Settings, args: argparse.Namespace) -> int:
    from poller import importcmd

    source = importcmd.read_source(args)  # bad flags or an unreadable file: no server touched
    return _with_db(settings, lambda conn: importcmd.run_import(conn, settings, args, source))


def export_users(settings: Settings, args: argparse.Namespace) -> int:
    async def body(conn: Conn) -> int:
        from poller.importcmd import write_users
        from poller.registry import Registry

        write_users(await Registry(conn, _NoBox()).listing(), args)
        return 0

    return _with_db(settings, body)


# -- the simulator --------------------------------------------------------------

def simulate(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from poller.simulator.faults import FaultRates
    from poller.simulator.fleet import credentials_for
    from poller.simulator.main import Simulator, SimulatorConfig, freeze_as_the_fleet_grows
    from poller.tasks import cancel_and_wait

    rates: dict[str, float] = {}
    for item in args.fault:
        kind, sep, value = item.partition("=")
        try:
            rates[kind] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise UsageError(f"--fault expects KIND=RATE such as http_5xx=0.01, got {item!r}")
    try:
        cfg = SimulatorConfig(host=args.host, port=args.port, devices=args.devices,
                              seed=args.seed, interval_s=args.interval,
                              http10_fraction=args.http10_fraction,
                              fault_rates=FaultRates().replaced(rates),
                              record_served=args.record_served)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    db_url = endpoints.resolve(settings, progress=progress).database_url if args.register \
        else None

    async def main() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        sim = Simulator(cfg)
        port = await sim.start()
        base = f"http://{args.host}:{port}"
        # Its own process: the heap policy is the simulator's to set.
        freezer = asyncio.create_task(freeze_as_the_fleet_grows(sim))
        try:
            if db_url is not None:
                from poller import db, migrate

                conn = await db.connect(db_url)
                try:
                    await migrate.migrate(conn)
                    reg = await _registry(conn, settings)
                    interval = args.interval or settings.polling.interval_s
                    entries = []
                    for cid in sim.cloud_ids():
                        email, password = credentials_for(cid, cfg.seed)
                        entries.append((cid, email, "eagle-cloud", base, interval, password))
                    n = await reg.upsert_many(entries)
                finally:
                    await conn.close()
                progress(f"registered {n} simulated device(s) against {base}")
            if args.port_file is not None:
                args.port_file.write_text(f"{port}\n")
            progress(f"simulator: {cfg.devices} device(s) on {base}/cgi-bin/post_manager; "
                     f"stats at {base}/_sim/stats, jitter at {base}/_sim/jitter")
            await stop.wait()
        finally:
            await cancel_and_wait({freezer})
            await sim.stop()
        return 0

    return run_async(main())


# -- archive and monitoring ------------------------------------------------------

def replay(settings: Settings, args: argparse.Namespace) -> int:
    from poller.archive.replay import replay as run_replay
    from poller.archive.s3 import ArchiveStore

    if args.day is not None:
        if args.since is not None or args.until is not None:
            raise UsageError("give --day, or --since and --until, not both")
        from datetime import UTC, datetime, timedelta

        args.since = datetime(args.day.year, args.day.month, args.day.day, tzinfo=UTC)
        args.until = args.since + timedelta(days=1)
    if args.since is None or args.until is None:
        raise UsageError("give --since and --until, or --day")
    if args.until <= args.since:
        raise UsageError("--until must be after --since")
    ep = endpoints.resolve(settings, progress=progress)

    def show(done: int, total: int) -> None:
        width = 30
        filled = width * done // total if total else width
        sys.stderr.write(f"\rreplay [{'#' * filled}{'.' * (width - filled)}] "
                         f"{done}/{total} objects")
        sys.stderr.flush()

    async def main() -> int:
        store = ArchiveStore(ep.s3_endpoint_url, ep.bucket, settings.s3.region,
                             settings.s3.access_key_id, settings.s3.secret_access_key)
        await store.start()
        try:
            result = await run_replay(store, args.prefix or settings.s3.prefix, ep.database_url,
                                      args.since, args.until, show)
        finally:
            await store.close()
        sys.stderr.write("\n")
        print(f"objects {result.objects}, rows read {result.rows_read}, inserted "
              f"{result.rows_inserted}, already present {result.rows_present}, errors "
              f"{result.errors}")
        for issue in result.issues:
            print(f"  {issue}", file=sys.stderr)
        if result.days_restored:
            print("days retention had dropped, back in PostgreSQL (held "
                  f"{settings.retention.replay_hold_days} days): "
                  + ", ".join(d.isoformat() for d in result.days_restored))
        return 1 if result.errors else 0

    return run_async(main())


def retention(settings: Settings, args: argparse.Namespace) -> int:
    from poller import db
    from poller import migrate as migrations
    from poller.archive.s3 import ArchiveStore
    from poller.retention.policy import Decision, RetentionPolicy

    ep = endpoints.resolve(settings, progress=progress)

    def show(d: Decision) -> None:
        print(d.describe(), flush=True)
        for line in d.details[:20]:
            print(f"    {line}")
        if len(d.details) > 20:
            print(f"    ... and {len(d.details) - 20} more")

    async def main() -> int:
        store = ArchiveStore(ep.s3_endpoint_url, ep.bucket, settings.s3.region,
                             settings.s3.access_key_id, settings.s3.secret_access_key)
        await store.start()
        try:
            conn = await db.connect(ep.database_url)
            try:
                await migrations.migrate(conn)
                policy = RetentionPolicy(settings.retention, store, settings.s3.prefix)
                progress("retention: checking each partition past its level's age "
                         "(a raw day: S3 listing, manifest, one count of its rows)")
                report = await policy.run(conn, apply=args.apply, progress=show)
            finally:
                await conn.close()
        finally:
            await store.close()
        print(f"\n{'level':7} {'keep':9} {'oldest':11} {'newest':11} {'rows':>14} {'size':>10}")
        for lv in report.levels:
            keep = f"{lv.keep_days} days" if lv.keep_days else "forever"
            oldest, newest = str(lv.oldest or "-"), str(lv.newest or "-")
            print(f"{lv.level:7} {keep:9} {oldest:11} {newest:11} "
                  f"{'~' + format(lv.rows, ','):>14} {lv.bytes / 1e6:>7.1f} MB")
        if report.skipped:
            print(f"nothing done: {report.skipped}")
            return 1
        going = [d for d in report.decisions if d.drop]
        blocked = report.blocked()
        verb = "dropped" if args.apply else "would drop (dry run: nothing changed; --apply acts)"
        print(f"\n{len(going)} partition(s) {verb}, {sum(d.bytes for d in going) / 1e6:.1f} MB; "
              f"{sum(1 for d in report.decisions if d.blocked)} kept past their age"
              + (": " + ", ".join(f"{lvl}/{why} {n}" for (lvl, why), n in sorted(blocked.items()))
                 if blocked else ""))
        return 0

    return run_async(main())


def archive(settings: Settings, args: argparse.Namespace) -> int:
    from poller.archive import lifecycle
    from poller.archive.s3 import ArchiveError, ArchiveStore

    ep = endpoints.resolve(settings, progress=progress)

    async def main() -> int:
        store = ArchiveStore(ep.s3_endpoint_url, ep.bucket, settings.s3.region,
                             settings.s3.access_key_id, settings.s3.secret_access_key)
        await store.start()
        try:
            print(f"bucket {ep.bucket} at {ep.s3_endpoint_url or 'AWS S3'}")
            if not args.apply:
                state = await lifecycle.state(store, settings.retention, settings.s3.prefix)
                print(f"server: {state.server or '(no Server header)'}")
                for line in state.lines():
                    print(line)
                return 0
            try:
                state = await lifecycle.apply(store, settings.retention, settings.s3.prefix)
            except ArchiveError as exc:
                known = lifecycle.unsupported_reason(str(exc).rpartition("[server: ")[2]
                                                     .rstrip("]"))
                raise PollerError(f"lifecycle rule not applied: {exc}"
                                  + (f"; {known}" if known else "")) from None
        finally:
            await store.close()
        print(f"applied rule {lifecycle.RULE_ID}: {lifecycle.describe_rule(state.wanted)}")
        if not state.in_place:
            print("but reading it back shows something else:")
            for line in state.lines():
                print(f"  {line}")
            return 1
        return 0

    return run_async(main())


def compact(settings: Settings, args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from poller.ingest import compact as packing

    async def body(conn: Conn) -> int:
        now = datetime.now(UTC)
        if args.day is not None:
            if not packing.is_closed(args.day, now):
                raise UsageError(f"{args.day} is not closed yet: a day may be compacted "
                                 f"{packing.CLOSED_AFTER} after it ends (UTC)")
            days = [args.day]
        else:
            days = await packing.closed_days(conn, now)
        if not days:
            print("nothing to compact: no closed day holds raw rows")
        for day in days:
            r = await packing.compact_day(conn, day, dry_run=args.dry_run,
                                          batch_devices=args.batch_devices, progress=progress)
            if r.dry_run:
                print(f"{day}: would pack {r.raw_rows_before:,} raw rows "
                      f"({r.packed_rows_before:,} packed already; {r.bytes_before:,} bytes now)")
            else:
                print(f"{day}: packed {r.rows_moved:,} raw rows into {r.hours_written:,} "
                      f"device-hours; {r.bytes_before:,} -> {r.bytes_after:,} bytes"
                      + ("" if r.truncated or not r.rows_moved
                         else " (late rows arrived meanwhile: compact again)"))
        return 0

    return _with_db(settings, body)


def check(settings: Settings, args: argparse.Namespace) -> int:
    import os

    from poller.check import Thresholds, default_url, run_check, token_from

    thresholds = Thresholds(**{name: getattr(args, name) for name in (
        "poll_ratio_warn", "poll_ratio_crit", "failure_ratio_warn", "failure_ratio_crit",
        "ingest_lag_warn_s", "ingest_lag_crit_s", "upload_backlog_warn", "upload_backlog_crit")})
    code, line = run_check(args.url or default_url(settings), token_from(os.environ, settings),
                           thresholds, args.timeout)
    print(line)
    return code


# -- the service --------------------------------------------------------------

def serve(settings: Settings, args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT. The first signal stops gracefully (bounded by
    ingest.shutdown_grace_s inside the service); a second one exits at once.
    SIGHUP re-reads the configuration: tokens, log settings, poll timeout,
    back-off, flush size and age apply at once; server URLs, the API address,
    the instance id and the shard need a restart (the log names them).
    SIGUSR2 writes a heap census to STATE_DIR/tracemalloc (poller.memtrace).

    A background task that cannot go on (another process took this instance
    id, say) stops the service like a signal, and serve exits non-zero with
    its message, so that systemd starts it again."""
    import asyncio
    import logging
    import os
    import signal

    from poller import logs
    from poller.sdnotify import Notifier, watchdog_interval_s, watchdog_loop
    from poller.service import Service

    log = logging.getLogger("poller.service")
    notifier = Notifier.from_env()

    async def main() -> int:
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        service = Service(settings, progress=progress)

        def on_signal(signum: int) -> None:
            if stopping.is_set():
                log.warning("second %s: exiting now", signal.Signals(signum).name)
                os._exit(1)
            log.info("%s: stopping", signal.Signals(signum).name)
            notifier.stopping()
            stopping.set()

        def on_hup() -> None:
            notifier.reloading()
            try:
                fresh = settings_from(args)
                later = service.reload(fresh)
            except PollerError as exc:
                log.error("SIGHUP: configuration refused, keeping the running one: %s", exc)
            else:
                logs.setup(fresh.log.level, fresh.log.format)
                log.info("SIGHUP: configuration reloaded%s",
                         f"; needs a restart to change: {', '.join(later)}" if later else "")
            notifier.ready(status_text())

        def status_text() -> str:
            if service.view is None:
                return "starting"
            f = service.view.fleet()
            return (f"{f.devices} devices, {sum(f.polls_per_s.values()):.0f} polls/s, "
                    f"p99 lateness {f.lateness_p99_s * 1000:.0f} ms, "
                    f"{f.rows_committed} rows committed, ingest lag {f.ingest_lag_s:.1f} s")

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, on_hup)
        # A heap census (and snapshot, with PYTHONTRACEMALLOC) on SIGUSR2, see
        # poller.memtrace; the C allocator's policy for a long run, see
        # poller.allocator (process-wide, so set here).
        from poller import allocator, memtrace

        loop.add_signal_handler(signal.SIGUSR2, memtrace.on_signal, settings.state_dir)
        policy = allocator.MallocPolicy()
        allocator.apply(policy)
        trimmer = asyncio.create_task(allocator.trim_every(policy.trim_every_s))
        watchdog: asyncio.Task[None] | None = None
        waits: list[asyncio.Task[bool]] = []
        try:
            await service.start()
            assert service.view is not None
            notifier.ready(status_text())
            interval = watchdog_interval_s()
            if interval:
                watchdog = asyncio.create_task(watchdog_loop(
                    notifier, service.view.loop_responsive, interval, status=status_text))
            waits = [asyncio.create_task(stopping.wait()),
                     asyncio.create_task(service.failed.wait())]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if service.failure is not None and not stopping.is_set():
                log.error("stopping: %s", service.failure)
                notifier.stopping()
                stopping.set()  # a signal from here on exits at once
        finally:
            trimmer.cancel()
            for task in (watchdog, *waits):
                if task is not None:
                    task.cancel()
            await service.stop()
        if service.failure is not None:
            raise service.failure
        return 0

    return run_async(main())
