"""The polling engine: transports, the device pool and the registry watcher,
started together and stopped in reverse."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from poller.config import PollingSettings, parse_shard
from poller.polling.adapt import FetchAdapter
from poller.polling.loop import CallbackTransport
from poller.polling.pool import DevicePool, ReadingSink
from poller.polling.sync import RegistryWatcher
from poller.sealing import SecretBox
from poller.transport import AiohttpClient, FastHttpClient

log = logging.getLogger("poller.polling")


class PollingEngine:
    def __init__(self, settings: PollingSettings, database_url: str, box: SecretBox,
                 sink: ReadingSink, *, seed: str,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        per_host = settings.connections_per_host
        # The fast client's global cap is the fleet-wide in-flight cap: no
        # connection limit hides below it (aiohttp's default of 100 would).
        self.fast = FastHttpClient(max_connections_per_host=per_host,
                                   max_connections=max(per_host, settings.max_in_flight),
                                   max_waiters=settings.max_in_flight)
        self.general = AiohttpClient(max_connections_per_host=per_host,
                                     max_connections=max(per_host, settings.max_in_flight))
        self._general_adapter = FetchAdapter(self.general)
        transports: dict[str, CallbackTransport] = {
            "eagle-cloud": self.fast,
            "eagle-local": self.fast,
            "http-json": self._general_adapter,
        }
        self.pool = DevicePool(settings, sink, transports, seed=seed, wall_clock=wall_clock,
                               wheel_resolution_s=settings.wheel_resolution_s)
        shard = parse_shard("polling.shard", settings.shard) if settings.shard else (0, 1)
        self.watcher = RegistryWatcher(database_url, box, self.pool, settings.resync_interval_s,
                                       shard=shard)
        self._started = False

    async def start(self) -> None:
        await self.pool.start()
        await self.watcher.start()
        self._started = True
        shard = f" (shard {self.settings.shard})" if self.settings.shard else ""
        log.info("polling %d device(s)%s", len(self.pool.loops), shard)

    async def stop(self, timeout_s: float) -> None:
        """Stop the watcher, then every loop (waiting up to ``timeout_s`` for
        polls in flight), then the transports. Idempotent."""
        if not self._started:
            return
        self._started = False
        await self.watcher.stop()
        left = await self.pool.stop(timeout_s)
        if left:
            log.warning("%d poll(s) still in flight at shutdown were abandoned", left)
        await self._general_adapter.close()
        await self.fast.close()
        await self.general.close()
