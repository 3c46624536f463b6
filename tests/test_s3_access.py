"""S3 gateway access rules: the reserved `_anvil/` namespace, anonymous reads of public buckets,
recovery mode, and (once identity lands) cross-tenant denial."""

from __future__ import annotations

from pathlib import Path

import boto3
import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from anvil.context import DEV_PRINCIPAL, RequestContext
from anvil.runtime import Anvil
from tests.helpers import AnvilServer, unique_bucket
from tests.s3_helpers import dev_credentials, s3_client

# The embedded catalog and PostgreSQL (tests/conftest.py `engine`).
# SQLite only: access semantics do not depend on the engine; the S3 gateway's SQL runs on PostgreSQL
# in test_s3.py and test_s3_uploads.py (kept off the second engine to hold the suite's time).

R = "_anvil/secret"


@pytest.fixture
def bkt(s3) -> str:
    name = unique_bucket("res")
    s3.create_bucket(Bucket=name)
    s3.put_object(Bucket=name, Key="visible", Body=b"ok")
    return name


def _reserved(e: pytest.ExceptionInfo, *, head: bool = False) -> None:
    resp = e.value.response
    assert resp["ResponseMetadata"]["HTTPStatusCode"] == 403
    if head:
        assert resp["ResponseMetadata"]["HTTPHeaders"].get("x-amz-error-code") == "AccessDenied"
    else:
        assert resp["Error"]["Code"] == "AccessDenied"
        assert "UnauthorizedReservedNamespace" in resp["Error"]["Message"]


def test_reserved_namespace_refused_on_every_operation(server: AnvilServer, s3, bkt: str) -> None:
    up = s3.create_multipart_upload(Bucket=bkt, Key="ok-upload")["UploadId"]
    calls = {
        "put": lambda: s3.put_object(Bucket=bkt, Key=R, Body=b"x"),
        "get": lambda: s3.get_object(Bucket=bkt, Key=R),
        "get-range": lambda: s3.get_object(Bucket=bkt, Key=R, Range="bytes=0-1"),
        "get-if-match": lambda: s3.get_object(Bucket=bkt, Key=R, IfMatch='"x"'),
        "get-if-none-match": lambda: s3.get_object(Bucket=bkt, Key=R, IfNoneMatch='"x"'),
        "get-version": lambda: s3.get_object(Bucket=bkt, Key=R, VersionId="v1"),
        "get-part": lambda: s3.get_object(Bucket=bkt, Key=R, PartNumber=1),
        "delete": lambda: s3.delete_object(Bucket=bkt, Key=R),
        "delete-version": lambda: s3.delete_object(Bucket=bkt, Key=R, VersionId="v1"),
        "copy-target": lambda: s3.copy_object(Bucket=bkt, Key=R, CopySource=f"{bkt}/visible"),
        "copy-source": lambda: s3.copy_object(Bucket=bkt, Key="copy", CopySource=f"{bkt}/{R}"),
        "mpu-create": lambda: s3.create_multipart_upload(Bucket=bkt, Key=R),
        "mpu-part": lambda: s3.upload_part(Bucket=bkt, Key=R, UploadId=up, PartNumber=1, Body=b"x"),
        "mpu-part-copy-source": lambda: s3.upload_part_copy(Bucket=bkt, Key="ok-upload", UploadId=up, PartNumber=1,
                                                            CopySource=f"{bkt}/{R}"),
        "mpu-list-parts": lambda: s3.list_parts(Bucket=bkt, Key=R, UploadId=up),
        "mpu-complete": lambda: s3.complete_multipart_upload(
            Bucket=bkt, Key=R, UploadId=up, MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": '"x"'}]}),
        "mpu-abort": lambda: s3.abort_multipart_upload(Bucket=bkt, Key=R, UploadId=up),
        "list-v2-prefix": lambda: s3.list_objects_v2(Bucket=bkt, Prefix="_anvil/"),
        "list-v1-prefix": lambda: s3.list_objects(Bucket=bkt, Prefix="_anvil/x"),
        "list-versions-prefix": lambda: s3.list_object_versions(Bucket=bkt, Prefix="_anvil/"),
        "list-versions-key-marker": lambda: s3.list_object_versions(Bucket=bkt, KeyMarker="_anvil/a"),
        "list-uploads-prefix": lambda: s3.list_multipart_uploads(Bucket=bkt, Prefix="_anvil/"),
        "acl-on-reserved": lambda: s3.get_object_acl(Bucket=bkt, Key=R),
    }
    for name, call in calls.items():
        with pytest.raises(ClientError) as e:
            call()
        try:
            _reserved(e)
        except AssertionError:
            raise AssertionError(f"{name}: {e.value.response}") from None
    with pytest.raises(ClientError) as e:
        s3.head_object(Bucket=bkt, Key=R)
    _reserved(e, head=True)
    # A missing bucket does not change the answer: the namespace check comes first.
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=unique_bucket("nobucket"), Key=R)
    _reserved(e)
    res = s3.delete_objects(Bucket=bkt, Delete={"Objects": [{"Key": R}, {"Key": "visible"}]})
    assert [d["Key"] for d in res["Deleted"]] == ["visible"]
    assert res["Errors"][0]["Key"] == R and res["Errors"][0]["Code"] == "AccessDenied"
    assert "UnauthorizedReservedNamespace" in res["Errors"][0]["Message"]
    # Presigned and anonymous requests get the same answer, before authentication.
    url = s3.generate_presigned_url("get_object", Params={"Bucket": bkt, "Key": R})
    for r in (httpx.get(url), httpx.get(f"{server.endpoint}/{bkt}/{R}"), httpx.put(f"{server.endpoint}/{bkt}/{R}")):
        assert r.status_code == 403 and b"UnauthorizedReservedNamespace" in r.content
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bkt).get("Contents", [])] == []
    assert [u["Key"] for u in s3.list_multipart_uploads(Bucket=bkt).get("Uploads", [])] == ["ok-upload"]


