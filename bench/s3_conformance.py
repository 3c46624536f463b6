"""S3 conformance figure: a fixed list of S3 behaviours (issue 18's groups), run against Anvil and against
moto's S3 server in the same run; prints each server's pass rate as JSON.

A case passes when the server answers as the AWS S3 API reference, the S3 User Guide or the AWS
error-code list documents (where AWS is silent, as Ceph RGW and MinIO document): never "as moto
answers". Each case runs in a bucket of its own through boto3 (SigV4, path style), or through raw
HTTP where a browser or an old client would (CORS preflight, anonymous reads, SigV2 URLs, bodies
without a length). A case that raises anything but its expected answer fails; nothing is retried.

    python bench/s3_conformance.py             # every case, both servers (~1 min on 2 cores)
    python bench/s3_conformance.py --quick     # a few cases (tests/test_s3_differential.py, on its servers)
    python bench/s3_conformance.py --only anvil --verbose   # one server, with each failure's reason
    python bench/s3_conformance.py --anvil URL KEY SECRET --moto URL   # servers already running

Groups: signatures (SigV2 and SigV4 presigned edges), acl, operations (GetObjectAttributes, tagging,
ListBuckets paging, lifecycle, CORS), errors (exact error semantics), checksums, objects / listing /
multipart / versioning basics, access (anonymous reads of public and private data).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import crc32c
import httpx
from awscrt import checksums as crt
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

REGION = "us-east-1"
MiB = 1024 * 1024
ALL_USERS = "http://acs.amazonaws.com/groups/global/AllUsers"
ORIGIN = "https://app.example.test"


# ---------------------------------------------------------------- servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


class Target:
    def __init__(self, name: str, endpoint: str, key: str, secret: str, proc: subprocess.Popen | None):
        self.name, self.endpoint, self.key, self.secret, self.proc = name, endpoint, key, secret, proc

    def client(self, **config: Any) -> Any:
        cfg = Config(signature_version=config.pop("signature_version", "s3v4"), s3={"addressing_style": "path"},
                     retries={"max_attempts": 1, "mode": "standard"}, **config)
        return boto3.session.Session().client("s3", endpoint_url=self.endpoint, region_name=REGION, config=cfg,
                                              aws_access_key_id=self.key, aws_secret_access_key=self.secret)

    def stop(self) -> None:
        if self.proc is None:  # a server this run did not start
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_anvil(data_dir: Path) -> Target:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "anvil.cli.main", "serve", "--storage-path", str(data_dir),
                             "--listen", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "ANVIL_MODE": "development"})
    endpoint = f"http://127.0.0.1:{port}"
    _wait(endpoint + "/anvil/health/live", proc)
    cred_file = data_dir / "bootstrap" / "dev-app.json"
    deadline = time.monotonic() + 30
    while not cred_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    creds = json.loads(cred_file.read_text())
    return Target("anvil", endpoint, creds["client_id"], creds["client_secret"], proc)


def start_moto() -> Target:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    _wait(endpoint + "/moto-api/", proc)
    return Target("moto", endpoint, "testing", "testing", proc)


# ---------------------------------------------------------------- what a case uses


class Failed(Exception):
    pass


def expect(cond: bool, what: str) -> None:
    if not cond:
        raise Failed(what)


class _UnsignedPayload(S3SigV4Auth):
    """SigV4 with `x-amz-content-sha256: UNSIGNED-PAYLOAD`, as presigned and streaming clients send."""

    def _should_sha256_sign_payload(self, request: Any) -> bool:
        return False


class Ctx:
    """One case's view: the target, a boto3 client, and a fresh bucket `b` (created by the runner)."""

    def __init__(self, target: Target, s3: Any, bucket: str):
        self.t, self.s3, self.b = target, s3, bucket

    def error(self, op: str, **kw: Any) -> tuple[int, str]:
        """(status, code) of a call expected to fail; (200, "") when it succeeded."""
        try:
            getattr(self.s3, op)(**kw)
        except ClientError as e:
            return e.response["ResponseMetadata"]["HTTPStatusCode"], e.response["Error"].get("Code", "")
        return 200, ""

    def fails(self, status: int, code: str, op: str, **kw: Any) -> None:
        got = self.error(op, **kw)
        expect(got == (status, code), f"{op}: expected {status} {code}, got {got[0]} {got[1]}")

    def raw(self, method: str, path: str, *, headers: dict[str, str] | None = None, content: Any = b"",
            sign: bool = True, query: str = "") -> httpx.Response:
        """A raw request, SigV4-signed with UNSIGNED-PAYLOAD unless `sign` is False (anonymous)."""
        url = self.t.endpoint + path + (f"?{query}" if query else "")
        hdrs = dict(headers or {})
        if sign:
            req = AWSRequest(method=method, url=url, headers=hdrs)
            _UnsignedPayload(Credentials(self.t.key, self.t.secret), "s3", REGION).add_auth(req)
            hdrs = dict(req.headers.items())
        return httpx.request(method, url, headers=hdrs, content=content, timeout=30)

    def keys(self, bucket: str | None = None) -> list[str]:
        return [o["Key"] for o in self.s3.list_objects_v2(Bucket=bucket or self.b).get("Contents", [])]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


DIGEST: dict[str, Callable[[bytes], bytes]] = {
    "CRC32": lambda d: zlib.crc32(d).to_bytes(4, "big"),
    "CRC32C": lambda d: crc32c.crc32c(d).to_bytes(4, "big"),
    "CRC64NVME": lambda d: crt.crc64nvme(d).to_bytes(8, "big"),
    "SHA1": lambda d: hashlib.sha1(d).digest(),
    "SHA256": lambda d: hashlib.sha256(d).digest(),
}

CASES: list[tuple[str, str, Callable[[Ctx], None]]] = []


