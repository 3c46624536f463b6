"""The bucket cache (objects.service: bucket rows and settings cached per name, dropped by committed
`bucket.*` events before the change is answered): the request right after a change obeys it. Versioning,
lifecycle, the public flag, deletion and re-creation by another tenant, each changed through one
request and checked by the next, on a real server; the same across two nodes on one PostgreSQL is in
tests/test_pg_records.py."""

from __future__ import annotations

import boto3
import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from anvil.client import AnvilAPIError
from tests.helpers import AnvilServer, unique_bucket

EXPIRE_ALL = {"Rules": [{"ID": "all", "Filter": {"Prefix": ""}, "Status": "Enabled", "Expiration": {"Days": 3}}]}


def _tenant_s3(server: AnvilServer):
    """An S3 client of a fresh, non-admin tenant: the gate checks its buckets' tenant on every request."""
    tenant = unique_bucket("tc")
    with server.client() as admin:
        admin.create_tenant(tenant)
        app = admin.create_app(tenant, "s3-app", scopes=[
            f"bucket:create|tenant:{tenant}", f"bucket:list|tenant:{tenant}", "bucket:*|bucket:*",
            "object:*|bucket:*"])
    return boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                        aws_access_key_id=app["client_id"], aws_secret_access_key=app["client_secret"],
                        config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                                      retries={"max_attempts": 1}))


def _code(e: pytest.ExceptionInfo) -> tuple[str, int]:
    r = e.value.response
    return r["Error"]["Code"], r["ResponseMetadata"]["HTTPStatusCode"]


def test_each_bucket_change_is_obeyed_by_the_next_request(server: AnvilServer, s3) -> None:
    t = _tenant_s3(server)
    b = unique_bucket("cache")
    t.create_bucket(Bucket=b)
    assert "VersionId" not in t.put_object(Bucket=b, Key="k", Body=b"1")  # cached from here on
    assert "Expiration" not in t.put_object(Bucket=b, Key="k", Body=b"2")

    t.put_bucket_versioning(Bucket=b, VersioningConfiguration={"Status": "Enabled"})
    first = t.put_object(Bucket=b, Key="k", Body=b"3")["VersionId"]
    assert first not in (None, "null")
    t.put_bucket_versioning(Bucket=b, VersioningConfiguration={"Status": "Suspended"})
    assert "VersionId" not in t.put_object(Bucket=b, Key="k", Body=b"4")  # the null version (S3: no header)
    t.put_bucket_versioning(Bucket=b, VersioningConfiguration={"Status": "Enabled"})
    assert t.put_object(Bucket=b, Key="k", Body=b"5")["VersionId"] not in ("null", first)
    # Every write landed as the setting of its moment said: two versions, the null one between them.
    ids = [v["VersionId"] for v in t.list_object_versions(Bucket=b)["Versions"]]
    assert len(ids) == 3 and ids[1] == "null" and ids[2] == first, ids

    t.put_bucket_lifecycle_configuration(Bucket=b, LifecycleConfiguration=EXPIRE_ALL)
    assert 'rule-id="all"' in t.put_object(Bucket=b, Key="k", Body=b"6")["Expiration"]
    t.delete_bucket_lifecycle(Bucket=b)
    assert "Expiration" not in t.put_object(Bucket=b, Key="k", Body=b"7")

    # Public, then private again: anonymous reads follow each change at once.
    with server.client() as admin:
        admin.set_public_access(b, True)
        assert httpx.get(f"{server.endpoint}/{b}/k").content == b"7"
        admin.set_public_access(b, False)
    assert httpx.get(f"{server.endpoint}/{b}/k").status_code == 403

    # Deleted: the next PUT finds no bucket; made again by another tenant (the admin's): the first
    # tenant is refused as for any foreign bucket; deleted and made again by the first: its own again.
    for v in t.list_object_versions(Bucket=b)["Versions"]:
        t.delete_object(Bucket=b, Key=v["Key"], VersionId=v["VersionId"])
    t.delete_bucket(Bucket=b)
    with pytest.raises(ClientError) as e:
        t.put_object(Bucket=b, Key="k", Body=b"8")
    assert _code(e) == ("NoSuchBucket", 404)
    s3.create_bucket(Bucket=b)
    with pytest.raises(ClientError) as e:
        t.put_object(Bucket=b, Key="k", Body=b"9")
    assert _code(e) == ("AccessDenied", 403)
    s3.delete_bucket(Bucket=b)
    t.create_bucket(Bucket=b)
    assert "VersionId" not in t.put_object(Bucket=b, Key="k", Body=b"10")
    assert t.get_object(Bucket=b, Key="k")["Body"].read() == b"10"


def test_native_versioning_and_delete_are_obeyed_by_the_next_put(client) -> None:
    b = unique_bucket("ncache")
    client.create_bucket(b)
    assert client.put_object(b, "k", b"1")["version_id"] == "null"
    client.set_versioning(b, "Enabled")
    assert client.put_object(b, "k", b"2")["version_id"] != "null"
    client.set_versioning(b, "Suspended")
    assert client.put_object(b, "k", b"3")["version_id"] == "null"
    for v in client.list_versions(b)["versions"]:
        client.delete_object(b, v["key"], version_id=v["version_id"])
    client.delete_bucket(b)
    with pytest.raises(AnvilAPIError) as e:
        client.put_object(b, "k", b"4")
    assert e.value.code == "NotFound"
    client.create_bucket(b, versioning="Enabled")
    assert client.put_object(b, "k", b"5")["version_id"] != "null"
