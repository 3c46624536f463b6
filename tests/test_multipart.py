"""Multipart upload and copy through a real server, including a restart between parts."""

from __future__ import annotations

import hashlib
import os

import pytest

from anvil.client import AnvilClient
from tests.helpers import AnvilServer, unique_bucket
from tests.objutil import all_keys, events_since, expect_error, journal_seq, unchanged

# The embedded catalog and PostgreSQL (tests/conftest.py `engine`).
pytestmark = pytest.mark.both_engines

MIB = 1024 * 1024
PART = 5 * MIB


@pytest.fixture(scope="module")
def parts() -> list[bytes]:
    return [os.urandom(PART), os.urandom(PART), os.urandom(1234)]


def s3_etag(bodies: list[bytes]) -> str:
    return hashlib.md5(b"".join(hashlib.md5(b).digest() for b in bodies)).hexdigest() + f"-{len(bodies)}"


def test_multipart_roundtrip(client: AnvilClient, bucket: str, parts: list[bytes]) -> None:
    seq = journal_seq(client)
    up = client.create_upload(bucket, "big", content_type="video/x-test", metadata={"who": "ünï"})
    assert [u["upload_id"] for u in client.list_uploads(bucket)] == [up]
    etags = [client.upload_part(bucket, up, i + 1, body)["etag"] for i, body in enumerate(parts)]
    assert etags == [hashlib.md5(b).hexdigest() for b in parts]
    listed = client.list_parts(bucket, up)
    assert [(p["part_number"], p["etag"], p["size"]) for p in listed] == [
        (i + 1, etags[i], len(parts[i])) for i in range(3)]
    assert all(p["sha256"] == hashlib.sha256(parts[i]).hexdigest() for i, p in enumerate(listed))
    # The object does not exist until completion.
    expect_error("NotFound", 404, client.head_object, bucket, "big")
    done = client.complete_upload(bucket, up, [(i + 1, f'"{e}"') for i, e in enumerate(etags)])
    assert done["etag"] == s3_etag(parts)
    whole = b"".join(parts)
    data, info = client.get_object_with_info(bucket, "big")
    assert data == whole
    assert info["etag"] == s3_etag(parts) and info["parts_count"] == 3
    assert info["content_type"] == "video/x-test" and info["metadata"] == {"who": "ünï"}
    # Ranges across part boundaries.
    assert client.get_object(bucket, "big", range=f"bytes={PART - 3}-{PART + 2}") == whole[PART - 3:PART + 3]
    assert client.get_object(bucket, "big", range="bytes=-1240") == whole[-1240:]
    assert client.list_uploads(bucket) == []
    kinds = [e["kind"] for e in events_since(client, seq)]
    assert kinds == ["multipart.create", "multipart.part", "multipart.part", "multipart.part", "object.put"]
    # A finished upload is gone: parts and complete answer NotFound.
    expect_error("NotFound", 404, client.list_parts, bucket, up)
    unchanged(client, "NotFound", 404, client.upload_part, bucket, up, 4, b"x")
    unchanged(client, "NotFound", 404, client.complete_upload, bucket, up, [(1, etags[0])])
    unchanged(client, "NotFound", 404, client.complete_upload, bucket, up, [(1, etags[0])], idempotency_key="new")


def test_single_small_part_and_replaced_part(client: AnvilClient, bucket: str) -> None:
    up = client.create_upload(bucket, "small")
    client.upload_part(bucket, up, 1, b"first try")
    e = client.upload_part(bucket, up, 1, b"second try")["etag"]  # re-uploading a part replaces it
    assert [p["etag"] for p in client.list_parts(bucket, up)] == [e]
    assert client.complete_upload(bucket, up, [(1, e)])["etag"] == s3_etag([b"second try"])
    assert client.get_object(bucket, "small") == b"second try"


