"""The embedded server stack: PostgreSQL, Valkey and SeaweedFS S3 on loopback."""

from poller.stack.embedded import COMPONENTS, ComponentStatus, EmbeddedStack, StackInfo
from poller.stack.errors import StackError, StackStartError, StackStopError
from poller.stack.postgres import create_database, pg_bin_dir

__all__ = [
    "COMPONENTS",
    "ComponentStatus",
    "EmbeddedStack",
    "StackError",
    "StackInfo",
    "StackStartError",
    "StackStopError",
    "create_database",
    "pg_bin_dir",
]