def case(group: str, name: str | None = None) -> Callable:
    def register(fn: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
        CASES.append((group, name or fn.__name__, fn))
        return fn
    return register


def add(group: str, name: str, fn: Callable[[Ctx], None]) -> None:
    CASES.append((group, name, fn))


# ---------------------------------------------------------------- objects, listing, versioning basics


@case("objects")
def put_get_round_trip(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"hello", ContentType="text/plain")
    got = c.s3.get_object(Bucket=c.b, Key="k")
    expect(got["Body"].read() == b"hello" and got["ContentType"] == "text/plain", "body or type")
    expect(got["ETag"] == f'"{hashlib.md5(b"hello").hexdigest()}"', "ETag is the MD5")


@case("objects")
def default_content_type_binary_octet_stream(c: Ctx) -> None:
    c.raw("PUT", f"/{c.b}/k", content=b"x", headers={"Content-Length": "1"})
    expect(c.s3.head_object(Bucket=c.b, Key="k")["ContentType"] == "binary/octet-stream", "content type")


@case("objects")
def get_missing_key_nosuchkey(c: Ctx) -> None:
    c.fails(404, "NoSuchKey", "get_object", Bucket=c.b, Key="nope")


@case("objects")
def get_missing_bucket_nosuchbucket(c: Ctx) -> None:
    c.fails(404, "NoSuchBucket", "get_object", Bucket=c.b + "-none", Key="k")


@case("objects")
def head_missing_key_404(c: Ctx) -> None:
    c.fails(404, "404", "head_object", Bucket=c.b, Key="nope")


@case("objects")
def range_get_206(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"0123456789")
    got = c.s3.get_object(Bucket=c.b, Key="k", Range="bytes=2-4")
    expect(got["Body"].read() == b"234" and got["ContentRange"] == "bytes 2-4/10", "range")


@case("objects")
def range_unsatisfiable_416(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"0123456789")
    c.fails(416, "InvalidRange", "get_object", Bucket=c.b, Key="k", Range="bytes=20-30")


@case("objects")
def if_none_match_304(c: Ctx) -> None:
    etag = c.s3.put_object(Bucket=c.b, Key="k", Body=b"x")["ETag"]
    c.fails(304, "304", "get_object", Bucket=c.b, Key="k", IfNoneMatch=etag)


@case("objects")
def if_match_412(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"x")
    c.fails(412, "PreconditionFailed", "get_object", Bucket=c.b, Key="k", IfMatch='"0000"')


@case("objects")
def put_if_none_match_star_412(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"x")
    c.fails(412, "PreconditionFailed", "put_object", Bucket=c.b, Key="k", Body=b"y", IfNoneMatch="*")


@case("objects")
def user_metadata_round_trip(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"x", Metadata={"colour": "blue"}, CacheControl="max-age=5")
    head = c.s3.head_object(Bucket=c.b, Key="k")
    expect(head["Metadata"] == {"colour": "blue"} and head["CacheControl"] == "max-age=5", "metadata")


@case("objects")
def response_content_type_override(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"x")
    got = c.s3.get_object(Bucket=c.b, Key="k", ResponseContentType="text/csv")
    expect(got["ContentType"] == "text/csv", "override")


@case("objects")
def delete_missing_key_204(c: Ctx) -> None:
    r = c.s3.delete_object(Bucket=c.b, Key="never")
    expect(r["ResponseMetadata"]["HTTPStatusCode"] == 204, "204")


@case("objects")
def delete_objects_quiet(c: Ctx) -> None:
    for k in ("a", "b"):
        c.s3.put_object(Bucket=c.b, Key=k, Body=b"x")
    r = c.s3.delete_objects(Bucket=c.b, Delete={"Objects": [{"Key": "a"}, {"Key": "b"}], "Quiet": True})
    expect("Deleted" not in r and c.keys() == [], "quiet delete")


@case("objects")
def delete_objects_verbose(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="a", Body=b"x")
    r = c.s3.delete_objects(Bucket=c.b, Delete={"Objects": [{"Key": "a"}, {"Key": "zz"}]})
    expect(sorted(d["Key"] for d in r["Deleted"]) == ["a", "zz"], "both reported deleted")


@case("objects")
def copy_object_copies_metadata(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="src", Body=b"x", Metadata={"m": "1"})
    c.s3.copy_object(Bucket=c.b, Key="dst", CopySource={"Bucket": c.b, "Key": "src"})
    expect(c.s3.head_object(Bucket=c.b, Key="dst")["Metadata"] == {"m": "1"}, "metadata copied")


@case("objects")
def copy_object_replace_metadata(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="src", Body=b"x", Metadata={"m": "1"})
    c.s3.copy_object(Bucket=c.b, Key="dst", CopySource={"Bucket": c.b, "Key": "src"},
                     MetadataDirective="REPLACE", Metadata={"n": "2"})
    expect(c.s3.head_object(Bucket=c.b, Key="dst")["Metadata"] == {"n": "2"}, "metadata replaced")


@case("objects")
def copy_onto_itself_invalid_request(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"x")
    c.fails(400, "InvalidRequest", "copy_object", Bucket=c.b, Key="k", CopySource={"Bucket": c.b, "Key": "k"})


@case("objects")
def copy_source_if_match_412(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"x")
    c.fails(412, "PreconditionFailed", "copy_object", Bucket=c.b, Key="d", CopySource={"Bucket": c.b, "Key": "k"},
            CopySourceIfMatch='"0000"')


@case("buckets")
def create_bucket_twice_us_east_1_ok(c: Ctx) -> None:
    c.s3.create_bucket(Bucket=c.b)  # S3's legacy answer in us-east-1: 200 for a bucket you own


@case("buckets")
def delete_non_empty_bucket_409(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"x")
    c.fails(409, "BucketNotEmpty", "delete_bucket", Bucket=c.b)


@case("buckets")
def invalid_bucket_name_400(c: Ctx) -> None:
    c.fails(400, "InvalidBucketName", "create_bucket", Bucket="Bad_Name")


@case("buckets")
def head_bucket_missing_404(c: Ctx) -> None:
    c.fails(404, "404", "head_bucket", Bucket=c.b + "-none")


@case("buckets")
def get_bucket_location(c: Ctx) -> None:
    expect(c.s3.get_bucket_location(Bucket=c.b).get("LocationConstraint") in (None, ""), "us-east-1 is null")


@case("buckets")
def versioning_round_trip(c: Ctx) -> None:
    c.s3.put_bucket_versioning(Bucket=c.b, VersioningConfiguration={"Status": "Enabled"})
    expect(c.s3.get_bucket_versioning(Bucket=c.b)["Status"] == "Enabled", "enabled")


@case("versioning")
def versions_and_delete_marker(c: Ctx) -> None:
    c.s3.put_bucket_versioning(Bucket=c.b, VersioningConfiguration={"Status": "Enabled"})
    v1 = c.s3.put_object(Bucket=c.b, Key="k", Body=b"1")["VersionId"]
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"2")
    d = c.s3.delete_object(Bucket=c.b, Key="k")
    expect(d.get("DeleteMarker") is True, "delete marker")
    expect(c.s3.get_object(Bucket=c.b, Key="k", VersionId=v1)["Body"].read() == b"1", "old version readable")
    listing = c.s3.list_object_versions(Bucket=c.b)
    expect(len(listing["Versions"]) == 2 and len(listing["DeleteMarkers"]) == 1, "two versions, one marker")


@case("versioning")
def get_delete_marker_version_405(c: Ctx) -> None:
    c.s3.put_bucket_versioning(Bucket=c.b, VersioningConfiguration={"Status": "Enabled"})
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"1")
    marker = c.s3.delete_object(Bucket=c.b, Key="k")["VersionId"]
    c.fails(405, "MethodNotAllowed", "get_object", Bucket=c.b, Key="k", VersionId=marker)


@case("versioning")
def suspended_put_makes_null_version(c: Ctx) -> None:
    c.s3.put_bucket_versioning(Bucket=c.b, VersioningConfiguration={"Status": "Suspended"})
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"1")
    versions = c.s3.list_object_versions(Bucket=c.b)["Versions"]
    expect([v["VersionId"] for v in versions] == ["null"], "null version")


@case("versioning")
def no_such_version(c: Ctx) -> None:
    c.s3.put_bucket_versioning(Bucket=c.b, VersioningConfiguration={"Status": "Enabled"})
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"1")
    status, code = c.error("get_object", Bucket=c.b, Key="k", VersionId="0000000000000001.0000000000000001")
    expect(status in (400, 404) and code in ("NoSuchVersion", "InvalidArgument"), f"{status} {code}")


def _fill(c: Ctx, keys: list[str]) -> None:
    for k in keys:
        c.s3.put_object(Bucket=c.b, Key=k, Body=b"x")


@case("listing")
def list_v2_delimiter_prefixes(c: Ctx) -> None:
    _fill(c, ["a/1", "a/2", "b/1", "c"])
    r = c.s3.list_objects_v2(Bucket=c.b, Delimiter="/")
    expect([p["Prefix"] for p in r["CommonPrefixes"]] == ["a/", "b/"] and [o["Key"] for o in r["Contents"]] == ["c"],
           "prefixes and contents")


@case("listing")
def list_v2_paging(c: Ctx) -> None:
    _fill(c, ["a", "b", "c"])
    r = c.s3.list_objects_v2(Bucket=c.b, MaxKeys=2)
    expect(r["IsTruncated"] and r["KeyCount"] == 2, "first page")
    r2 = c.s3.list_objects_v2(Bucket=c.b, ContinuationToken=r["NextContinuationToken"])
    expect([o["Key"] for o in r2["Contents"]] == ["c"] and not r2["IsTruncated"], "second page")


@case("listing")
def list_v2_start_after(c: Ctx) -> None:
    _fill(c, ["a", "b", "c"])
    expect([o["Key"] for o in c.s3.list_objects_v2(Bucket=c.b, StartAfter="a")["Contents"]] == ["b", "c"], "after")


@case("listing")
def list_v1_marker(c: Ctx) -> None:
    _fill(c, ["a", "b", "c"])
    r = c.s3.list_objects(Bucket=c.b, MaxKeys=1, Delimiter="/")
    expect(r["IsTruncated"] and r.get("NextMarker") == "a", "NextMarker with a delimiter")


@case("listing")
def list_v2_fetch_owner(c: Ctx) -> None:
    _fill(c, ["a"])
    r = c.s3.list_objects_v2(Bucket=c.b, FetchOwner=True)
    expect("Owner" in r["Contents"][0], "owner")
    expect("Owner" not in c.s3.list_objects_v2(Bucket=c.b)["Contents"][0], "no owner by default")


