"""Typed keys of what the API keeps on its aiohttp Application."""

from __future__ import annotations

from aiohttp import web

from poller.api.view import ServiceView

VIEW = web.AppKey("view", ServiceView)
