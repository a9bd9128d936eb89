"""Live per-device state in Redis, written once per flush in one pipeline.

What is written for each device changed since the last flush: its latest
reading (``keys.LATEST``), its status and counters (``keys.STATE``) and, when
it failed, its failure counts (``keys.failures``). Counters are absolute:
the count Redis had for the device before this process wrote it (read with
one HMGET for the devices of a flush that were never written, just before
their first write) plus what this process counted since. Only this
instance's devices are read: the hash also holds other shards' devices and
devices long removed, which a whole-hash read kept in memory for good.
With Redis down, polling and storage go on; when it answers again every
device's state is written afresh from memory.

Cost: the latest reading of every polled device is written at every flush; a
device's status document is written at once when its state changes and
otherwise with its counters every ``counters_every_s`` (30 s), so at 100k
devices the counters do not cost a document per poll. The in-memory status
(API ``/api/devices/{id}``) is always current.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from poller import keys
from poller.polling.stats import OUTCOME_INDEX
from poller.polling.target import DeviceState, Target
from poller.reading import PlainReading

log = logging.getLogger("poller.livestate")
_OUTCOME_BY_NAME = {o.value: i for o, i in OUTCOME_INDEX.items()}
_SLICE = 2000
"""Devices per pipeline when the whole fleet is written (after an outage)."""
_STEP = 500
"""Devices whose commands are built between two turns of the event loop."""
_COUNTERS = ("total_events_logged", "first_timestamp", "last_timestamp", "failures")


def reading_doc(r: PlainReading) -> bytes:
    _, tick_at, device_at, received_at, demand_w, delivered_wh, received_wh, price, _ = r
    return orjson.dumps({
        "tick_at": tick_at, "device_at": device_at, "received_at": received_at,
        "demand_w": demand_w, "delivered_wh": delivered_wh, "received_wh": received_wh,
        "price": price,
    })


def reading_docs(readings: Sequence[PlainReading]) -> list[bytes]:
    """``[reading_doc(r) for r in readings]`` in one ``dumps`` call (a third of
    the cost): the documents hold numbers and nulls only, so the separators
    between them in the array are exactly the ``},{`` in its text."""
    if not readings:
        return []
    array = orjson.dumps([
        {"tick_at": b, "device_at": c, "received_at": d, "demand_w": e, "delivered_wh": f,
         "received_wh": g, "price": h}
        for _, b, c, d, e, f, g, h, _ in readings])
    docs = array[2:-2].split(b"},{")
    if len(docs) != len(readings):  # not numbers after all: one at a time
        return [reading_doc(r) for r in readings]
    return [b"{" + doc + b"}" for doc in docs]


class LiveState:
    def __init__(self, redis_url: str, targets: Callable[[], list[Target]],
                 take_dirty: Callable[[], list[Target]], *,
                 counters_every_s: float = 30.0, write_stopped: bool = True) -> None:
        self._counters_every_s = counters_every_s
        self._write_stopped = write_stopped
        """False in a cluster: a stop is mostly a handoff, and the member
        taking the device writes its state; a 'stopped' document written
        later by the member letting go (still waiting for its counters'
        turn) would overwrite it until the new owner's next change."""
        self._counters_at = 0.0
        self._waiting: dict[Target, Target] = {}
        """Targets whose status document is due, oldest first (keyed by identity)."""
        self._url = redis_url
        self._targets = targets
        self._take_dirty = take_dirty
        self._client: aioredis.Redis | None = None
        self._needs_rebuild = True
        self.up = False
        self.failures = 0

    @property
    def client(self) -> aioredis.Redis | None:
        return self._client

    async def start(self) -> None:
        self._client = aioredis.from_url(self._url, socket_timeout=2.0,
                                         socket_connect_timeout=2.0, retry_on_timeout=False)
        await self.flush()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def flush(self, *, final: bool = False) -> None:
        """Write the state of devices changed since the last call (or of every
        device after an outage; ``final``: every pending document, at
        shutdown). Never raises for Redis trouble."""
        dirty = self._take_dirty()
        waiting = self._waiting
        for t in dirty:
            t.dirty = False
            waiting[t] = t
        if self._client is None:
            return
        now = time.monotonic()
        try:
            if self._needs_rebuild:
                everyone = self._targets()
                for start in range(0, len(everyone), _SLICE):
                    part = everyone[start:start + _SLICE]
                    await self._write(part, part)
                waiting.clear()
                self._counters_at = now
            elif final:
                await self._write(dirty, self._documents(list(waiting.values())))
                waiting.clear()
            else:
                # State changes at once; counters oldest first, a slice per
                # flush, so each waits about counters_every_s and no flush
                # writes the whole fleet at once (a 150 ms stall at 10k).
                changed = [t for t in dirty if t.state_changed]
                for t in changed:
                    waiting.pop(t, None)
                span = max(now - self._counters_at, 1e-3)
                self._counters_at = now
                quota = math.ceil(len(waiting) * min(1.0, span / self._counters_every_s))
                due = [waiting.pop(k) for k in list(itertools.islice(waiting, quota))]
                await self._write(dirty, self._documents(changed + due))
            self._needs_rebuild = False
            if not self.up:
                log.info("redis live state: writing")
            self.up = True
        except (RedisError, OSError) as exc:
            self.failures += 1
            if self.up or self.failures == 1:
                log.warning("redis unavailable (%s); state is rebuilt when it returns",
                            type(exc).__name__)
            self.up = False
            self._needs_rebuild = True

    def _documents(self, targets: list[Target]) -> list[Target]:
        if self._write_stopped:
            return targets
        return [t for t in targets if t.state is not DeviceState.STOPPED]

    async def _fold_baselines(self, documents: list[Target]) -> None:
        """Add what Redis counted for ``documents`` never written by this
        process into their counters, before their first write replaces it."""
        assert self._client is not None
        unread = [t for t in documents if not t.counted]
        if not unread:
            return
        raw = await self._client.hmget(keys.STATE, [t.record.cloud_id for t in unread])
        for t, doc in zip(unread, raw, strict=True):
            t.counted = True
            if doc is None:
                continue
            try:
                parsed = orjson.loads(doc)
            except orjson.JSONDecodeError:
                continue  # a corrupt entry is rewritten from memory
            if isinstance(parsed, dict):
                _fold(t, {k: parsed.get(k) for k in _COUNTERS})

    async def _write(self, fresh: list[Target], documents: list[Target]) -> None:
        """Latest readings of ``fresh``; status documents of ``documents``.

        Built ``_STEP`` devices at a time with a turn of the event loop
        between steps: at 50k devices a flush carries some 8k readings, and
        building their commands in one go held the loop (and every poll due
        meanwhile) for tens of milliseconds. Sent as one pipeline."""
        assert self._client is not None
        commands: list[bytes] = []
        polled = [t for t in fresh if t.latest is not None]
        for start in range(0, len(polled), _STEP):
            if start:
                await asyncio.sleep(0)
            part = polled[start:start + _STEP]
            docs = reading_docs([t.latest for t in part])  # type: ignore[misc]
            commands.append(hset_framed(_LATEST_KEY, [
                resp_pair(t.record.cloud_id.encode(), doc)
                for t, doc in zip(part, docs, strict=True)]))
        for start in range(0, len(documents), _STEP):
            if commands:
                await asyncio.sleep(0)
            part = documents[start:start + _STEP]
            await self._fold_baselines(part)
            self._status_commands(part, commands)
        if commands:
            await self._send(commands)

    def _status_commands(self, documents: list[Target], commands: list[bytes]) -> None:
        state: list[bytes] = []
        for t in documents:
            t.state_changed = False
            cloud_id = t.record.cloud_id
            snap = t.snapshot()
            # Framed at once: orjson's result holds a 4 KiB allocation whatever
            # its length, so 10k documents kept in a list until the command is
            # joined would hold 40 MB (the first flush writes every device).
            state.append(resp_pair(cloud_id.encode(), orjson.dumps(snap)))
            if snap["failures"] and (self._needs_rebuild or t.last_outcome != "ok"):
                commands.append(hset_command(keys.failures(cloud_id).encode(), [
                    (k.encode(), str(n).encode()) for k, n in snap["failures"].items()]))
        if state:
            commands.append(hset_framed(_STATE_KEY, state))

    async def _send(self, commands: list[bytes]) -> None:
        """Write packed commands on one pooled connection; read every reply.

        redis-py's pipeline packs each argument in Python, which measured
        (against Valkey) at more than twice the cost of packing the HSETs
        here. Any failure drops the connection, so a reply left unread cannot
        be taken for the next command's."""
        assert self._client is not None
        pool = self._client.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.send_packed_command(commands)
            for _ in commands:
                await conn.read_response()  # raises on an error reply
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)


