"""Errors raised while starting or stopping the embedded stack."""

from __future__ import annotations


class StackError(Exception):
    """Base class: something in the embedded stack went wrong."""


class StackStartError(StackError):
    """A component did not become ready; carries the tail of its log."""

    def __init__(self, component: str, reason: str, log_tail: str = "") -> None:
        self.component = component
        self.reason = reason
        self.log_tail = log_tail
        message = f"{component}: {reason}"
        if log_tail:
            message += f"\n--- last lines of the {component} log ---\n{log_tail}"
        super().__init__(message)

    def __repr__(self) -> str:
        return f"StackStartError(component={self.component!r}, reason={self.reason!r})"


class StackStopError(StackError):
    """A component could not be stopped."""

    def __init__(self, component: str, reason: str) -> None:
        self.component = component
        self.reason = reason
        super().__init__(f"{component}: {reason}")
