"""``poller import`` and ``poller export-users``: their flags, their input and
output. The work is :mod:`poller.importer` (plan and write) and
:mod:`poller.fleetfile` (the formats); :mod:`poller.commands` runs them on a
migrated database connection."""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING
from urllib.parse import urlsplit

from poller import argtypes, fleetfile
from poller.cliutil import print_json
from poller.errors import UsageError

if TYPE_CHECKING:  # imported where used: every poller command builds this parser
    from poller.config import Settings
    from poller.db import Conn
    from poller.registry import DeviceRecord

DEFAULT_BATCH_ROWS = 10_000

REDIS_PASSWORD_ENV = "POLLER_IMPORT_REDIS_PASSWORD"
IMPORT_HELP = "register or update many devices from a CSV or NDJSON file, or from the " \
    "Rainforest Logger's Redis"
IMPORT_DESCRIPTION = f"""\
{IMPORT_HELP}.

The file has the fields of add-user, CSV with a header row or NDJSON (one
JSON object a line; a JSON array works too): cloud_id, email, password (or
install_code), driver, url, interval_s, enabled, fields, options. Only
cloud_id is required; a new device needs its password. A field a row leaves
out keeps the registered value (or add-user's default for a new device).

THE FILE HOLDS DEVICE PASSWORDS: keep it readable by you only (chmod 600)
and delete it once imported; a file others can read is warned about.
Passwords never appear in the output, including the refusals.

Every row is checked first, as add-user checks it (ids, emails, URLs and
polling.allowed_networks / denied_networks, driver options). A row that
fails is refused with its line and reason; the others go on. Rows are then
written in batches (--batch-size), each in one transaction: a batch is
written whole or not at all, and a running serve picks it up at once. An
existing device that differs from its row is only reported, unless
--update. Importing the same file again changes nothing.

Dry run or not: with neither --dry-run nor --apply, the import is a dry run
(it reports, writes nothing) when standard input or standard output is a
terminal, since a person is then watching; run it again with --apply. From
a script (neither is a terminal) it writes.

Exit status: 0 every row imported or already as it is; 1 some row refused or
a batch not written (the report names them); 2 the input as a whole is bad."""
EXPORT_HELP = "write every registered device as CSV or NDJSON, without secrets " \
    "(for review, and to import again with --update)"


def import_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = IMPORT_DESCRIPTION
    p.add_argument("file", nargs="?", metavar="FILE",
                   help="the fleet file (.csv, .ndjson or .jsonl, .json), or - for standard "
                   "input")
    p.add_argument("--from-redis", metavar="URL", default=None,
                   help="read the Rainforest Logger's user records (one key per cloud id, a "
                   "JSON value with cloud_id, user_email, user_pw, total_events_logged, "
                   "first_timestamp, last_timestamp) from this Redis, e.g. "
                   "redis://host:6379/0, and register them as eagle-cloud devices; the "
                   f"Logger's history goes to options.history. Redis's own password, if "
                   f"any, comes from {REDIS_PASSWORD_ENV}, never the URL")
    p.add_argument("--match", metavar="PATTERN", default="*",
                   help="with --from-redis: only keys matching this Redis glob "
                   "(default *)")
    p.add_argument("--format", choices=fleetfile.FORMATS, default=None,
                   help="the file's format (default: from its extension, else from its "
                   "first character)")
    p.add_argument("--update", action="store_true",
                   help="change existing devices that differ from their row")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", dest="dry_run", action="store_true", default=None,
                      help="report what would change, write nothing")
    mode.add_argument("--apply", dest="dry_run", action="store_false",
                      help="write (the default unless a terminal is attached)")
    p.add_argument("--batch-size", type=argtypes.count, default=DEFAULT_BATCH_ROWS,
                   metavar="ROWS", help=f"rows per transaction (default {DEFAULT_BATCH_ROWS})")
    p.add_argument("--json", action="store_true",
                   help="print the report as one JSON document")


def export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=("csv", "ndjson"), default=None,
                   help="default: from the --output extension, else csv")
    p.add_argument("--output", "-o", type=Path, default=None, metavar="FILE",
                   help="write here instead of standard output")


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class Source:
    """What to import: a file's rows, or the Logger's Redis."""

    name: str
    rows: list[fleetfile.Parsed] | None = None
    redis_url: str | None = None


