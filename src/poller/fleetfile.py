"""Fleet files: the rows ``poller import`` reads and ``poller export-users`` writes.

Three formats hold the fields of ``add-user`` (:data:`COLUMNS`): CSV with a
header row, NDJSON (one JSON object a line) and a JSON array of objects. A
fourth source is the Rainforest Logger's Redis, one key per cloud id holding
a JSON blob (:func:`logger_row`). Each row keeps where it came from (a line,
an array item, a Redis key) so that a refusal names it, and a field a row
leaves out is marked as not given: an update keeps what is registered.

    >>> rows = parse(b"cloud_id,email,password\\n00AB12,a@b.example,pw-1\\nzz\\n", "csv")
    >>> rows[0].cloud_id, sorted(rows[0].given), str(rows[0].where)
    ('00AB12', ['cloud_id', 'email', 'password'], 'line 2')
    >>> rows[1]
    BadRow(where=Where(kind='line', ref=3), cloud_id=None, reason='1 value(s) for 3 columns')

Nothing here ever puts a password into a reason: a row whose cells do not
line up with the header is refused without echoing any of them.
"""

from __future__ import annotations

import csv
import io
import math
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

import orjson

from poller.errors import UsageError

if TYPE_CHECKING:
    from poller.registry import DeviceRecord

COLUMNS = ("cloud_id", "email", "password", "install_code", "driver", "url", "interval_s",
           "enabled", "fields", "options")
"""What a row may set; ``password`` and ``install_code`` are the same secret
under the names the two EAGLE generations give it."""
EXPORT_COLUMNS = ("cloud_id", "email", "driver", "url", "interval_s", "enabled", "options")
"""What ``export-users`` writes: every column but the secrets."""
FORMATS = ("csv", "ndjson", "json")
LOGGER_SOURCE = "rainforest-logger"
_SECRET_COLUMNS = frozenset({"password", "install_code"})
_TEXT_COLUMNS = ("cloud_id", "email", "password", "install_code", "driver", "url")
_TRUE = frozenset({"true", "yes", "1", "on"})
_FALSE = frozenset({"false", "no", "0", "off"})
_MAX_ID_ECHO = 64


@dataclass(frozen=True, slots=True)
class Where:
    """Where a row came from: ``line`` of a CSV or NDJSON text, ``item`` of a
    JSON array (both from 1), or ``key`` in Redis."""

    kind: str
    ref: int | str

    def __str__(self) -> str:
        return f"{self.kind} {self.ref}"

    def to_json(self) -> dict[str, int | str]:
        return {self.kind: self.ref}


@dataclass(frozen=True, slots=True)
class FleetRow:
    """One device as a row gives it. Only the fields in ``given`` were in the
    row; the others hold defaults that mean nothing."""

    where: Where
    cloud_id: str
    given: frozenset[str]
    email: str = ""
    driver: str = ""
    url: str | None = None
    interval_s: float = 0.0
    enabled: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)
    secret: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class BadRow:
    """A row refused, and why (the reason never holds the row's password)."""

    where: Where
    cloud_id: str | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {**self.where.to_json(), "cloud_id": self.cloud_id, "reason": self.reason}


Parsed = FleetRow | BadRow


def detect_format(name: str | None, data: bytes) -> str:
    """The format of ``data``: from the file name's extension, else from its
    first character (``[`` a JSON array, ``{`` NDJSON, anything else CSV).

    >>> detect_format("fleet.jsonl", b""), detect_format(None, b'  {"a": 1}')
    ('ndjson', 'ndjson')
    """
    if name is not None:
        suffix = name.rsplit(".", 1)[-1].lower() if "." in name else ""
        if suffix in ("csv", "ndjson", "json"):
            return suffix
        if suffix == "jsonl":
            return "ndjson"
    head = data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    return {b"[": "json", b"{": "ndjson"}.get(head, "csv")


def parse(data: bytes, fmt: str) -> list[Parsed]:
    """Rows of a fleet file in ``fmt`` (one of :data:`FORMATS`), in order.

    A problem of the whole file (not UTF-8, no header, an unknown column, an
    array that is not JSON) is a UsageError; a problem of one row is a
    :class:`BadRow` in its place."""
    return list(iter_rows(data, fmt))


