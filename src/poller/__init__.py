"""poller: polls fleets of energy gateways and keeps every reading."""

from poller import build as _build

__version__ = "0.1.0"

# Before any other poller module is imported: compiled or plain Python.
_build.choose()