@case("listing")
def list_encoding_type_url(c: Ctx) -> None:
    _fill(c, ["a b+c"])
    r = c.raw("GET", f"/{c.b}", query="list-type=2&encoding-type=url")
    expect(b"<Key>a%20b%2Bc</Key>" in r.content, "URL-encoded key")


@case("listing")
def max_keys_zero(c: Ctx) -> None:
    _fill(c, ["a"])
    r = c.s3.list_objects_v2(Bucket=c.b, MaxKeys=0)
    expect(r["KeyCount"] == 0 and "Contents" not in r, "no keys")


@case("listing")
def list_missing_bucket(c: Ctx) -> None:
    c.fails(404, "NoSuchBucket", "list_objects_v2", Bucket=c.b + "-none")


@case("listing")
def list_versions_key_marker(c: Ctx) -> None:
    c.s3.put_bucket_versioning(Bucket=c.b, VersioningConfiguration={"Status": "Enabled"})
    _fill(c, ["a", "b"])
    r = c.s3.list_object_versions(Bucket=c.b, KeyMarker="a")
    expect([v["Key"] for v in r["Versions"]] == ["b"], "after the key marker")


# ---------------------------------------------------------------- multipart


def _mpu(c: Ctx, key: str, bodies: list[bytes], alg: str | None = None, **create: Any) -> tuple[str, list[dict]]:
    extra = {"ChecksumAlgorithm": alg} if alg else {}
    up = c.s3.create_multipart_upload(Bucket=c.b, Key=key, **extra, **create)["UploadId"]
    parts = []
    for n, body in enumerate(bodies, start=1):
        r = c.s3.upload_part(Bucket=c.b, Key=key, UploadId=up, PartNumber=n, Body=body, **extra)
        part = {"PartNumber": n, "ETag": r["ETag"]}
        if alg:
            part[f"Checksum{alg}"] = r.get(f"Checksum{alg}")
        parts.append(part)
    return up, parts


FIVE = b"5" * (5 * MiB)


@case("multipart")
def multipart_etag_md5_of_md5s(c: Ctx) -> None:
    up, parts = _mpu(c, "k", [FIVE, b"tail"])
    done = c.s3.complete_multipart_upload(Bucket=c.b, Key="k", UploadId=up, MultipartUpload={"Parts": parts})
    want = hashlib.md5(hashlib.md5(FIVE).digest() + hashlib.md5(b"tail").digest()).hexdigest() + "-2"
    expect(done["ETag"] == f'"{want}"', "ETag")


@case("multipart")
def multipart_entity_too_small(c: Ctx) -> None:
    up, parts = _mpu(c, "k", [b"small", b"tail"])
    c.fails(400, "EntityTooSmall", "complete_multipart_upload", Bucket=c.b, Key="k", UploadId=up,
            MultipartUpload={"Parts": parts})