def iter_rows(data: bytes, fmt: str) -> Iterator[Parsed]:
    """:func:`parse`, a row at a time (for a caller that must pause between
    rows); a problem of the whole file is raised before the first row."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"the input is not UTF-8 text (byte {exc.start})") from None
    if fmt == "csv":
        return _parse_csv(text)
    if fmt == "ndjson":
        return (_parse_line(n, line) for n, line in enumerate(text.splitlines(), 1)
                if line.strip())
    try:
        items = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise UsageError(f"the input is not valid JSON ({exc.msg}, at character "
                         f"{exc.pos})") from None
    if not isinstance(items, list):
        raise UsageError("a JSON input must be an array of objects (or use NDJSON)")
    return (_from_json(Where("item", n), item) for n, item in enumerate(items, 1))


def _parse_csv(text: str) -> Iterator[Parsed]:
    """The header is checked at once; the rows as they are asked for."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise UsageError(f"line 1: the header is not CSV ({exc})") from None
    if header is None:
        raise UsageError("the input is empty: expected a header row naming the columns "
                         f"({', '.join(COLUMNS)})")
    names = [h.strip().lower() for h in header]
    unknown = sorted(set(names) - set(COLUMNS))
    if unknown:
        raise UsageError(f"unknown column(s) {', '.join(map(repr, unknown))} in the header "
                         f"(known: {', '.join(COLUMNS)})")
    if "cloud_id" not in names:
        raise UsageError("the header has no cloud_id column")
    if len(set(names)) != len(names):
        raise UsageError("a column is named twice in the header")
    return _csv_rows(reader, names)


def _csv_rows(reader: Any, names: list[str]) -> Iterator[Parsed]:
    line = reader.line_num + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            # The csv module's reasons name a character, never a cell.
            yield BadRow(Where("line", line), None, f"not CSV: {exc}")
            return
        where = Where("line", line)
        line = reader.line_num + 1
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(names):
            # Which cell slid into which column is unknown: echo none of them.
            yield BadRow(where, None, f"{len(cells)} value(s) for {len(names)} columns")
            continue
        values = {n: c.strip() for n, c in zip(names, cells, strict=True) if c.strip()}
        yield _guarded(where, values, from_text=True)


def _parse_line(n: int, line: str) -> Parsed:
    where = Where("line", n)
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return BadRow(where, None, f"not valid JSON ({exc.msg})")
    return _from_json(where, doc)


def _from_json(where: Where, doc: Any) -> Parsed:
    if not isinstance(doc, dict):
        return BadRow(where, None, "expected a JSON object")
    unknown = sorted(set(doc) - set(COLUMNS))
    if unknown:
        return BadRow(where, _echo_id(doc.get("cloud_id")),
                      f"unknown field(s) {', '.join(map(repr, unknown))[:200]} "
                      f"(known: {', '.join(COLUMNS)})")
    # null: not given, except for url, where it asks for the driver's default.
    values = {k: v for k, v in doc.items() if v is not None or k == "url"}
    return _guarded(where, values, from_text=False)


def _guarded(where: Where, values: Mapping[str, Any], *, from_text: bool) -> Parsed:
    secret = values.get("password") or values.get("install_code")
    secret = secret if isinstance(secret, str) else None
    try:
        return _row(where, values, from_text)
    except UsageError as exc:
        return BadRow(where, scrub(_echo_id(values.get("cloud_id")), secret),
                      scrub(str(exc), secret) or "")


def _row(where: Where, values: Mapping[str, Any], from_text: bool) -> FleetRow:
    for name in _TEXT_COLUMNS:
        value = values.get(name)
        if value is not None and not isinstance(value, str):
            raise UsageError(f"{name}: expected a string, got {_kind(value)}")
        if isinstance(value, str) and "\x00" in value:
            raise UsageError(f"{name}: contains a NUL character")
    cloud_id = values.get("cloud_id")
    if not cloud_id:
        raise UsageError("no cloud_id")
    if "password" in values and "install_code" in values:
        raise UsageError("give password or install_code, not both")
    given = set(values) - _SECRET_COLUMNS
    secret = values.get("password", values.get("install_code"))
    if secret is not None:
        given.add("password")
    extra: dict[str, Any] = {}
    if "interval_s" in values:
        extra["interval_s"] = _number(values["interval_s"], from_text)
    if "enabled" in values:
        extra["enabled"] = _flag(values["enabled"], from_text)
    if "options" in values:
        extra["options"] = _object("options", values["options"], from_text)
    if "fields" in values:
        extra["fields"] = _fields(values["fields"], from_text)
    return FleetRow(where, cloud_id, frozenset(given), email=values.get("email", ""),
                    driver=values.get("driver", ""), url=values.get("url") or None,
                    secret=secret, **extra)


