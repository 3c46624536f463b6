"""Preconditions on ETag and version id: writes, create-only, conditional reads and deletes."""

from __future__ import annotations

import pytest

from anvil.client import AnvilClient
from tests.objutil import all_keys, expect_error, unchanged

# The embedded catalog and PostgreSQL (tests/conftest.py `engine`).
pytestmark = pytest.mark.both_engines


def test_if_match_on_put(client: AnvilClient, bucket: str) -> None:
    e1 = client.put_object(bucket, "k", b"one")["etag"]
    e2 = client.put_object(bucket, "k", b"two", if_match=e1)["etag"]
    # The ETag is stale now: the write is refused and the object keeps its body.
    unchanged(client, "PreconditionFailed", 412, client.put_object, bucket, "k", b"three", if_match=e1)
    assert client.get_object(bucket, "k") == b"two"
    client.put_object(bucket, "k", b"three", if_match="*")
    assert client.get_object(bucket, "k") == b"three"
    # If-Match on an absent key fails, even with "*".
    unchanged(client, "PreconditionFailed", 412, client.put_object, bucket, "absent", b"x", if_match=e2)
    unchanged(client, "PreconditionFailed", 412, client.put_object, bucket, "absent", b"x", if_match="*")
    assert "absent" not in all_keys(client, bucket)
    # A list of ETags matches any of them.
    e3 = client.head_object(bucket, "k")["etag"]
    client._json("PUT", f"/anvil/v1/buckets/{bucket}/object", params={"key": "k"}, content=b"four",
                 headers={"if-match": f'"{e1}", "{e3}"'})
    assert client.get_object(bucket, "k") == b"four"


def test_if_none_match_on_put(client: AnvilClient, bucket: str) -> None:
    e1 = client.put_object(bucket, "k", b"one")["etag"]
    unchanged(client, "PreconditionFailed", 412, client.put_object, bucket, "k", b"other", if_none_match=e1)
    client.put_object(bucket, "k", b"two", if_none_match="0" * 32)
    assert client.get_object(bucket, "k") == b"two"


def test_create_only(client: AnvilClient, versioned_bucket: str, bucket: str) -> None:
    for b in (bucket, versioned_bucket):
        client.put_object(b, "once", b"first", if_none_match="*")
        unchanged(client, "PreconditionFailed", 412, client.put_object, b, "once", b"second", if_none_match="*")
        assert client.get_object(b, "once") == b"first"
    # After a delete (a delete marker in a versioned bucket) the key is absent again: create-only succeeds.
    client.delete_object(versioned_bucket, "once")
    client.put_object(versioned_bucket, "once", b"third", if_none_match="*")
    assert client.get_object(versioned_bucket, "once") == b"third"


def test_version_match(client: AnvilClient, versioned_bucket: str) -> None:
    b = versioned_bucket
    v1 = client.put_object(b, "k", b"one")["version_id"]
    v2 = client.put_object(b, "k", b"two", if_version_match=v1)["version_id"]
    unchanged(client, "PreconditionFailed", 412, client.put_object, b, "k", b"x", if_version_match=v1)
    assert client.get_object(b, "k") == b"two"
    # Reads: the current version must be the one named.
    assert client.get_object(b, "k", if_version_match=v2) == b"two"
    expect_error("PreconditionFailed", 412, client.get_object, b, "k", if_version_match=v1)
    # Deletes.
    unchanged(client, "PreconditionFailed", 412, client.delete_object, b, "k", if_version_match=v1)
    client.delete_object(b, "k", if_version_match=v2)
    expect_error("NotFound", 404, client.get_object, b, "k")


def test_version_none_match(client: AnvilClient, versioned_bucket: str) -> None:
    b = versioned_bucket
    v1 = client.put_object(b, "k", b"one")["version_id"]
    # Write only if the current version is no longer v1 (it still is): refused, nothing written.
    unchanged(client, "PreconditionFailed", 412, client.put_object, b, "k", b"x", if_version_none_match=v1)
    v2 = client.put_object(b, "k", b"two", if_version_none_match="0" * 32)["version_id"]
    client.put_object(b, "k2", b"new", if_version_none_match=v1)  # absent key: nothing to match
    assert [v["version_id"] for v in client.list_versions(b, prefix="k")["versions"] if v["key"] == "k"] == [v2, v1]
    # Reads: 304 while the current version is the one the caller already has.
    expect_error("NotModified", 304, client.get_object, b, "k", if_version_none_match=v2)
    expect_error("NotModified", 304, client.head_object, b, "k", if_version_none_match=v2)
    expect_error("PreconditionFailed", 412, client.head_object, b, "k", if_version_match=v1)
    assert client.head_object(b, "k", if_version_match=v2)["version_id"] == v2
    assert client.get_object(b, "k", if_version_none_match=v1) == b"two"
    unchanged(client, "PreconditionFailed", 412, client.delete_object, b, "k", if_version_none_match=v2)
    client.delete_object(b, "k", if_version_none_match=v1)
    expect_error("NotFound", 404, client.get_object, b, "k")