@case("multipart")
def multipart_invalid_part(c: Ctx) -> None:
    up, parts = _mpu(c, "k", [b"only"])
    c.fails(400, "InvalidPart", "complete_multipart_upload", Bucket=c.b, Key="k", UploadId=up,
            MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": '"00000000000000000000000000000000"'}]})


@case("multipart")
def multipart_invalid_part_order(c: Ctx) -> None:
    up, parts = _mpu(c, "k", [FIVE, b"tail"])
    c.fails(400, "InvalidPartOrder", "complete_multipart_upload", Bucket=c.b, Key="k", UploadId=up,
            MultipartUpload={"Parts": list(reversed(parts))})


@case("multipart")
def multipart_no_such_upload(c: Ctx) -> None:
    c.fails(404, "NoSuchUpload", "upload_part", Bucket=c.b, Key="k", UploadId="nope", PartNumber=1, Body=b"x")


@case("multipart")
def multipart_abort(c: Ctx) -> None:
    up, _ = _mpu(c, "k", [b"x"])
    c.s3.abort_multipart_upload(Bucket=c.b, Key="k", UploadId=up)
    c.fails(404, "NoSuchUpload", "list_parts", Bucket=c.b, Key="k", UploadId=up)


@case("multipart")
def multipart_list_parts_paging(c: Ctx) -> None:
    up, _ = _mpu(c, "k", [b"a", b"b", b"c"])
    r = c.s3.list_parts(Bucket=c.b, Key="k", UploadId=up, MaxParts=2)
    expect(r["IsTruncated"] and r["NextPartNumberMarker"] == 2, "first page")
    r2 = c.s3.list_parts(Bucket=c.b, Key="k", UploadId=up, PartNumberMarker=2)
    expect([p["PartNumber"] for p in r2["Parts"]] == [3], "second page")


@case("multipart")
def multipart_list_uploads(c: Ctx) -> None:
    _mpu(c, "a", [])
    _mpu(c, "b", [])
    r = c.s3.list_multipart_uploads(Bucket=c.b, MaxUploads=1)
    expect(r["IsTruncated"] and [u["Key"] for u in r["Uploads"]] == ["a"], "paged")


@case("multipart")
def upload_part_copy_range(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="src", Body=b"0123456789")
    up = c.s3.create_multipart_upload(Bucket=c.b, Key="k")["UploadId"]
    r = c.s3.upload_part_copy(Bucket=c.b, Key="k", UploadId=up, PartNumber=1, CopySource=f"{c.b}/src",
                              CopySourceRange="bytes=2-5")
    c.s3.complete_multipart_upload(Bucket=c.b, Key="k", UploadId=up, MultipartUpload={"Parts": [
        {"PartNumber": 1, "ETag": r["CopyPartResult"]["ETag"]}]})
    expect(c.s3.get_object(Bucket=c.b, Key="k")["Body"].read() == b"2345", "copied range")


@case("multipart")
def get_part_number_of_multipart(c: Ctx) -> None:
    up, parts = _mpu(c, "k", [FIVE, b"tail"])
    c.s3.complete_multipart_upload(Bucket=c.b, Key="k", UploadId=up, MultipartUpload={"Parts": parts})
    got = c.s3.get_object(Bucket=c.b, Key="k", PartNumber=2)
    expect(got["Body"].read() == b"tail" and got["PartsCount"] == 2, "part 2")


# ---------------------------------------------------------------- checksums (AWS "Checking object integrity")


def _single_ok(alg: str) -> Callable[[Ctx], None]:
    def run(c: Ctx) -> None:
        data = b"integrity " * 50
        put = c.s3.put_object(Bucket=c.b, Key="k", Body=data, ChecksumAlgorithm=alg)
        expect(put.get(f"Checksum{alg}") == b64(DIGEST[alg](data)), "PUT answer")
        head = c.s3.head_object(Bucket=c.b, Key="k", ChecksumMode="ENABLED")
        expect(head.get(f"Checksum{alg}") == b64(DIGEST[alg](data)), "HEAD with checksum mode")
    return run


def _single_bad(alg: str) -> Callable[[Ctx], None]:
    def run(c: Ctx) -> None:
        c.fails(400, "BadDigest", "put_object", Bucket=c.b, Key="k", Body=b"data",
                **{f"Checksum{alg}": b64(DIGEST[alg](b"other"))})
        expect(c.keys() == [], "nothing stored")
    return run


def _composite(alg: str) -> Callable[[Ctx], None]:
    def run(c: Ctx) -> None:
        bodies = [FIVE, b"tail"]
        up, parts = _mpu(c, "k", bodies, alg)
        done = c.s3.complete_multipart_upload(Bucket=c.b, Key="k", UploadId=up, MultipartUpload={"Parts": parts})
        want = b64(DIGEST[alg](b"".join(DIGEST[alg](b) for b in bodies))) + "-2"
        expect(done.get(f"Checksum{alg}") == want, f"composite {done.get(f'Checksum{alg}')} != {want}")
        expect(done.get("ChecksumType") == "COMPOSITE", "type")
    return run


def _full_object(alg: str) -> Callable[[Ctx], None]:
    def run(c: Ctx) -> None:
        bodies = [FIVE, b"tail"]
        up, parts = _mpu(c, "k", bodies, alg, ChecksumType="FULL_OBJECT")
        done = c.s3.complete_multipart_upload(Bucket=c.b, Key="k", UploadId=up, MultipartUpload={"Parts": parts})
        want = b64(DIGEST[alg](b"".join(bodies)))
        expect(done.get(f"Checksum{alg}") == want and done.get("ChecksumType") == "FULL_OBJECT", "full object")
    return run


for _alg in DIGEST:
    add("checksums", f"single_put_{_alg.lower()}", _single_ok(_alg))
    add("checksums", f"bad_digest_{_alg.lower()}", _single_bad(_alg))
    if _alg != "CRC64NVME":
        add("checksums", f"composite_multipart_{_alg.lower()}", _composite(_alg))
    if _alg.startswith("CRC"):
        add("checksums", f"full_object_multipart_{_alg.lower()}", _full_object(_alg))


@case("checksums")
def content_md5_mismatch_bad_digest(c: Ctx) -> None:
    c.fails(400, "BadDigest", "put_object", Bucket=c.b, Key="k", Body=b"data",
            ContentMD5=b64(hashlib.md5(b"other").digest()))


@case("checksums")
def content_md5_malformed_invalid_digest(c: Ctx) -> None:
    c.fails(400, "InvalidDigest", "put_object", Bucket=c.b, Key="k", Body=b"data", ContentMD5="notmd5")


@case("checksums")
def part_checksum_mismatch_bad_digest(c: Ctx) -> None:
    up = c.s3.create_multipart_upload(Bucket=c.b, Key="k", ChecksumAlgorithm="SHA256")["UploadId"]
    c.fails(400, "BadDigest", "upload_part", Bucket=c.b, Key="k", UploadId=up, PartNumber=1, Body=b"x",
            ChecksumSHA256=b64(hashlib.sha256(b"y").digest()))


@case("checksums")
def complete_wrong_object_checksum_bad_digest(c: Ctx) -> None:
    up, parts = _mpu(c, "k", [b"only"], "CRC32", ChecksumType="FULL_OBJECT")
    c.fails(400, "BadDigest", "complete_multipart_upload", Bucket=c.b, Key="k", UploadId=up,
            MultipartUpload={"Parts": parts}, ChecksumCRC32=b64(DIGEST["CRC32"](b"else")), ChecksumType="FULL_OBJECT")


@case("checksums")
def sha256_full_object_invalid_request(c: Ctx) -> None:
    c.fails(400, "InvalidRequest", "create_multipart_upload", Bucket=c.b, Key="k", ChecksumAlgorithm="SHA256",
            ChecksumType="FULL_OBJECT")


@case("checksums")
def crc64nvme_composite_invalid_request(c: Ctx) -> None:
    c.fails(400, "InvalidRequest", "create_multipart_upload", Bucket=c.b, Key="k", ChecksumAlgorithm="CRC64NVME",
            ChecksumType="COMPOSITE")


@case("checksums")
def crc64nvme_multipart_defaults_full_object(c: Ctx) -> None:
    r = c.s3.create_multipart_upload(Bucket=c.b, Key="k", ChecksumAlgorithm="CRC64NVME")
    expect(r.get("ChecksumType") == "FULL_OBJECT", "CRC64NVME is full-object")


@case("checksums")
def head_multipart_composite_has_part_count(c: Ctx) -> None:
    up, parts = _mpu(c, "k", [FIVE, b"t"], "SHA1")
    c.s3.complete_multipart_upload(Bucket=c.b, Key="k", UploadId=up, MultipartUpload={"Parts": parts})
    head = c.s3.head_object(Bucket=c.b, Key="k", ChecksumMode="ENABLED")
    expect(head.get("ChecksumSHA1", "").endswith("-2") and head.get("ChecksumType") == "COMPOSITE", "HEAD")


# ---------------------------------------------------------------- operations: GetObjectAttributes


@case("attributes")
def attributes_single_object(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"x" * 10, ChecksumAlgorithm="SHA256")
    a = c.s3.get_object_attributes(Bucket=c.b, Key="k",
                                   ObjectAttributes=["ETag", "Checksum", "ObjectParts", "StorageClass", "ObjectSize"])
    expect(a["ETag"] == hashlib.md5(b"x" * 10).hexdigest() and a["ObjectSize"] == 10, "etag, size")
    expect(a["StorageClass"] == "STANDARD" and "ObjectParts" not in a, "class, no parts")
    expect(a["Checksum"].get("ChecksumSHA256") == b64(hashlib.sha256(b"x" * 10).digest()), "checksum")


@case("attributes")
def attributes_multipart_parts_and_checksums(c: Ctx) -> None:
    bodies = [FIVE, b"tail"]
    up, parts = _mpu(c, "k", bodies, "SHA256")
    c.s3.complete_multipart_upload(Bucket=c.b, Key="k", UploadId=up, MultipartUpload={"Parts": parts})
    a = c.s3.get_object_attributes(Bucket=c.b, Key="k", ObjectAttributes=["ObjectParts", "Checksum"])
    op = a.get("ObjectParts", {})
    expect(op.get("TotalPartsCount") == 2, "parts count")
    want = [{"PartNumber": n, "Size": len(b), "ChecksumSHA256": b64(hashlib.sha256(b).digest())}
            for n, b in enumerate(bodies, 1)]
    expect(op.get("Parts") == want, "parts with sizes and checksums")
    composite = b64(hashlib.sha256(b"".join(hashlib.sha256(b).digest() for b in bodies)).digest())
    expect(a["Checksum"].get("ChecksumSHA256") == composite and a["Checksum"].get("ChecksumType") == "COMPOSITE",
           "composite checksum without a part count")


@case("attributes")
def attributes_parts_paging(c: Ctx) -> None:
    up, parts = _mpu(c, "k", [FIVE, FIVE, b"t"], "CRC32")
    c.s3.complete_multipart_upload(Bucket=c.b, Key="k", UploadId=up, MultipartUpload={"Parts": parts})
    op = c.s3.get_object_attributes(Bucket=c.b, Key="k", ObjectAttributes=["ObjectParts"], MaxParts=1,
                                    PartNumberMarker=1).get("ObjectParts", {})
    expect(op.get("IsTruncated") is True and op.get("NextPartNumberMarker") == 2, "truncated after part 2")
    expect([p["PartNumber"] for p in op.get("Parts", [])] == [2], "part 2 only")


@case("attributes")
def attributes_invalid_name(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"x")
    r = c.raw("GET", f"/{c.b}/k", query="attributes", headers={"x-amz-object-attributes": "Colour"})
    expect(r.status_code == 400 and b"<Code>InvalidArgument</Code>" in r.content, f"{r.status_code}")


@case("attributes")
def attributes_missing_key(c: Ctx) -> None:
    c.fails(404, "NoSuchKey", "get_object_attributes", Bucket=c.b, Key="nope", ObjectAttributes=["ETag"])


@case("attributes")
def attributes_version_id_header(c: Ctx) -> None:
    c.s3.put_bucket_versioning(Bucket=c.b, VersioningConfiguration={"Status": "Enabled"})
    v = c.s3.put_object(Bucket=c.b, Key="k", Body=b"x")["VersionId"]
    a = c.s3.get_object_attributes(Bucket=c.b, Key="k", ObjectAttributes=["ObjectSize"])
    expect(a.get("VersionId") == v and "LastModified" in a, "version id and last-modified headers")


# ---------------------------------------------------------------- operations: tagging


@case("tagging")
def object_tagging_round_trip(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"x")
    c.s3.put_object_tagging(Bucket=c.b, Key="k", Tagging={"TagSet": [{"Key": "a", "Value": "1"}]})
    expect(c.s3.get_object_tagging(Bucket=c.b, Key="k")["TagSet"] == [{"Key": "a", "Value": "1"}], "tags")
    c.s3.delete_object_tagging(Bucket=c.b, Key="k")
    expect(c.s3.get_object_tagging(Bucket=c.b, Key="k")["TagSet"] == [], "removed")


@case("tagging")
def put_object_with_tagging_header(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"x", Tagging="a=1&b=2")
    expect(c.s3.get_object(Bucket=c.b, Key="k").get("TagCount") == 2, "x-amz-tagging-count")


@case("tagging")
def eleven_object_tags_refused(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"x")
    c.fails(400, "BadRequest", "put_object_tagging", Bucket=c.b, Key="k",
            Tagging={"TagSet": [{"Key": f"k{i}", "Value": "v"} for i in range(11)]})


@case("tagging")
def duplicate_tag_keys_invalid_tag(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"x")
    c.fails(400, "InvalidTag", "put_object_tagging", Bucket=c.b, Key="k",
            Tagging={"TagSet": [{"Key": "a", "Value": "1"}, {"Key": "a", "Value": "2"}]})


@case("tagging")
def aws_prefix_tag_invalid(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"x")
    c.fails(400, "InvalidTag", "put_object_tagging", Bucket=c.b, Key="k",
            Tagging={"TagSet": [{"Key": "aws:x", "Value": "1"}]})


@case("tagging")
def tagging_missing_key(c: Ctx) -> None:
    c.fails(404, "NoSuchKey", "get_object_tagging", Bucket=c.b, Key="nope")


@case("tagging")
def copy_tagging_directive_replace(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="src", Body=b"x", Tagging="a=1")
    c.s3.copy_object(Bucket=c.b, Key="dst", CopySource=f"{c.b}/src", TaggingDirective="REPLACE", Tagging="b=2")
    expect(c.s3.get_object_tagging(Bucket=c.b, Key="dst")["TagSet"] == [{"Key": "b", "Value": "2"}], "replaced")


@case("tagging")
def copy_tagging_directive_copy(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="src", Body=b"x", Tagging="a=1")
    c.s3.copy_object(Bucket=c.b, Key="dst", CopySource=f"{c.b}/src")
    expect(c.s3.get_object_tagging(Bucket=c.b, Key="dst")["TagSet"] == [{"Key": "a", "Value": "1"}], "copied")


@case("tagging")
def multipart_tagging_header(c: Ctx) -> None:
    up, parts = _mpu(c, "k", [b"x"], Tagging="t=1")
    c.s3.complete_multipart_upload(Bucket=c.b, Key="k", UploadId=up, MultipartUpload={"Parts": parts})
    expect(c.s3.get_object_tagging(Bucket=c.b, Key="k")["TagSet"] == [{"Key": "t", "Value": "1"}], "tags")


@case("tagging")
def bucket_tagging_round_trip(c: Ctx) -> None:
    c.s3.put_bucket_tagging(Bucket=c.b, Tagging={"TagSet": [{"Key": "team", "Value": "core"}]})
    expect(c.s3.get_bucket_tagging(Bucket=c.b)["TagSet"] == [{"Key": "team", "Value": "core"}], "tags")


@case("tagging")
def bucket_tagging_none_no_such_tag_set(c: Ctx) -> None:
    c.fails(404, "NoSuchTagSet", "get_bucket_tagging", Bucket=c.b)


@case("tagging")
def bucket_tagging_delete(c: Ctx) -> None:
    c.s3.put_bucket_tagging(Bucket=c.b, Tagging={"TagSet": [{"Key": "team", "Value": "core"}]})
    c.s3.delete_bucket_tagging(Bucket=c.b)
    c.fails(404, "NoSuchTagSet", "get_bucket_tagging", Bucket=c.b)


@case("tagging")
def tagging_version_id(c: Ctx) -> None:
    c.s3.put_bucket_versioning(Bucket=c.b, VersioningConfiguration={"Status": "Enabled"})
    v1 = c.s3.put_object(Bucket=c.b, Key="k", Body=b"1", Tagging="v=1")["VersionId"]
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"2", Tagging="v=2")
    expect(c.s3.get_object_tagging(Bucket=c.b, Key="k", VersionId=v1)["TagSet"] == [{"Key": "v", "Value": "1"}],
           "the version's tags")


