"""poller: polls fleets of energy gateways and keeps every reading."""
__version__ = "0.1.0"