def test_conditional_get_and_head(client: AnvilClient, bucket: str) -> None:
    etag = client.put_object(bucket, "k", b"body")["etag"]
    assert client.get_object(bucket, "k", if_match=etag) == b"body"
    assert client.get_object(bucket, "k", if_none_match="0" * 32) == b"body"
    err = expect_error("PreconditionFailed", 412, client.get_object, bucket, "k", if_match="0" * 32)
    assert "body" not in err.message
    err = expect_error("NotModified", 304, client.get_object, bucket, "k", if_none_match=etag)
    assert err.headers["etag"] == f'"{etag}"'
    expect_error("NotModified", 304, client.get_object, bucket, "k", if_none_match="*")
    expect_error("PreconditionFailed", 412, client.head_object, bucket, "k", if_match="0" * 32)
    expect_error("NotModified", 304, client.head_object, bucket, "k", if_none_match=etag)
    assert client.head_object(bucket, "k", if_match=etag)["etag"] == etag
    # Weak and quoted forms compare on the opaque tag.
    resp = client._http.get(f"/anvil/v1/buckets/{bucket}/object", params={"key": "k"},
                            headers={"if-none-match": f'W/"{etag}"'})
    assert resp.status_code == 304 and resp.content == b""
    # Preconditions combine with ranges.
    data, info = client.get_object_with_info(bucket, "k", if_match=etag, range="bytes=1-2")
    assert data == b"od" and info["status"] == 206


def test_conditional_delete(client: AnvilClient, bucket: str, versioned_bucket: str) -> None:
    etag = client.put_object(bucket, "k", b"body")["etag"]
    unchanged(client, "PreconditionFailed", 412, client.delete_object, bucket, "k", if_match="0" * 32)
    assert client.get_object(bucket, "k") == b"body"
    client.delete_object(bucket, "k", if_match=etag)
    assert "k" not in all_keys(client, bucket)
    unchanged(client, "PreconditionFailed", 412, client.delete_object, bucket, "k", if_match=etag)
    # Versioned: a refused conditional delete leaves no delete marker.
    e = client.put_object(versioned_bucket, "k", b"v")["etag"]
    unchanged(client, "PreconditionFailed", 412, client.delete_object, versioned_bucket, "k", if_match="0" * 32)
    assert len(client.list_versions(versioned_bucket)["versions"]) == 1
    client.delete_object(versioned_bucket, "k", if_match=e)
    assert [v["delete_marker"] for v in client.list_versions(versioned_bucket)["versions"]] == [True, False]


def test_conditional_copy(client: AnvilClient, bucket: str) -> None:
    etag = client.put_object(bucket, "src", b"s")["etag"]
    client.put_object(bucket, "dst", b"d")
    unchanged(client, "PreconditionFailed", 412, client.copy_object, bucket, "dst", source_key="src",
              if_none_match="*")
    assert client.get_object(bucket, "dst") == b"d"
    unchanged(client, "PreconditionFailed", 412, client.copy_object, bucket, "new", source_key="src",
              source_if_match="0" * 32)
    assert "new" not in all_keys(client, bucket)
    client.copy_object(bucket, "new", source_key="src", source_if_match=etag, if_none_match="*")
    assert client.get_object(bucket, "new") == b"s"
    # Quoted ETags work as in headers; a non-string condition is an argument error.
    client._json("POST", f"/anvil/v1/buckets/{bucket}/copy",
                 json={"key": "quoted", "source_key": "src", "source_if_match": f'"{etag}"'})
    assert client.get_object(bucket, "quoted") == b"s"
    unchanged(client, "InvalidArgument", 400, client._json, "POST", f"/anvil/v1/buckets/{bucket}/copy",
              json={"key": "n", "source_key": "src", "source_if_match": 5})
    # x-copy-source-if-none-match matching is a failed precondition (412), never 304, for a copy.
    unchanged(client, "PreconditionFailed", 412, client._json, "POST", f"/anvil/v1/buckets/{bucket}/copy",
              json={"key": "new2", "source_key": "src", "source_if_none_match": etag})


def test_malformed_precondition(client: AnvilClient, bucket: str) -> None:
    client.put_object(bucket, "k", b"x")
    unchanged(client, "InvalidArgument", 400, client._json, "PUT", f"/anvil/v1/buckets/{bucket}/object",
              params={"key": "k"}, content=b"y", headers={"if-match": ","})
    assert client.get_object(bucket, "k") == b"x"
