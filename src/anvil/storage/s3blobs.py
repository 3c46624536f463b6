"""Blob bodies in an S3-compatible bucket (`anvil serve --blobs s3://bucket/prefix`).

Keys are content addresses: `prefix/ab/cd/<sha256>` for a body, `prefix/ab/cd/<sha256>.chunks`
for its per-chunk digests (written before the body, as on local disk), `prefix/quarantine/<sha256>`
for a body proven bad. A body is uploaded only once its SHA-256 is known (`BlobWriter` spools it
to `STORAGE_PATH/tmp/` while hashing), in one PUT with `If-None-Match: *` or, from 64 MiB
(`ANVIL_BLOBS_MULTIPART_MIN`), as a multipart upload; a body already present is never written
again, only its LastModified refreshed (a copy onto itself) so gc's grace period protects it.

Through boto3 (already a runtime dependency for backup repositories): SigV4, the standard
credential chain (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`), paging, retries and
multipart uploads come tested, where hand-written SigV4 over httpx would be new code to trust.
Every failure to reach the store (refused connection, timeout, 5xx, refused credentials) becomes
`BlobBackendUnavailable` (503); since a body is stored before its record, such a write records
nothing.
"""

from __future__ import annotations

import os
import threading
import urllib.parse
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from anvil.storage.blobbackend import SIDECAR_SUFFIX, BlobBackend, StoredBlob, unavailable, valid_hash
from anvil.storage.space import parse_size

