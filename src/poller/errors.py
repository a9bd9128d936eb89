"""Domain exceptions. The CLI maps each to a one-line message and exit code."""

from __future__ import annotations


class PollerError(Exception):
    """Base of the errors poller reports to a person rather than as a traceback."""

    exit_code = 1


class UsageError(PollerError):
    """Bad input from the person at the keyboard: flags, ids, emails, URLs."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration key is unknown or its value has the wrong form."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key

    def __repr__(self) -> str:
        return f"ConfigError({self.args[0]!r})"


class NotFoundError(UsageError):
    """An id that names nothing (an unknown device, say)."""


class ConflictError(UsageError):
    """A request that clashes with what exists (a duplicate registration)."""


class SecretKeyError(PollerError):
    """The sealing key is missing, malformed, or not the key a secret was sealed with."""

    exit_code = 2


class StackError(PollerError):
    """An embedded server failed to start, answer or stop."""
