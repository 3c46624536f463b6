"""A repository under a prefix of an S3 bucket (`s3://bucket/prefix`), through boto3."""

from __future__ import annotations

import os
import urllib.parse
from typing import Any

from anvil.backup.backends import Backend, BackendOptions, check_name, missing
from anvil.backup.errors import BackupError


def _status(e: Any) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


class S3Backend(Backend):
    def __init__(self, bucket: str, prefix: str, *, endpoint: str | None = None, access_key: str | None = None,
                 secret_key: str | None = None, region: str | None = None):
        import boto3
        from botocore.config import Config
        from botocore.exceptions import ClientError

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}"
        self.s3_endpoint = endpoint
        self.s3 = boto3.client(
            "s3", endpoint_url=endpoint, aws_access_key_id=access_key or os.environ.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY"),
            region_name=region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            config=Config(retries={"max_attempts": 5, "mode": "standard"}),
        )
        self._client_error = ClientError

    def _k(self, name: str) -> str:
        return self.prefix + check_name(name)

    def read(self, name: str) -> bytes:
        try:
            return self.s3.get_object(Bucket=self.bucket, Key=self._k(name))["Body"].read()
        except self.s3.exceptions.NoSuchKey:
            raise missing(name) from None

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise BackupError(f"{name}: invalid range offset {offset} length {length}")
        if length == 0:
            # "bytes=N-(N-1)" is not a range: a server would answer with the whole object.
            self.size(name)
            return b""
        key = self._k(name)
        try:
            return self.s3.get_object(Bucket=self.bucket, Key=key,
                                      Range=f"bytes={offset}-{offset + length - 1}")["Body"].read()
        except self.s3.exceptions.NoSuchKey:
            raise missing(name) from None
        except self._client_error as e:
            if _status(e) != 416:
                raise
        self.size(name)  # past the end of an object that exists: nothing, as a file read gives
        return b""

    def write(self, name: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=self._k(name), Body=data)

    def list(self, folder: str) -> list[str]:
        out: list[str] = []
        paginator = self.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._k(folder.rstrip("/")) + "/"):
            out.extend(o["Key"][len(self.prefix):] for o in page.get("Contents", []))
        return sorted(out)

    def delete(self, name: str) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=self._k(name))

    def exists(self, name: str) -> bool:
        key = self._k(name)
        try:
            self.s3.head_object(Bucket=self.bucket, Key=key)
            return True
        except Exception:  # noqa: BLE001 - botocore raises ClientError(404)
            return False

    def size(self, name: str) -> int:
        return int(self._head(name)["ContentLength"])

    def modified(self, name: str) -> float:
        return self._head(name)["LastModified"].timestamp()

    def _head(self, name: str) -> dict[str, Any]:
        try:
            return self.s3.head_object(Bucket=self.bucket, Key=self._k(name))
        except self._client_error as e:
            if _status(e) == 404:
                raise missing(name) from None
            raise


def from_url(url: str, parsed: urllib.parse.ParseResult, options: BackendOptions) -> S3Backend:
    if not parsed.netloc:
        raise BackupError(f"s3 URLs must be s3://bucket/prefix, got {url!r}")
    return S3Backend(parsed.netloc, parsed.path, endpoint=options.s3_endpoint, access_key=options.access_key,
                     secret_key=options.secret_key)
