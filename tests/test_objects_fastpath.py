"""The small-PUT fast path (body buffered, O_TMPFILE blob, direct object-route dispatch) behaves
exactly like the streamed path it shortcuts."""

from __future__ import annotations

import hashlib
import os

import apsw
import httpx
import pytest

from anvil.client import AnvilAPIError, AnvilClient
from anvil.storage.blobs import BlobStore, digest_bytes
from tests.helpers import AnvilServer

# The embedded catalog and PostgreSQL (tests/conftest.py `engine`).
pytestmark = pytest.mark.both_engines


def _blob_path(server: AnvilServer, data: bytes):
    sha = hashlib.sha256(data).hexdigest()
    return server.storage_path / "blobs" / "sha256" / sha[:2] / sha


def _inline_rows(server: AnvilServer, sha: str, records_url: str | None) -> list[bytes]:
    """The inline bodies (storage.inline) stored under `sha`: at most one row per hash."""
    if records_url:  # the PostgreSQL record store
        import psycopg

        with psycopg.connect(records_url) as pg:
            return [bytes(r[0]) for r in pg.execute("SELECT body FROM inline_blobs WHERE sha256 = %s", (sha,))]
    conn = apsw.Connection(str(server.storage_path / "catalog.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return [bytes(r[0]) for r in conn.execute("SELECT body FROM inline_blobs WHERE sha256 = ?", (sha,))]
    finally:
        conn.close()


def _blob_root(server: AnvilServer):
    found = [p for p in server.storage_path.rglob("*") if p.is_dir() and p.name == "sha256"]
    return found[0] if found else server.storage_path / "blobs"


def test_small_and_streamed_puts_store_identical_records(client: AnvilClient, bucket: str, server: AnvilServer,
                                                         records_url: str | None) -> None:
    small = os.urandom(4096)
    big = os.urandom(1024 * 1024 + 1)  # one byte over the buffered limit: streamed to tmp/
    chunked = os.urandom(10_000)
    r_small = client.put_object(bucket, "small", small, metadata={"a": "b"})
    r_big = client.put_object(bucket, "big", big)
    r_chunked = client.put_object(bucket, "chunked", iter([chunked[:3000], chunked[3000:]]))  # no length
    for res, data in ((r_small, small), (r_big, big), (r_chunked, chunked)):
        assert res["sha256"] == hashlib.sha256(data).hexdigest()
        assert res["etag"] == hashlib.md5(data).hexdigest()
        assert res["size"] == len(data)
    assert client.get_object(bucket, "small") == small
    assert client.get_object(bucket, "big") == big
    assert client.get_object(bucket, "chunked") == chunked
    assert client.get_object(bucket, "small", range="bytes=10-19") == small[10:20]
    head = client.head_object(bucket, "small")
    assert head["size"] == 4096 and head["metadata"] == {"a": "b"}
    # Small bodies (buffered or streamed) are stored inline in catalog.db, with no blob file;
    # the large one is a file.
    for res, data in ((r_small, small), (r_chunked, chunked)):
        assert list(_blob_root(server).rglob(res["sha256"])) == []
        assert _inline_rows(server, res["sha256"], records_url) == [data]
    blob = [p for p in _blob_root(server).rglob(r_big["sha256"])]
    assert len(blob) == 1 and blob[0].read_bytes() == big
    assert oct(blob[0].stat().st_mode & 0o777) == "0o644"


def test_small_put_with_wrong_checksum_stores_nothing(client: AnvilClient, bucket: str,
                                                      server: AnvilServer) -> None:
    data = os.urandom(4096)
    with pytest.raises(AnvilAPIError) as exc:
        client.put_object(bucket, "bad", data, checksum_sha256="0" * 64)
    assert exc.value.status == 400 and exc.value.code == "BadDigest"
    with pytest.raises(AnvilAPIError) as exc:
        client.put_object(bucket, "bad", data, content_md5=hashlib.md5(b"other").digest())
    assert exc.value.code == "BadDigest"
    assert not list(_blob_root(server).rglob(hashlib.sha256(data).hexdigest()))
    with pytest.raises(AnvilAPIError) as exc:
        client.head_object(bucket, "bad")
    assert exc.value.status == 404
    good = client.put_object(bucket, "good", data, checksum_sha256=hashlib.sha256(data).hexdigest())
    assert good["size"] == 4096


def test_identical_small_bodies_share_one_blob(client: AnvilClient, bucket: str, server: AnvilServer,
                                               records_url: str | None) -> None:
    data = os.urandom(2048)
    first = client.put_object(bucket, "one", data)
    second = client.put_object(bucket, "two", data)
    assert first["sha256"] == second["sha256"]
    assert list(_blob_root(server).rglob(first["sha256"])) == []
    assert _inline_rows(server, first["sha256"], records_url) == [data]  # one inline body for both
    assert client.get_object(bucket, "two") == data


def test_direct_object_route_keeps_errors_and_methods(server: AnvilServer, bucket: str) -> None:
    with httpx.Client(base_url=server.endpoint, headers=server.auth_headers()) as http:
        missing = http.get(f"/anvil/v1/buckets/{bucket}/object", params={"key": "nope"})
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "NotFound" and missing.headers["x-request-id"]
        assert http.get(f"/anvil/v1/buckets/{bucket}/object").status_code == 400  # no key
        reserved = http.put(f"/anvil/v1/buckets/{bucket}/object", params={"key": "_anvil/x"}, content=b"x")
        assert reserved.json()["error"]["code"] == "UnauthorizedReservedNamespace"
        # Other methods still reach the router, which answers MethodNotAllowed.
        assert http.post(f"/anvil/v1/buckets/{bucket}/object", params={"key": "k"}).status_code == 405
        assert http.put("/anvil/v1/buckets/no-such-bucket-x/object", params={"key": "k"},
                        content=b"x").status_code == 404


def test_blobstore_put_bytes_links_complete_files(tmp_path) -> None:
    store = BlobStore(tmp_path / "blobs", tmp_path / "tmp")
    (tmp_path / "blobs").mkdir()
    (tmp_path / "tmp").mkdir()
    data = os.urandom(5000)
    info = store.put_bytes(data)
    assert info == digest_bytes(data)
    assert store.path(info.sha256).read_bytes() == data
    assert store.put_bytes(data) == info  # deduplicated, still one file
    assert [sha for sha, _ in store.iter_all()] == [info.sha256]
    assert list((tmp_path / "tmp").iterdir()) == []  # nothing staged in tmp/


def test_blobstore_put_bytes_fallback_without_tmpfile(tmp_path) -> None:
    # Filesystems without O_TMPFILE take the tmp/ + fsync + rename path: same result.
    store = BlobStore(tmp_path / "blobs", tmp_path / "tmp")
    (tmp_path / "blobs").mkdir()
    (tmp_path / "tmp").mkdir()
    store._tmpfile_ok = False
    data = os.urandom(3000)
    info = store.put_bytes(data)
    assert info == digest_bytes(data)
    assert store.path(info.sha256).read_bytes() == data
    assert list((tmp_path / "tmp").iterdir()) == []