MULTIPART_ENV = "ANVIL_BLOBS_MULTIPART_MIN"
DEFAULT_MULTIPART_MIN = 64 * 1024 * 1024
QUARANTINE = "quarantine/"
# Below this a body is sent with a conditional PUT straight away (resending it when it is already
# there costs little); from it on, the store is asked first (a copy onto itself refreshes a present
# body's age without sending it again).
TOUCH_FIRST_MIN = 1024 * 1024


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of `s3://bucket/prefix`; InvalidArgument if it is not one."""
    from anvil.errors import AnvilError

    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc or parsed.query or parsed.fragment:
        raise AnvilError("InvalidArgument", f"the blob backend must be s3://bucket/prefix, got {url!r}")
    return parsed.netloc, parsed.path.strip("/")


def _ts(value: Any) -> float:
    return value.timestamp() if isinstance(value, datetime) else float(value or 0)


class _Stream:
    """A response body whose read errors become `BlobBackendUnavailable` (the connection broke)."""

    def __init__(self, body: Any, backend: S3BlobBackend):
        self._body, self._backend = body, backend

    def read(self, n: int = -1) -> bytes:
        try:
            return self._body.read(n if n >= 0 else None)
        except Exception as e:  # noqa: BLE001 - any transport failure mid-body
            raise self._backend.error(e) from None

    def close(self) -> None:
        self._body.close()

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class S3BlobBackend(BlobBackend):
    local = False

    def __init__(self, bucket: str, prefix: str, *, endpoint: str | None = None):
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}"
        self.endpoint = endpoint
        raw = os.environ.get(MULTIPART_ENV, "").strip()
        # S3 refuses parts under 5 MiB (but the last), so that is the floor.
        self.multipart_min = max(5 * 1024 * 1024, parse_size(MULTIPART_ENV, raw)) if raw else DEFAULT_MULTIPART_MIN
        self._client: Any = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- client and errors

    @property
    def s3(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    import boto3
                    from botocore.config import Config

                    # Short timeouts and few retries: a request waits on this, and an unreachable
                    # store must answer 503 in seconds, not after minutes of backoff.
                    # No CRC of every byte by botocore: each body is checked by its SHA-256 and chunk
                    # digests on every read already (and some S3 servers answer a multipart
                    # object's checksum in a form botocore then rejects).
                    cfg = Config(signature_version="s3v4", s3={"addressing_style": "path"},
                                 connect_timeout=3, read_timeout=60,
                                 retries={"max_attempts": 3, "mode": "standard"},
                                 max_pool_connections=32, request_checksum_calculation="when_required",
                                 response_checksum_validation="when_required")
                    self._client = boto3.client(
                        "s3", endpoint_url=self.endpoint, config=cfg,
                        region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                        or "us-east-1")
        return self._client

    def error(self, e: BaseException) -> Exception:
        status = _status(e)
        if status:
            code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
            return unavailable(self.url, f"{self.endpoint or 'S3'} answered {status} {code}".rstrip())
        return unavailable(self.url, f"{type(e).__name__}: {e}")

    def _call(self, op: str, **kw: Any) -> Any:
        try:
            return getattr(self.s3, op)(Bucket=self.bucket, **kw)
        except Exception as e:  # noqa: BLE001 - every failure is classified below
            if _status(e) == 404:
                raise FileNotFoundError(kw.get("Key", self.bucket)) from None
            raise self.error(e) from None

    def key(self, sha256: str) -> str:
        return f"{self.prefix}{sha256[:2]}/{sha256[2:4]}/{sha256}"

    def sidecar_key(self, sha256: str) -> str:
        return self.key(sha256) + SIDECAR_SUFFIX

    def quarantine_key(self, sha256: str) -> str:
        return f"{self.prefix}{QUARANTINE}{sha256}"

    def location(self, sha256: str) -> str:
        return f"s3://{self.bucket}/{self.key(sha256)}"

    # ---------------------------------------------------------------- bodies

    def put_file(self, sha256: str, path: Path, size: int) -> bool:
        if size < TOUCH_FIRST_MIN:
            with open(path, "rb") as f:
                return self._put_new(sha256, f)
        if self.touch(sha256):
            return False  # present: content-addressed, so the same bytes; never overwritten
        if size >= self.multipart_min:
            from boto3.s3.transfer import TransferConfig

            cfg = TransferConfig(multipart_threshold=self.multipart_min, multipart_chunksize=self.multipart_min,
                                 max_concurrency=4)
            try:
                self.s3.upload_file(str(path), self.bucket, self.key(sha256), Config=cfg)
            except Exception as e:  # noqa: BLE001
                raise self.error(getattr(e, "last_exception", None) or e) from None
            return True
        with open(path, "rb") as f:
            return self._put(self.key(sha256), f)

    def put_bytes(self, sha256: str, data: bytes) -> bool:
        if len(data) < TOUCH_FIRST_MIN:
            return self._put_new(sha256, data)
        if self.touch(sha256):
            return False
        return self._put(self.key(sha256), data)

    def _put_new(self, sha256: str, body: Any) -> bool:
        """A small body: the conditional PUT first (one request for a new body, the common case);
        if the body was there already, only its age is refreshed."""
        if self._put(self.key(sha256), body):
            return True
        self.touch(sha256)
        return False

    def _put(self, key: str, body: Any) -> bool:
        try:
            # Conditional create: a concurrent writer of the same content (another node) wins,
            # and nothing present is ever overwritten.
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*")
        except Exception as e:  # noqa: BLE001
            if _status(e) == 412:
                return False
            raise self.error(e) from None
        return True

    def stat(self, sha256: str) -> tuple[int, float] | None:
        try:
            head = self._call("head_object", Key=self.key(sha256))
        except FileNotFoundError:
            return None
        return int(head["ContentLength"]), _ts(head.get("LastModified"))

    def open_range(self, sha256: str, offset: int = 0, length: int | None = None) -> BinaryIO:
        kw: dict[str, Any] = {}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            kw["Range"] = f"bytes={offset}-{end}"
        return _Stream(self._call("get_object", Key=self.key(sha256), **kw)["Body"], self)  # type: ignore[return-value]

    def touch(self, sha256: str) -> bool:
        key = self.key(sha256)
        try:
            # A copy onto itself with new metadata is S3's only way to refresh LastModified; the
            # bytes are not rewritten by a content-addressed store, nor sent over the wire.
            self.s3.copy_object(Bucket=self.bucket, Key=key, CopySource={"Bucket": self.bucket, "Key": key},
                                MetadataDirective="REPLACE", Metadata={"anvil-touched": "1"})
        except Exception as e:  # noqa: BLE001
            if _status(e) == 404 or _code(e) in ("NoSuchKey", "NotFound"):
                return False
            raise self.error(e) from None
        return True

    def _list(self, prefix: str) -> Iterator[dict[str, Any]]:
        try:
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                yield from page.get("Contents", [])
        except Exception as e:  # noqa: BLE001
            raise self.error(e) from None

    def _fanout(self) -> Iterator[tuple[str, str, dict[str, Any]]]:
        """(name, ab/cd shape ok, entry) for every key under the prefix's fan-out folders."""
        n = len(self.prefix)
        for o in self._list(self.prefix):
            rel = o["Key"][n:]
            parts = rel.split("/")
            if len(parts) == 3 and len(parts[0]) == 2 and len(parts[1]) == 2:
                name = parts[2]
                if name[:2] == parts[0] and name[2:4] == parts[1]:
                    yield name, o["Key"], o

    def list_blobs(self) -> Iterator[StoredBlob]:
        for name, key, o in self._fanout():
            if valid_hash(name):
                yield StoredBlob(name, int(o["Size"]), _ts(o.get("LastModified")), f"s3://{self.bucket}/{key}")

    def delete(self, sha256: str) -> bool:
        present = self.stat(sha256) is not None
        self._call("delete_object", Key=self.key(sha256))
        self.delete_sidecar(sha256)
        return present

    # ---------------------------------------------------------------- sidecars

    def get_sidecar(self, sha256: str) -> bytes | None:
        try:
            with _Stream(self._call("get_object", Key=self.sidecar_key(sha256))["Body"], self) as body:
                return body.read()
        except FileNotFoundError:
            return None

    def put_sidecar(self, sha256: str, raw: bytes) -> None:
        # Derived data: overwriting a damaged one with digests of verified bytes is the point.
        self._call("put_object", Key=self.sidecar_key(sha256), Body=raw)

    def delete_sidecar(self, sha256: str) -> bool:
        try:
            self._call("head_object", Key=self.sidecar_key(sha256))
        except FileNotFoundError:
            return False
        self._call("delete_object", Key=self.sidecar_key(sha256))
        return True

    def list_sidecars(self) -> Iterator[tuple[str, float]]:
        for name, _, o in self._fanout():
            if name.endswith(SIDECAR_SUFFIX) and valid_hash(name[:-len(SIDECAR_SUFFIX)]):
                yield name[:-len(SIDECAR_SUFFIX)], _ts(o.get("LastModified"))

    # ---------------------------------------------------------------- quarantine

    def quarantine(self, sha256: str) -> bool:
        key = self.key(sha256)
        try:
            self._call("copy_object", Key=self.quarantine_key(sha256), CopySource={"Bucket": self.bucket, "Key": key})
        except FileNotFoundError:
            return False
        self._call("delete_object", Key=key)
        self.delete_sidecar(sha256)
        return True

    def quarantined(self) -> list[str]:
        start = len(self.prefix) + len(QUARANTINE)
        return sorted(o["Key"][start:] for o in self._list(self.prefix + QUARANTINE) if valid_hash(o["Key"][start:]))

    def drop_quarantined(self, sha256: str) -> bool:
        try:
            self._call("head_object", Key=self.quarantine_key(sha256))
        except FileNotFoundError:
            return False
        self._call("delete_object", Key=self.quarantine_key(sha256))
        return True

    def check(self) -> None:
        """The bucket exists and answers (at start): BlobBackendUnavailable otherwise."""
        try:
            self._call("head_bucket")
        except FileNotFoundError:
            raise unavailable(self.url, f"bucket {self.bucket} does not exist") from None


def _status(e: BaseException) -> int:
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        try:
            return int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        except (TypeError, ValueError):
            return 0
    return 0


def _code(e: BaseException) -> str:
    resp = getattr(e, "response", None)
    return str(resp.get("Error", {}).get("Code", "")) if isinstance(resp, dict) else ""
