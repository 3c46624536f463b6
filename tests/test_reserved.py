"""The reserved `_anvil/` namespace: refused on every operation, before other logic, never listed."""

from __future__ import annotations

import httpx
import pytest

from anvil.client import AnvilAPIError, AnvilClient
from tests.helpers import AnvilServer, unique_bucket
from tests.objutil import journal_seq

SECRET = "_anvil/internal-secret-name"
NO_BUCKET = "no-such-bucket-for-reserved"


def _refused(client: AnvilClient, fn, *args, **kwargs) -> None:
    before = journal_seq(client)
    with pytest.raises(AnvilAPIError) as info:
        fn(*args, **kwargs)
    err = info.value
    assert (err.code, err.status) == ("UnauthorizedReservedNamespace", 403), (err.code, err.message)
    assert "internal-secret-name" not in err.message  # the error never echoes the key
    assert journal_seq(client) == before


def _operations(client: AnvilClient, bucket: str, key: str, upload_id: str) -> list[tuple]:
    return [
        (client.put_object, bucket, key, b"x"),
        (client.put_object, bucket, key, b"x", {"if_none_match": "*"}),
        (client.put_object, bucket, key, b"x", {"if_match": "abc", "checksum_sha256": "0" * 64}),
        (client.get_object, bucket, key),
        (client.get_object, bucket, key, {"range": "bytes=0-1"}),
        (client.get_object, bucket, key, {"range": "bytes=-1"}),
        (client.get_object, bucket, key, {"range": "garbage"}),
        (client.get_object, bucket, key, {"if_match": "abc"}),
        (client.get_object, bucket, key, {"if_none_match": "*"}),
        (client.get_object, bucket, key, {"version_id": "null"}),
        (client.get_object, bucket, key, {"if_version_match": "v"}),
        (client.head_object, bucket, key),
        (client.head_object, bucket, key, {"version_id": "abc", "if_match": "x"}),
        (client.delete_object, bucket, key),
        (client.delete_object, bucket, key, {"version_id": "null"}),
        (client.delete_object, bucket, key, {"if_match": "abc"}),
        (client.copy_object, bucket, "plain-target", {"source_key": key}),
        (client.copy_object, bucket, key, {"source_key": "plain-source"}),
        (client.copy_object, bucket, key, {"source_key": key, "source_version_id": "v",
                                           "metadata_directive": "REPLACE"}),
        (client.create_upload, bucket, key),
        (client.list_objects, bucket, {"prefix": "_anvil/"}),
        (client.list_objects, bucket, {"prefix": "_anvil/x", "delimiter": "/"}),
        (client.list_versions, bucket, {"prefix": "_anvil/"}),
        (client.list_uploads, bucket, {"prefix": "_anvil/"}),
    ]


def _call(client: AnvilClient, op: tuple) -> None:
    fn, *args = op
    kwargs = args.pop() if args and isinstance(args[-1], dict) else {}
    _refused(client, fn, *args, **kwargs)


def test_every_operation_refused(client: AnvilClient, versioned_bucket: str) -> None:
    up = client.create_upload(versioned_bucket, "ordinary")
    for op in _operations(client, versioned_bucket, SECRET, up):
        _call(client, op)


def test_refused_before_other_logic(client: AnvilClient) -> None:
    """Even with a missing bucket, an invalid key tail or bad input, the namespace answers first."""
    long_key = "_anvil/" + "x" * 2000
    for key in (SECRET, long_key, "_anvil/nul\x00", "_anvil/"):
        for op in _operations(client, NO_BUCKET, key, "0" * 32):
            _call(client, op)


def test_head_refusal_has_code_and_no_body(server: AnvilServer, bucket: str) -> None:
    resp = httpx.head(f"{server.endpoint}/anvil/v1/buckets/{bucket}/object", params={"key": SECRET})
    assert resp.status_code == 403 and resp.headers["x-anvil-error-code"] == "UnauthorizedReservedNamespace"
    assert resp.content == b""
    resp = httpx.get(f"{server.endpoint}/anvil/v1/buckets/{bucket}/object", params={"key": SECRET})
    assert resp.status_code == 403 and "internal-secret-name" not in resp.text


