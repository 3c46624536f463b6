"""Idempotency keys: a retried request gives the first result once; a reused key with another request fails."""

from __future__ import annotations

import os
import uuid

import pytest

from anvil.client import AnvilClient
from tests.helpers import unique_bucket
from tests.objutil import all_keys, events_since, journal_seq, unchanged

# The embedded catalog and PostgreSQL (tests/conftest.py `engine`).
pytestmark = pytest.mark.both_engines


def _key() -> str:
    return f"idem-{uuid.uuid4().hex}"


def _same(a: dict, b: dict) -> None:
    assert b.pop("idempotent_replay", None) is True
    assert a == b


def test_put(client: AnvilClient, versioned_bucket: str) -> None:
    b, key = versioned_bucket, _key()
    seq = journal_seq(client)
    first = client.put_object(b, "k", b"body", metadata={"m": "1"}, idempotency_key=key)
    again = client.put_object(b, "k", b"body", metadata={"m": "1"}, idempotency_key=key)
    _same(first, again)
    assert [e["kind"] for e in events_since(client, seq)] == ["object.put", "idempotency.record"]
    assert len(client.list_versions(b)["versions"]) == 1
    # Same key, different body / metadata / target: refused, nothing changes.
    for kwargs in ({"data": b"other"}, {"data": b"body", "metadata": {"m": "2"}}):
        data = kwargs.pop("data")
        unchanged(client, "IdempotencyMismatch", 422, client.put_object, b, "k", data, idempotency_key=key,
                  **kwargs)
    unchanged(client, "IdempotencyMismatch", 422, client.put_object, b, "k2", b"body", idempotency_key=key)
    assert client.get_object(b, "k") == b"body" and len(client.list_versions(b)["versions"]) == 1
    assert "k2" not in all_keys(client, b)


def test_delete(client: AnvilClient, versioned_bucket: str) -> None:
    b, key = versioned_bucket, _key()
    client.put_object(b, "k", b"x")
    seq = journal_seq(client)
    first = client.delete_object(b, "k", idempotency_key=key)
    again = client.delete_object(b, "k", idempotency_key=key)
    _same(first, again)
    # One delete marker, one event: the retry did not stack a second marker.
    assert [e["kind"] for e in events_since(client, seq)] == ["object.delete", "idempotency.record"]
    assert [v["delete_marker"] for v in client.list_versions(b)["versions"]] == [True, False]
    unchanged(client, "IdempotencyMismatch", 422, client.delete_object, b, "other", idempotency_key=key)


def test_copy(client: AnvilClient, versioned_bucket: str) -> None:
    b, key = versioned_bucket, _key()
    client.put_object(b, "src", b"x")
    seq = journal_seq(client)
    first = client.copy_object(b, "dst", source_key="src", idempotency_key=key)
    again = client.copy_object(b, "dst", source_key="src", idempotency_key=key)
    _same(first, again)
    assert [e["kind"] for e in events_since(client, seq)] == ["object.put", "idempotency.record"]
    unchanged(client, "IdempotencyMismatch", 422, client.copy_object, b, "dst", source_key="src",
              metadata_directive="REPLACE", metadata={"a": "b"}, idempotency_key=key)
    assert len([v for v in client.list_versions(b)["versions"] if v["key"] == "dst"]) == 1


def test_bucket_create_and_versioning(client: AnvilClient) -> None:
    name, key = unique_bucket(), _key()
    seq = journal_seq(client)
    first = client.create_bucket(name, idempotency_key=key)
    again = client.create_bucket(name, idempotency_key=key)  # not AlreadyExists: it is the same request
    _same(first, again)
    assert [e["kind"] for e in events_since(client, seq)] == ["bucket.create", "idempotency.record"]
    other = unique_bucket()
    unchanged(client, "IdempotencyMismatch", 422, client.create_bucket, other, idempotency_key=key)
    unchanged(client, "IdempotencyMismatch", 422, client.create_bucket, name, versioning="Enabled",
              idempotency_key=key)
    assert other not in [x["name"] for x in client.list_buckets()]
    vkey = _key()
    _same(client.set_versioning(name, "Enabled", idempotency_key=vkey),
          client.set_versioning(name, "Enabled", idempotency_key=vkey))
    unchanged(client, "IdempotencyMismatch", 422, client.set_versioning, name, "Suspended", idempotency_key=vkey)
    assert client.get_bucket(name)["versioning"] == "Enabled"
    dkey = _key()
    _same(client.delete_bucket(name, idempotency_key=dkey), client.delete_bucket(name, idempotency_key=dkey))


def test_multipart(client: AnvilClient, bucket: str) -> None:
    key = _key()
    seq = journal_seq(client)
    up1 = client.create_upload(bucket, "mp", idempotency_key=key)
    up2 = client.create_upload(bucket, "mp", idempotency_key=key)
    assert up1 == up2
    assert [u["upload_id"] for u in client.list_uploads(bucket)] == [up1]
    assert [e["kind"] for e in events_since(client, seq)] == ["multipart.create", "idempotency.record"]
    unchanged(client, "IdempotencyMismatch", 422, client.create_upload, bucket, "mp2", idempotency_key=key)

    pkey = _key()
    body = os.urandom(1000)
    seq = journal_seq(client)
    p1 = client.upload_part(bucket, up1, 1, body, idempotency_key=pkey)
    _same(p1, client.upload_part(bucket, up1, 1, body, idempotency_key=pkey))
    assert [e["kind"] for e in events_since(client, seq)] == ["multipart.part", "idempotency.record"]
    unchanged(client, "IdempotencyMismatch", 422, client.upload_part, bucket, up1, 1, b"different",
              idempotency_key=pkey)
    assert [p["etag"] for p in client.list_parts(bucket, up1)] == [p1["etag"]]

    ckey = _key()
    seq = journal_seq(client)
    done = client.complete_upload(bucket, up1, [(1, p1["etag"])], idempotency_key=ckey)
    _same(done, client.complete_upload(bucket, up1, [(1, p1["etag"])], idempotency_key=ckey))
    assert [e["kind"] for e in events_since(client, seq)] == ["object.put", "idempotency.record"]
    assert client.get_object(bucket, "mp") == body


def test_keys_are_per_request_kind(client: AnvilClient, bucket: str) -> None:
    key = _key()
    client.put_object(bucket, "k", b"x", idempotency_key=key)
    unchanged(client, "IdempotencyMismatch", 422, client.delete_object, bucket, "k", idempotency_key=key)
    assert client.get_object(bucket, "k") == b"x"


def test_bad_idempotency_keys(client: AnvilClient, bucket: str) -> None:
    unchanged(client, "InvalidArgument", 400, client.put_object, bucket, "k", b"x", idempotency_key="k" * 256)
    assert "k" not in all_keys(client, bucket)
