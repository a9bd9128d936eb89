"""Parsing of path, query and body values, each failure a 400 naming the value."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import orjson
from aiohttp import web

from poller.api.errors import ApiError, bad_request

# The devices table's own constraint on ids: anything else names nothing.
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
_EAGLE_ID_RE = re.compile(r"^[0-9a-fA-F]{6}$")
_INT_RE = re.compile(r"^[0-9]{1,18}$")
_NUMBER_RE = re.compile(r"^-?[0-9]{1,12}(\.[0-9]{1,9})?$")
# Times outside these years are certainly typos, and stay clear of the
# overflow edges of datetime and Postgres.
_MIN_TIME = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_TIME = datetime(9000, 1, 1, tzinfo=UTC)


def cloud_id(request: web.Request) -> str:
    """The ``{cloud_id}`` path segment, normalised as the registry stores it."""
    raw = request.match_info["cloud_id"]
    if not _ID_RE.match(raw):
        raise ApiError(400, "invalid_id", "malformed device id: expected 1-64 of "
                       "A-Z a-z 0-9 _ . : - starting with a letter or digit")
    return raw.lower() if _EAGLE_ID_RE.match(raw) else raw


def query_int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not _INT_RE.match(raw) or not lo <= int(raw) <= hi:
        raise bad_request(f"query parameter {name!r}: expected a whole number "
                          f"from {lo} to {hi}")
    return int(raw)


def query_time(request: web.Request, name: str, default: datetime) -> datetime:
    """ISO 8601 (naive means UTC) or Unix seconds."""
    raw = request.query.get(name)
    if raw is None:
        return default
    when: datetime
    try:
        if _NUMBER_RE.match(raw):
            when = datetime.fromtimestamp(float(raw), tz=UTC)
        else:
            when = datetime.fromisoformat(raw)
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            when = when.astimezone(UTC)
    except (ValueError, OverflowError, OSError):
        raise bad_request(f"query parameter {name!r}: expected an ISO 8601 time such as "
                          "2024-05-01T12:00:00Z or Unix seconds") from None
    if not _MIN_TIME <= when <= _MAX_TIME:
        raise bad_request(f"query parameter {name!r}: expected a time between "
                          "1970 and 9000")
    return when


def check_query(request: web.Request, known: frozenset[str]) -> None:
    """Refuse unknown and repeated query parameters (which value would win?)."""
    unknown = sorted(set(request.query) - known)
    if unknown:
        raise bad_request(f"unknown query parameter(s): {', '.join(unknown)}")
    if len(request.query) != len(set(request.query)):
        raise bad_request("a query parameter is given more than once")


async def json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object; strings free of NUL (Postgres refuses it)."""
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad_request("the body is not valid JSON", "malformed_json") from None
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object", "malformed_json")
    _check_text(body, "body")
    return body


def _check_text(value: Any, where: str) -> None:
    if isinstance(value, str):
        if "\x00" in value:
            raise bad_request(f"{where}: strings may not contain NUL characters")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k, where)
            _check_text(v, f"{where}.{k}" if len(where) < 200 else where)
    elif isinstance(value, list):
        for v in value:
            _check_text(v, where)
    elif isinstance(value, float) and not math.isfinite(value):
        raise bad_request(f"{where}: numbers must be finite")


def typed(body: dict[str, Any], name: str, kinds: tuple[type, ...], what: str) -> Any:
    """``body[name]`` if present and of one of ``kinds`` (bool is not a number)."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds:
        raise bad_request(f"field {name!r}: expected {what}, got a boolean", "wrong_type")
    if not isinstance(value, kinds):
        raise bad_request(f"field {name!r}: expected {what}, got "
                          f"{type(value).__name__}", "wrong_type")
    return value


MAX_SERIES_POINTS = 10_000
MAX_SERIES_RANGE = timedelta(days=366)


class SeriesQuery(NamedTuple):
    start: datetime
    end: datetime
    step_s: int


def query_series(request: web.Request, *, min_step_s: int = 1) -> SeriesQuery:
    """``from``, ``to`` (default: the last day) and ``step`` (default 60 s) of a
    series request, each failure a 400: ``from`` before ``to``, at most 366
    days apart, at most 10,000 points, a step of ``min_step_s`` or more."""
    check_query(request, frozenset({"from", "to", "step"}))
    now = datetime.now(UTC).replace(microsecond=0)
    end = query_time(request, "to", now)
    start = query_time(request, "from", end - timedelta(days=1))
    step = query_int(request, "step", max(60, min_step_s), min_step_s,
                     int(MAX_SERIES_RANGE.total_seconds()))
    if start >= end:
        raise bad_request("'from' must be before 'to'", "bad_range")
    if end - start > MAX_SERIES_RANGE:
        raise bad_request("the range from 'from' to 'to' may span at most 366 days",
                          "bad_range")
    points = math.ceil((end - start).total_seconds() / step)
    if points > MAX_SERIES_POINTS:
        raise bad_request(f"{points} points requested; at most {MAX_SERIES_POINTS} per "
                          "request (raise 'step' or narrow the range)", "too_many_points")
    return SeriesQuery(start, end, step)
