"""Buckets through a real server: lifecycle, naming rules, versioning transitions."""

from __future__ import annotations

import pytest

from anvil.client import AnvilClient
from tests.helpers import unique_bucket
from tests.objutil import events_since, expect_error, journal_seq, unchanged

# The embedded catalog and PostgreSQL (tests/conftest.py `engine`).
pytestmark = pytest.mark.both_engines

BAD_NAMES = [
    "ab",  # too short
    "a" * 64,  # too long
    "Upper-case",
    "under_score",
    "-leading-dash",
    "trailing-dash-",
    ".leading-dot",
    "double..dot",
    "dot-.dash",
    "dash.-dot",
    "192.168.1.1",
    "xn--punycode",
    "sthree-bucket",
    "bucket-s3alias",
    "bucket--ol-s3",
    "space name",
    "café-bucket",
    "anvil",  # reserved: the native API lives under /anvil
]


def test_create_get_list_delete(client: AnvilClient) -> None:
    name = unique_bucket()
    seq = journal_seq(client)
    created = client.create_bucket(name)
    assert created["name"] == name and created["versioning"] == "Unversioned"
    got = client.get_bucket(name)
    assert got["name"] == name and got["versioning"] == "Unversioned"
    assert name in [b["name"] for b in client.list_buckets()]
    names = [b["name"] for b in client.list_buckets()]
    assert names == sorted(names)
    ev = events_since(client, seq)
    assert [e["kind"] for e in ev] == ["bucket.create"]
    assert ev[0]["payload"]["bucket"] == name and ev[0]["scope"] == name

    seq = journal_seq(client)
    assert client.delete_bucket(name)["deleted"] is True
    assert [e["kind"] for e in events_since(client, seq)] == ["bucket.delete"]
    expect_error("NotFound", 404, client.get_bucket, name)
    assert name not in [b["name"] for b in client.list_buckets()]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_bucket_names_are_refused_and_create_nothing(client: AnvilClient, name: str) -> None:
    err = unchanged(client, "InvalidArgument", 400, client.create_bucket, name)
    assert err.message
    assert name not in [b["name"] for b in client.list_buckets()]


def test_reserved_bucket_name_anvil(client: AnvilClient) -> None:
    err = unchanged(client, "InvalidArgument", 400, client.create_bucket, "anvil")
    assert "reserved" in err.message


def test_good_edge_names(client: AnvilClient) -> None:
    for name in ("abc", "a" * 63, "a.b-c.d1", "0-9"):
        client.create_bucket(name)
        client.delete_bucket(name)


def test_already_exists(client: AnvilClient, bucket: str) -> None:
    unchanged(client, "AlreadyExists", 409, client.create_bucket, bucket)
    unchanged(client, "AlreadyExists", 409, client.create_bucket, bucket, versioning="Enabled")
    assert client.get_bucket(bucket)["versioning"] == "Unversioned"


def test_delete_only_if_empty(client: AnvilClient, bucket: str) -> None:
    client.put_object(bucket, "k", b"x")
    unchanged(client, "BucketNotEmpty", 409, client.delete_bucket, bucket)
    client.delete_object(bucket, "k")
    client.delete_bucket(bucket)
    unchanged(client, "NotFound", 404, client.delete_bucket, bucket)


def test_delete_refused_while_versions_or_markers_or_uploads_remain(client: AnvilClient) -> None:
    name = unique_bucket()
    client.create_bucket(name, versioning="Enabled")
    put = client.put_object(name, "k", b"x")
    marker = client.delete_object(name, "k")
    assert client.list_objects(name)["objects"] == []
    unchanged(client, "BucketNotEmpty", 409, client.delete_bucket, name)  # a version and a marker remain
    client.delete_object(name, "k", version_id=put["version_id"])
    unchanged(client, "BucketNotEmpty", 409, client.delete_bucket, name)  # the marker remains
    client.delete_object(name, "k", version_id=marker["version_id"])
    upload = client.create_upload(name, "big")
    unchanged(client, "BucketNotEmpty", 409, client.delete_bucket, name)
    client.abort_upload(name, upload)
    client.delete_bucket(name)


def test_unknown_bucket_operations(client: AnvilClient) -> None:
    missing = unique_bucket("missing")
    expect_error("NotFound", 404, client.get_bucket, missing)
    unchanged(client, "NotFound", 404, client.set_versioning, missing, "Enabled")
    unchanged(client, "NotFound", 404, client.put_object, missing, "k", b"x")
    expect_error("NotFound", 404, client.list_objects, missing)
    expect_error("NotFound", 404, client.list_versions, missing)


def test_versioning_transitions(client: AnvilClient, bucket: str) -> None:
    assert client.get_bucket(bucket)["versioning"] == "Unversioned"
    seq = journal_seq(client)
    assert client.set_versioning(bucket, "Enabled")["versioning"] == "Enabled"
    assert client.get_bucket(bucket)["versioning"] == "Enabled"
    ev = events_since(client, seq)
    assert [(e["kind"], e["payload"]["status"]) for e in ev] == [("bucket.versioning", "Enabled")]
    client.set_versioning(bucket, "Suspended")
    assert client.get_bucket(bucket)["versioning"] == "Suspended"
    client.set_versioning(bucket, "Enabled")
    assert client.get_bucket(bucket)["versioning"] == "Enabled"
    # Setting the state it already has changes nothing and journals nothing.
    seq = journal_seq(client)
    client.set_versioning(bucket, "Enabled")
    assert journal_seq(client) == seq
    # Once versioned, a bucket can never return to unversioned.
    for status in ("Unversioned", "", "Disabled", "enabled"):
        unchanged(client, "InvalidArgument", 400, client._json, "PUT", f"/anvil/v1/buckets/{bucket}/versioning",
                  json={"status": status})
    assert client.get_bucket(bucket)["versioning"] == "Enabled"


def test_create_with_versioning(client: AnvilClient) -> None:
    name = unique_bucket()
    assert client.create_bucket(name, versioning="Enabled")["versioning"] == "Enabled"
    bad = unique_bucket()
    unchanged(client, "InvalidArgument", 400, client.create_bucket, bad, versioning="Sometimes")
    unchanged(client, "InvalidArgument", 400, client.create_bucket, bad, versioning="Suspended")  # S3 agrees
    expect_error("NotFound", 404, client.get_bucket, bad)


def test_malformed_bucket_bodies(client: AnvilClient) -> None:
    name = unique_bucket()
    unchanged(client, "InvalidArgument", 400, client._json, "PUT", f"/anvil/v1/buckets/{name}",
              content=b"{not json", headers={"content-type": "application/json"})
    unchanged(client, "InvalidArgument", 400, client._json, "PUT", f"/anvil/v1/buckets/{name}", json=[1, 2])
    unchanged(client, "InvalidArgument", 400, client._json, "PUT", f"/anvil/v1/buckets/{name}",
              json={"versioning": 3})
    expect_error("NotFound", 404, client.get_bucket, name)