def test_part_list_validation(client: AnvilClient, bucket: str, parts: list[bytes]) -> None:
    up = client.create_upload(bucket, "v")
    small = client.upload_part(bucket, up, 1, b"tiny")["etag"]
    e2 = client.upload_part(bucket, up, 2, parts[1])["etag"]
    e3 = client.upload_part(bucket, up, 3, parts[2])["etag"]
    u = client.complete_upload
    unchanged(client, "InvalidPartOrder", 400, u, bucket, up, [(2, e2), (1, small)])
    unchanged(client, "InvalidPartOrder", 400, u, bucket, up, [(2, e2), (2, e2)])
    unchanged(client, "InvalidPart", 400, u, bucket, up, [(2, e3)])  # wrong etag
    unchanged(client, "InvalidPart", 400, u, bucket, up, [(2, e2), (4, e3)])  # never uploaded
    unchanged(client, "EntityTooSmall", 400, u, bucket, up, [(1, small), (2, e2)])  # small, not last
    unchanged(client, "InvalidArgument", 400, u, bucket, up, [])
    unchanged(client, "InvalidArgument", 400, u, bucket, up, [(0, small)])
    unchanged(client, "InvalidArgument", 400, client._json, "POST",
              f"/anvil/v1/buckets/{bucket}/uploads/{up}/complete", json={"parts": [{"part_number": "1"}]})
    unchanged(client, "InvalidArgument", 400, client.upload_part, bucket, up, 10001, b"x")
    unchanged(client, "InvalidArgument", 400, client.upload_part, bucket, up, 0, b"x")
    unchanged(client, "InvalidArgument", 400, client._json, "PUT",
              f"/anvil/v1/buckets/{bucket}/uploads/{up}/parts/one", content=b"x")
    assert "v" not in all_keys(client, bucket)
    # Still in progress and completable with a valid list (a subset of parts is allowed).
    assert client.complete_upload(bucket, up, [(2, e2), (3, e3)])["etag"] == s3_etag([parts[1], parts[2]])
    assert client.get_object(bucket, "v") == parts[1] + parts[2]


def test_abort_and_unknown_upload(client: AnvilClient, bucket: str) -> None:
    up = client.create_upload(bucket, "a")
    client.upload_part(bucket, up, 1, b"x")
    seq = journal_seq(client)
    assert client.abort_upload(bucket, up)["aborted"] is True
    assert [e["kind"] for e in events_since(client, seq)] == ["multipart.abort"]
    assert client.list_uploads(bucket) == []
    for fake in (up, "0" * 32, "not-an-id"):
        unchanged(client, "NotFound", 404, client.upload_part, bucket, fake, 1, b"x")
        expect_error("NotFound", 404, client.list_parts, bucket, fake)
        unchanged(client, "NotFound", 404, client.complete_upload, bucket, fake, [(1, "0" * 32)])
        unchanged(client, "NotFound", 404, client.abort_upload, bucket, fake)
    # An upload id is bound to its bucket.
    other = unique_bucket()
    client.create_bucket(other)
    up2 = client.create_upload(other, "k")
    unchanged(client, "NotFound", 404, client.upload_part, bucket, up2, 1, b"x")
    client.abort_upload(other, up2)
    unchanged(client, "NotFound", 404, client.create_upload, unique_bucket("nope"), "k")


def test_part_checksum_mismatch(client: AnvilClient, bucket: str) -> None:
    up = client.create_upload(bucket, "c")
    unchanged(client, "BadDigest", 400, client._json, "PUT", f"/anvil/v1/buckets/{bucket}/uploads/{up}/parts/1",
              content=b"data", headers={"x-anvil-checksum-sha256": hashlib.sha256(b"other").hexdigest()})
    assert client.list_parts(bucket, up) == []
    client.abort_upload(bucket, up)


def test_restart_between_parts(tmp_path_factory: pytest.TempPathFactory, parts: list[bytes]) -> None:
    srv = AnvilServer(tmp_path_factory.mktemp("mp-restart") / "data").start()
    try:
        with srv.client() as c:
            c.create_bucket("restart")
            up = c.create_upload("restart", "obj", metadata={"a": "b"})
            e1 = c.upload_part("restart", up, 1, parts[0])["etag"]
        srv.restart()
        with srv.client() as c:
            assert [u["upload_id"] for u in c.list_uploads("restart")] == [up]
            assert [p["etag"] for p in c.list_parts("restart", up)] == [e1]
            e2 = c.upload_part("restart", up, 2, parts[2])["etag"]
        srv.kill()  # even a hard stop keeps the acknowledged parts
        srv.start()
        with srv.client() as c:
            done = c.complete_upload("restart", up, [(1, e1), (2, e2)])
            assert done["etag"] == s3_etag([parts[0], parts[2]])
            data, info = c.get_object_with_info("restart", "obj")
            assert data == parts[0] + parts[2] and info["metadata"] == {"a": "b"}
            assert c.verify_journal()["ok"] is True
    finally:
        srv.stop()