_STATE_KEY = keys.STATE.encode()
_LATEST_KEY = keys.LATEST.encode()


def hset_command(key: bytes, items: list[tuple[bytes, bytes]]) -> bytes:
    """``HSET key field value ...`` in RESP, as Redis reads it off the wire."""
    return hset_framed(key, [resp_pair(f, v) for f, v in items])


def resp_pair(field: bytes, value: bytes) -> bytes:
    """One field and its value as RESP bulk strings."""
    return b"$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(field), field, len(value), value)


def hset_framed(key: bytes, pairs: list[bytes]) -> bytes:
    """``HSET`` of pairs already framed by :func:`resp_pair`."""
    head = b"*%d\r\n$4\r\nHSET\r\n$%d\r\n%b\r\n" % (2 + 2 * len(pairs), len(key), key)
    return head + b"".join(pairs)


def _fold(t: Target, base: dict[str, Any]) -> None:
    """Add what Redis counted before this process started into the target's
    own counters, once; from then on the target carries the whole count."""
    try:
        t.readings += int(base.get("total_events_logged") or 0)
        first, last = base.get("first_timestamp"), base.get("last_timestamp")
        if isinstance(first, int | float):
            t.first_reading_at = float(first)
        if t.last_reading_at is None and isinstance(last, int | float):
            t.last_reading_at = float(last)
        failures = base.get("failures")
        if isinstance(failures, dict):
            for outcome, n in failures.items():
                index = _OUTCOME_BY_NAME.get(outcome)
                if index is not None:
                    t.count_failure(index, int(n))
    except (TypeError, ValueError):
        log.warning("device %s: unreadable counters in Redis ignored", t.cloud_id)
