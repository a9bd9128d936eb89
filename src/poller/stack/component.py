"""The seam every embedded server implements, so the stack can drive them alike."""

from __future__ import annotations

from typing import Protocol


class Component(Protocol):
    """One server of the stack, bound to its record in `stack.json`."""

    name: str

    def url(self) -> str | None:
        """Client URL, known once the component has been started at least once."""
        ...

    def pid(self) -> int | None:
        """Pid of the running server process, None when it is not running."""
        ...

    def ready(self) -> bool:
        """True if the server answers its protocol right now."""
        ...

    def start(self, *, same_ports: bool) -> None:
        """Start and wait until ready; with `same_ports`, fail rather than move ports."""
        ...

    def stop(self) -> None:
        """Stop the recorded process and wait until it is gone; no-op when stopped."""
        ...