def _number(value: Any, from_text: bool) -> float:
    if from_text and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise UsageError("interval_s: expected a number of seconds") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            not math.isfinite(value):
        raise UsageError("interval_s: expected a number of seconds")
    return float(value)


def _flag(value: Any, from_text: bool) -> bool:
    if from_text and isinstance(value, str):
        word = value.lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise UsageError("enabled: expected true or false")
    if not isinstance(value, bool):
        raise UsageError("enabled: expected true or false")
    return value


def _object(name: str, value: Any, from_text: bool) -> dict[str, Any]:
    if from_text and isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            raise UsageError(f"{name}: expected a JSON object") from None
    if not isinstance(value, dict):
        raise UsageError(f"{name}: expected a JSON object")
    if _has_nul(value):
        raise UsageError(f"{name}: contains a NUL character")
    return value


def _fields(value: Any, from_text: bool) -> dict[str, Any]:
    """``fields`` as JSON, or in CSV also as ``NAME=/pointer`` items apart by
    blanks, as ``add-user --field`` takes them."""
    if not (from_text and isinstance(value, str)) or value.lstrip().startswith("{"):
        return _object("fields", value, from_text)
    fields: dict[str, Any] = {}
    for item in value.split():
        name, sep, pointer = item.partition("=")
        if not sep or not pointer.startswith("/"):
            raise UsageError("fields: expected NAME=/json/pointer items or a JSON object")
        fields[name] = pointer
    return fields


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


def _echo_id(value: Any) -> str | None:
    """A cloud id fit to name a refused row: a short, printable string."""
    if isinstance(value, str) and 0 < len(value) <= _MAX_ID_ECHO and value.isprintable():
        return value
    return None


def scrub(text: str | None, secret: str | None) -> str | None:
    """``text`` without ``secret``: a password typed into the wrong column
    must not come back in the reason that refuses it.

    >>> scrub("malformed email 'hunter2'", "hunter2")
    "malformed email '<password>'"
    """
    if text is None or not secret:
        return text
    return text.replace(secret, "<password>")


# -- the Rainforest Logger's Redis records --------------------------------------

def logger_row(key: str, raw: bytes | None) -> Parsed:
    """One Logger record (key: the cloud id; value: JSON with ``cloud_id``,
    ``user_email``, ``user_pw``, ``total_events_logged``, ``first_timestamp``,
    ``last_timestamp``) as an eagle-cloud device. What the Logger knew of its
    history goes to ``options["history"]``: shown, never used for polling.

    >>> row = logger_row("002738", b'{"cloud_id": "002738", "user_email": "v@d.example", '
    ...                  b'"user_pw": "1234567", "total_events_logged": 2725, '
    ...                  b'"first_timestamp": 1443274732.39435}')
    >>> row.driver, row.options["history"]["total_events_logged"], row.secret == "1234567"
    ('eagle-cloud', 2725, True)
    """
    where = Where("key", key)
    if raw is None:
        return BadRow(where, _echo_id(key), "not a string value (the Logger keeps one JSON "
                      "string per cloud id)")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return BadRow(where, _echo_id(key), "not a Logger record: the value is not JSON")
    if not isinstance(doc, dict):
        return BadRow(where, _echo_id(key), "not a Logger record: expected a JSON object")
    secret = doc.get("user_pw") if isinstance(doc.get("user_pw"), str) else None
    try:
        return _logger_row(where, key, doc)
    except UsageError as exc:
        return BadRow(where, scrub(_echo_id(key), secret), scrub(str(exc), secret) or "")


