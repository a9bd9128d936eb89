"""Where the servers are: configured URLs, or the embedded stack's.

A component whose URL is configured is used as it is; the others come from
the embedded stack under the state directory, started (idempotently) if
needed. Production configures all three and never starts anything here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from poller.config import Settings
from poller.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from poller.stack import EmbeddedStack

_URL_KEYS = (("database.url", "POLLER_DATABASE_URL"), ("redis.url", "POLLER_REDIS_URL"),
             ("s3.endpoint_url", "POLLER_S3_ENDPOINT_URL"))


@dataclass(frozen=True, slots=True)
class Endpoints:
    database_url: str
    redis_url: str
    s3_endpoint_url: str | None
    """None: the AWS default endpoints (``s3.endpoint_url = "aws"``)."""
    bucket: str


def resolve(settings: Settings, progress: Callable[[str], None] | None = None) -> Endpoints:
    db, redis, s3 = settings.database.url, settings.redis.url, settings.s3.endpoint_url
    if not (db and redis and s3):
        info = embedded_stack(settings, progress).up()
        db, redis, s3 = info.database_url, info.redis_url, info.s3_endpoint_url
    return Endpoints(db, redis, None if s3 == "aws" else s3, settings.s3.bucket)


def embedded_stack(settings: Settings,
                   progress: Callable[[str], None] | None = None) -> EmbeddedStack:
    """The embedded stack for the servers ``settings`` leaves without a URL.

    Without the ``embedded`` extra (a production install) that is a one-line
    configuration error naming the keys to set, not an ImportError."""
    try:
        from poller.stack import EmbeddedStack
    except ImportError as exc:
        missing = f"the embedded servers are not installed (no module {exc.name!r})"
        urls = (settings.database.url, settings.redis.url, settings.s3.endpoint_url)
        unset = [pair for pair, url in zip(_URL_KEYS, urls, strict=True) if not url]
        if not unset:
            raise UsageError(f"{missing}: install poller[embedded]") from None
        raise ConfigError(", ".join(key for key, _ in unset),
                          f"not set, and {missing}: set {', '.join(v for _, v in unset)} "
                          "(or the keys in the configuration file), or install "
                          "poller[embedded]") from None
    return EmbeddedStack(settings.state_dir, database_url=settings.database.url or None,
                         redis_url=settings.redis.url or None,
                         s3_endpoint_url=settings.s3.endpoint_url or None,
                         bucket=settings.s3.bucket, progress=progress)


def redact_url(url: str) -> str:
    """The URL with any password replaced, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = (parts.username or "") + ":***"
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[-1]}"))