# ---------------------------------------------------------------- operations: ListBuckets paging


@case("list-buckets")
def list_buckets_max_buckets(c: Ctx) -> None:
    for s in ("-x", "-y"):
        c.s3.create_bucket(Bucket=c.b + s)
    r = c.s3.list_buckets(MaxBuckets=1, Prefix=c.b)
    expect(len(r["Buckets"]) == 1 and "ContinuationToken" in r, "one bucket and a token")


@case("list-buckets")
def list_buckets_continuation(c: Ctx) -> None:
    for s in ("-x", "-y"):
        c.s3.create_bucket(Bucket=c.b + s)
    seen, token = [], None
    for _ in range(5):
        r = c.s3.list_buckets(MaxBuckets=1, Prefix=c.b, **({"ContinuationToken": token} if token else {}))
        seen += [x["Name"] for x in r["Buckets"]]
        token = r.get("ContinuationToken")
        if not token:
            break
    expect(seen == [c.b, c.b + "-x", c.b + "-y"], f"paged {seen}")


@case("list-buckets")
def list_buckets_prefix(c: Ctx) -> None:
    c.s3.create_bucket(Bucket=c.b + "-x")
    r = c.s3.list_buckets(Prefix=c.b + "-")
    expect([x["Name"] for x in r["Buckets"]] == [c.b + "-x"] and r.get("Prefix") == c.b + "-", "prefix")


# ---------------------------------------------------------------- operations: lifecycle


def _rules(c: Ctx, *rules: dict) -> None:
    c.s3.put_bucket_lifecycle_configuration(Bucket=c.b, LifecycleConfiguration={"Rules": list(rules)})


EXPIRE = {"ID": "r", "Filter": {"Prefix": "logs/"}, "Status": "Enabled", "Expiration": {"Days": 3}}


@case("lifecycle")
def lifecycle_round_trip(c: Ctx) -> None:
    _rules(c, EXPIRE)
    expect(c.s3.get_bucket_lifecycle_configuration(Bucket=c.b)["Rules"] == [EXPIRE], "rules")


@case("lifecycle")
def lifecycle_missing(c: Ctx) -> None:
    c.fails(404, "NoSuchLifecycleConfiguration", "get_bucket_lifecycle_configuration", Bucket=c.b)


@case("lifecycle")
def lifecycle_delete(c: Ctx) -> None:
    _rules(c, EXPIRE)
    c.s3.delete_bucket_lifecycle(Bucket=c.b)
    c.fails(404, "NoSuchLifecycleConfiguration", "get_bucket_lifecycle_configuration", Bucket=c.b)


@case("lifecycle")
def lifecycle_size_filter_round_trip(c: Ctx) -> None:
    rule = {"ID": "s", "Filter": {"And": {"Prefix": "a/", "ObjectSizeGreaterThan": 10, "ObjectSizeLessThan": 99}},
            "Status": "Enabled", "Expiration": {"Days": 1}}
    _rules(c, rule)
    expect(c.s3.get_bucket_lifecycle_configuration(Bucket=c.b)["Rules"] == [rule], "size filter kept")


@case("lifecycle")
def lifecycle_noncurrent_and_abort(c: Ctx) -> None:
    rule = {"ID": "n", "Filter": {"Prefix": ""}, "Status": "Enabled",
            "NoncurrentVersionExpiration": {"NoncurrentDays": 7, "NewerNoncurrentVersions": 2},
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 3}}
    _rules(c, rule)
    expect(c.s3.get_bucket_lifecycle_configuration(Bucket=c.b)["Rules"] == [rule], "rules")


@case("lifecycle")
def lifecycle_rule_without_id_gets_one(c: Ctx) -> None:
    _rules(c, {k: val for k, val in EXPIRE.items() if k != "ID"})
    expect(c.s3.get_bucket_lifecycle_configuration(Bucket=c.b)["Rules"][0].get("ID"), "an assigned ID")