def _logger_row(where: Where, key: str, doc: dict[str, Any]) -> FleetRow:
    cloud_id = doc.get("cloud_id", key)
    if not isinstance(cloud_id, str):
        raise UsageError("cloud_id: expected a string (with its leading zeroes)")
    if cloud_id.lower() != key.lower():
        raise UsageError(f"the record under key {key!r} names cloud id {_echo_id(cloud_id)!r}")
    email, secret = doc.get("user_email"), doc.get("user_pw")
    if not isinstance(email, str):
        raise UsageError("user_email: expected a string")
    if not isinstance(secret, str) or not secret:
        raise UsageError("user_pw: expected the password as a non-empty string")
    history: dict[str, Any] = {"source": LOGGER_SOURCE}
    count = doc.get("total_events_logged")
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise UsageError("total_events_logged: expected a whole number, 0 or more")
        history["total_events_logged"] = count
    for name in ("first_timestamp", "last_timestamp"):
        when = doc.get(name)
        if when is None:
            continue
        if isinstance(when, bool) or not isinstance(when, int | float) or \
                not 0 <= when < 1e11:
            raise UsageError(f"{name}: expected Unix seconds")
        history[name] = when
    values = {"cloud_id": cloud_id, "email": email, "password": secret,
              "driver": "eagle-cloud", "options": {"history": history}}
    return _row(where, values, from_text=False)


async def read_logger(url: str, pattern: str, password: str | None,
                      progress: Callable[[str], None]) -> list[Parsed]:
    """The Logger's records among the keys matching ``pattern`` (a Redis glob),
    in key order. ``password``: Redis's own (AUTH), never in ``url``."""
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    from poller.endpoints import redact_url

    client = aioredis.from_url(url, password=password, socket_timeout=10.0,
                               socket_connect_timeout=10.0)
    try:
        keys = sorted([k async for k in client.scan_iter(match=pattern, count=1000)])
        progress(f"import: {len(keys):,} key(s) match {pattern!r}")
        rows: list[Parsed] = []
        for start in range(0, len(keys), 1000):
            chunk = keys[start:start + 1000]
            values = await client.mget(chunk)
            rows.extend(logger_row(k.decode("utf-8", "replace"),
                                   v.encode() if isinstance(v, str) else v)
                        for k, v in zip(chunk, values, strict=True))
    except (RedisError, OSError) as exc:
        raise UsageError(f"cannot read the Logger's records from {redact_url(url)}: "
                         f"{type(exc).__name__}") from None
    finally:
        await client.aclose()
    return rows


# -- export -------------------------------------------------------------------

def export_row(record: DeviceRecord) -> dict[str, Any]:
    """A registered device as an import row, without its secret."""
    return {"cloud_id": record.cloud_id, "email": record.email, "driver": record.driver,
            "url": record.url, "interval_s": float(short_real(record.interval_s)),
            "enabled": record.enabled, "options": record.options}


def short_real(value: float) -> str:
    """The shortest text of a 4-byte float (``interval_s`` is a Postgres
    ``real``) that reads back as the same value.

    >>> short_real(6.099999904632568), short_real(10.0), short_real(0.25)
    ('6.1', '10', '0.25')
    """
    target = struct.pack("<f", value)
    for digits in range(1, 10):
        short = float(f"{value:.{digits}g}")
        if struct.pack("<f", short) == target:
            return str(int(short)) if short.is_integer() else repr(short)
    return repr(value)


def write_export(records: Iterable[DeviceRecord], fmt: str, out: IO[str]) -> int:
    """Write ``records`` as CSV or NDJSON; returns how many."""
    n = 0
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(EXPORT_COLUMNS)
        for record in records:
            row = export_row(record)
            writer.writerow([short_real(record.interval_s) if name == "interval_s"
                             else _cell(row[name]) for name in EXPORT_COLUMNS])
            n += 1
        return n
    if fmt != "ndjson":
        raise UsageError(f"export writes csv or ndjson, not {fmt!r}")
    for record in records:
        out.write(orjson.dumps(export_row(record)).decode() + "\n")
        n += 1
    return n


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return orjson.dumps(value).decode() if value else ""
    return str(value)