def test_copy_directives_and_versions(client: AnvilClient, versioned_bucket: str, bucket: str) -> None:
    b = versioned_bucket
    v1 = client.put_object(b, "src", b"one", content_type="text/plain", metadata={"x": "1"})["version_id"]
    client.put_object(b, "src", b"two", content_type="text/html", metadata={"x": "2"})
    seq = journal_seq(client)
    res = client.copy_object(bucket, "dst", source_bucket=b, source_key="src")
    assert res["etag"] == hashlib.md5(b"two").hexdigest() and res["version_id"] == "null"
    ev = events_since(client, seq)
    assert [e["kind"] for e in ev] == ["object.put"] and ev[0]["payload"]["source"] == "copy"
    data, info = client.get_object_with_info(bucket, "dst")
    assert data == b"two" and info["content_type"] == "text/html" and info["metadata"] == {"x": "2"}
    # A specific source version.
    client.copy_object(bucket, "dst-v1", source_bucket=b, source_key="src", source_version_id=v1)
    data, info = client.get_object_with_info(bucket, "dst-v1")
    assert data == b"one" and info["content_type"] == "text/plain" and info["metadata"] == {"x": "1"}
    # REPLACE: new metadata and content type, same bytes.
    client.copy_object(bucket, "dst-r", source_bucket=b, source_key="src", metadata_directive="REPLACE",
                       metadata={"y": "ÿ"}, content_type="application/json")
    data, info = client.get_object_with_info(bucket, "dst-r")
    assert data == b"two" and info["content_type"] == "application/json" and info["metadata"] == {"y": "ÿ"}
    # Onto itself: only with REPLACE (S3).
    unchanged(client, "InvalidArgument", 400, client.copy_object, bucket, "dst", source_key="dst")
    client.copy_object(bucket, "dst", source_key="dst", metadata_directive="REPLACE", metadata={"z": "1"})
    assert client.head_object(bucket, "dst")["metadata"] == {"z": "1"}
    # Copying a multipart object keeps its bytes.
    up = client.create_upload(b, "mp")
    e = client.upload_part(b, up, 1, b"multi")["etag"]
    client.complete_upload(b, up, [(1, e)])
    client.copy_object(bucket, "mp-copy", source_bucket=b, source_key="mp")
    assert client.get_object(bucket, "mp-copy") == b"multi"
    # Bad sources.
    marker = client.delete_object(b, "src")["version_id"]
    unchanged(client, "NotFound", 404, client.copy_object, bucket, "x", source_bucket=b, source_key="src")
    unchanged(client, "InvalidArgument", 400, client.copy_object, bucket, "x", source_bucket=b, source_key="src",
              source_version_id=marker)
    unchanged(client, "NotFound", 404, client.copy_object, bucket, "x", source_bucket=b, source_key="nope")
    unchanged(client, "NotFound", 404, client.copy_object, bucket, "x", source_bucket=b, source_key="src",
              source_version_id="0" * 32)
    unchanged(client, "NotFound", 404, client.copy_object, bucket, "x", source_bucket=unique_bucket("no"),
              source_key="src")
    unchanged(client, "InvalidArgument", 400, client.copy_object, bucket, "x", source_bucket=b, source_key="mp",
              metadata_directive="MOVE")
    unchanged(client, "InvalidArgument", 400, client.copy_object, bucket, "x", source_bucket=b, source_key="mp",
              metadata_directive="REPLACE", metadata={"k": "v" * 3000})
    assert "x" not in all_keys(client, bucket)
