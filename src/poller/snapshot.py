"""The registry snapshot: what to poll when Postgres is down at start.

After every full resync that changed anything, the polling engine writes
what :meth:`poller.registry.Registry.specs` reads of its shard's devices to
``STATE_DIR/registry-INSTANCE.json``, secrets still sealed (they open only
with the instance's key, as in Postgres), atomically: a temporary file,
fsynced, renamed over the old one, the directory fsynced. A crash leaves the
old snapshot or the new one, never a torn one.

``serve`` started while Postgres is unreachable polls the snapshot's
devices; the registry watcher replaces them with the registry's once
Postgres answers (only the devices whose ``updated_at`` differs restart).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path

import orjson

from poller.config import Shard
from poller.db import Conn
from poller.drivers.base import DeviceSpec
from poller.errors import PollerError
from poller.registry import DeviceRecord, Registry, Row, open_row
from poller.sealing import SecretBox

log = logging.getLogger("poller.snapshot")
FORMAT = 1
_FIELDS = ("id", "cloud_id", "email", "driver", "url", "options", "interval_s", "enabled",
           "created_at", "updated_at")
_ENCODE_PART = 500
"""Devices encoded between two turns of the event loop (a few ms)."""


class SnapshotError(PollerError):
    """No usable registry snapshot."""


Specs = dict[int, tuple[DeviceRecord, DeviceSpec]]


def path_for(state_dir: Path | str, instance_id: str) -> Path:
    return Path(state_dir) / f"registry-{instance_id}.json"


def _encoded_parts(rows: Sequence[Row]) -> Iterator[bytes]:
    """The devices of registry rows (each with ``sealed_secret``) as JSON, a
    part of :data:`_ENCODE_PART` at a time: the items of an array, without
    its brackets."""
    for start in range(0, len(rows), _ENCODE_PART):
        devices = []
        for row in rows[start:start + _ENCODE_PART]:
            doc = {name: row[name] for name in _FIELDS}
            options = doc["options"]
            if isinstance(options, str):  # jsonb arrives as text without a codec
                doc["options"] = orjson.loads(options)
            doc["sealed_secret"] = base64.b64encode(row["sealed_secret"]).decode("ascii")
            devices.append(doc)
        yield orjson.dumps(devices)[1:-1]


def _document(parts: list[bytes], shard: Shard, written_at: float) -> bytes:
    head = orjson.dumps({"format": FORMAT, "written_at": written_at,
                         "shard": [shard.k, shard.n], "devices": []})
    return head[:-len(b"[]}")] + b"[" + b",".join(p for p in parts if p) + b"]}"


def decode(data: bytes, box: SecretBox, shard: Shard) -> tuple[Specs, float]:
    """``(specs, written_at)`` of a snapshot document; SnapshotError if it is
    not one, or was written for another shard."""
    try:
        doc = orjson.loads(data)
        if doc.get("format") != FORMAT:
            raise SnapshotError(f"unknown snapshot format {doc.get('format')!r}")
        if doc["shard"] != [shard.k, shard.n]:
            raise SnapshotError(f"the snapshot is of shard {doc['shard'][0]}/{doc['shard'][1]}, "
                                f"this instance polls {shard}")
        specs: Specs = {}
        for device in doc["devices"]:
            row = dict(device)
            row["created_at"] = datetime.fromisoformat(row["created_at"])
            row["updated_at"] = datetime.fromisoformat(row["updated_at"])
            row["sealed_secret"] = base64.b64decode(row["sealed_secret"], validate=True)
            opened = open_row(row, box)
            if opened is not None:
                specs[opened[0].id] = opened
        return specs, float(doc["written_at"])
    except SnapshotError:
        raise
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SnapshotError(f"malformed registry snapshot: {type(exc).__name__}: {exc}") from None


def load(path: Path, box: SecretBox, shard: Shard) -> tuple[Specs, float]:
    """Read the snapshot at ``path``: ``(specs, written_at)``."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SnapshotError(f"no registry snapshot at {path} (one is written once serve has "
                            "read the registry from PostgreSQL)") from None
    except OSError as exc:
        raise SnapshotError(f"cannot read the registry snapshot {path}: {exc}") from None
    try:
        return decode(data, box, shard)
    except SnapshotError as exc:
        raise SnapshotError(f"{path}: {exc}") from None


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: tmp + fsync + rename + directory fsync."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


async def save(conn: Conn, box: SecretBox, path: Path,
               shard: Shard) -> int | None:
    """Write the snapshot of ``shard`` read over ``conn``; the devices written.

    A file system error is logged and returns None: polling never depends on
    the snapshot. Postgres errors propagate (the caller's connection broke)."""
    rows = await Registry(conn, box).sealed_rows(shard=shard)
    written_at = time.time()
    # Encoding 100k devices is a second of CPU. On the event loop a part at a
    # time, the polls due running in between: in a thread it held the GIL
    # against them (one orjson call held it 230 ms; Python code takes it back
    # every 5 ms, from every wake-up of the loop), lateness up to 220 ms for
    # seconds after each bulk registration (poller bench --import-devices).
    parts = []
    for part in _encoded_parts(rows):
        parts.append(part)
        await asyncio.sleep(0)
    data = _document(parts, shard, written_at)
    try:
        await asyncio.to_thread(write_atomically, path, data)  # I/O only
    except OSError as exc:
        log.warning("could not write the registry snapshot %s: %s", path, exc)
        return None
    log.debug("registry snapshot: %d device(s) in %s", len(rows), path)
    return len(rows)
