"""The ``poller`` command line: every sub-command's flags, and the one place
that turns an error into an exit status (``sys.exit``).

The commands themselves are in :mod:`poller.commands` (and
:mod:`poller.bench.run`); those that run until stopped install their own
signal handlers (``serve``: SIGTERM, SIGINT, SIGHUP, SIGUSR2; ``simulate``:
SIGTERM, SIGINT; ``bench``: SIGTERM). What both sides share is in :mod:`poller.cliutil`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from poller import __version__, argtypes, build, logs
from poller.cliutil import PASSWORD_ENV, settings_from
from poller.config import Settings
from poller.errors import PollerError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with one line, like every other usage error here."""

    def error(self, message: str) -> Any:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _common(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS lets these sit before or after the sub-command without the
    # sub-parser's default wiping a value given before it.
    g = parser.add_argument_group("configuration")
    g.add_argument("--config", type=Path, default=argparse.SUPPRESS, metavar="PATH",
                   help="TOML configuration file (default /etc/poller/poller.toml if present)")
    g.add_argument("--state-dir", default=argparse.SUPPRESS, metavar="DIR",
                   help="state directory (default ./var or POLLER_STATE_DIR)")
    g.add_argument("--set", action="append", default=argparse.SUPPRESS, metavar="KEY=VALUE",
                   dest="overrides", help="override a configuration key, e.g. "
                   "--set polling.interval_s=10 (repeatable)")
    g.add_argument("--log-level", default=argparse.SUPPRESS,
                   choices=("debug", "info", "warning", "error"))
    g.add_argument("--log-format", default=argparse.SUPPRESS, choices=("text", "json"))


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The command line's parser. With ``argv`` that does not name ``bench``,
    the bench's own flags are left out: they import the whole bench (S3,
    the simulator, ...), about two thirds of every command's start-up."""
    parser = _Parser(prog="poller", description="Polls fleets of home energy gateways on a "
                     "fixed schedule and keeps every reading.")
    parser.add_argument("--version", action="version",
                        version=f"poller {__version__}, {build.build_kind()}")
    _common(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=_Parser)

    def cmd(name: str, help: str, func: Callable[..., Any]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        _common(p)
        p.set_defaults(func=func)
        return p

    from poller import commands as c

    cmd("serve", "run the poller until SIGTERM", c.serve)
    cmd("migrate", "apply pending schema migrations", c.migrate)

    p = cmd("stack", "start, stop or show the embedded Postgres/Valkey/SeaweedFS", c.stack)
    p.add_argument("action", choices=("up", "down", "status"))

    p = cmd("config", "show the effective configuration (secrets redacted)", c.config_show)
    p.add_argument("action", choices=("show",))
    p.add_argument("--keys", action="store_true", help="list every key and its variable")
    p.add_argument("--json", action="store_true", help="print JSON instead of TOML")

    cmd("secret-key", "print a new random sealing key for POLLER_SECRET_KEY", c.secret_key)

    p = cmd("add-user", "register a device (password from a prompt, stdin or "
            f"{PASSWORD_ENV})", c.add_user)
    p.add_argument("cloud_id", metavar="CLOUD_ID", help="the device's id, e.g. 00ce69")
    _device_flags(p, adding=True)

    p = cmd("update-user", "change a registered device", c.update_user)
    p.add_argument("cloud_id", metavar="CLOUD_ID")
    _device_flags(p, adding=False)

    p = cmd("remove-user", "stop polling a device and wipe its credentials "
            "(its readings stay)", c.remove_user)
    p.add_argument("cloud_id", metavar="CLOUD_ID")

    p = cmd("list-users", "list registered devices (never a secret)", c.list_users)
    p.add_argument("--json", action="store_true", help="one JSON document")

    from poller import importcmd

    importcmd.import_arguments(cmd("import", importcmd.IMPORT_HELP, c.import_users))
    importcmd.export_arguments(cmd("export-users", importcmd.EXPORT_HELP, c.export_users))

    p = cmd("simulate", "run a simulated fleet of EAGLE gateways (both protocols) with "
            "fault injection", c.simulate)
    p.add_argument("--devices", type=argtypes.count, default=1000, help="fleet size (default 1000)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    p.add_argument("--port", type=argtypes.port, default=0, help="port; 0 picks a free one")
    p.add_argument("--seed", type=int, default=0, help="values, faults and passwords derive "
                   "from it")
    p.add_argument("--interval", type=argtypes.seconds, default=None, metavar="SECONDS",
                   help="expected poll interval, for the jitter report")
    p.add_argument("--fault", action="append", default=[], metavar="KIND=RATE",
                   help="per-request fault probability, e.g. --fault http_5xx=0.01; kinds: "
                   "auth http_5xx hang slow malformed reset offline")
    p.add_argument("--http10-fraction", type=float, default=0.0,
                   help="share of devices answering HTTP/1.0 + Connection: close")
    p.add_argument("--record-served", action="store_true",
                   help="record every reading served (GET /_sim/served)")
    p.add_argument("--register", action="store_true",
                   help="register (or refresh) the fleet in poller's registry, pointing at "
                   "this simulator")
    p.add_argument("--port-file", type=Path, default=None,
                   help="write the bound port here once listening")

    p = cmd("replay", "reload Postgres from the S3 archive (idempotent); a day retention "
            "dropped comes back into its partition", c.replay)
    p.add_argument("--since", type=argtypes.moment, default=None, metavar="TIME",
                   help="first tick time to load: ISO 8601 (UTC if no offset) or Unix seconds")
    p.add_argument("--until", type=argtypes.moment, default=None, metavar="TIME",
                   help="load tick times before this")
    p.add_argument("--day", type=argtypes.utc_day, default=None, metavar="YYYY-MM-DD",
                   help="load one whole UTC day (instead of --since/--until)")
    p.add_argument("--prefix", default=None, help="archive key prefix (default s3.prefix)")

    p = cmd("retention", "show what each storage level holds and what retention would drop "
            "and why; --apply drops it (raw days only once S3 holds all of them)", c.retention)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", dest="apply", action="store_false", default=False,
                      help="decide and show, change nothing (the default)")
    mode.add_argument("--apply", dest="apply", action="store_true",
                      help="drop what the policy lets go")

    p = cmd("archive", "the archive bucket's lifecycle rule: colder storage after "
            "retention.archive_cold_after_days, never deleting by default", c.archive)
    p.add_argument("action", choices=("lifecycle",))
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--show", dest="apply", action="store_false", default=False,
                      help="show the rule, the bucket's rules and whether the server can "
                      "apply it (the default)")
    mode.add_argument("--apply", dest="apply", action="store_true",
                      help="set the rule on the bucket, keeping its other rules")

    p = cmd("compact", "pack closed days' raw readings into one row per device and hour "
            "(about a tenth of the bytes; readings_all() reads both forms)", c.compact)
    p.add_argument("--day", type=argtypes.utc_day, default=None, metavar="YYYY-MM-DD",
                   help="compact this UTC day only (default: every closed day with raw rows)")
    p.add_argument("--dry-run", action="store_true", help="count what would be packed; "
                   "change nothing")
    p.add_argument("--batch-devices", type=argtypes.count, default=100, metavar="N",
                   help="devices per transaction (default 100)")

    p = cmd("bench", "measure throughput, lateness, CPU and memory per device against the "
            "simulator (starts its own stack under STATE_DIR/bench)", _run_bench)
    if argv is None or "bench" in argv:
        from poller.bench.run import add_arguments as bench_arguments

        bench_arguments(p)

    p = cmd("check", "monitoring check of a running instance (exit 0 OK, 1 WARNING, "
            "2 CRITICAL, 3 UNKNOWN)", c.check)
    p.add_argument("--url", default=None, help="API base URL (default from api.host/port); "
                   "the read token comes from POLLER_API_TOKEN or the configuration")
    p.add_argument("--timeout", type=argtypes.seconds, default=5.0, metavar="SECONDS")
    from poller.check import Thresholds

    defaults = Thresholds()
    for name in ("poll_ratio_warn", "poll_ratio_crit", "failure_ratio_warn",
                 "failure_ratio_crit", "ingest_lag_warn_s", "ingest_lag_crit_s",
                 "upload_backlog_warn", "upload_backlog_crit"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name),
                       metavar="N", help=f"threshold (default {getattr(defaults, name):g})")
    return parser


