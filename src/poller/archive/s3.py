"""The archive bucket: verified uploads, listing and downloads over one client.

One aiobotocore client lives between :meth:`ArchiveStore.start` and
:meth:`ArchiveStore.close`. Every upload is checked twice: the server checks
the body against ``Content-MD5`` and we check the stored object with
``HEAD`` (size, and the ETag S3 derives from the MD5s). Failures come out as
:class:`ArchiveUnavailable` (worth retrying later) or :class:`ArchiveError`
(the request itself was refused or the object is wrong)::

    store = ArchiveStore("http://127.0.0.1:8333", "poller-archive", "us-east-1", "", "")
    await store.start()
    try:
        await store.ensure_bucket()
        result = await store.upload_file(path, "poller/readings/.../gw-000001.ndjson.gz")
    finally:
        await store.close()
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from collections.abc import AsyncGenerator, Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from poller.endpoints import redact_url
from poller.errors import PollerError

if TYPE_CHECKING:  # types-aiobotocore[s3]: a dev dependency, types only
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# The embedded SeaweedFS runs without identities and accepts any signature;
# botocore still wants a key to sign with.
_ANY_KEY = ("poller", "poller-embedded")
_TRANSIENT_CODES = frozenset(
    {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed"})


class ArchiveError(PollerError):
    """The archive refused a request (4xx) or an object failed verification."""


class ArchiveUnavailable(ArchiveError):
    """The archive cannot be reached or answered 5xx: retry later."""


@dataclass(frozen=True, slots=True)
class UploadResult:
    key: str
    size: int
    etag: str
    """The verified ETag, without quotes."""
    parts: int
    """1 for a single PUT, else the number of multipart parts."""


class ArchiveStore:
    """One bucket on one S3 endpoint (``endpoint_url=None``: AWS itself).

    With ``endpoint_url=None`` and no access key the AWS default credential
    chain applies. With an ``endpoint_url`` and no access key the endpoint is
    taken to be the embedded SeaweedFS, which accepts any key.
    """

    def __init__(
        self,
        endpoint_url: str | None,
        bucket: str,
        region: str,
        access_key_id: str,
        secret_access_key: str,
        *,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
        max_attempts: int = 3,
        multipart_threshold_bytes: int = 64 * MIB,
        part_size_bytes: int = 16 * MIB,
    ) -> None:
        if not bucket:
            raise ValueError("bucket must not be empty")
        if bool(access_key_id) != bool(secret_access_key):
            raise ValueError("set both access_key_id and secret_access_key, or neither")
        if part_size_bytes < 5 * MIB:
            raise ValueError("part_size_bytes below 5 MiB: S3 rejects such parts")
        if multipart_threshold_bytes < part_size_bytes:
            raise ValueError("multipart_threshold_bytes must be at least part_size_bytes")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self._endpoint_url = endpoint_url
        self._bucket = bucket
        self._region = region
        self._credentials: tuple[str, str] | None = (
            (access_key_id, secret_access_key) if access_key_id
            else _ANY_KEY if endpoint_url is not None
            else None)
        self._config = AioConfig(
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            retries={"mode": "standard", "max_attempts": max_attempts},
            s3={"addressing_style": "path"},
            # We send Content-MD5 ourselves; botocore's default CRC trailers
            # (aws-chunked bodies) are not understood by every S3 server.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._multipart_threshold = multipart_threshold_bytes
        self._part_size = part_size_bytes
        self._where = redact_url(endpoint_url) if endpoint_url else "AWS S3"
        self._stack: AsyncExitStack | None = None
        self._client: S3Client | None = None

    def __repr__(self) -> str:
        return f"ArchiveStore({self._where!r}, bucket={self._bucket!r})"

    @property
    def bucket(self) -> str:
        return self._bucket

    async def start(self) -> None:
        """Create the client. Nothing is sent until the first request."""
        if self._stack is not None:
            raise RuntimeError("ArchiveStore.start() called twice")
        stack = AsyncExitStack()
        kwargs: dict[str, Any] = {"region_name": self._region, "config": self._config}
        if self._endpoint_url is not None:
            kwargs["endpoint_url"] = self._endpoint_url
        if self._credentials is not None:
            kwargs["aws_access_key_id"], kwargs["aws_secret_access_key"] = self._credentials
        self._client = await stack.enter_async_context(
            AioSession().create_client("s3", **kwargs))
        self._stack = stack

    async def close(self) -> None:
        """Close the client; safe to call more than once."""
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def __aenter__(self) -> ArchiveStore:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def _c(self) -> S3Client:
        if self._client is None:
            raise RuntimeError("ArchiveStore is not started: call start() first")
        return self._client

    async def ensure_bucket(self) -> None:
        """Create the bucket unless it exists."""
        client = self._c()
        try:
            with self._mapped("HeadBucket", ""):
                await client.head_bucket(Bucket=self._bucket)
            return
        except ArchiveUnavailable:
            raise
        except ArchiveError:
            pass  # usually 404; CreateBucket below reports anything else
        kwargs: dict[str, Any] = {"Bucket": self._bucket}
        if self._endpoint_url is None and self._region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self._region}
        try:
            await client.create_bucket(**kwargs)
        except ClientError as exc:
            # Another instance may have created it since our HEAD.
            if _error_code(exc) in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return
            raise self._translate(exc, "CreateBucket", "") from exc
        except (BotoCoreError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise self._translate(exc, "CreateBucket", "") from exc

    async def upload_file(self, path: Path | str, key: str) -> UploadResult:
        """Upload one file to ``key`` and verify the stored object.

        Files up to ``multipart_threshold_bytes`` go in one PUT, larger ones
        in parts. Uploading the same file to the same key again overwrites.
        """
        client = self._c()
        path = Path(path)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ArchiveError(f"cannot read {path.name}: {exc.strerror}") from exc
        if size <= self._multipart_threshold:
            body, digest = await asyncio.to_thread(_read_with_md5, path, 0, size)
            with self._mapped("PutObject", key):
                await client.put_object(
                    Bucket=self._bucket, Key=key, Body=body,
                    ContentMD5=base64.b64encode(digest).decode("ascii"),
                    ContentType="application/gzip")
            expected, parts = digest.hex(), 1
        else:
            expected, parts = await self._upload_parts(client, path, key, size)
        await self._verify(client, key, size, expected)
        return UploadResult(key, size, expected, parts)

    async def _upload_parts(self, client: S3Client, path: Path, key: str,
                            size: int) -> tuple[str, int]:
        with self._mapped("CreateMultipartUpload", key):
            created = await client.create_multipart_upload(
                Bucket=self._bucket, Key=key, ContentType="application/gzip")
        upload_id: str = created["UploadId"]
        digests: list[bytes] = []
        done: list[CompletedPartTypeDef] = []
        try:
            offset = 0
            while offset < size:
                length = min(self._part_size, size - offset)
                body, digest = await asyncio.to_thread(_read_with_md5, path, offset, length)
                number = len(digests) + 1
                with self._mapped("UploadPart", key):
                    answer = await client.upload_part(
                        Bucket=self._bucket, Key=key, UploadId=upload_id, PartNumber=number,
                        Body=body, ContentMD5=base64.b64encode(digest).decode("ascii"))
                if answer["ETag"].strip('"') != digest.hex():
                    raise ArchiveError(f"S3 UploadPart {key}: part {number} ETag mismatch")
                digests.append(digest)
                done.append({"ETag": answer["ETag"], "PartNumber": number})
                offset += length
            with self._mapped("CompleteMultipartUpload", key):
                await client.complete_multipart_upload(
                    Bucket=self._bucket, Key=key, UploadId=upload_id,
                    MultipartUpload={"Parts": done})
        except BaseException:
            await self._abort(client, key, upload_id)
            raise
        combined = hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest()
        return f"{combined}-{len(digests)}", len(digests)

    async def _abort(self, client: S3Client, key: str, upload_id: str) -> None:
        # Best effort: an upload left open only costs storage until the
        # bucket's lifecycle rule (or the next successful retry) clears it.
        try:
            await client.abort_multipart_upload(Bucket=self._bucket, Key=key, UploadId=upload_id)
        except (BotoCoreError, ClientError, aiohttp.ClientError, OSError, TimeoutError):
            log.warning("could not abort multipart upload of %s", key)

    async def _verify(self, client: S3Client, key: str, size: int, etag: str) -> None:
        with self._mapped("HeadObject", key):
            head = await client.head_object(Bucket=self._bucket, Key=key)
        stored_size = int(head["ContentLength"])
        stored_etag = str(head.get("ETag", "")).strip('"')
        if stored_size != size:
            raise ArchiveError(f"S3 verify {key}: stored {stored_size} bytes, sent {size}")
        if stored_etag != etag:
            raise ArchiveError(f"S3 verify {key}: stored ETag {stored_etag}, expected {etag}")

    async def list_keys(self, prefix: str) -> list[tuple[str, int]]:
        """Every ``(key, size)`` under ``prefix``, in key order."""
        client = self._c()
        found: list[tuple[str, int]] = []
        with self._mapped("ListObjectsV2", prefix):
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=self._bucket, Prefix=prefix)
            async for page in pages:
                found.extend((item["Key"], int(item["Size"])) for item in page.get("Contents", ()))
        return found

    async def get(self, key: str) -> bytes:
        """The whole object (for small objects; see :meth:`stream`)."""
        chunks = [chunk async for chunk in self.stream(key)]
        return b"".join(chunks)

    async def stream(self, key: str, chunk_bytes: int = MIB) -> AsyncGenerator[bytes, None]:
        """The object's bytes in chunks of at most ``chunk_bytes``."""
        client = self._c()
        with self._mapped("GetObject", key):
            answer = await client.get_object(Bucket=self._bucket, Key=key)
            body = answer["Body"]
            # Read from the body itself: before aiobotocore 3.8, `async with`
            # yields the raw aiohttp response, whose read() takes no size.
            async with body:
                while True:
                    chunk: bytes = await body.read(chunk_bytes)
                    if not chunk:
                        return
                    yield chunk

    async def get_lifecycle(self) -> tuple[list[dict[str, Any]] | None, str]:
        """The bucket's lifecycle rules (None when it has none) and the
        server's name as its ``Server`` header gives it ("" if none)."""
        client = self._c()
        try:
            answer = await client.get_bucket_lifecycle_configuration(Bucket=self._bucket)
        except ClientError as exc:
            if _error_code(exc) == "NoSuchLifecycleConfiguration":
                return None, _server_of(exc.response)
            raise self._refusal(exc, "GetBucketLifecycleConfiguration") from exc
        except (BotoCoreError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise self._translate(exc, "GetBucketLifecycleConfiguration", "") from exc
        rules: list[dict[str, Any]] = [dict(r) for r in answer.get("Rules", [])]
        return rules, _server_of(answer)

    async def put_lifecycle(self, rules: list[dict[str, Any]]) -> None:
        """Replace the bucket's lifecycle rules. A refusal (including a server
        that does not implement what a rule asks) is an :class:`ArchiveError`
        carrying the server's code, status and message."""
        client = self._c()
        try:
            await client.put_bucket_lifecycle_configuration(
                Bucket=self._bucket, LifecycleConfiguration={"Rules": rules})  # type: ignore[typeddict-item]
        except ClientError as exc:
            raise self._refusal(exc, "PutBucketLifecycleConfiguration") from exc
        except (BotoCoreError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise self._translate(exc, "PutBucketLifecycleConfiguration", "") from exc

    def _refusal(self, exc: ClientError, op: str) -> ArchiveError:
        """A refusal with the server's own words: code, status, message, name."""
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        message = str(exc.response.get("Error", {}).get("Message") or "").strip()
        server = _server_of(exc.response)
        text = (f"S3 {op} on bucket {self._bucket} at {self._where}: {_error_code(exc)} "
                f"(HTTP {status})" + (f": {message}" if message else "")
                + (f" [server: {server}]" if server else ""))
        # Not ArchiveUnavailable even for a 501: trying again changes nothing.
        return ArchiveError(text)

    @contextmanager
    def _mapped(self, op: str, key: str) -> Iterator[None]:
        try:
            yield
        except ArchiveError:
            raise
        except (BotoCoreError, ClientError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise self._translate(exc, op, key) from exc

    def _translate(self, exc: BaseException, op: str, key: str) -> ArchiveError:
        what = f"S3 {op} {key}".rstrip()
        if isinstance(exc, ClientError):
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            code = _error_code(exc)
            text = f"{what}: {code} (HTTP {status})"
            if status >= 500 or code in _TRANSIENT_CODES:
                return ArchiveUnavailable(text)
            return ArchiveError(text)
        if isinstance(exc, (BotoConnectionError, HTTPClientError, aiohttp.ClientError,
                            OSError, TimeoutError)):
            return ArchiveUnavailable(f"{what}: cannot reach {self._where} "
                                      f"({type(exc).__name__})")
        return ArchiveError(f"{what}: {type(exc).__name__}")


def _server_of(response: Any) -> str:
    headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}) or {}
    return str(headers.get("server", ""))


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code") or "?")


def _read_with_md5(path: Path, offset: int, length: int) -> tuple[bytes, bytes]:
    try:
        with path.open("rb") as f:
            body = _read_exactly(f, offset, length, path)
    except OSError as exc:
        raise ArchiveError(f"cannot read {path.name}: {exc.strerror}") from exc
    return body, hashlib.md5(body, usedforsecurity=False).digest()


def _read_exactly(f: BinaryIO, offset: int, length: int, path: Path) -> bytes:
    f.seek(offset)
    body = f.read(length)
    if len(body) != length:
        # Closed segments never change; a short read means someone truncated it.
        raise ArchiveError(f"{path.name} changed while being uploaded")
    return body
