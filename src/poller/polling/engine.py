"""The polling engine: transports, the device pool and the registry watcher,
started together and stopped in reverse.

A start that fails half-way (the first resync, say) undoes what it did: no
loop stays armed on the wheel, no connection or transport stays open.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from poller import snapshot
from poller.clock import Clock, LoopClock
from poller.config import EVERY_DEVICE, PollingSettings
from poller.db import Conn
from poller.drivers.base import DeviceSpec
from poller.netpolicy import NetPolicy
from poller.polling.adapt import FetchAdapter
from poller.polling.loop import CallbackTransport
from poller.polling.pool import DevicePool, ReadingSink
from poller.polling.sync import RegistryWatcher
from poller.registry import DeviceRecord
from poller.sealing import SecretBox
from poller.tasks import Supervisor
from poller.transport import AiohttpClient, FastHttpClient

log = logging.getLogger("poller.polling")


class PollingEngine:
    def __init__(self, settings: PollingSettings, database_url: str, box: SecretBox,
                 sink: ReadingSink, *, seed: str, clock: Clock | None = None,
                 snapshot_path: Path | None = None,
                 supervisor: Supervisor | None = None,
                 fence: Callable[[float], bool] | None = None) -> None:
        self.settings = settings
        clock = clock if clock is not None else LoopClock()
        per_host = settings.connections_per_host
        # The fast client's global cap is the fleet-wide in-flight cap: no
        # connection limit hides below it (aiohttp's default of 100 would).
        # Both check each new connection against polling.allowed_networks /
        # denied_networks (registration checked the URL; DNS can change since).
        policy = NetPolicy.from_settings(settings)
        self.fast = FastHttpClient(max_connections_per_host=per_host,
                                   max_connections=max(per_host, settings.max_in_flight),
                                   max_waiters=settings.max_in_flight, clock=clock,
                                   net_policy=policy,
                                   keep_after_timeout_s=settings.keep_after_timeout_s,
                                   max_connects_per_s=settings.max_connects_per_s,
                                   # Waiting is bounded in time (half what a
                                   # request has left); this bounds what it
                                   # costs under overload. Eight a connection
                                   # drain in a few hundred ms: a burst after
                                   # a pause of the loop is still served,
                                   # where twice that number refused some.
                                   waiters_per_connection=8)
        self.general = AiohttpClient(max_connections_per_host=per_host,
                                     max_connections=max(per_host, settings.max_in_flight),
                                     net_policy=policy)
        self._general_adapter = FetchAdapter(self.general, clock)
        transports: dict[str, CallbackTransport] = {
            "eagle-cloud": self.fast,
            "eagle-local": self.fast,
            "http-json": self._general_adapter,
        }
        self.pool = DevicePool(settings, sink, transports, seed=seed, clock=clock,
                               wheel_resolution_s=settings.wheel_resolution_s, fence=fence)
        self.shard = settings.shard or EVERY_DEVICE
        self.snapshot_path = snapshot_path
        self._box = box
        self.watcher = RegistryWatcher(
            database_url, box, self.pool, settings.resync_interval_s, shard=self.shard,
            on_resync=self._write_snapshot if snapshot_path is not None else None,
            supervisor=supervisor)
        self._stack: contextlib.AsyncExitStack | None = None
        self._stop_timeout_s = 1.0

    async def start(self, initial: Mapping[int, tuple[DeviceRecord, DeviceSpec]] | None = None,
                    ) -> None:
        """Start polling the registry's devices (``initial``: the snapshot's,
        while Postgres is down). On failure, everything started is stopped."""
        if self._stack is not None:
            raise RuntimeError("PollingEngine.start() called twice")
        async with contextlib.AsyncExitStack() as stack:
            # Each teardown is pushed before its part starts: the part's stop
            # undoes a half-done start too (a resync that started some loops).
            stack.push_async_callback(self._close_transports)
            stack.push_async_callback(self._stop_pool)
            await self.pool.start()
            stack.push_async_callback(self.watcher.stop)
            await self.watcher.start(initial)
            self._stack = stack.pop_all()
        shard = f" (shard {self.settings.shard})" if self.settings.shard else ""
        log.info("polling %d device(s)%s%s", len(self.pool.loops), shard,
                 " from the registry snapshot" if initial is not None else "")

    async def stop(self, timeout_s: float) -> None:
        """Stop the watcher, then every loop (waiting up to ``timeout_s`` for
        polls in flight), then the transports. Idempotent."""
        stack, self._stack = self._stack, None
        if stack is None:
            return
        self._stop_timeout_s = timeout_s
        await stack.aclose()

    async def _stop_pool(self) -> None:
        left = await self.pool.stop(self._stop_timeout_s)
        if left:
            log.warning("%d poll(s) still in flight at shutdown were abandoned", left)

    async def _close_transports(self) -> None:
        await self._general_adapter.close()
        await self.fast.close()
        await self.general.close()

    async def _write_snapshot(self, conn: Conn) -> None:
        assert self.snapshot_path is not None
        await snapshot.save(conn, self._box, self.snapshot_path, self.shard)
