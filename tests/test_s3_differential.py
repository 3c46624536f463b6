"""Differential tests: the same boto3 script against Anvil's S3 gateway and moto's S3 server.

Each scenario runs once per peer and yields a normalised transcript: operation, HTTP status, S3
error code and the response fields a client relies on. Values that legitimately differ between
two S3 implementations (request ids, dates, owners, version ids, upload ids, continuation
tokens) are replaced by stable placeholders numbered by order of appearance, so "the second
version id seen" compares equal on both sides. The transcripts must then be identical.

moto is a good but imperfect oracle. Where it deviates from AWS's documented S3 behaviour,
moto's entry is corrected to the documented answer -- `moto=` on one call, MOTO_OP_FIXES for
every call of an operation -- with a comment naming the deviation. Anvil's entry is never
corrected: everywhere else a difference is an Anvil bug.

The last test (Anvil only) checks S3's 5 GiB single-PUT limit with a raw signed request that
declares a larger body and sends none.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import pprint
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.helpers import AnvilServer, free_port
from tests.s3_helpers import REGION, dev_credentials

MiB = 1024 * 1024
PAST = datetime(2001, 1, 1, tzinfo=UTC)
FUTURE = datetime(2099, 1, 1, tzinfo=UTC)

# Response fields whose values differ legitimately between implementations: placeholder by order.
PLACEHOLDER_FIELDS = {
    "VersionId": "version", "VersionIdMarker": "version", "NextVersionIdMarker": "version",
    "DeleteMarkerVersionId": "version", "CopySourceVersionId": "version",
    "UploadId": "upload", "UploadIdMarker": "upload", "NextUploadIdMarker": "upload",
    "ContinuationToken": "token", "NextContinuationToken": "token",
}
# Response fields that carry no comparable information (times, identities, transport details).
DROPPED_FIELDS = {"ResponseMetadata", "LastModified", "CreationDate", "Initiated",
                  "RequestCharged", "Expiration", "ServerSideEncryption",
                  "ChecksumType", "ChecksumCRC32", "ChecksumCRC32C", "ChecksumSHA1", "ChecksumSHA256",
                  "ChecksumCRC64NVME", "ExpiresString", "BucketArn"}


# ------------------------------------------------------------------ peers


class Moto:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def wait(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto exited with {self.proc.returncode}")
            try:
                httpx.get(self.endpoint + "/moto-api/", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("moto did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _client(endpoint: str, key: str, secret: str):
    # No flexible checksums on every request: their presence in responses is not what is compared here.
    cfg = Config(signature_version="s3v4", s3={"addressing_style": "path"},
                 retries={"max_attempts": 1, "mode": "standard"},
                 request_checksum_calculation="when_required", response_checksum_validation="when_required")
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=REGION, config=cfg,
                                          aws_access_key_id=key, aws_secret_access_key=secret)


@pytest.fixture(scope="module")
def peers(server: AnvilServer):
    moto = Moto()
    try:
        moto.wait()
        creds = dev_credentials(server)
        yield {"anvil": _client(server.endpoint, creds["access_key_id"], creds["secret_access_key"]),
               "moto": _client(moto.endpoint, "testing", "testing")}
    finally:
        moto.stop()


# ------------------------------------------------------------------ transcripts

Entry = dict[str, Any]
Fix = Callable[[Entry], Entry]


def _moto_list_versions(t: Transcript, entry: Entry, kwargs: dict[str, Any]) -> Entry:
    if entry.get("status") != 200:
        return entry
    # moto deviation: ListObjectVersions ignores encoding-type=url and never echoes EncodingType
    # (S3 echoes it whenever it was requested; boto3 always requests it).
    entry = {**entry, "EncodingType": "url"}
    marker = kwargs.get("KeyMarker")
    if marker and not kwargs.get("VersionIdMarker"):
        # moto deviation: a key-marker without a version-id-marker starts *after* that key in S3 ("the
        # key to start with"; the versions of the marker key itself were already listed); moto includes it.
        for field in ("Versions", "DeleteMarkers"):
            if field in entry:
                kept = [item for item in entry[field] if item["Key"] > marker]
                entry = {k: val for k, val in entry.items() if k != field} | ({field: kept} if kept else {})
    return entry


def _moto_list_v1(t: Transcript, entry: Entry, kwargs: dict[str, Any]) -> Entry:
    if entry.get("status") != 200:
        return entry
    entry = dict(entry)
    # moto deviation: ListObjects (v1) leaves out an empty <Prefix/> and never echoes <Marker>; S3 always
    # sends both, the marker as requested.
    entry.setdefault("Prefix", "")
    entry.setdefault("Marker", kwargs.get("Marker", ""))
    # moto deviation: with encoding-type=url S3 encodes Prefix, Marker and Delimiter too, moto only keys.
    if kwargs.get("EncodingType") == "url":
        entry["Prefix"] = urllib.parse.quote(entry["Prefix"])
        entry["Marker"] = urllib.parse.quote(entry["Marker"])
    # moto deviation: without a delimiter moto still sends a NextMarker (the last key's ETag!); S3 sends
    # NextMarker only when a delimiter was given.
    if not kwargs.get("Delimiter"):
        entry.pop("NextMarker", None)
    return entry


def _moto_list_v2(t: Transcript, entry: Entry, kwargs: dict[str, Any]) -> Entry:
    # moto deviation: S3 echoes the ContinuationToken a request sent; moto does not.
    if entry.get("status") == 200 and kwargs.get("ContinuationToken"):
        entry = {**entry, "ContinuationToken": t.ph("token", kwargs["ContinuationToken"])}
    return entry


def _moto_complete(t: Transcript, entry: Entry, kwargs: dict[str, Any]) -> Entry:
    # moto deviation: moto answers CompleteMultipartUpload in an unversioned bucket with
    # x-amz-version-id: null; S3 sends no version id for buckets that never had versioning.
    if entry.get("VersionId") == "null":
        entry = {k: val for k, val in entry.items() if k != "VersionId"}
    return entry


def _moto_404_is_500(code: str) -> Fix:
    # moto deviation: moto answers some requests naming a missing upload id with 500 InternalError.
    return lambda e: {"status": 404, "code": code} if e.get("status") == 500 else e


# Deviations moto shows on every call of an operation (each function names its deviation).
MOTO_OP_FIXES: dict[str, Callable[[Transcript, Entry, dict[str, Any]], Entry]] = {
    "list_object_versions": _moto_list_versions,
    "list_objects": _moto_list_v1,
    "list_objects_v2": _moto_list_v2,
    "complete_multipart_upload": _moto_complete,
}


def update(**fields: Any) -> Fix:
    return lambda e: {**e, **fields}


def replace(entry: Entry) -> Fix:
    return lambda e: dict(entry)


class Transcript:
    """Runs boto3 calls on one peer and records what a client sees, normalised.

    `call` returns the normalised entry it recorded, so a script follows the same answers on both
    peers (placeholders are turned back into this peer's real values with `real`). `moto=` is a
    correction applied to moto's entry only, where moto deviates from S3; each use says how.
    """

    def __init__(self, name: str, s3) -> None:
        self.name = name
        self.s3 = s3
        self.lines: list[tuple[str, Entry]] = []
        self._placeholders: dict[tuple[str, str], str] = {}
        self._real: dict[str, str] = {}
        self._counts: dict[str, int] = {}

    def ph(self, kind: str, value: str) -> str:
        if value == "null":
            return "null"  # the null version id is the same everywhere
        key = (kind, value)
        if key not in self._placeholders:
            self._counts[kind] = self._counts.get(kind, 0) + 1
            self._placeholders[key] = f"<{kind}{self._counts[kind]}>"
            self._real[self._placeholders[key]] = value
        return self._placeholders[key]

    def real(self, value: str) -> str:
        """The real value behind a placeholder (ids go back to the peer that issued them)."""
        return self._real.get(value, value)

    def norm(self, value: Any, field: str | None = None) -> Any:
        if field in ("Owner", "Initiator"):
            return "<present>"  # ids and display names differ; whether an owner is sent does not
        if isinstance(value, dict):
            return {k: self.norm(val, k) for k, val in sorted(value.items()) if k not in DROPPED_FIELDS}
        if isinstance(value, list):
            return [self.norm(val, field) for val in value]
        if field in PLACEHOLDER_FIELDS and isinstance(value, str) and value:
            return self.ph(PLACEHOLDER_FIELDS[field], value)
        if isinstance(value, datetime):
            return value.isoformat()
        return value

    def call(self, op: str, note: str = "", *, moto: Fix | None = None, **kwargs: Any) -> Entry:
        label = f"{op} {note}".strip()
        try:
            resp = getattr(self.s3, op)(**kwargs)
        except ClientError as e:
            err = e.response.get("Error", {})
            entry: Entry = {"status": e.response.get("ResponseMetadata", {}).get("HTTPStatusCode"),
                            "code": err.get("Code")}
            headers = e.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
            for h in ("x-amz-delete-marker", "content-range"):
                if h in headers:
                    entry[h] = headers[h]
        else:
            out = dict(resp)
            if "Body" in out:
                body = out["Body"].read()
                out["Body"] = body if len(body) <= 256 else f"{len(body)} bytes, md5 {hashlib.md5(body).hexdigest()}"
            entry = {"status": resp["ResponseMetadata"]["HTTPStatusCode"], **self.norm(out)}
        entry = _normalise(op, kwargs, entry)
        if self.name == "moto":
            if op in MOTO_OP_FIXES:
                entry = MOTO_OP_FIXES[op](self, entry, kwargs)
            if moto is not None:
                entry = moto(entry)
        self.lines.append((label, entry))
        return entry


def _normalise(op: str, kwargs: dict[str, Any], entry: Entry) -> Entry:
    """Normalisations applied to both peers alike."""
    if op == "complete_multipart_upload" and "Location" in entry:
        # An absolute URL of the object; the host differs, and moto answers in virtual-host style
        # (http://BUCKET.s3.amazonaws.com/KEY) for a path-style request. Compared: absolute, ends in the key.
        loc = urllib.parse.urlsplit(entry["Location"])
        entry = {**entry, "Location": (bool(loc.scheme and loc.netloc),
                                       loc.path.endswith("/" + urllib.parse.quote(kwargs["Key"])))}
    if op == "list_parts" and entry.get("IsTruncated") is False:
        # NextPartNumberMarker is documented for truncated listings only; on the last page moto sends the
        # last part's number or 0 (for no parts), and the value means nothing to a client.
        entry = {k: val for k, val in entry.items() if k != "NextPartNumberMarker"}
    return entry


def run_both(peers: dict[str, Any], script: Callable[[Transcript], None]) -> None:
    """Run `script(t)` against both peers and assert the normalised transcripts are equal."""
    got = {}
    for name, s3 in peers.items():
        t = Transcript(name, s3)
        script(t)
        got[name] = t.lines
    if got["anvil"] != got["moto"]:
        a = pprint.pformat(got["moto"], width=120).splitlines()
        b = pprint.pformat(got["anvil"], width=120).splitlines()
        diff = "\n".join(difflib.unified_diff(a, b, "moto (corrected)", "anvil", lineterm="", n=3))
        pytest.fail(f"Anvil and moto answer differently:\n{diff}")


# ------------------------------------------------------------------ scenarios

OTHER_ETAG = '"00000000000000000000000000000000"'
MISSING = "diff-no-such-bucket"


def test_bucket_operations(peers) -> None:
    def script(t: Transcript) -> None:
        b = "diff-buckets"
        t.call("create_bucket", Bucket=b)
        t.call("create_bucket", "again (us-east-1: 200)", Bucket=b)
        t.call("head_bucket", Bucket=b)
        t.call("head_bucket", "missing", Bucket=MISSING)
        t.call("get_bucket_location", Bucket=b)
        t.call("get_bucket_location", "missing", Bucket=MISSING)
        t.call("get_bucket_versioning", "never set", Bucket=b)
        t.call("put_bucket_versioning", Bucket=b, VersioningConfiguration={"Status": "Enabled"})
        t.call("get_bucket_versioning", Bucket=b)
        t.call("put_bucket_versioning", Bucket=b, VersioningConfiguration={"Status": "Suspended"})
        t.call("get_bucket_versioning", Bucket=b)
        t.call("put_object", "suspended", Bucket=b, Key="k", Body=b"x")
        t.call("delete_bucket", "not empty", Bucket=b)
        # moto deviation: S3 names the version a DeleteObject with a versionId removed (x-amz-version-id),
        # the null version included; moto leaves the header out for null.
        t.call("delete_object", "the null version", Bucket=b, Key="k", VersionId="null", moto=update(VersionId="null"))
        t.call("list_object_versions", "empty again", Bucket=b)
        t.call("delete_bucket", Bucket=b)
        t.call("head_bucket", "deleted", Bucket=b)
        t.call("delete_bucket", "missing", Bucket=b)
        t.call("list_objects_v2", "missing", Bucket=b)
        t.call("get_bucket_versioning", "missing", Bucket=b)
        t.call("put_bucket_versioning", "missing", Bucket=b, VersioningConfiguration={"Status": "Enabled"})

    run_both(peers, script)


def test_object_put_get_head_delete(peers) -> None:
    def script(t: Transcript) -> None:
        b = "diff-objects"
        t.call("create_bucket", Bucket=b)
        t.call("put_object", Bucket=b, Key="hello.txt", Body=b"hello world", ContentType="text/plain",
               Metadata={"Colour": "blue", "n": "1"})
        t.call("get_object", Bucket=b, Key="hello.txt")
        t.call("head_object", Bucket=b, Key="hello.txt")
        t.call("put_object", "empty, no Content-Type", Bucket=b, Key="empty", Body=b"")
        t.call("get_object", "empty", Bucket=b, Key="empty")
        t.call("head_object", "empty", Bucket=b, Key="empty")
        t.call("put_object", "odd key", Bucket=b, Key="dir/sub/ünï cödé+%.bin", Body=b"\x00\x01\x02")
        t.call("get_object", "odd key", Bucket=b, Key="dir/sub/ünï cödé+%.bin")
        t.call("get_object", "missing key", Bucket=b, Key="nope")
        t.call("head_object", "missing key", Bucket=b, Key="nope")
        t.call("get_object", "missing bucket", Bucket=MISSING, Key="k")
        t.call("head_object", "missing bucket", Bucket=MISSING, Key="k")
        t.call("put_object", "missing bucket", Bucket=MISSING, Key="k", Body=b"x")
        t.call("delete_object", "missing key", Bucket=b, Key="nope")
        t.call("delete_object", "missing bucket", Bucket=MISSING, Key="k")
        t.call("get_object", "versionId null, unversioned bucket", Bucket=b, Key="hello.txt", VersionId="null")
        t.call("put_object", "overwrite", Bucket=b, Key="hello.txt", Body=b"second")
        t.call("get_object", "overwritten", Bucket=b, Key="hello.txt")
        t.call("delete_object", Bucket=b, Key="hello.txt")
        t.call("get_object", "deleted", Bucket=b, Key="hello.txt")
        t.call("head_object", "deleted", Bucket=b, Key="hello.txt")
        # moto deviation: moto checks neither Content-MD5 (S3: BadDigest when it does not match the body,
        # InvalidDigest when it is not a base64 MD5) nor the key length (S3: KeyTooLongError past 1,024
        # bytes) nor the user metadata size (S3: MetadataTooLarge past 2 KB); it stores all of these.
        t.call("put_object", "bad Content-MD5", Bucket=b, Key="md5", Body=b"abc", ContentMD5="1B2M2Y8AsgTpgAmY7PhCfg==",
               moto=replace({"status": 400, "code": "BadDigest"}))
        t.call("put_object", "malformed Content-MD5", Bucket=b, Key="md5", Body=b"abc", ContentMD5="not-md5",
               moto=replace({"status": 400, "code": "InvalidDigest"}))
        t.call("head_object", "after the bad digests", Bucket=b, Key="md5",
               moto=replace({"status": 404, "code": "404"}))
        t.call("put_object", "key too long", Bucket=b, Key="k" * 1025, Body=b"x",
               moto=replace({"status": 400, "code": "KeyTooLongError"}))
        t.call("put_object", "metadata too large", Bucket=b, Key="meta", Body=b"x", Metadata={"big": "v" * 2100},
               moto=replace({"status": 400, "code": "MetadataTooLarge"}))
        t.call("create_bucket", "name too short", Bucket="ab")
        t.call("put_object", "If-None-Match * on a new key", Bucket=b, Key="cond", Body=b"1", IfNoneMatch="*")
        t.call("put_object", "If-None-Match * on an existing key", Bucket=b, Key="cond", Body=b"2", IfNoneMatch="*")
        etag = t.call("head_object", "cond", Bucket=b, Key="cond")["ETag"]
        t.call("put_object", "If-Match ok", Bucket=b, Key="cond", Body=b"3", IfMatch=etag)
        t.call("put_object", "If-Match stale", Bucket=b, Key="cond", Body=b"4", IfMatch=etag)
        # S3 user guide, conditional writes: If-Match with no object of that name fails with 404 NoSuchKey.
        t.call("put_object", "If-Match on a missing key", Bucket=b, Key="cond-missing", Body=b"5", IfMatch=etag)
        t.call("get_object", "cond", Bucket=b, Key="cond")
        t.call("get_object", "unknown versionId", Bucket=b, Key="cond", VersionId="not-a-version")
        # moto deviation: moto's HEAD answers 400 for a version id its GET answers 404 NoSuchVersion for;
        # S3 answers GET and HEAD of a version alike.
        t.call("head_object", "unknown versionId", Bucket=b, Key="cond", VersionId="not-a-version",
               moto=replace({"status": 404, "code": "404"}))
        t.call("put_object", "trailing slash key", Bucket=b, Key="folder/", Body=b"")
        t.call("head_object", "trailing slash key", Bucket=b, Key="folder/")
        t.call("head_object", "without the slash", Bucket=b, Key="folder")
        t.call("put_object", "Content-Type with parameters", Bucket=b, Key="ct", Body=b"x",
               ContentType="text/plain; charset=ISO-8859-1")
        t.call("head_object", "Content-Type with parameters", Bucket=b, Key="ct")

    run_both(peers, script)


def test_metadata_and_system_headers(peers) -> None:
    def script(t: Transcript) -> None:
        b = "diff-metadata"
        t.call("create_bucket", Bucket=b)
        t.call("put_object", Bucket=b, Key="doc", Body=b"<p>hi</p>", ContentType="text/html; charset=utf-8",
               ContentEncoding="identity", ContentDisposition='attachment; filename="doc.html"',
               ContentLanguage="en-GB", CacheControl="max-age=60, public", Expires=datetime(2030, 1, 1, tzinfo=UTC),
               Metadata={"owner": "alice", "Mixed-Case": "Value With Spaces", "empty": ""})
        t.call("head_object", Bucket=b, Key="doc")
        t.call("get_object", Bucket=b, Key="doc")
        t.call("get_object", "response overrides", Bucket=b, Key="doc", ResponseContentType="application/x-test",
               ResponseContentLanguage="fr", ResponseExpires=datetime(2031, 2, 3, 4, 5, 6, tzinfo=UTC),
               ResponseCacheControl="no-cache", ResponseContentDisposition="inline",
               ResponseContentEncoding="gzip")
        # moto deviation: moto ignores the response-* overrides on HEAD; S3's HeadObject takes them as
        # GetObject does (ResponseCacheControl, ResponseContentType, ... in the HeadObject API).
        t.call("head_object", "response overrides", Bucket=b, Key="doc", ResponseContentType="application/x-test",
               ResponseCacheControl="no-store", moto=update(ContentType="application/x-test", CacheControl="no-store"))

    run_both(peers, script)


def test_conditional_requests(peers) -> None:
    def script(t: Transcript) -> None:
        b = "diff-conditions"
        t.call("create_bucket", Bucket=b)
        etag = t.call("put_object", Bucket=b, Key="c", Body=b"conditional body")["ETag"]
        ok = {"get_object": t.call("get_object", "plain", Bucket=b, Key="c"),
              "head_object": t.call("head_object", "plain", Bucket=b, Key="c")}
        failed = {"get_object": {"status": 412, "code": "PreconditionFailed"},
                  "head_object": {"status": 412, "code": "412"}}
        not_modified = {"status": 304, "code": "304"}
        # (label, conditions, the S3 answer where moto deviates from it)
        cases: list[tuple[str, dict[str, Any], str | None]] = [
            ("If-Match ok", {"IfMatch": etag}, None),
            ("If-Match bad", {"IfMatch": OTHER_ETAG}, None),
            # moto deviation: moto compares If-Match literally; S3 follows RFC 7232, where `*` matches any
            # current object and a list matches if any of its ETags does.
            ("If-Match *", {"IfMatch": "*"}, "ok"),
            ("If-Match list", {"IfMatch": f"{OTHER_ETAG}, {etag}"}, "ok"),
            ("If-None-Match match", {"IfNoneMatch": etag}, None),
            # moto deviation: RFC 7232: If-None-Match `*` fails for any existing object (304 on GET/HEAD).
            ("If-None-Match *", {"IfNoneMatch": "*"}, "not_modified"),
            ("If-None-Match other", {"IfNoneMatch": OTHER_ETAG}, None),
            ("If-Modified-Since past", {"IfModifiedSince": PAST}, None),
            ("If-Modified-Since future", {"IfModifiedSince": FUTURE}, None),
            ("If-Unmodified-Since past", {"IfUnmodifiedSince": PAST}, None),
            ("If-Unmodified-Since future", {"IfUnmodifiedSince": FUTURE}, None),
            # moto deviation: the GetObject/HeadObject reference: If-Match true and If-Unmodified-Since false
            # -> 200 OK; moto answers 412.
            ("If-Match ok + If-Unmodified-Since past", {"IfMatch": etag, "IfUnmodifiedSince": PAST}, "ok"),
            # The reference: If-None-Match false and If-Modified-Since true -> 304.
            ("If-None-Match match + If-Modified-Since past", {"IfNoneMatch": etag, "IfModifiedSince": PAST}, None),
            # moto deviation: RFC 7232 3.3: If-Modified-Since is ignored when If-None-Match is present; moto
            # answers 304 here.
            ("If-None-Match other + If-Modified-Since future",
             {"IfNoneMatch": OTHER_ETAG, "IfModifiedSince": FUTURE}, "ok"),
            ("If-Match bad + If-None-Match match", {"IfMatch": OTHER_ETAG, "IfNoneMatch": etag}, None),
            ("If-Match ok + If-None-Match match", {"IfMatch": etag, "IfNoneMatch": etag}, None),
            ("If-Unmodified-Since past + If-Modified-Since future",
             {"IfUnmodifiedSince": PAST, "IfModifiedSince": FUTURE}, None),
        ]
        for label, cond, s3_answer in cases:
            for op in ("get_object", "head_object"):
                fix = None
                if s3_answer is not None:
                    fix = replace({"ok": ok[op], "failed": failed[op], "not_modified": not_modified}[s3_answer])
                t.call(op, label, Bucket=b, Key="c", moto=fix, **cond)
        t.call("get_object", "If-Match on a missing key", Bucket=b, Key="missing", IfMatch=etag)
        t.call("head_object", "If-None-Match on a missing key", Bucket=b, Key="missing", IfNoneMatch="*")

    run_both(peers, script)


def test_ranges(peers) -> None:
    def script(t: Transcript) -> None:
        b = "diff-ranges"
        t.call("create_bucket", Bucket=b)
        t.call("put_object", Bucket=b, Key="r", Body=bytes(range(100)))
        t.call("put_object", Bucket=b, Key="zero", Body=b"")
        whole = {"get_object": t.call("get_object", "no range", Bucket=b, Key="r"),
                 "head_object": t.call("head_object", "no range", Bucket=b, Key="r")}
        for rng in ("bytes=0-9", "bytes=90-", "bytes=-5", "bytes=95-200", "bytes=0-0", "bytes=99-99", "bytes=-200",
                    "bytes=100-", "bytes=150-160", "bytes=0-1,5-6", "bytes=9-3", "lines=0-5", "bytes=abc"):
            for op in ("get_object", "head_object"):
                fix = None
                if rng in ("bytes=100-", "bytes=150-160"):
                    # moto deviation: S3's 416 carries Content-Range: bytes */SIZE (RFC 7233 4.4); moto's has none.
                    fix = update(**{"content-range": "bytes */100"})
                elif rng == "lines=0-5":
                    # moto deviation: moto reads any unit as bytes; S3 (RFC 7233) ignores a Range in another unit.
                    fix = replace(whole[op])
                t.call(op, rng, Bucket=b, Key="r", Range=rng, moto=fix)
        # Empty objects: S3 refuses any first-byte range (416) but answers a suffix range with the empty object.
        for rng in ("bytes=0-0", "bytes=-1", "bytes=0-"):
            fix = update(**{"content-range": "bytes */0"}) if rng != "bytes=-1" else None  # as above
            t.call("get_object", f"empty object {rng}", Bucket=b, Key="zero", Range=rng, moto=fix)

    run_both(peers, script)


ODD_KEYS = ["a/1", "a/2", "a/b/3", "b", "c d/e", "c d/f", "e+f", "g%h", "q?x=1&y", "z", "ü/x", "ü/y"]


def _etag(body: bytes) -> str:
    return f'"{hashlib.md5(body).hexdigest()}"'


def _contents(*keys: str) -> list[Entry]:
    """ListObjects (v1) entries for keys whose body is the key itself."""
    return [{"ETag": _etag(k.encode()), "Key": k, "Owner": "<present>", "Size": len(k.encode()),
             "StorageClass": "STANDARD"} for k in keys]


def test_listing(peers) -> None:
    def script(t: Transcript) -> None:
        b = "diff-listing"
        t.call("create_bucket", Bucket=b)
        t.call("list_objects_v2", "empty", Bucket=b)
        t.call("list_objects", "empty", Bucket=b)
        for k in ODD_KEYS:
            t.call("put_object", Bucket=b, Key=k, Body=k.encode())
        t.call("list_objects_v2", Bucket=b)
        t.call("list_objects_v2", "delimiter", Bucket=b, Delimiter="/")
        t.call("list_objects_v2", "prefix+delimiter", Bucket=b, Prefix="a/", Delimiter="/")
        t.call("list_objects_v2", "unicode prefix", Bucket=b, Prefix="ü/")
        t.call("list_objects_v2", "start-after", Bucket=b, StartAfter="c d/e")
        t.call("list_objects_v2", "max-keys 0", Bucket=b, MaxKeys=0)
        t.call("list_objects_v2", "url, raw", Bucket=b, EncodingType="url")
        t.call("list_objects_v2", "url, raw, delimiter", Bucket=b, EncodingType="url", Delimiter="/", Prefix="c d/")
        t.call("list_objects_v2", "fetch-owner", Bucket=b, Prefix="z", FetchOwner=True)
        t.call("list_objects_v2", "prefix without the delimiter", Bucket=b, Prefix="a", Delimiter="/")
        t.call("list_objects_v2", "prefix matching nothing", Bucket=b, Prefix="nothing/", Delimiter="/")
        t.call("list_objects_v2", "start-after + prefix", Bucket=b, Prefix="c d/", StartAfter="c d/e")
        # Paging with a delimiter: common prefixes and keys count against max-keys alike.
        token = None
        for page in range(8):
            kwargs = {"ContinuationToken": t.real(token)} if token else {}
            resp = t.call("list_objects_v2", f"page {page}", Bucket=b, Delimiter="/", MaxKeys=2, **kwargs)
            token = resp.get("NextContinuationToken")
            if not resp["IsTruncated"]:
                break
        # moto deviation: moto answers a continuation token it cannot decode with 500; S3 with 400 InvalidArgument.
        t.call("list_objects_v2", "bad token", Bucket=b, ContinuationToken="not-a-token",
               moto=replace({"status": 400, "code": "InvalidArgument"}))
        t.call("list_objects", "v1", Bucket=b)
        t.call("list_objects", "v1 url raw", Bucket=b, EncodingType="url", Prefix="c d/")
        # moto deviation: with a delimiter, moto's v1 pages hold max-keys keys *plus* every common prefix, and
        # its NextMarker is an ETag. S3 counts prefixes and keys together and sends the last one as NextMarker.
        v1_pages = [
            {"CommonPrefixes": [{"Prefix": "a/"}, {"Prefix": "c d/"}], "Contents": _contents("b"), "Marker": "",
             "IsTruncated": True, "NextMarker": "c d/"},
            {"Contents": _contents("e+f", "g%h", "q?x=1&y"), "Marker": "c d/", "IsTruncated": True,
             "NextMarker": "q?x=1&y"},
            {"CommonPrefixes": [{"Prefix": "ü/"}], "Contents": _contents("z"), "Marker": "q?x=1&y",
             "IsTruncated": False},
        ]
        common = {"Delimiter": "/", "EncodingType": "url", "MaxKeys": 3, "Name": b, "Prefix": "", "status": 200}
        marker = ""
        for page in range(8):
            resp = t.call("list_objects", f"v1 page {page}", Bucket=b, Delimiter="/", MaxKeys=3, Marker=marker,
                          moto=replace({**common, **v1_pages[page]}) if page < len(v1_pages) else None)
            if not resp["IsTruncated"]:
                break
            marker = resp["NextMarker"]
        for page_marker in ("", "a/2"):
            t.call("list_objects", f"v1 no delimiter from {page_marker!r}", Bucket=b, MaxKeys=2, Marker=page_marker)
        t.call("list_objects", "v1 marker inside a prefix", Bucket=b, Delimiter="/", Marker="a/1")

    run_both(peers, script)


def _version(key: str, body: bytes, version: str, latest: bool) -> Entry:
    return {"ETag": _etag(body), "IsLatest": latest, "Key": key, "Owner": "<present>", "Size": len(body),
            "StorageClass": "STANDARD", "VersionId": version}


def test_list_object_versions(peers) -> None:
    def script(t: Transcript) -> None:
        b = "diff-versions"
        t.call("create_bucket", Bucket=b)
        t.call("put_object", "before versioning", Bucket=b, Key="pre", Body=b"pre")
        t.call("put_bucket_versioning", Bucket=b, VersioningConfiguration={"Status": "Enabled"})
        v1 = t.call("put_object", Bucket=b, Key="k", Body=b"one")["VersionId"]
        t.call("put_object", Bucket=b, Key="k", Body=b"two")
        t.call("put_object", Bucket=b, Key="pre", Body=b"pre2")
        t.call("put_object", Bucket=b, Key="d/x", Body=b"x")
        marker = t.call("delete_object", "makes a marker", Bucket=b, Key="k")["VersionId"]
        # moto deviation: S3 marks a GET of a key whose latest version is a delete marker with
        # x-amz-delete-marker: true, as it does HEAD; moto only on HEAD.
        t.call("get_object", "latest is a marker", Bucket=b, Key="k", moto=update(**{"x-amz-delete-marker": "true"}))
        t.call("head_object", "latest is a marker", Bucket=b, Key="k")
        t.call("get_object", "old version", Bucket=b, Key="k", VersionId=t.real(v1))
        t.call("head_object", "old version", Bucket=b, Key="k", VersionId=t.real(v1))
        # moto deviation: a GET naming a delete marker's version id is 405 MethodNotAllowed in S3 (with
        # x-amz-delete-marker: true); moto answers 404 NoSuchVersion.
        t.call("get_object", "the marker by id", Bucket=b, Key="k", VersionId=t.real(marker),
               moto=replace({"status": 405, "code": "MethodNotAllowed", "x-amz-delete-marker": "true"}))
        t.call("head_object", "the marker by id", Bucket=b, Key="k", VersionId=t.real(marker))
        # moto deviation: in a bucket with versioning configured S3 names the null version
        # (x-amz-version-id: null) on GET and HEAD; moto leaves the header out.
        t.call("get_object", "null version", Bucket=b, Key="pre", VersionId="null", moto=update(VersionId="null"))
        t.call("list_object_versions", Bucket=b)
        t.call("list_object_versions", "prefix+delimiter", Bucket=b, Delimiter="/")
        t.call("list_object_versions", "prefix", Bucket=b, Prefix="k")
        # moto deviation: moto pages ListObjectVersions by its versions first and its delete markers
        # after; S3 pages through one list ordered by key, newest version first.
        common = {"EncodingType": "url", "MaxKeys": 2, "Name": b, "Prefix": "", "status": 200}
        pages = [
            {"KeyMarker": "", "VersionIdMarker": "", "IsTruncated": True, "NextKeyMarker": "k",
             "NextVersionIdMarker": "<version5>", "Versions": [_version("d/x", b"x", "<version4>", True)],
             "DeleteMarkers": [{"IsLatest": True, "Key": "k", "Owner": "<present>", "VersionId": "<version5>"}]},
            {"KeyMarker": "k", "VersionIdMarker": "<version5>", "IsTruncated": True, "NextKeyMarker": "k",
             "NextVersionIdMarker": "<version1>",
             "Versions": [_version("k", b"two", "<version2>", False), _version("k", b"one", "<version1>", False)]},
            {"KeyMarker": "k", "VersionIdMarker": "<version1>", "IsTruncated": False,
             "Versions": [_version("pre", b"pre2", "<version3>", True), _version("pre", b"pre", "null", False)]},
        ]
        key_marker, version_marker = "", ""
        for page in range(len(pages)):
            resp = t.call("list_object_versions", f"page {page}", Bucket=b, MaxKeys=2, KeyMarker=key_marker,
                          VersionIdMarker=t.real(version_marker), moto=replace({**common, **pages[page]}))
            if not resp["IsTruncated"]:
                break
            key_marker, version_marker = resp["NextKeyMarker"], resp.get("NextVersionIdMarker", "")
        t.call("list_object_versions", "key-marker alone", Bucket=b, KeyMarker="k")
        # moto deviation: DeleteObject of a delete marker by version id answers x-amz-delete-marker: true
        # in S3 (the reference: "whether the version permanently deleted was a delete marker"); moto does not.
        t.call("delete_object", "the marker by id", Bucket=b, Key="k", VersionId=t.real(marker),
               moto=update(DeleteMarker=True))
        t.call("get_object", "back after the marker went", Bucket=b, Key="k")
        t.call("delete_object", "a version by id", Bucket=b, Key="k", VersionId=t.real(v1))
        t.call("delete_object", "a version that does not exist", Bucket=b, Key="k", VersionId="3HL4kqtJlcpXroDTDmJ")
        t.call("list_object_versions", "k after the deletes", Bucket=b, Prefix="k")
        # moto deviation: S3 puts a delete marker on a key that never existed in a versioned bucket
        # (DELETE always adds a marker there); moto answers 204 and adds nothing.
        t.call("delete_object", "marker for a missing key", Bucket=b, Key="never",
               moto=update(DeleteMarker=True, VersionId="<version7>"))
        t.call("put_bucket_versioning", Bucket=b, VersioningConfiguration={"Status": "Suspended"})
        t.call("put_object", "suspended", Bucket=b, Key="s", Body=b"s")
        t.call("head_object", "suspended", Bucket=b, Key="s", moto=update(VersionId="null"))  # as "null version"
        t.call("get_object", "suspended", Bucket=b, Key="s", moto=update(VersionId="null"))  # as "null version"
        t.call("list_object_versions", "suspended", Bucket=b, Prefix="s")
        # moto deviation: with versioning suspended a DELETE replaces the null version with a null delete
        # marker in S3 (answering x-amz-delete-marker: true, x-amz-version-id: null); moto removes the
        # object and adds no marker.
        t.call("delete_object", "suspended", Bucket=b, Key="s", moto=update(DeleteMarker=True, VersionId="null"))
        t.call("list_object_versions", "after the suspended delete", Bucket=b, Prefix="s",
               moto=update(DeleteMarkers=[{"IsLatest": True, "Key": "s", "Owner": "<present>", "VersionId": "null"}]))
        t.call("head_object", "after the suspended delete", Bucket=b, Key="s",
               moto=update(**{"x-amz-delete-marker": "true"}))

    run_both(peers, script)


def test_delete_objects(peers) -> None:
    def script(t: Transcript) -> None:
        b = "diff-multidelete"
        t.call("create_bucket", Bucket=b)
        for k in ("a", "b", "c", "d"):
            t.call("put_object", Bucket=b, Key=k, Body=k.encode())
        t.call("delete_objects", "verbose", Bucket=b,
               Delete={"Objects": [{"Key": "a"}, {"Key": "missing"}, {"Key": "b"}]})
        # moto deviation: in quiet mode S3 reports only the keys it failed to delete; moto lists every key.
        t.call("delete_objects", "quiet", Bucket=b, Delete={"Objects": [{"Key": "c"}, {"Key": "missing"}],
                                                            "Quiet": True}, moto=replace({"status": 200}))
        t.call("list_objects_v2", Bucket=b)
        t.call("delete_objects", "missing bucket", Bucket=MISSING, Delete={"Objects": [{"Key": "a"}]})
        v = "diff-multidelete-v"
        t.call("create_bucket", Bucket=v)
        t.call("put_bucket_versioning", Bucket=v, VersioningConfiguration={"Status": "Enabled"})
        vid = t.call("put_object", Bucket=v, Key="a", Body=b"a")["VersionId"]
        t.call("put_object", Bucket=v, Key="b", Body=b"b")
        t.call("delete_objects", "versioned verbose", Bucket=v,
               Delete={"Objects": [{"Key": "a", "VersionId": t.real(vid)}, {"Key": "b"}]})
        t.call("list_object_versions", Bucket=v)

    run_both(peers, script)


def test_copy_object(peers) -> None:
    def script(t: Transcript) -> None:
        b = "diff-copy"
        t.call("create_bucket", Bucket=b)
        t.call("put_object", Bucket=b, Key="src", Body=b"source body", ContentType="text/plain", Metadata={"a": "1"},
               CacheControl="max-age=5")
        src = {"Bucket": b, "Key": "src"}
        t.call("copy_object", "COPY", Bucket=b, Key="dst1", CopySource=src)
        t.call("head_object", "COPY", Bucket=b, Key="dst1")
        t.call("copy_object", "REPLACE", Bucket=b, Key="dst2", CopySource=src, MetadataDirective="REPLACE",
               ContentType="application/json", Metadata={"b": "2"})
        t.call("head_object", "REPLACE", Bucket=b, Key="dst2")
        t.call("copy_object", "REPLACE without Content-Type", Bucket=b, Key="dst4", CopySource=src,
               MetadataDirective="REPLACE")
        t.call("head_object", "REPLACE without Content-Type", Bucket=b, Key="dst4")
        t.call("copy_object", "COPY ignores new metadata", Bucket=b, Key="dst3", CopySource=src,
               Metadata={"ignored": "yes"}, ContentType="image/png")
        t.call("head_object", "COPY ignores new metadata", Bucket=b, Key="dst3")
        t.call("copy_object", "onto itself", Bucket=b, Key="src", CopySource=src)
        t.call("copy_object", "onto itself REPLACE", Bucket=b, Key="src", CopySource=src,
               MetadataDirective="REPLACE", Metadata={"c": "3"}, ContentType="text/plain")
        t.call("head_object", "onto itself REPLACE", Bucket=b, Key="src")
        t.call("copy_object", "missing source key", Bucket=b, Key="x", CopySource={"Bucket": b, "Key": "nope"})
        t.call("copy_object", "missing source bucket", Bucket=b, Key="x", CopySource={"Bucket": MISSING, "Key": "k"})
        t.call("copy_object", "missing destination bucket", Bucket=MISSING, Key="x", CopySource=src)
        etag = t.call("head_object", Bucket=b, Key="src")["ETag"]
        failed = replace({"status": 412, "code": "PreconditionFailed"})
        for label, cond, fix in [
            ("if-match ok", {"CopySourceIfMatch": etag}, None),
            # moto deviation: moto ignores x-amz-copy-source-if-match, -if-modified-since and
            # -if-unmodified-since; S3 refuses the copy with 412 when one fails (CopyObject reference).
            ("if-match bad", {"CopySourceIfMatch": OTHER_ETAG}, failed),
            ("if-none-match match", {"CopySourceIfNoneMatch": etag}, None),
            ("if-none-match other", {"CopySourceIfNoneMatch": OTHER_ETAG}, None),
            ("if-modified-since future", {"CopySourceIfModifiedSince": FUTURE}, failed),
            ("if-modified-since past", {"CopySourceIfModifiedSince": PAST}, None),
            ("if-unmodified-since past", {"CopySourceIfUnmodifiedSince": PAST}, failed),
            ("if-unmodified-since future", {"CopySourceIfUnmodifiedSince": FUTURE}, None),
            # The reference: if-match true and if-unmodified-since false -> the copy is made.
            ("if-match ok + if-unmodified-since past",
             {"CopySourceIfMatch": etag, "CopySourceIfUnmodifiedSince": PAST}, None),
            # The reference: if-none-match false and if-modified-since true -> 412.
            ("if-none-match match + if-modified-since past",
             {"CopySourceIfNoneMatch": etag, "CopySourceIfModifiedSince": PAST}, None),
        ]:
            t.call("copy_object", label, Bucket=b, Key="cond", CopySource=src, moto=fix, **cond)
        v = "diff-copy-v"
        t.call("create_bucket", Bucket=v)
        t.call("put_bucket_versioning", Bucket=v, VersioningConfiguration={"Status": "Enabled"})
        old = t.call("put_object", Bucket=v, Key="s", Body=b"old")["VersionId"]
        t.call("put_object", Bucket=v, Key="s", Body=b"new")
        t.call("copy_object", "old version", Bucket=v, Key="t", CopySource={"Bucket": v, "Key": "s",
                                                                             "VersionId": t.real(old)})
        t.call("get_object", "old version copied", Bucket=v, Key="t")
        t.call("copy_object", "into unversioned", Bucket=b, Key="from-v", CopySource={"Bucket": v, "Key": "s"})
        odd = "dir/ünï x+y%z"
        t.call("put_object", "odd key", Bucket=b, Key=odd, Body=b"odd")
        t.call("copy_object", "odd source key", Bucket=b, Key="odd copy", CopySource={"Bucket": b, "Key": odd})
        t.call("get_object", "odd copy", Bucket=b, Key="odd copy")
        # moto deviation: moto copies with any metadata directive; S3 knows only COPY and REPLACE and refuses
        # others with InvalidArgument ("Unknown metadata directive").
        t.call("copy_object", "bad directive", Bucket=b, Key="x", CopySource=src, MetadataDirective="MOVE",
               moto=replace({"status": 400, "code": "InvalidArgument"}))

    run_both(peers, script)


def test_multipart(peers) -> None:
    part1 = b"1" * (5 * MiB)
    part2 = b"2" * 1000

    def script(t: Transcript) -> None:
        b = "diff-multipart"
        t.call("create_bucket", Bucket=b)
        up = t.real(t.call("create_multipart_upload", Bucket=b, Key="mp", ContentType="application/x-mp",
                           Metadata={"m": "1"})["UploadId"])
        e1 = t.call("upload_part", Bucket=b, Key="mp", UploadId=up, PartNumber=1, Body=part1)["ETag"]
        e2 = t.call("upload_part", Bucket=b, Key="mp", UploadId=up, PartNumber=2, Body=part2)["ETag"]
        e3 = t.call("upload_part", Bucket=b, Key="mp", UploadId=up, PartNumber=3, Body=b"3")["ETag"]
        t.call("list_parts", Bucket=b, Key="mp", UploadId=up)
        t.call("list_parts", "max-parts 2", Bucket=b, Key="mp", UploadId=up, MaxParts=2)
        t.call("list_parts", "after marker 2", Bucket=b, Key="mp", UploadId=up, PartNumberMarker=2)
        t.call("list_parts", "after marker 3", Bucket=b, Key="mp", UploadId=up, PartNumberMarker=3)
        marker = 0
        for page in range(4):
            resp = t.call("list_parts", f"page {page}", Bucket=b, Key="mp", UploadId=up, MaxParts=1,
                          PartNumberMarker=marker)
            if not resp["IsTruncated"]:
                break
            marker = resp["NextPartNumberMarker"]
        t.call("upload_part", "missing upload", Bucket=b, Key="mp", UploadId="no-such-upload", PartNumber=1,
               Body=b"x", moto=_moto_404_is_500("NoSuchUpload"))
        t.call("complete_multipart_upload", "InvalidPart", Bucket=b, Key="mp", UploadId=up,
               MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": e1}, {"PartNumber": 2, "ETag": OTHER_ETAG}]})
        t.call("complete_multipart_upload", "missing part", Bucket=b, Key="mp", UploadId=up,
               MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": e1}, {"PartNumber": 5, "ETag": e2}]})
        t.call("complete_multipart_upload", "EntityTooSmall", Bucket=b, Key="mp", UploadId=up,
               MultipartUpload={"Parts": [{"PartNumber": 2, "ETag": e2}, {"PartNumber": 3, "ETag": e3}]})
        t.call("complete_multipart_upload", Bucket=b, Key="mp", UploadId=up,
               MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": e1}, {"PartNumber": 2, "ETag": e2}]})
        t.call("list_parts", "completed", Bucket=b, Key="mp", UploadId=up)
        whole = t.call("head_object", Bucket=b, Key="mp")
        # moto deviation: moto ignores partNumber on a multipart object and answers with all of it; S3
        # answers 206 with the part's bytes, its Content-Range and x-amz-mp-parts-count.
        part = {k: val for k, val in whole.items() if k != "PartsCount"}
        total = len(part1) + len(part2)
        t.call("head_object", "part 1", Bucket=b, Key="mp", PartNumber=1,
               moto=replace({**part, "status": 206, "ContentLength": len(part1), "PartsCount": 2,
                             "ContentRange": f"bytes 0-{len(part1) - 1}/{total}"}))
        t.call("get_object", "part 2", Bucket=b, Key="mp", PartNumber=2,
               moto=replace({**part, "status": 206, "ContentLength": len(part2), "PartsCount": 2,
                             "ContentRange": f"bytes {len(part1)}-{total - 1}/{total}",
                             "Body": f"{len(part2)} bytes, md5 {hashlib.md5(part2).hexdigest()}"}))
        no_part = replace({"status": 416, "code": "InvalidPartNumber"})
        t.call("get_object", "part 3", Bucket=b, Key="mp", PartNumber=3, moto=no_part)
        t.call("put_object", Bucket=b, Key="single", Body=b"single")
        t.call("get_object", "single part 1", Bucket=b, Key="single", PartNumber=1)
        # moto deviation: moto's 416 for a part number past the last has no error code in its body.
        t.call("get_object", "single part 2", Bucket=b, Key="single", PartNumber=2, moto=no_part)

        up2 = t.real(t.call("create_multipart_upload", "to abort", Bucket=b, Key="ab")["UploadId"])
        t.call("upload_part", Bucket=b, Key="ab", UploadId=up2, PartNumber=1, Body=b"x")
        t.call("abort_multipart_upload", Bucket=b, Key="ab", UploadId=up2)
        t.call("list_parts", "aborted", Bucket=b, Key="ab", UploadId=up2)
        t.call("complete_multipart_upload", "aborted", Bucket=b, Key="ab", UploadId=up2,
               MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": e1}]}, moto=_moto_404_is_500("NoSuchUpload"))
        t.call("head_object", "never completed", Bucket=b, Key="ab")

        # Parts out of order, each big enough: copied server-side from the object above.
        up3 = t.real(t.call("create_multipart_upload", "out of order", Bucket=b, Key="order")["UploadId"])
        etags = [t.call("upload_part_copy", Bucket=b, Key="order", UploadId=up3, PartNumber=n,
                        CopySource={"Bucket": b, "Key": "mp"}, CopySourceRange=f"bytes=0-{len(part1) - 1}",
                        )["CopyPartResult"]["ETag"] for n in (1, 2)]
        # moto deviation: moto completes an upload whose parts are listed out of order; S3 refuses it
        # with InvalidPartOrder ("the parts list must be specified in order by part number").
        t.call("complete_multipart_upload", "InvalidPartOrder", Bucket=b, Key="order", UploadId=up3,
               MultipartUpload={"Parts": [{"PartNumber": 2, "ETag": etags[1]}, {"PartNumber": 1, "ETag": etags[0]}]},
               moto=replace({"status": 400, "code": "InvalidPartOrder"}))

    run_both(peers, script)


def test_error_semantics(peers) -> None:
    """Issue 18, item 4: part numbers out of range, checksum mismatches of every algorithm (single and
    multipart), Content-Encoding kept as sent, DeleteBucket over in-progress uploads."""
    import base64
    import zlib

    out_of_range = replace({"status": 400, "code": "InvalidArgument"})
    no_part = replace({"status": 416, "code": "InvalidPartNumber"})

    def script(t: Transcript) -> None:
        b = "diff-errors"
        t.call("create_bucket", Bucket=b)
        t.call("put_object", Bucket=b, Key="single", Body=b"single")
        # moto deviation: moto serves partNumber 0 and -1 as the whole object. AWS GetObject API reference:
        # partNumber "is a positive integer between 1 and 10,000", anything else a bad argument (400).
        for n in (0, -1, 10001):
            t.call("get_object", f"single part {n}", Bucket=b, Key="single", PartNumber=n,
                   moto=out_of_range if n != 10001 else replace({"status": 400, "code": "InvalidArgument"}))
        # moto deviation: 416 without an error code (S3 "Error responses": InvalidPartNumber, 416).
        t.call("head_object", "single part 2", Bucket=b, Key="single", PartNumber=2,
               moto=replace({"status": 416, "code": "416"}))
        t.call("get_object", "single part 2", Bucket=b, Key="single", PartNumber=2, moto=no_part)
        up = t.real(t.call("create_multipart_upload", Bucket=b, Key="mp")["UploadId"])
        # moto deviation: part 0 answers NoSuchUpload; S3 checks the part number (1 to 10,000) first.
        t.call("upload_part", "part 0", Bucket=b, Key="mp", UploadId=up, PartNumber=0, Body=b"x",
               moto=out_of_range)
        t.call("upload_part", "part 10001", Bucket=b, Key="mp", UploadId=up, PartNumber=10001, Body=b"x")
        e1 = t.call("upload_part", Bucket=b, Key="mp", UploadId=up, PartNumber=1, Body=b"a" * (5 * MiB))["ETag"]
        e2 = t.call("upload_part", Bucket=b, Key="mp", UploadId=up, PartNumber=2, Body=b"b")["ETag"]
        t.call("complete_multipart_upload", Bucket=b, Key="mp", UploadId=up,
               MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": e1}, {"PartNumber": 2, "ETag": e2}]})
        t.call("get_object", "multipart part 3", Bucket=b, Key="mp", PartNumber=3, moto=no_part)
        t.call("get_object", "multipart part 10001", Bucket=b, Key="mp", PartNumber=10001, moto=out_of_range)

        # Content-MD5 and every x-amz-checksum-* algorithm, wrong: BadDigest, nothing stored.
        wrong = {"ContentMD5": base64.b64encode(b"\0" * 16).decode(),
                 "ChecksumCRC32": base64.b64encode(zlib.crc32(b"other").to_bytes(4, "big")).decode(),
                 "ChecksumCRC32C": base64.b64encode(b"\0\0\0\1").decode(),
                 "ChecksumCRC64NVME": base64.b64encode(b"\0" * 7 + b"\1").decode(),
                 "ChecksumSHA1": base64.b64encode(b"\0" * 20).decode(),
                 "ChecksumSHA256": base64.b64encode(b"\0" * 32).decode()}
        bad_digest = replace({"status": 400, "code": "BadDigest"})
        for field, value in wrong.items():
            # moto deviation: moto stores a body whose CRC32C/CRC64NVME/SHA-1/SHA-256 does not match (it
            # does not check them); S3 ("Checking object integrity"): BadDigest, nothing stored.
            t.call("put_object", f"wrong {field}", Bucket=b, Key="bad", Body=b"body", **{field: value},
                   moto=bad_digest)
            up2 = t.real(t.call("create_multipart_upload", f"for wrong {field}", Bucket=b, Key="badmp",
                                **({"ChecksumAlgorithm": field[len("Checksum"):]} if field != "ContentMD5" else {})
                                )["UploadId"])
            t.call("upload_part", f"wrong {field}", Bucket=b, Key="badmp", UploadId=up2, PartNumber=1,
                   Body=b"body", **{field: value}, moto=bad_digest)
            # moto deviations: the part it kept goes; and its ListParts leaves out ChecksumAlgorithm, which
            # S3's ListParts API reference returns for an upload created with one.
            alg = {"ChecksumAlgorithm": field[len("Checksum"):]} if field != "ContentMD5" else {}
            t.call("list_parts", f"after wrong {field}", Bucket=b, Key="badmp", UploadId=up2,
                   moto=lambda e, alg=alg: {k: val for k, val in e.items() if k != "Parts"} | alg)
            t.call("abort_multipart_upload", Bucket=b, Key="badmp", UploadId=up2)
        t.call("head_object", "nothing stored", Bucket=b, Key="bad", moto=replace({"status": 404, "code": "404"}))

        # Content-Encoding exactly as sent.
        for enc in ("gzip, identity", "GZIP", "br,gzip"):
            t.call("put_object", f"encoding {enc}", Bucket=b, Key="enc", Body=b"x", ContentEncoding=enc)
            t.call("head_object", f"encoding {enc}", Bucket=b, Key="enc")

        # A bucket whose only content is in-progress uploads.
        b2 = "diff-only-uploads"
        t.call("create_bucket", Bucket=b2)
        t.call("put_object", Bucket=b2, Key="k", Body=b"x")
        t.real(t.call("create_multipart_upload", Bucket=b2, Key="pending")["UploadId"])
        t.call("delete_bucket", "object left", Bucket=b2)
        t.call("delete_object", Bucket=b2, Key="k")
        # moto deviation (and AWS is silent): Ceph RGW deletes a bucket holding only in-progress multipart
        # uploads and aborts them ("RGW: bucket removal aborts incomplete multipart uploads"); moto refuses.
        t.call("delete_bucket", "only uploads left", Bucket=b2,
               moto=replace({"status": 204}))
        t.call("list_multipart_uploads", "gone", Bucket=b2, moto=replace({"status": 404, "code": "NoSuchBucket"}))

    run_both(peers, script)


def test_tagging_attributes_and_bucket_paging(peers) -> None:
    """Issue 18, item 3: object and bucket tagging, GetObjectAttributes, ListBuckets paging."""
    def script(t: Transcript) -> None:
        b = "diff-tags"
        t.call("create_bucket", Bucket=b)
        t.call("put_bucket_versioning", Bucket=b, VersioningConfiguration={"Status": "Enabled"})
        t.call("put_object", Bucket=b, Key="k", Body=b"tagged", Tagging="team=core&tier=gold")
        t.call("get_object_tagging", Bucket=b, Key="k")
        t.call("head_object", Bucket=b, Key="k")
        # moto deviation (here and on DeleteObjectTagging): no x-amz-version-id; the PutObjectTagging and
        # DeleteObjectTagging API references return the version whose tags were set.
        t.call("put_object_tagging", Bucket=b, Key="k",
               Tagging={"TagSet": [{"Key": "a", "Value": "1"}, {"Key": "ü", "Value": "ß"}]},
               moto=update(VersionId="<version1>"))
        t.call("get_object_tagging", "replaced", Bucket=b, Key="k")
        # moto deviation: moto keeps the last of two tags with one key; S3 refuses the set (InvalidTag,
        # "Cannot provide multiple Tags with the same key"; AWS "Error responses").
        t.call("put_object_tagging", "duplicate keys", Bucket=b, Key="k",
               Tagging={"TagSet": [{"Key": "a", "Value": "1"}, {"Key": "a", "Value": "2"}]},
               moto=replace({"status": 400, "code": "InvalidTag"}))
        # moto deviation: moto accepts 11 tags on an object; S3 allows at most 10 (AWS "Categorizing your
        # storage using tags": "You can associate up to 10 tags with an object"), BadRequest.
        t.call("put_object_tagging", "11 tags", Bucket=b, Key="k",
               Tagging={"TagSet": [{"Key": f"k{i}", "Value": "v"} for i in range(11)]},
               moto=replace({"status": 400, "code": "BadRequest"}))
        t.call("copy_object", Bucket=b, Key="copy", CopySource={"Bucket": b, "Key": "k"})
        t.call("get_object_tagging", "copied", Bucket=b, Key="copy",  # (moto: after its duplicate-key write)
               moto=update(TagSet=[{"Key": "a", "Value": "1"}, {"Key": "ü", "Value": "ß"}]))
        t.call("copy_object", "tagging REPLACE", Bucket=b, Key="copy2", CopySource={"Bucket": b, "Key": "k"},
               TaggingDirective="REPLACE", Tagging="x=y")
        t.call("get_object_tagging", "replaced on copy", Bucket=b, Key="copy2")
        t.call("delete_object_tagging", Bucket=b, Key="k", moto=update(VersionId="<version1>"))
        t.call("get_object_tagging", "deleted", Bucket=b, Key="k")
        t.call("get_object_tagging", "missing key", Bucket=b, Key="nope")
        up = t.real(t.call("create_multipart_upload", Bucket=b, Key="mp", Tagging="from=upload")["UploadId"])
        e1 = t.call("upload_part", Bucket=b, Key="mp", UploadId=up, PartNumber=1, Body=b"p" * (5 * MiB))["ETag"]
        e2 = t.call("upload_part", Bucket=b, Key="mp", UploadId=up, PartNumber=2, Body=b"q")["ETag"]
        t.call("complete_multipart_upload", Bucket=b, Key="mp", UploadId=up,
               MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": e1}, {"PartNumber": 2, "ETag": e2}]})
        t.call("get_object_tagging", "multipart", Bucket=b, Key="mp")

        t.call("get_bucket_tagging", "none yet", Bucket=b)
        t.call("put_bucket_tagging", Bucket=b, Tagging={"TagSet": [{"Key": "cost", "Value": "eng"}]})
        t.call("get_bucket_tagging", Bucket=b)
        t.call("delete_bucket_tagging", Bucket=b)
        t.call("get_bucket_tagging", "deleted", Bucket=b)

        t.call("get_object_attributes", Bucket=b, Key="k",
               ObjectAttributes=["ETag", "StorageClass", "ObjectSize"])
        # moto deviation: moto leaves ObjectParts out for a multipart object; the GetObjectAttributes API
        # reference (GetObjectAttributesParts) gives its PartsCount, and the Part list only for an object
        # uploaded with an additional checksum, which this one was not (tests/test_s3_attributes.py
        # pages a checksummed one).
        t.call("get_object_attributes", "multipart", Bucket=b, Key="mp", ObjectAttributes=["ObjectParts", "ObjectSize"],
               MaxParts=1, moto=update(ObjectParts={"TotalPartsCount": 2}))
        t.call("get_object_attributes", "missing", Bucket=b, Key="nope", ObjectAttributes=["ETag"])

        for name in ("diff-page-a", "diff-page-b", "diff-page-c"):
            t.call("create_bucket", Bucket=name)
        # moto deviation: moto ignores max-buckets, prefix and continuation-token and sends no BucketRegion;
        # the ListBuckets API reference pages by them and echoes Prefix.
        page = [{"BucketRegion": REGION, "Name": n} for n in ("diff-page-a", "diff-page-b", "diff-page-c")]
        first = t.call("list_buckets", "page 1", MaxBuckets=2, Prefix="diff-page-",
                       moto=update(Buckets=page[:2], ContinuationToken="<token1>", Prefix="diff-page-"))
        t.call("list_buckets", "page 2", MaxBuckets=2, Prefix="diff-page-",
               ContinuationToken=t.real(first.get("ContinuationToken", "")) or "none",
               moto=update(Buckets=page[2:], Prefix="diff-page-"))

    run_both(peers, script)


# ------------------------------------------------------------------ Anvil only: S3's single-PUT limit

def _raw_request(endpoint: str, method: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """Send a request's head and no body at all, then read the answer: a server that waits for the
    declared body would time out here instead of answering."""
    netloc = urllib.parse.urlsplit(endpoint).netloc
    host, port = netloc.split(":")
    headers = {"Host": netloc, **headers}
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {val}\r\n" for k, val in headers.items()) + "\r\n"
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode("latin-1"))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before an answer: {data!r}"
            data += chunk
        raw_head, _, body = data.partition(b"\r\n\r\n")
        lines = raw_head.decode("latin-1").split("\r\n")
        answer = {k.strip().lower(): val.strip() for k, _, val in (line.partition(":") for line in lines[1:])}
        while len(body) < int(answer.get("content-length", "0")):
            chunk = sock.recv(65536)
            assert chunk, "connection closed mid-body"
            body += chunk
    return int(lines[0].split()[1]), answer, body


def test_put_over_5_gib_refused_from_the_header(server: AnvilServer) -> None:
    """S3 takes at most 5 GiB in one PutObject (or UploadPart): a larger declared Content-Length (or
    x-amz-decoded-content-length for aws-chunked bodies) is EntityTooLarge at once, before any of the body
    is read, and nothing is stored. moto does not enforce the limit, so this runs against Anvil only."""
    from tests.s3_sign import sign

    creds = dev_credentials(server)
    s3 = _client(server.endpoint, creds["access_key_id"], creds["secret_access_key"])
    b = "diff-too-large"
    s3.create_bucket(Bucket=b)
    too_large = str(5 * 1024**3 + 1)
    upload = s3.create_multipart_upload(Bucket=b, Key="mp")["UploadId"]
    cases = [
        (f"/{b}/big", {"Content-Length": too_large}, "UNSIGNED-PAYLOAD"),
        (f"/{b}/big-chunked", {"Content-Length": too_large, "Content-Encoding": "aws-chunked",
                               "x-amz-decoded-content-length": too_large}, "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"),
        (f"/{b}/mp?partNumber=1&uploadId={upload}", {"Content-Length": too_large}, "UNSIGNED-PAYLOAD"),
    ]
    for path, extra, payload in cases:
        headers, _ = sign("PUT", server.endpoint + path, creds, headers=extra, payload_hash=payload)
        status, answer, body = _raw_request(server.endpoint, "PUT", path, headers)
        assert status == 400 and b"<Code>EntityTooLarge</Code>" in body, (path, status, body)
        assert f"<ProposedSize>{too_large}</ProposedSize>".encode() in body
        assert answer.get("connection") == "close"  # the unread body makes the connection unusable
    assert s3.list_objects_v2(Bucket=b)["KeyCount"] == 0
    assert s3.list_parts(Bucket=b, Key="mp", UploadId=upload).get("Parts", []) == []


def test_conformance_bench_quick(server: AnvilServer, peers) -> None:
    """`bench/s3_conformance.py --quick` on this module's two servers: a few of its cases, the documented
    JSON, and Anvil answering them as AWS documents. The full run (the conformance figure, docs/s3.md)
    stays out of the suite."""
    root = Path(__file__).resolve().parent.parent
    creds = dev_credentials(server)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    proc = subprocess.run([sys.executable, str(root / "bench" / "s3_conformance.py"), "--quick",
                           "--anvil", server.endpoint, creds["access_key_id"], creds["secret_access_key"],
                           "--moto", peers["moto"].meta.endpoint_url], env=env, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    doc = json.loads(proc.stdout)
    assert doc["benchmark"] == "s3_conformance" and doc["quick"] is True and doc["cases"] == 8
    for name in ("anvil", "moto"):
        fig = doc[name]
        assert fig["total"] == 8 and fig["pass_rate"] == round(fig["passed"] / 8, 4)
        assert sum(g["total"] for g in fig["groups"].values()) == 8
    assert doc["anvil"]["failed"] == [], doc["anvil"]["failed"]