def _device_flags(p: argparse.ArgumentParser, *, adding: bool) -> None:
    p.add_argument("--email", required=False, default=None,
                   help="account email (the cloud API's User header)")
    p.add_argument("--driver", default="eagle-cloud" if adding else None,
                   help="eagle-cloud (default), eagle-local or http-json")
    p.add_argument("--url", default=None, help="device or API base URL")
    p.add_argument("--interval", type=argtypes.seconds, default=None, metavar="SECONDS",
                   help="poll interval (default: polling.interval_s)")
    p.add_argument("--field", action="append", default=None, metavar="NAME=/json/pointer",
                   help="http-json: where a reading field lives in the answer (repeatable)")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password or install code from standard input")
    if not adding:
        p.add_argument("--change-password", action="store_true",
                       help=f"set a new password (prompt, or {PASSWORD_ENV})")
        p.add_argument("--clear-url", action="store_true", help="use the driver's default URL")
        state = p.add_mutually_exclusive_group()
        state.add_argument("--enable", dest="enabled", action="store_true", default=None)
        state.add_argument("--disable", dest="enabled", action="store_false")


def _run_bench(settings: Settings, args: argparse.Namespace) -> int:
    from poller.bench.run import run_bench

    return run_bench(settings, args)


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        settings = settings_from(args)
    except PollerError as exc:
        print(f"poller: configuration error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    logs.setup(settings.log.level, settings.log.format)
    try:
        code = args.func(settings, args)
    except PollerError as exc:
        print(f"poller: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code)
