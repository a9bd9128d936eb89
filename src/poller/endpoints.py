"""Where the servers are: configured URLs, or the embedded stack's.

A component whose URL is configured is used as it is; the others come from
the embedded stack under the state directory, started (idempotently) if
needed. Production configures all three and never starts anything here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from poller.config import Settings


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
        from poller.stack import EmbeddedStack

        info = EmbeddedStack(settings.state_dir, database_url=db or None,
                             redis_url=redis or None, s3_endpoint_url=s3 or None,
                             bucket=settings.s3.bucket, progress=progress).up()
        db, redis, s3 = info.database_url, info.redis_url, info.s3_endpoint_url
    return Endpoints(db, redis, None if s3 == "aws" else s3, settings.s3.bucket)


def redact_url(url: str) -> str:
    """The URL with any password replaced, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = (parts.username or "") + ":***"
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[-1]}"))
