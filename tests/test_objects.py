"""Objects through a real server: bodies, metadata, checksums, ranges and opaque keys."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import httpx
import pytest

from anvil.client import AnvilClient
from tests.helpers import AnvilServer
from tests.objutil import all_keys, events_since, expect_error, journal_seq, unchanged

pytestmark = pytest.mark.both_engines

BODY = bytes(range(256)) * 40 + b"tail"  # 10244 bytes


def test_put_get_head_delete(client: AnvilClient, bucket: str) -> None:
    seq = journal_seq(client)
    res = client.put_object(bucket, "dir/obj.bin", BODY, content_type="application/x-test")
    assert res["etag"] == hashlib.md5(BODY).hexdigest()
    assert res["sha256"] == hashlib.sha256(BODY).hexdigest()
    assert res["size"] == len(BODY)
    ev = events_since(client, seq)
    assert [e["kind"] for e in ev] == ["object.put"]
    payload = ev[0]["payload"]
    assert (payload["bucket"], payload["key"], payload["sha256"], payload["size"]) == (
        bucket, "dir/obj.bin", res["sha256"], len(BODY))
    assert payload["chunks"] == [[res["sha256"], len(BODY)]]

    data, info = client.get_object_with_info(bucket, "dir/obj.bin")
    assert data == BODY and info["status"] == 200
    assert info["etag"] == res["etag"] and info["sha256"] == res["sha256"]
    assert info["content_type"] == "application/x-test" and info["size"] == len(BODY)
    assert info["last_modified"].endswith("GMT")
    head = client.head_object(bucket, "dir/obj.bin")
    assert {k: head[k] for k in ("etag", "sha256", "size", "content_type")} == {
        k: info[k] for k in ("etag", "sha256", "size", "content_type")}
    listed = client.list_objects(bucket)["objects"]
    assert [(o["key"], o["etag"], o["size"]) for o in listed] == [("dir/obj.bin", res["etag"], len(BODY))]

    client.delete_object(bucket, "dir/obj.bin")
    expect_error("NotFound", 404, client.get_object, bucket, "dir/obj.bin")
    expect_error("NotFound", 404, client.head_object, bucket, "dir/obj.bin")


def test_default_content_type_and_empty_body(client: AnvilClient, bucket: str) -> None:
    res = client.put_object(bucket, "empty", b"")
    assert res["etag"] == hashlib.md5(b"").hexdigest() and res["size"] == 0
    data, info = client.get_object_with_info(bucket, "empty")
    assert data == b"" and info["content_type"] == "application/octet-stream"


def test_streamed_body(client: AnvilClient, bucket: str) -> None:
    pieces = [os.urandom(70_000) for _ in range(5)]
    res = client.put_object(bucket, "streamed", iter(pieces))
    whole = b"".join(pieces)
    assert res["sha256"] == hashlib.sha256(whole).hexdigest()
    assert client.get_object(bucket, "streamed") == whole


def test_large_body_streams_back(client: AnvilClient, bucket: str, tmp_path: Path) -> None:
    body = os.urandom(3 * 1024 * 1024 + 17)  # above the inline limit: the streaming response path
    client.put_object(bucket, "large", body)
    assert client.get_object(bucket, "large") == body
    dest = tmp_path / "out"
    info = client.download(bucket, "large", dest)
    assert dest.read_bytes() == body and info["size"] == len(body)
    part = client.get_object(bucket, "large", range="bytes=1048570-2097160")
    assert part == body[1048570:2097161]


def test_unicode_metadata_roundtrip(client: AnvilClient, bucket: str) -> None:
    meta = {"owner": "Zoë Ørsted", "emoji": "🔥 hot, 100%", "path": "a/b?c=d&e", "plain": "x", "empty": ""}
    client.put_object(bucket, "m", b"x", metadata=meta)
    assert client.head_object(bucket, "m")["metadata"] == meta
    assert client.get_object_with_info(bucket, "m")[1]["metadata"] == meta
    listed = client.list_objects(bucket, prefix="m")["objects"][0]
    assert listed["metadata"] == meta
    # Metadata names are case-insensitive (HTTP headers) and stored lower-case.
    client.put_object(bucket, "m2", b"x", metadata={"Owner": "x"})
    assert client.head_object(bucket, "m2")["metadata"] == {"owner": "x"}


def test_oversized_metadata_refused(client: AnvilClient, bucket: str) -> None:
    client.put_object(bucket, "meta", b"original", metadata={"a": "1"})
    ok = {"k": "v" * (2048 - 1)}  # exactly 2 KiB of name + value bytes
    client.put_object(bucket, "meta-ok", b"x", metadata=ok)
    too_big = {"k": "v" * 2048}
    unchanged(client, "InvalidArgument", 400, client.put_object, bucket, "meta", b"new", metadata=too_big)
    multibyte = {"k": "é" * 1024}  # 2048 bytes of value + 1 of name
    unchanged(client, "InvalidArgument", 400, client.put_object, bucket, "meta", b"new", metadata=multibyte)
    data, info = client.get_object_with_info(bucket, "meta")
    assert data == b"original" and info["metadata"] == {"a": "1"}
    assert "meta" in all_keys(client, bucket) and len(all_keys(client, bucket, "meta")) == 2


def test_raw_utf8_metadata_header(client: AnvilClient, bucket: str) -> None:
    """A client that sends unencoded UTF-8 in a metadata header gets its text back, not mojibake."""
    client._json("PUT", f"/anvil/v1/buckets/{bucket}/object", params={"key": "raw"}, content=b"x",
                 headers={"x-anvil-meta-owner": "Zoë 🔥".encode()})
    assert client.head_object(bucket, "raw")["metadata"] == {"owner": "Zoë 🔥"}
    unchanged(client, "InvalidArgument", 400, client._json, "PUT", f"/anvil/v1/buckets/{bucket}/object",
              params={"key": "raw"}, content=b"y", headers={"x-anvil-meta-owner": b"\xff\xfe"})
    assert client.get_object(bucket, "raw") == b"x"


def test_bad_metadata_encoding_refused(client: AnvilClient, bucket: str) -> None:
    unchanged(client, "InvalidArgument", 400, client._json, "PUT", f"/anvil/v1/buckets/{bucket}/object",
              params={"key": "badmeta"}, content=b"x", headers={"x-anvil-meta-a": "%ff%fe"})
    unchanged(client, "InvalidArgument", 400, client._json, "PUT", f"/anvil/v1/buckets/{bucket}/object",
              params={"key": "badmeta"}, content=b"x", headers={"x-anvil-meta-a": "bell%07"})
    assert all_keys(client, bucket, "badmeta") == []


def test_expected_checksums(client: AnvilClient, bucket: str, server: AnvilServer) -> None:
    sha = hashlib.sha256(BODY).hexdigest()
    md5 = hashlib.md5(BODY).digest()
    res = client.put_object(bucket, "c", BODY, checksum_sha256=sha, content_md5=md5)
    assert res["sha256"] == sha
    res = client.put_object(bucket, "c2", BODY, checksum_sha256=sha.upper())
    assert res["sha256"] == sha

    tmp_before = sorted(os.listdir(server.storage_path / "tmp"))
    other = os.urandom(100)
    wrong_sha = hashlib.sha256(b"other").hexdigest()
    unchanged(client, "BadDigest", 400, client.put_object, bucket, "c", other, checksum_sha256=wrong_sha)
    unchanged(client, "BadDigest", 400, client.put_object, bucket, "c", other,
              content_md5=hashlib.md5(b"other").digest())
    unchanged(client, "BadDigest", 400, client.put_object, bucket, "new", other, checksum_sha256=wrong_sha)
    assert client.get_object(bucket, "c") == BODY
    assert "new" not in all_keys(client, bucket)
    # The rejected bodies are neither in the blob store nor left in tmp/.
    blob = server.storage_path / "blobs" / "sha256"
    other_sha = hashlib.sha256(other).hexdigest()
    assert not (blob / other_sha[:2] / other_sha).exists()
    assert sorted(os.listdir(server.storage_path / "tmp")) == tmp_before
    # Malformed expected checksums are argument errors.
    unchanged(client, "InvalidArgument", 400, client.put_object, bucket, "c", b"x", checksum_sha256="abc")
    unchanged(client, "InvalidArgument", 400, client._json, "PUT", f"/anvil/v1/buckets/{bucket}/object",
              params={"key": "c"}, content=b"x", headers={"content-md5": "not-base64!"})
    unchanged(client, "InvalidArgument", 400, client._json, "PUT", f"/anvil/v1/buckets/{bucket}/object",
              params={"key": "c"}, content=b"x", headers={"content-md5": base64.b64encode(b"short").decode()})


RANGE_BODY = bytes(range(100))


@pytest.mark.parametrize(("header", "start", "end"), [
    ("bytes=0-0", 0, 0),
    ("bytes=0-9", 0, 9),
    ("bytes=10-19", 10, 19),
    ("bytes=90-", 90, 99),
    ("bytes=0-", 0, 99),
    ("bytes=-1", 99, 99),
    ("bytes=-10", 90, 99),
    ("bytes=-100", 0, 99),
    ("bytes=-500", 0, 99),  # suffix longer than the object: the whole object
    ("bytes=95-500", 95, 99),  # end beyond the object is clamped
    ("bytes=99-99", 99, 99),
])
def test_ranges(client: AnvilClient, bucket: str, header: str, start: int, end: int) -> None:
    client.put_object(bucket, "r", RANGE_BODY)
    data, info = client.get_object_with_info(bucket, "r", range=header)
    assert info["status"] == 206
    assert data == RANGE_BODY[start:end + 1]
    assert info["content_range"] == f"bytes {start}-{end}/100"
    assert info["size"] == end - start + 1
    head = client._request("HEAD", f"/anvil/v1/buckets/{bucket}/object", params={"key": "r"},
                           headers={"range": header})
    assert head.status_code == 206 and head.headers["content-range"] == f"bytes {start}-{end}/100"


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=100-200", "bytes=-0", "bytes=1000-"])
def test_unsatisfiable_ranges(client: AnvilClient, bucket: str, header: str) -> None:
    client.put_object(bucket, "r", RANGE_BODY)
    err = expect_error("InvalidRange", 416, client.get_object, bucket, "r", range=header)
    assert err.headers["content-range"] == "bytes */100"


@pytest.mark.parametrize("header", ["bytes=0-", "bytes=-1", "bytes=0-0"])
def test_every_range_on_empty_object_is_unsatisfiable(client: AnvilClient, bucket: str, header: str) -> None:
    client.put_object(bucket, "empty", b"")
    err = expect_error("InvalidRange", 416, client.get_object, bucket, "empty", range=header)
    assert err.headers["content-range"] == "bytes */0"


@pytest.mark.parametrize("header", ["bytes=", "bytes=-", "bytes=5-2", "bytes=a-b", "items=0-1", "bytes=0-1,3-4",
                                    "0-1", "bytes=1.5-2", "bytes=--1"])
def test_malformed_ranges(client: AnvilClient, bucket: str, header: str) -> None:
    client.put_object(bucket, "r", RANGE_BODY)
    expect_error("InvalidArgument", 400, client.get_object, bucket, "r", range=header)
    resp = client._http.head(f"/anvil/v1/buckets/{bucket}/object", params={"key": "r"}, headers={"range": header})
    assert resp.status_code == 400 and resp.headers["x-anvil-error-code"] == "InvalidArgument"


def test_range_on_version(client: AnvilClient, versioned_bucket: str) -> None:
    v1 = client.put_object(versioned_bucket, "r", b"0123456789")["version_id"]
    client.put_object(versioned_bucket, "r", b"abcdefghij")
    assert client.get_object(versioned_bucket, "r", version_id=v1, range="bytes=2-4") == b"234"
    assert client.get_object(versioned_bucket, "r", range="bytes=-3") == b"hij"


def test_keys_are_opaque(client: AnvilClient, bucket: str, server: AnvilServer) -> None:
    outside = server.storage_path.parent
    before_outside = set(os.listdir(outside))
    before_root = set(os.listdir(server.storage_path))
    keys = [
        "../../etc/passwd", "../escape", "./dot", "a/../../b", "/leading/slash", "trailing/", "a//b",
        "..", ".", "CON", "ünïcödé/ключ/鍵/🔑", "spaces and\ttabs", "%2e%2e/percent", "q?x=1&y=2#frag",
        "back\\slash\\..\\..", "k" * 1024, "plus+sign", "amp&eq=semi;", "%", "%zz", "\u200b",
    ]
    for i, key in enumerate(keys):
        client.put_object(bucket, key, f"body-{i}".encode())
    for i, key in enumerate(keys):
        assert client.get_object(bucket, key) == f"body-{i}".encode(), key
        assert client.head_object(bucket, key)["size"] == len(f"body-{i}")
    assert sorted(all_keys(client, bucket), key=lambda k: k.encode()) == sorted(keys, key=lambda k: k.encode())
    # Nothing appeared outside STORAGE_PATH or at its top level: keys never become paths.
    assert set(os.listdir(outside)) - before_outside <= {p for p in os.listdir(outside) if p.endswith(".log")}
    assert set(os.listdir(server.storage_path)) == before_root
    assert not Path("/etc/passwd.anvil").exists()
    for key in keys:
        client.delete_object(bucket, key)
    assert all_keys(client, bucket) == []


def test_bad_keys_refused(client: AnvilClient, bucket: str) -> None:
    long_ascii = "k" * 1025
    long_multibyte = "é" * 513  # 1026 bytes
    for key in (long_ascii, long_multibyte, "nul\x00byte", "", "\x00"):
        unchanged(client, "InvalidArgument", 400, client.put_object, bucket, key, b"x")
        expect_error("InvalidArgument", 400, client.get_object, bucket, key)
        unchanged(client, "InvalidArgument", 400, client.delete_object, bucket, key)
        unchanged(client, "InvalidArgument", 400, client.copy_object, bucket, "dst", source_key=key)
        unchanged(client, "InvalidArgument", 400, client.create_upload, bucket, key)
    assert all_keys(client, bucket) == []
    # Keys that are not valid UTF-8 on the wire are refused, not turned into U+FFFD.
    unchanged(client, "InvalidArgument", 400, client._json, "PUT",
              f"/anvil/v1/buckets/{bucket}/object?key=bad%FFkey", content=b"x")
    expect_error("InvalidArgument", 400, client._json, "GET", f"/anvil/v1/buckets/{bucket}/object?key=%C3")
    # A missing key parameter is an argument error, not a crash.
    unchanged(client, "InvalidArgument", 400, client._json, "PUT", f"/anvil/v1/buckets/{bucket}/object",
              content=b"x")


def test_bad_content_type_refused(client: AnvilClient, bucket: str) -> None:
    unchanged(client, "InvalidArgument", 400, client.put_object, bucket, "ct", b"x", content_type="a" * 300)
    assert all_keys(client, bucket) == []


def test_head_errors_carry_code_without_body(server: AnvilServer, bucket: str) -> None:
    h = httpx.Client(headers=server.auth_headers())
    resp = h.head(f"{server.endpoint}/anvil/v1/buckets/{bucket}/object", params={"key": "nope"})
    assert resp.status_code == 404 and resp.headers["x-anvil-error-code"] == "NotFound"
    assert resp.content == b"" and resp.headers["x-request-id"]
    resp = h.head(f"{server.endpoint}/anvil/v1/buckets/no-such-bucket-x/object", params={"key": "k"})
    assert resp.status_code == 404 and resp.headers["x-anvil-error-code"] == "NotFound"


def test_unknown_routes_and_methods_answer_json(server: AnvilServer, bucket: str) -> None:
    h = httpx.Client(headers=server.auth_headers())
    resp = h.get(f"{server.endpoint}/anvil/v1/nothing-here")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "NotFound"
    resp = h.post(f"{server.endpoint}/anvil/v1/buckets/{bucket}/object", params={"key": "k"})
    assert resp.status_code == 405 and resp.json()["error"]["code"] == "MethodNotAllowed"
    assert "PUT" in resp.headers["allow"]
    resp = h.get(f"{server.endpoint}/anvil/v1/buckets/{bucket}/versioning")
    assert resp.status_code == 405 and resp.json()["error"]["code"] == "MethodNotAllowed"
    resp = h.request("TRACE", f"{server.endpoint}/anvil/v1/buckets")
    assert resp.status_code == 405 and resp.json()["error"]["code"] == "MethodNotAllowed"
    resp = h.request("HEAD", f"{server.endpoint}/anvil/v1/nothing-here")
    assert resp.status_code == 404 and resp.headers["x-anvil-error-code"] == "NotFound"
    resp = h.get(f"{server.endpoint}/anvil/v1/buckets", params={"limit": "x"})
    assert resp.status_code == 200  # unknown parameters are ignored on list_buckets
    resp = h.get(f"{server.endpoint}/anvil/v1/buckets/{bucket}/objects", params={"limit": "x"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "InvalidArgument"


def test_paths_outside_anvil_belong_to_s3(server: AnvilServer) -> None:
    """Bucket names that merely start with "anvil" are S3 paths, not the native API."""
    for path in ("/anvil-data/key", "/anvilx", "/some-bucket/anvil/v1/buckets"):
        resp = httpx.get(server.endpoint + path)
        assert resp.headers["content-type"].startswith("application/xml"), path
        assert "x-amz-request-id" in resp.headers
    resp = httpx.get(server.endpoint + "/anvil")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "NotFound"


def test_health(server: AnvilServer) -> None:
    assert httpx.get(f"{server.endpoint}/anvil/health/live").json()["status"] == "live"
    ready = httpx.get(f"{server.endpoint}/anvil/health/ready").json()
    assert ready["status"] == "ready" and ready["journal"]["seq"] >= 0


def test_openapi_covers_every_native_route(server: AnvilServer) -> None:
    from anvil.api.native import ROUTES

    doc = httpx.get(f"{server.endpoint}/anvil/v1/openapi.json").json()
    for route in ROUTES:
        if route.path == "/anvil/v1/openapi.json":
            continue
        for method in route.methods - {"HEAD"}:
            assert method.lower() in doc["paths"].get(route.path, {}), (method, route.path)


def test_streamed_put_in_odd_pieces(server: AnvilServer, client: AnvilClient, bucket: str) -> None:
    """A body of unknown length in pieces of every size (tiny, socket-sized, over 1 MiB): the server
    gathers them into blocks without copying the large ones (api.common.BlockGatherer); what is stored
    and served, whole and by range, is the body, and a wrong declared checksum stores nothing."""
    from tests.test_large_body import MIB, _pieces

    pieces = _pieces(3)
    body = b"".join(pieces)
    url = f"{server.endpoint}/anvil/v1/buckets/{bucket}/object"
    headers = server.auth_headers()
    with httpx.Client(timeout=60) as http:
        r = http.put(url, params={"key": "big"}, content=iter(pieces), headers={  # chunked: no length
            **headers, "x-anvil-checksum-sha256": hashlib.sha256(body).hexdigest()})
        assert r.status_code == 200, r.text
        assert (r.json()["etag"], r.json()["size"]) == (hashlib.md5(body).hexdigest(), len(body))
        got = http.get(url, params={"key": "big"}, headers=headers)
        assert got.status_code == 200 and got.content == body
        lo, hi = MIB + 1, 4 * MIB - 2
        part = http.get(url, params={"key": "big"}, headers={**headers, "range": f"bytes={lo}-{hi}"})
        assert part.status_code == 206 and part.content == body[lo:hi + 1]
    unchanged(client, "BadDigest", 400, client.put_object, bucket, "big", iter([body[1:], b"x"]),
              checksum_sha256=hashlib.sha256(body).hexdigest())
