"""``poller check``: a Nagios-style probe of a running instance.

It reads ``GET /api/fleet`` and grades four numbers against thresholds,
printing one status line with perfdata and exiting 0 OK, 1 WARNING,
2 CRITICAL or 3 UNKNOWN (the instance could not be asked). The same checks
exist as Prometheus alerts in ``scripts/alerts.yml``.

    >>> code, line = run_check("http://127.0.0.1:8640", None, Thresholds(), 5.0)  # doctest: +SKIP
    >>> line                                                                      # doctest: +SKIP
    'POLLER OK - 16000.0/16000.0 polls/s (100%), ... | polls_per_s=16000;...'
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import Message
from typing import IO, Any
from urllib.parse import urlsplit

from poller.config import Settings

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
_NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}
TOKEN_ENV = "POLLER_API_TOKEN"
FLEET_PATH = "/api/fleet"


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Warning and critical levels; each overridable from the command line."""

    poll_ratio_warn: float = 0.95
    """Completed / expected polls per second below this: warning."""
    poll_ratio_crit: float = 0.8
    failure_ratio_warn: float = 0.05
    """Failed / all polls per second above this: warning."""
    failure_ratio_crit: float = 0.2
    ingest_lag_warn_s: float = 10.0
    ingest_lag_crit_s: float = 60.0
    upload_backlog_warn: int = 2
    """Closed segments waiting for S3 above this: warning."""
    upload_backlog_crit: int = 6


@dataclass(frozen=True, slots=True)
class _Numbers:
    polls_per_s: float
    expected_polls_per_s: float
    failure_ratio: float
    ingest_lag_s: float
    upload_backlog: int

    @property
    def poll_ratio(self) -> float:
        if self.expected_polls_per_s <= 0:
            return 1.0
        return self.polls_per_s / self.expected_polls_per_s


class _Unknown(Exception):
    pass


def fleet_url(url: str) -> str:
    """``url`` if it already names /api/fleet, else that path under it."""
    base = url.rstrip("/")
    return base if base.endswith(FLEET_PATH) else base + FLEET_PATH


def default_url(settings: Settings) -> str:
    """Where this configuration's API listens, as seen from the same host."""
    host = settings.api.host
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.api.port}"