def test_public_bucket_anonymous_reads(tmp_path: Path) -> None:
    srv = AnvilServer(tmp_path / "data").start()
    try:
        s3 = s3_client(srv)
        pub, priv = unique_bucket("pub"), unique_bucket("priv")
        for b in (pub, priv):
            s3.create_bucket(Bucket=b)
            s3.put_object(Bucket=b, Key="doc.txt", Body=b"public words", ContentType="text/plain")
        srv.stop()
        # Making a bucket public is an identity/admin operation with no S3 or native route yet:
        # apply it through the object service itself while the server is down.
        anvil = Anvil(srv.storage_path)
        try:
            anvil.objects.set_public(RequestContext(principal=DEV_PRINCIPAL), pub, True)
        finally:
            anvil.close()
        srv.restart()
        anon = boto3.client("s3", endpoint_url=srv.endpoint, region_name="us-east-1",
                            config=Config(signature_version=boto3.session.botocore.UNSIGNED,
                                          s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
        got = anon.get_object(Bucket=pub, Key="doc.txt")
        assert got["Body"].read() == b"public words"
        assert anon.head_object(Bucket=pub, Key="doc.txt")["ContentLength"] == 12
        assert [o["Key"] for o in anon.list_objects_v2(Bucket=pub)["Contents"]] == ["doc.txt"]
        assert httpx.get(f"{srv.endpoint}/{pub}/doc.txt").content == b"public words"
        for call in (lambda: anon.get_object(Bucket=priv, Key="doc.txt"),
                     lambda: anon.list_objects_v2(Bucket=priv),
                     lambda: anon.put_object(Bucket=pub, Key="new", Body=b"x"),
                     lambda: anon.delete_object(Bucket=pub, Key="doc.txt"),
                     lambda: anon.list_buckets(),
                     lambda: anon.get_object(Bucket=unique_bucket("absent"), Key="doc.txt")):
            with pytest.raises(ClientError) as e:
                call()
            assert e.value.response["Error"]["Code"] == "AccessDenied"
        s3 = s3_client(srv)
        assert [o["Key"] for o in s3.list_objects_v2(Bucket=pub)["Contents"]] == ["doc.txt"]
    finally:
        srv.stop()


def test_recovery_mode_refuses_writes(tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    from anvil.api.app import create_app

    anvil = Anvil(tmp_path / "data")
    try:
        anvil.objects.create_bucket(RequestContext(principal=DEV_PRINCIPAL), "recov")
        app = create_app(anvil, recovery_mode=True)
        creds = dev_credentials(type("S", (), {"storage_path": tmp_path / "data"})())
        signer = boto3.client("s3", endpoint_url="http://testserver", region_name="us-east-1",
                              aws_access_key_id=creds["access_key_id"],
                              aws_secret_access_key=creds["secret_access_key"],
                              config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))
        with TestClient(app) as http:
            put = signer.generate_presigned_url("put_object", Params={"Bucket": "recov", "Key": "k"})
            r = http.put(put, content=b"x")
            assert r.status_code == 503 and b"RecoveryMode" in r.content, r.content
            delete = signer.generate_presigned_url("delete_bucket", Params={"Bucket": "recov"})
            assert http.delete(delete).status_code == 503
            listing = signer.generate_presigned_url("list_objects_v2", Params={"Bucket": "recov"})
            r = http.get(listing)
            assert r.status_code == 200 and b"<KeyCount>0</KeyCount>" in r.content
        assert anvil.objects.list_buckets()[0].name == "recov"
    finally:
        anvil.close()


def test_recreate_own_bucket_outside_us_east_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only us-east-1 answers 200 to re-creating a bucket you own; every other region 409."""
    from starlette.testclient import TestClient

    from anvil.api.app import create_app

    monkeypatch.setenv("REGION", "eu-west-1")
    anvil = Anvil(tmp_path / "data")
    try:
        app = create_app(anvil)
        creds = dev_credentials(type("S", (), {"storage_path": tmp_path / "data"})())
        signer = boto3.client("s3", endpoint_url="http://testserver", region_name="eu-west-1",
                              aws_access_key_id=creds["access_key_id"],
                              aws_secret_access_key=creds["secret_access_key"],
                              config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))
        with TestClient(app) as http:
            create = signer.generate_presigned_url("create_bucket", Params={"Bucket": "regional"})
            assert http.put(create).status_code == 200
            r = http.put(create)
            assert r.status_code == 409 and b"<Code>BucketAlreadyOwnedByYou</Code>" in r.content, r.content
    finally:
        anvil.close()


def _tenant_client(server: AnvilServer, prefix: str):
    tenant = unique_bucket(prefix)
    with server.client() as admin:
        admin.create_tenant(tenant)
        app = admin.create_app(tenant, "s3-app", scopes=[
            f"bucket:create|tenant:{tenant}", f"bucket:list|tenant:{tenant}", "bucket:*|bucket:*",
            "object:*|bucket:*"])
    return boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                        aws_access_key_id=app["client_id"], aws_secret_access_key=app["client_secret"],
                        config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                                      retries={"max_attempts": 1}))


def test_cross_tenant_denial(server: AnvilServer, s3) -> None:
    """Tenants are S3 accounts: another tenant's application gets S3's cross-account answers for a bucket
    it does not own: 403 AccessDenied for every read, write, listing and copy (bucket names are global,
    so S3 does not hide that the bucket exists), 404 NoSuchBucket only for a bucket that does not exist.
    AWS "Troubleshoot access denied (403 Forbidden) errors in Amazon S3" / "Error responses"."""
    private = unique_bucket("ct")
    s3.create_bucket(Bucket=private)
    s3.put_object(Bucket=private, Key="secret.txt", Body=b"admin only")
    other = _tenant_client(server, "acme")
    own = unique_bucket("own")
    other.create_bucket(Bucket=own)  # its own tenant works normally
    other.put_object(Bucket=own, Key="k", Body=b"mine")
    assert [b["Name"] for b in other.list_buckets()["Buckets"]] == [own]
    missing = unique_bucket("nope")
    attempts = [
        lambda b: other.get_object(Bucket=b, Key="secret.txt"),
        lambda b: other.get_object(Bucket=b, Key="no-such-key"),
        lambda b: other.put_object(Bucket=b, Key="x", Body=b"intruder"),
        lambda b: other.list_objects_v2(Bucket=b),
        lambda b: other.delete_object(Bucket=b, Key="secret.txt"),
        lambda b: other.copy_object(Bucket=own, Key="stolen", CopySource={"Bucket": b, "Key": "secret.txt"}),
        lambda b: other.get_bucket_acl(Bucket=b),
        lambda b: other.put_bucket_acl(Bucket=b, ACL="public-read"),
        lambda b: other.get_object_tagging(Bucket=b, Key="secret.txt"),
    ]
    for attempt in attempts:
        with pytest.raises(ClientError) as foreign:
            attempt(private)
        with pytest.raises(ClientError) as absent:
            attempt(missing)
        assert (foreign.value.response["Error"]["Code"], foreign.value.response["ResponseMetadata"]["HTTPStatusCode"]
                ) == ("AccessDenied", 403)
        assert (absent.value.response["Error"]["Code"], absent.value.response["ResponseMetadata"]["HTTPStatusCode"]
                ) == ("NoSuchBucket", 404)
    with pytest.raises(ClientError) as e:
        other.head_bucket(Bucket=private)
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with pytest.raises(ClientError) as e:
        other.create_bucket(Bucket=private)
    assert e.value.response["Error"]["Code"] == "BucketAlreadyExists"
    # Nothing changed in the private bucket.
    assert s3.get_object(Bucket=private, Key="secret.txt")["Body"].read() == b"admin only"
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=private)["Contents"]] == ["secret.txt"]
    assert "stolen" not in [o["Key"] for o in other.list_objects_v2(Bucket=own)["Contents"]]


def test_cross_tenant_public_reads(server: AnvilServer, s3) -> None:
    """What another account may read, as in S3: everything in a public bucket (Anvil's public bucket is
    a policy granting everyone GetObject and ListBucket), a public-read object in a private bucket (an
    object ACL granting AllUsers READ), and copy from either; never a private object of a private bucket,
    and never a write."""
    other = _tenant_client(server, "reader")
    own = unique_bucket("rdr")
    other.create_bucket(Bucket=own)
    public, private = unique_bucket("pub"), unique_bucket("priv")
    s3.create_bucket(Bucket=public, ACL="public-read")
    s3.create_bucket(Bucket=private)
    s3.put_object(Bucket=public, Key="doc", Body=b"in a public bucket")
    s3.put_object(Bucket=private, Key="open", Body=b"public object", ACL="public-read")
    s3.put_object(Bucket=private, Key="closed", Body=b"private object")
    assert other.get_object(Bucket=public, Key="doc")["Body"].read() == b"in a public bucket"
    assert [o["Key"] for o in other.list_objects_v2(Bucket=public)["Contents"]] == ["doc"]
    assert other.get_object(Bucket=private, Key="open")["Body"].read() == b"public object"
    other.copy_object(Bucket=own, Key="copied", CopySource={"Bucket": private, "Key": "open"})
    assert other.get_object(Bucket=own, Key="copied")["Body"].read() == b"public object"
    for call in (lambda: other.get_object(Bucket=private, Key="closed"),
                 lambda: other.list_objects_v2(Bucket=private),
                 lambda: other.copy_object(Bucket=own, Key="nope", CopySource={"Bucket": private, "Key": "closed"}),
                 lambda: other.put_object(Bucket=public, Key="graffiti", Body=b"x"),
                 lambda: other.delete_object(Bucket=public, Key="doc"),
                 lambda: other.put_object_acl(Bucket=private, Key="open", ACL="private")):
        with pytest.raises(ClientError) as e:
            call()
        assert (e.value.response["Error"]["Code"], e.value.response["ResponseMetadata"]["HTTPStatusCode"]) == \
            ("AccessDenied", 403)
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=public)["Contents"]] == ["doc"]


def test_virtual_host_style(tmp_path: Path) -> None:
    from tests.s3_sign import sign

    srv = AnvilServer(tmp_path / "data", env={"ANVIL_S3_BASE_DOMAIN": "s3.anvil.test"}).start()
    try:
        s3 = s3_client(srv)
        s3.create_bucket(Bucket="vhost-bucket")  # path style keeps working
        creds = dev_credentials(srv)
        host = f"vhost-bucket.s3.anvil.test:{srv.port}"
        for method, path, body in [("PUT", "/dir/file.txt", b"by host"), ("GET", "/dir/file.txt", b""),
                                   ("GET", "/?list-type=2", b"")]:
            headers, _ = sign(method, f"http://{host}{path}", creds, body=body, headers={"Host": host})
            r = httpx.request(method, f"{srv.endpoint}{path}", content=body or None, headers=headers)
            assert r.status_code == 200, r.text
            if path == "/dir/file.txt" and method == "GET":
                assert r.content == b"by host"
            if "list-type" in path:
                assert b"<Key>dir/file.txt</Key>" in r.content
        assert s3.get_object(Bucket="vhost-bucket", Key="dir/file.txt")["Body"].read() == b"by host"
    finally:
        srv.stop()