@case("lifecycle")
def lifecycle_abort_date_headers(c: Ctx) -> None:
    _rules(c, {"ID": "a", "Filter": {"Prefix": "up/"}, "Status": "Enabled",
               "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 2}})
    create = c.s3.create_multipart_upload(Bucket=c.b, Key="up/k")
    expect(create.get("AbortRuleId") == "a" and "AbortDate" in create, "x-amz-abort-date and -rule-id")
    listed = c.s3.list_parts(Bucket=c.b, Key="up/k", UploadId=create["UploadId"])
    expect(listed.get("AbortRuleId") == "a", "on ListParts too")
    expect("AbortRuleId" not in c.s3.create_multipart_upload(Bucket=c.b, Key="other"), "only under the prefix")


@case("lifecycle")
def lifecycle_zero_days_invalid(c: Ctx) -> None:
    c.fails(400, "InvalidArgument", "put_bucket_lifecycle_configuration", Bucket=c.b, LifecycleConfiguration={
        "Rules": [{**EXPIRE, "Expiration": {"Days": 0}}]})


@case("lifecycle")
def lifecycle_duplicate_ids_invalid(c: Ctx) -> None:
    c.fails(400, "InvalidArgument", "put_bucket_lifecycle_configuration", Bucket=c.b,
            LifecycleConfiguration={"Rules": [EXPIRE, EXPIRE]})


@case("lifecycle")
def lifecycle_no_action_invalid_request(c: Ctx) -> None:
    c.fails(400, "InvalidRequest", "put_bucket_lifecycle_configuration", Bucket=c.b,
            LifecycleConfiguration={"Rules": [{"ID": "x", "Filter": {"Prefix": ""}, "Status": "Enabled"}]})


@case("lifecycle")
def lifecycle_date_not_midnight_invalid(c: Ctx) -> None:
    r = c.raw("PUT", f"/{c.b}", query="lifecycle", content=(
        b"<LifecycleConfiguration><Rule><ID>d</ID><Filter><Prefix></Prefix></Filter><Status>Enabled</Status>"
        b"<Expiration><Date>2030-01-01T10:00:00Z</Date></Expiration></Rule></LifecycleConfiguration>"),
        headers={"Content-MD5": b64(hashlib.md5(
            b"<LifecycleConfiguration><Rule><ID>d</ID><Filter><Prefix></Prefix></Filter><Status>Enabled</Status>"
            b"<Expiration><Date>2030-01-01T10:00:00Z</Date></Expiration></Rule></LifecycleConfiguration>").digest())})
    expect(r.status_code == 400 and b"InvalidArgument" in r.content, f"{r.status_code}")


@case("lifecycle")
def lifecycle_expiration_header_on_put_and_head(c: Ctx) -> None:
    _rules(c, EXPIRE)
    put = c.s3.put_object(Bucket=c.b, Key="logs/a", Body=b"x")
    head = c.s3.head_object(Bucket=c.b, Key="logs/a")
    for answer in (put, head):
        value = answer.get("Expiration", "")
        expect(value.startswith('expiry-date="') and value.endswith('", rule-id="r"'), f"x-amz-expiration {value!r}")
    c.s3.put_object(Bucket=c.b, Key="other", Body=b"x")
    expect("Expiration" not in c.s3.head_object(Bucket=c.b, Key="other"), "no header outside the rule")


@case("lifecycle")
def lifecycle_expiry_date_is_midnight(c: Ctx) -> None:
    _rules(c, EXPIRE)
    value = c.s3.put_object(Bucket=c.b, Key="logs/a", Body=b"x").get("Expiration", "")
    expect("00:00:00 GMT" in value, f"rounded to midnight UTC: {value!r}")


# ---------------------------------------------------------------- operations: CORS


CORS = {"CORSRules": [{"AllowedOrigins": [ORIGIN], "AllowedMethods": ["PUT", "GET"],
                       "AllowedHeaders": ["content-type"], "MaxAgeSeconds": 600}]}


@case("cors")
def cors_round_trip(c: Ctx) -> None:
    c.s3.put_bucket_cors(Bucket=c.b, CORSConfiguration=CORS)
    expect(c.s3.get_bucket_cors(Bucket=c.b)["CORSRules"] == CORS["CORSRules"], "rules")


@case("cors")
def cors_missing(c: Ctx) -> None:
    c.fails(404, "NoSuchCORSConfiguration", "get_bucket_cors", Bucket=c.b)


@case("cors")
def cors_bad_method_invalid_request(c: Ctx) -> None:
    c.fails(400, "InvalidRequest", "put_bucket_cors", Bucket=c.b, CORSConfiguration={"CORSRules": [
        {"AllowedOrigins": ["*"], "AllowedMethods": ["PATCH"]}]})


def _preflight(c: Ctx, origin: str, method: str = "PUT") -> httpx.Response:
    return c.raw("OPTIONS", f"/{c.b}/upload", sign=False, headers={
        "Origin": origin, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": "content-type"})


@case("cors")
def cors_preflight_allowed(c: Ctx) -> None:
    c.s3.put_bucket_cors(Bucket=c.b, CORSConfiguration=CORS)
    r = _preflight(c, ORIGIN)
    expect(r.status_code == 200 and r.headers.get("access-control-allow-origin") == ORIGIN, f"{r.status_code}")
    expect(r.headers.get("access-control-max-age") == "600", "max age")


@case("cors")
def cors_preflight_other_origin_403(c: Ctx) -> None:
    c.s3.put_bucket_cors(Bucket=c.b, CORSConfiguration=CORS)
    expect(_preflight(c, "https://evil.example").status_code == 403, "refused")


@case("cors")
def cors_preflight_without_configuration_403(c: Ctx) -> None:
    expect(_preflight(c, ORIGIN).status_code == 403, "refused")


@case("cors")
def cors_presigned_put_after_preflight(c: Ctx) -> None:
    c.s3.put_bucket_cors(Bucket=c.b, CORSConfiguration=CORS)
    url = c.s3.generate_presigned_url("put_object", Params={"Bucket": c.b, "Key": "upload"}, ExpiresIn=300)
    r = httpx.put(url, content=b"browser", headers={"Origin": ORIGIN}, timeout=30)
    expect(r.status_code == 200 and r.headers.get("access-control-allow-origin") == ORIGIN, f"{r.status_code}")


@case("cors")
def cors_delete(c: Ctx) -> None:
    c.s3.put_bucket_cors(Bucket=c.b, CORSConfiguration=CORS)
    c.s3.delete_bucket_cors(Bucket=c.b)
    c.fails(404, "NoSuchCORSConfiguration", "get_bucket_cors", Bucket=c.b)


# ---------------------------------------------------------------- ACLs


def _anon(c: Ctx, path: str) -> int:
    return c.raw("GET", path, sign=False).status_code


@case("acl")
def acl_private_object_anonymous_403(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"x", ACL="private")
    expect(_anon(c, f"/{c.b}/k") == 403, "private")


@case("acl")
def acl_public_read_object_anonymous_200(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"x", ACL="public-read")
    expect(_anon(c, f"/{c.b}/k") == 200, "public-read object")


@case("acl")
def acl_public_read_bucket_lists(c: Ctx) -> None:
    c.s3.put_bucket_acl(Bucket=c.b, ACL="public-read")
    expect(_anon(c, f"/{c.b}") == 200, "public-read bucket listing")


@case("acl")
def acl_get_object_acl_grants(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"x", ACL="public-read")
    acl = c.s3.get_object_acl(Bucket=c.b, Key="k")
    got = sorted((g["Grantee"].get("URI") or g["Grantee"]["Type"], g["Permission"]) for g in acl["Grants"])
    expect(got == [("CanonicalUser", "FULL_CONTROL"), (ALL_USERS, "READ")], f"grants {got}")


@case("acl")
def acl_private_bucket_grants(c: Ctx) -> None:
    acl = c.s3.get_bucket_acl(Bucket=c.b)
    expect([g["Permission"] for g in acl["Grants"]] == ["FULL_CONTROL"] and "ID" in acl["Owner"], "owner only")


@case("acl")
def acl_public_read_write_not_implemented(c: Ctx) -> None:
    c.fails(501, "NotImplemented", "put_bucket_acl", Bucket=c.b, ACL="public-read-write")


@case("acl")
def acl_grant_other_account_not_implemented(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"x")
    c.fails(501, "NotImplemented", "put_object_acl", Bucket=c.b, Key="k", GrantRead='id="another-account"')


@case("acl")
def acl_copy_object_public_read(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="src", Body=b"x")
    c.s3.copy_object(Bucket=c.b, Key="dst", CopySource=f"{c.b}/src", ACL="public-read")
    expect(_anon(c, f"/{c.b}/dst") == 200 and _anon(c, f"/{c.b}/src") == 403, "only the copy is public")


@case("acl")
def acl_multipart_public_read(c: Ctx) -> None:
    up, parts = _mpu(c, "k", [b"x"], ACL="public-read")
    c.s3.complete_multipart_upload(Bucket=c.b, Key="k", UploadId=up, MultipartUpload={"Parts": parts})
    expect(_anon(c, f"/{c.b}/k") == 200, "public after completion")


@case("acl")
def acl_create_bucket_public_read(c: Ctx) -> None:
    c.s3.create_bucket(Bucket=c.b + "-pub", ACL="public-read")
    c.s3.put_object(Bucket=c.b + "-pub", Key="k", Body=b"x")
    expect(_anon(c, f"/{c.b}-pub/k") == 200, "public bucket's object")


@case("access")
def anonymous_write_refused(c: Ctx) -> None:
    c.s3.put_bucket_acl(Bucket=c.b, ACL="public-read")
    r = c.raw("PUT", f"/{c.b}/k", sign=False, content=b"x")
    expect(r.status_code == 403 and b"AccessDenied" in r.content, f"{r.status_code}")


@case("access")
def anonymous_read_private_bucket_403(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"x")
    r = c.raw("GET", f"/{c.b}/k", sign=False)
    expect(r.status_code == 403 and b"AccessDenied" in r.content, f"{r.status_code}")


@case("access")
def bad_secret_signature_does_not_match(c: Ctx) -> None:
    bad = boto3.session.Session().client("s3", endpoint_url=c.t.endpoint, region_name=REGION,
                                         aws_access_key_id=c.t.key, aws_secret_access_key="wrong-secret",
                                         config=Config(s3={"addressing_style": "path"}))
    try:
        bad.list_objects_v2(Bucket=c.b)
        raise Failed("a wrong secret was accepted")
    except ClientError as e:
        expect(e.response["Error"]["Code"] == "SignatureDoesNotMatch", e.response["Error"]["Code"])


@case("access")
def unknown_access_key_invalid_access_key_id(c: Ctx) -> None:
    bad = boto3.session.Session().client("s3", endpoint_url=c.t.endpoint, region_name=REGION,
                                         aws_access_key_id="AKIDUNKNOWN000000000", aws_secret_access_key="x",
                                         config=Config(s3={"addressing_style": "path"}))
    try:
        bad.list_objects_v2(Bucket=c.b)
        raise Failed("an unknown key was accepted")
    except ClientError as e:
        expect(e.response["Error"]["Code"] == "InvalidAccessKeyId", e.response["Error"]["Code"])


# ---------------------------------------------------------------- signatures: SigV2 and presigned edges


def _v2(c: Ctx) -> Any:
    return c.t.client(signature_version="s3")


@case("signatures")
def sigv2_header_put_get(c: Ctx) -> None:
    v2 = _v2(c)
    v2.put_object(Bucket=c.b, Key="k", Body=b"v2")
    expect(v2.get_object(Bucket=c.b, Key="k")["Body"].read() == b"v2", "round trip")


@case("signatures")
def sigv2_presigned_get(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"v2")
    url = _v2(c).generate_presigned_url("get_object", Params={"Bucket": c.b, "Key": "k"}, ExpiresIn=300)
    expect("AWSAccessKeyId=" in url and "Signature=" in url, "a SigV2 URL")
    r = httpx.get(url, timeout=30)
    expect(r.status_code == 200 and r.content == b"v2", f"{r.status_code}")


@case("signatures")
def sigv2_presigned_expired(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"v2")
    url = _v2(c).generate_presigned_url("get_object", Params={"Bucket": c.b, "Key": "k"}, ExpiresIn=-10)
    r = httpx.get(url, timeout=30)
    expect(r.status_code == 403 and b"AccessDenied" in r.content, f"{r.status_code}")


@case("signatures")
def sigv2_presigned_tampered(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"v2")
    url = _v2(c).generate_presigned_url("get_object", Params={"Bucket": c.b, "Key": "k"}, ExpiresIn=300)
    r = httpx.get(url.replace(f"/{c.b}/k?", f"/{c.b}/k?versionId=null&"), timeout=30)
    expect(r.status_code == 403 and b"SignatureDoesNotMatch" in r.content, f"{r.status_code}")


@case("signatures")
def sigv2_presigned_too_far_ahead(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"v2")
    url = _v2(c).generate_presigned_url("get_object", Params={"Bucket": c.b, "Key": "k"}, ExpiresIn=30 * 86400)
    r = httpx.get(url, timeout=30)
    expect(r.status_code in (400, 403) and r.status_code != 200, f"{r.status_code}")


@case("signatures")
def sigv2_unsigned_amz_header_refused(c: Ctx) -> None:
    url = _v2(c).generate_presigned_url("put_object", Params={"Bucket": c.b, "Key": "k"}, ExpiresIn=300)
    r = httpx.put(url, content=b"x", headers={"x-amz-meta-extra": "1"}, timeout=30)
    expect(r.status_code == 403 and c.keys() == [], f"{r.status_code}")


@case("signatures")
def sigv4_presigned_get(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"v4")
    url = c.s3.generate_presigned_url("get_object", Params={"Bucket": c.b, "Key": "k"}, ExpiresIn=300)
    expect(httpx.get(url, timeout=30).content == b"v4", "presigned GET")


def _expires(value: str) -> Callable[[Ctx], None]:
    def run(c: Ctx) -> None:
        c.s3.put_object(Bucket=c.b, Key="k", Body=b"v4")
        url = c.s3.generate_presigned_url("get_object", Params={"Bucket": c.b, "Key": "k"}, ExpiresIn=300)
        url = url.replace("X-Amz-Expires=300", f"X-Amz-Expires={value}")
        r = httpx.get(url, timeout=30)
        # The signature no longer matches either; S3 checks the parameter first.
        expect(r.status_code in (400, 403) and b"AuthorizationQueryParametersError" in r.content,
               f"{r.status_code} {r.content[:120]!r}")
    return run


for _value in ("604801", "0", "-1", "abc"):
    add("signatures", f"x_amz_expires_{_value}", _expires(_value))


@case("signatures")
def sigv4_presigned_unsigned_copy_source_refused(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="secret", Body=b"s")
    url = c.s3.generate_presigned_url("put_object", Params={"Bucket": c.b, "Key": "k"}, ExpiresIn=300)
    r = httpx.put(url, headers={"x-amz-copy-source": f"/{c.b}/secret"}, timeout=30)
    expect(r.status_code == 403 and b"AccessDenied" in r.content, f"{r.status_code}")


@case("signatures")
def sigv4_skew_refused(c: Ctx) -> None:
    import datetime as dt
    from unittest import mock

    req = AWSRequest(method="GET", url=f"{c.t.endpoint}/{c.b}", headers={"x-amz-content-sha256": "UNSIGNED-PAYLOAD"})
    # A client whose clock is an hour behind: signed with that time, as such a client would.
    with mock.patch("botocore.auth.get_current_datetime",
                    return_value=dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(hours=1)):
        S3SigV4Auth(Credentials(c.t.key, c.t.secret), "s3", REGION).add_auth(req)
    r = httpx.get(req.url, headers=dict(req.headers.items()), timeout=30)
    expect(r.status_code == 403 and b"RequestTimeTooSkewed" in r.content, f"{r.status_code}")


# ---------------------------------------------------------------- exact error semantics


@case("errors")
def part_number_zero_invalid_argument(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"x")
    r = c.raw("GET", f"/{c.b}/k", query="partNumber=0")
    expect(r.status_code == 400 and b"InvalidArgument" in r.content, f"{r.status_code}")


@case("errors")
def part_number_past_single_part_416(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"x")
    c.fails(416, "InvalidPartNumber", "get_object", Bucket=c.b, Key="k", PartNumber=2)


@case("errors")
def part_number_1_of_single_part_206(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"xyz")
    got = c.s3.get_object(Bucket=c.b, Key="k", PartNumber=1)
    expect(got["ResponseMetadata"]["HTTPStatusCode"] == 206 and got["Body"].read() == b"xyz", "206 whole")


@case("errors")
def part_number_past_multipart_416(c: Ctx) -> None:
    up, parts = _mpu(c, "k", [FIVE, b"t"])
    c.s3.complete_multipart_upload(Bucket=c.b, Key="k", UploadId=up, MultipartUpload={"Parts": parts})
    c.fails(416, "InvalidPartNumber", "get_object", Bucket=c.b, Key="k", PartNumber=3)


@case("errors")
def upload_part_10001_invalid_argument(c: Ctx) -> None:
    up = c.s3.create_multipart_upload(Bucket=c.b, Key="k")["UploadId"]
    c.fails(400, "InvalidArgument", "upload_part", Bucket=c.b, Key="k", UploadId=up, PartNumber=10001, Body=b"x")


@case("errors")
def missing_content_length_411(c: Ctx) -> None:
    def body():
        yield b"chunked body"
    r = c.raw("PUT", f"/{c.b}/k", content=body())
    expect(r.status_code == 411 and b"MissingContentLength" in r.content, f"{r.status_code}")


@case("errors")
def version_marker_deleted_continues(c: Ctx) -> None:
    c.s3.put_bucket_versioning(Bucket=c.b, VersioningConfiguration={"Status": "Enabled"})
    ids = [c.s3.put_object(Bucket=c.b, Key="k", Body=str(i).encode())["VersionId"] for i in range(3)]
    page = c.s3.list_object_versions(Bucket=c.b, MaxKeys=1)
    marker = page["NextVersionIdMarker"]
    c.s3.delete_object(Bucket=c.b, Key="k", VersionId=marker)
    rest = c.s3.list_object_versions(Bucket=c.b, KeyMarker="k", VersionIdMarker=marker)
    expect([v["VersionId"] for v in rest.get("Versions", [])] == [ids[1], ids[0]], "continued")


@case("errors")
def unicode_metadata_rfc2047(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"x", Metadata={"name": "=?UTF-8?B?Y2Fmw6k=?="})
    r = c.raw("HEAD", f"/{c.b}/k")
    expect(r.headers.get("x-amz-meta-name") == "=?UTF-8?Q?caf=C3=A9?=", f"{r.headers.get('x-amz-meta-name')!r}")


@case("errors")
def ascii_metadata_as_sent(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"x", Metadata={"name": "plain value"})
    expect(c.s3.head_object(Bucket=c.b, Key="k")["Metadata"] == {"name": "plain value"}, "as sent")


@case("errors")
def content_encoding_kept_exactly(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"x", ContentEncoding="gzip,  Identity")
    expect(c.s3.head_object(Bucket=c.b, Key="k")["ContentEncoding"] == "gzip,  Identity", "as sent")


@case("errors")
def control_character_key_listed(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="a\rb", Body=b"x")
    expect(c.keys() == ["a\rb"], f"{c.keys()!r}")


@case("errors")
def control_character_key_url_encoded(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="a\x01b", Body=b"x")
    r = c.raw("GET", f"/{c.b}", query="list-type=2&encoding-type=url")
    expect(b"<Key>a%01b</Key>" in r.content, f"{r.content[:300]!r}")


@case("errors")
def delete_bucket_with_only_uploads(c: Ctx) -> None:
    c.s3.create_multipart_upload(Bucket=c.b, Key="k")
    c.s3.delete_bucket(Bucket=c.b)
    c.fails(404, "404", "head_bucket", Bucket=c.b)


@case("errors")
def malformed_xml(c: Ctx) -> None:
    body = b"<Delete><Object>"
    r = c.raw("POST", f"/{c.b}", query="delete", content=body, headers={"Content-MD5": b64(hashlib.md5(body).digest())})
    expect(r.status_code == 400 and b"MalformedXML" in r.content, f"{r.status_code}")


@case("errors")
def metadata_too_large(c: Ctx) -> None:
    c.fails(400, "MetadataTooLarge", "put_object", Bucket=c.b, Key="k", Body=b"x", Metadata={"big": "v" * 2100})


@case("errors")
def key_too_long(c: Ctx) -> None:
    c.fails(400, "KeyTooLongError", "put_object", Bucket=c.b, Key="k" * 1025, Body=b"x")


@case("errors")
def if_match_without_object_404(c: Ctx) -> None:
    c.fails(404, "NoSuchKey", "put_object", Bucket=c.b, Key="k", Body=b"x", IfMatch='"0000"')


@case("errors")
def invalid_storage_class(c: Ctx) -> None:
    c.fails(400, "InvalidStorageClass", "put_object", Bucket=c.b, Key="k", Body=b"x", StorageClass="FANCY")


@case("errors")
def invalid_max_keys(c: Ctx) -> None:
    r = c.raw("GET", f"/{c.b}", query="list-type=2&max-keys=-1")
    expect(r.status_code == 400 and b"InvalidArgument" in r.content, f"{r.status_code}")


@case("errors")
def range_and_part_number_invalid_request(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"xyz")
    c.fails(400, "InvalidRequest", "get_object", Bucket=c.b, Key="k", PartNumber=1, Range="bytes=0-1")


@case("errors")
def copy_missing_source_nosuchkey(c: Ctx) -> None:
    c.fails(404, "NoSuchKey", "copy_object", Bucket=c.b, Key="d", CopySource={"Bucket": c.b, "Key": "nope"})


@case("errors")
def empty_version_id_invalid_argument(c: Ctx) -> None:
    c.s3.put_object(Bucket=c.b, Key="k", Body=b"x")
    r = c.raw("GET", f"/{c.b}/k", query="versionId=")
    expect(r.status_code == 400 and b"InvalidArgument" in r.content, f"{r.status_code}")


# ---------------------------------------------------------------- runner


def run_case(target: Target, s3: Any, fn: Callable[[Ctx], None], n: int) -> str | None:
    bucket = f"conf-{n:03d}-{secrets.token_hex(4)}"
    try:
        s3.create_bucket(Bucket=bucket)
        fn(Ctx(target, s3, bucket))
        return None
    except Failed as e:
        return f"expected: {e}"
    except ClientError as e:
        err = e.response.get("Error", {})
        return f"unexpected {e.response['ResponseMetadata'].get('HTTPStatusCode')} {err.get('Code')}"
    except Exception as e:  # noqa: BLE001 - any other failure is a failed case, reported
        return f"{type(e).__name__}: {e}".splitlines()[0][:200] + ("" if os.environ.get("CONF_TRACE") is None
                                                                    else "\n" + traceback.format_exc())


QUICK = ("put_get_round_trip", "single_put_sha256", "bad_digest_crc32", "attributes_single_object",
         "object_tagging_round_trip", "lifecycle_round_trip", "cors_preflight_allowed",
         "part_number_zero_invalid_argument")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"only {len(QUICK)} cases (the smoke run)")
    ap.add_argument("--only", choices=("anvil", "moto"), default=None)
    ap.add_argument("--verbose", action="store_true", help="every failure with its reason")
    ap.add_argument("--anvil", nargs=3, metavar=("ENDPOINT", "KEY", "SECRET"),
                    help="use this running Anvil instead of starting one")
    ap.add_argument("--moto", metavar="ENDPOINT", help="use this running moto server instead of starting one")
    args = ap.parse_args()
    load_before = os.getloadavg()
    cases = [c for c in CASES if not args.quick or c[1] in QUICK]
    names = [n for _, n, _ in CASES]
    assert len(names) == len(set(names)), "case names are unique"
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="anvil-s3conf-") as tmp:
        starters = {"anvil": lambda: start_anvil(Path(tmp) / "data"), "moto": start_moto}
        if args.anvil:
            starters["anvil"] = lambda: Target("anvil", *args.anvil, None)
        if args.moto:
            starters["moto"] = lambda: Target("moto", args.moto, "testing", "testing", None)
        for name in [args.only] if args.only else ["anvil", "moto"]:
            target = starters[name]()
            try:
                s3 = target.client()
                failures: dict[str, str] = {}
                groups: dict[str, list[int]] = {}
                started = time.monotonic()
                for n, (group, case_name, fn) in enumerate(cases):
                    reason = run_case(target, s3, fn, n)
                    tally = groups.setdefault(group, [0, 0])
                    tally[1] += 1
                    if reason is None:
                        tally[0] += 1
                    else:
                        failures[case_name] = reason
                passed = len(cases) - len(failures)
                results[name] = {
                    "passed": passed, "total": len(cases), "pass_rate": round(passed / len(cases), 4),
                    "seconds": round(time.monotonic() - started, 1),
                    "groups": {g: {"passed": p, "total": t} for g, (p, t) in sorted(groups.items())},
                    "failed": failures if args.verbose else sorted(failures),
                }
            finally:
                target.stop()
    print(json.dumps({"benchmark": "s3_conformance", "quick": args.quick, "cases": len(cases), **results,
                      "load_average_before": [round(x, 2) for x in load_before],
                      "load_average_after": [round(x, 2) for x in os.getloadavg()]}, indent=2))


if __name__ == "__main__":
    main()