def token_from(env: Mapping[str, str], settings: Settings | None) -> str | None:
    """``$POLLER_API_TOKEN``, else the configured read token; never the admin
    token: a monitoring probe (and wherever its URL points) gets no write power."""
    token = env.get(TOKEN_ENV)
    if token:
        return token
    if settings is not None:
        return settings.api.read_token or None
    return None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse redirects: urllib would resend the Authorization header to
    wherever a Location points, another host included."""

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int,
                         msg: str, headers: Message, newurl: str) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _fetch(url: str, token: str | None, timeout_s: float) -> dict[str, Any]:
    target = fleet_url(url)
    if urlsplit(target).scheme not in ("http", "https"):
        raise _Unknown(f"not an http(s) URL: {url!r}")
    request = urllib.request.Request(target, headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with _OPENER.open(request, timeout=timeout_s) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        hint = ""
        if exc.code in (401, 403):
            hint = " (token missing or wrong? set $POLLER_API_TOKEN or api.read_token)"
        elif 300 <= exc.code < 400:
            hint = " (a redirect, not followed: give the instance's own URL)"
        raise _Unknown(f"{target} answered HTTP {exc.code}{hint}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _Unknown(f"cannot reach {target}: {reason}") from None
    try:
        doc = json.loads(raw)
    except ValueError:
        raise _Unknown(f"{target} did not answer JSON") from None
    if not isinstance(doc, dict):
        raise _Unknown(f"{target} did not answer a JSON object")
    return doc


def _numbers(doc: dict[str, Any]) -> _Numbers:
    try:
        rates = {str(k): float(v) for k, v in doc["polls_per_s"].items()}
        total = sum(rates.values())
        failed = total - rates.get("ok", 0.0)
        return _Numbers(
            polls_per_s=total,
            expected_polls_per_s=float(doc["expected_polls_per_s"]),
            failure_ratio=failed / total if total > 0 else 0.0,
            ingest_lag_s=float(doc["ingest_lag_s"]),
            upload_backlog=int(doc["segments_pending_upload"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _Unknown(f"unexpected fleet document ({type(exc).__name__}: {exc})") from None


def _grade(n: _Numbers, t: Thresholds) -> list[tuple[int, str]]:
    """(state, text) for each check, in a fixed order."""
    def level(bad_crit: bool, bad_warn: bool) -> int:
        return CRITICAL if bad_crit else WARNING if bad_warn else OK

    return [
        (level(n.poll_ratio < t.poll_ratio_crit, n.poll_ratio < t.poll_ratio_warn),
         f"{n.polls_per_s:.1f}/{n.expected_polls_per_s:.1f} polls/s ({n.poll_ratio:.0%})"),
        (level(n.failure_ratio > t.failure_ratio_crit, n.failure_ratio > t.failure_ratio_warn),
         f"failures {n.failure_ratio:.1%}"),
        (level(n.ingest_lag_s > t.ingest_lag_crit_s, n.ingest_lag_s > t.ingest_lag_warn_s),
         f"ingest lag {n.ingest_lag_s:.1f} s"),
        (level(n.upload_backlog > t.upload_backlog_crit, n.upload_backlog > t.upload_backlog_warn),
         f"{n.upload_backlog} segment(s) awaiting upload"),
    ]


def _cluster_grade(cluster: Any) -> list[tuple[int, str]]:
    """A warning per cluster member that holds no lease but did not leave
    (kill -9, a lost host): its devices are polled by the others, and its
    unuploaded spool waits for that instance id to start again."""
    if not isinstance(cluster, dict) or not cluster.get("enabled"):
        return []
    graded: list[tuple[int, str]] = []
    for gone in cluster.get("missing") or []:
        if isinstance(gone, dict):
            graded.append((WARNING, f"cluster member {gone.get('id')} missing for "
                                    f"{float(gone.get('last_seen_s_ago') or 0):.0f} s"))
    if cluster.get("store_up") is False:
        graded.append((WARNING, "cluster membership store unreachable"))
    return graded


def _perfdata(n: _Numbers, t: Thresholds) -> str:
    return " ".join([
        f"polls_per_s={n.polls_per_s:g};;;0",
        f"expected_polls_per_s={n.expected_polls_per_s:g};;;0",
        f"poll_ratio={n.poll_ratio:.4g};{t.poll_ratio_warn:g}:;{t.poll_ratio_crit:g}:;0",
        f"failure_ratio={n.failure_ratio:.4g};{t.failure_ratio_warn:g};"
        f"{t.failure_ratio_crit:g};0;1",
        f"ingest_lag_s={n.ingest_lag_s:g}s;{t.ingest_lag_warn_s:g};{t.ingest_lag_crit_s:g};0",
        f"upload_backlog={n.upload_backlog};{t.upload_backlog_warn};{t.upload_backlog_crit};0",
    ])


def run_check(url: str, token: str | None, thresholds: Thresholds,
              timeout_s: float) -> tuple[int, str]:
    """Ask the instance at ``url``; return (exit code, status line with perfdata)."""
    try:
        doc = _fetch(url, token, timeout_s)
        numbers = _numbers(doc)
    except _Unknown as exc:
        return UNKNOWN, f"POLLER UNKNOWN - {exc}"
    graded = _grade(numbers, thresholds) + _cluster_grade(doc.get("cluster"))
    code = max(state for state, _ in graded)
    # The checks that fired come first, so a truncated line still says why.
    texts = [text + (f" ({_NAMES[state]})" if state else "")
             for state, text in sorted(graded, key=lambda g: -g[0])]
    return code, f"POLLER {_NAMES[code]} - {', '.join(texts)} | {_perfdata(numbers, thresholds)}"
