"""The first end-to-end path: a real server, a bucket, an object, the journal."""

from __future__ import annotations

from anvil.client import AnvilClient


def test_put_get_list_delete(client: AnvilClient, bucket: str) -> None:
    res = client.put_object(bucket, "docs/readme.txt", b"hello anvil", content_type="text/plain",
                            metadata={"owner": "café"})
    assert res["size"] == 11
    data, info = client.get_object_with_info(bucket, "docs/readme.txt")
    assert data == b"hello anvil"
    assert info["metadata"] == {"owner": "café"}
    assert info["etag"] == res["etag"]
    page = client.list_objects(bucket, delimiter="/")
    assert page["common_prefixes"] == ["docs/"]
    client.delete_object(bucket, "docs/readme.txt")
    assert client.list_objects(bucket)["objects"] == []


def test_journal_chain_is_intact(client: AnvilClient, bucket: str) -> None:
    client.put_object(bucket, "k", b"v")
    events = client.journal(after=0, limit=1000)
    assert events and [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert client.verify_journal()["ok"] is True


def test_openapi_published(client: AnvilClient) -> None:
    doc = client._http.get("/anvil/v1/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert "/anvil/v1/buckets/{bucket}/object" in doc["paths"]