def read_source(args: argparse.Namespace) -> Source:
    """The input named by the flags, read and parsed now: a file that is bad as
    a whole is refused before any server is touched."""
    if (args.file is None) == (args.from_redis is None):
        raise UsageError("give a FILE (or - for standard input) or --from-redis URL, "
                         "one of the two")
    if args.from_redis is not None:
        parts = urlsplit(args.from_redis)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise UsageError("--from-redis expects redis://host[:port][/db] (or rediss://, "
                             "unix://)")
        if parts.password is not None:
            raise UsageError("--from-redis: the URL carries a password, which would show in "
                             f"ps: give it in {REDIS_PASSWORD_ENV} instead")
        return Source(name=f"redis {args.from_redis}", redis_url=args.from_redis)
    if args.match != "*":
        raise UsageError("--match goes with --from-redis")
    if args.file == "-":
        data = sys.stdin.buffer.read()
        _warn_if_readable(os.fstat(sys.stdin.fileno()), "standard input", data)
        name = None
    else:
        try:
            with open(args.file, "rb") as fh:
                data = fh.read()
                _warn_if_readable(os.fstat(fh.fileno()), args.file, data)
        except OSError as exc:
            raise UsageError(f"cannot read {args.file}: {exc.strerror}") from None
        name = args.file
    fmt = args.format or fleetfile.detect_format(name, data)
    return Source(name=name or "standard input", rows=fleetfile.parse(data, fmt))


def _warn_if_readable(st: os.stat_result, name: str, data: bytes) -> None:
    # Only a regular file keeps the passwords after the import.
    if stat.S_ISREG(st.st_mode) and st.st_mode & stat.S_IROTH and \
            (b"password" in data or b"install_code" in data):
        _progress(f"warning: {name} holds device passwords and every user of this machine "
                  f"can read it (mode {stat.S_IMODE(st.st_mode):o}): chmod 600 it, and "
                  "delete it once imported")


def dry_run_default(args: argparse.Namespace) -> bool:
    """A dry run unless told, when a person is at a terminal."""
    if args.dry_run is not None:
        return bool(args.dry_run)
    return sys.stdin.isatty() or sys.stdout.isatty()


async def run_import(conn: Conn, settings: Settings, args: argparse.Namespace,
                     source: Source) -> int:
    from poller import sealing
    from poller.importer import Importer, ImportOptions
    from poller.netpolicy import NetPolicy
    from poller.registry import registry_key

    if source.redis_url is not None:
        rows = await fleetfile.read_logger(source.redis_url, args.match,
                                           os.environ.get(REDIS_PASSWORD_ENV) or None,
                                           _progress)
    else:
        assert source.rows is not None
        rows = source.rows
    _progress(f"import: {len(rows):,} row(s) from {source.name}")
    dry_run = dry_run_default(args)
    options = ImportOptions(update=args.update, dry_run=dry_run, batch_rows=args.batch_size,
                            default_interval_s=settings.polling.interval_s)
    box = sealing.SecretBox(await registry_key(conn, settings.state_dir))
    report = await Importer(conn, box, NetPolicy.from_settings(settings.polling), options,
                            _progress).run(rows)
    if args.json:
        print_json(report.to_json())
    else:
        for line in report.details():
            print(line)
        print(report.summary())
        if dry_run and args.dry_run is None:
            _progress("import: a dry run, as a terminal is attached: run again with --apply "
                      "to write")
    return 0 if report.complete else 1


def export_format(args: argparse.Namespace) -> str:
    if args.format is not None:
        return str(args.format)
    if args.output is not None and args.output.suffix.lower() in (".ndjson", ".jsonl"):
        return "ndjson"
    return "csv"


def write_users(records: Sequence[DeviceRecord], args: argparse.Namespace) -> int:
    """Write ``records`` where the flags say; returns how many."""
    fmt = export_format(args)
    if args.output is None:
        return _write(records, fmt, sys.stdout)
    try:
        with args.output.open("w", encoding="utf-8", newline="") as out:
            return _write(records, fmt, out)
    except OSError as exc:
        raise UsageError(f"cannot write {args.output}: {exc.strerror}") from None


def _write(records: Sequence[DeviceRecord], fmt: str, out: IO[str]) -> int:
    n = fleetfile.write_export(records, fmt, out)
    _progress(f"export: {n:,} device(s) as {fmt}")
    return n
