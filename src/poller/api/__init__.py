"""The HTTP API, /metrics and health checks of a running service."""

from poller.api.app import make_app, start_api, stop_api

__all__ = ["make_app", "start_api", "stop_api"]