def test_not_reserved_lookalikes_work(client: AnvilClient, bucket: str) -> None:
    for key in ("_anvil", "_anvilx/y", "_Anvil/y", "a/_anvil/y", " _anvil/y", "_anvil\\y"):
        client.put_object(bucket, key, b"ok")
        assert client.get_object(bucket, key) == b"ok"
    page = client.list_objects(bucket, prefix="_anvil")
    assert sorted(o["key"] for o in page["objects"]) == ["_anvil", "_anvil\\y", "_anvilx/y"]


def test_multipart_on_reserved_upload_id_paths(client: AnvilClient, bucket: str) -> None:
    """Upload ids never lead to a reserved key: an upload for `_anvil/` cannot exist."""
    _refused(client, client.create_upload, bucket, "_anvil/mp")
    assert client.list_uploads(bucket) == []


def test_listings_never_show_internal_keys(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Internal keys written below the public API (as Anvil itself would) stay invisible in listings."""
    import apsw

    srv = AnvilServer(tmp_path_factory.mktemp("reserved") / "data").start()
    try:
        with srv.client() as c:
            b = unique_bucket()
            c.create_bucket(b, versioning="Enabled")
            for k in ("_anvi", "_anvil", "_anvil0", "a", "z"):
                c.put_object(b, k, b"public")
            c.put_object(b, "template", b"internal")
            internal_upload = c.create_upload(b, "template-upload")
        srv.stop()
        # Rename rows to reserved keys directly in the catalog: the only way such keys can exist.
        conn = apsw.Connection(str(srv.storage_path / "catalog.db"))
        conn.execute("UPDATE versions SET key = '_anvil/internal' WHERE key = 'template'")
        conn.execute("UPDATE multipart_uploads SET key = '_anvil/upload' WHERE key = 'template-upload'")
        conn.close()
        srv.start()
        with srv.client() as c:
            public = ["_anvi", "_anvil", "_anvil0", "a", "z"]
            for size in (1, 2, 1000):
                keys = [o["key"] for o in c.iter_objects(b, page_size=size)]
                assert keys == public
                entries = list(c.iter_objects(b, delimiter="/", page_size=size))
                assert [e.get("key", e.get("prefix")) for e in entries] == public
            for prefix in ("", "_", "_anvil"):
                page = c.list_objects(b, prefix=prefix, delimiter="/")
                assert "_anvil/" not in page["common_prefixes"]
                assert all(not o["key"].startswith("_anvil/") for o in page["objects"])
                vpage = c.list_versions(b, prefix=prefix, delimiter="/")
                assert "_anvil/" not in vpage["common_prefixes"]
                assert all(not v["key"].startswith("_anvil/") for v in vpage["versions"])
                assert all(not u["key"].startswith("_anvil/") for u in c.list_uploads(b, prefix=prefix))
            km = vm = ""
            seen = []
            for _guard in range(50):
                page = c.list_versions(b, key_marker=km, version_marker=vm, limit=1)
                seen += [v["key"] for v in page["versions"]]
                if not page["truncated"]:
                    break
                km, vm = page["next_key_marker"], page["next_version_marker"] or ""
            assert seen == public
            # The internal key is refused by name, even though it exists.
            _refused(c, c.get_object, b, "_anvil/internal")
            upload = c._http.get(f"/anvil/v1/buckets/{b}/uploads").json()["uploads"]
            assert upload == []
            # An upload whose key is internal is refused on every upload operation by its id.
            _refused(c, c.list_parts, b, internal_upload)
            _refused(c, c.upload_part, b, internal_upload, 1, b"x")
            _refused(c, c.complete_upload, b, internal_upload, [(1, "0" * 32)])
            _refused(c, c.abort_upload, b, internal_upload)
    finally:
        srv.stop()
