"""Issue 18, item 2: canned ACLs and ACL documents expressed through Anvil's access model (public read
per bucket or per object version), against a real server; what cannot be honoured is NotImplemented
and changes nothing. Grant documents follow the AWS "Access control list (ACL) overview" page: the
owner's FULL_CONTROL, plus `http://acs.amazonaws.com/groups/global/AllUsers` READ when public."""

from __future__ import annotations

import httpx
import pytest
from botocore.exceptions import ClientError

from tests.helpers import AnvilServer, unique_bucket

ALL_USERS = "http://acs.amazonaws.com/groups/global/AllUsers"
TIMEOUT = 10


def grants(acl: dict) -> list[tuple[str, str]]:
    return sorted((g["Grantee"].get("URI") or g["Grantee"]["Type"], g["Permission"]) for g in acl["Grants"])


def anonymous(server: AnvilServer, path: str) -> int:
    return httpx.get(server.endpoint + path, timeout=TIMEOUT).status_code


def test_object_canned_acls(server: AnvilServer, s3) -> None:
    b = unique_bucket("acl")
    s3.create_bucket(Bucket=b)
    s3.put_object(Bucket=b, Key="private", Body=b"p")
    s3.put_object(Bucket=b, Key="public", Body=b"o", ACL="public-read")
    s3.put_object(Bucket=b, Key="owner-full", Body=b"f", ACL="bucket-owner-full-control")
    assert anonymous(server, f"/{b}/private") == 403
    assert anonymous(server, f"/{b}/public") == 200
    assert anonymous(server, f"/{b}/owner-full") == 403
    assert anonymous(server, f"/{b}") == 403  # an object's ACL opens that object, not the listing
    acl = s3.get_object_acl(Bucket=b, Key="public")
    assert grants(acl) == [("CanonicalUser", "FULL_CONTROL"), (ALL_USERS, "READ")]
    assert grants(s3.get_object_acl(Bucket=b, Key="private")) == [("CanonicalUser", "FULL_CONTROL")]
    assert acl["Owner"]["ID"] == acl["Grants"][0]["Grantee"]["ID"]
    # PutObjectAcl, canned and as a document.
    s3.put_object_acl(Bucket=b, Key="public", ACL="private")
    assert anonymous(server, f"/{b}/public") == 403
    owner = acl["Owner"]
    s3.put_object_acl(Bucket=b, Key="private", AccessControlPolicy={"Owner": owner, "Grants": [
        {"Grantee": {"Type": "CanonicalUser", "ID": owner["ID"]}, "Permission": "FULL_CONTROL"},
        {"Grantee": {"Type": "Group", "URI": ALL_USERS}, "Permission": "READ"}]})
    assert anonymous(server, f"/{b}/private") == 200
    # A copy gets its own ACL: private unless the copy asks for public-read.
    s3.copy_object(Bucket=b, Key="copy", CopySource={"Bucket": b, "Key": "private"})
    assert anonymous(server, f"/{b}/copy") == 403
    s3.copy_object(Bucket=b, Key="copy-public", CopySource={"Bucket": b, "Key": "private"}, ACL="public-read")
    assert anonymous(server, f"/{b}/copy-public") == 200
    # Multipart: the ACL given at CreateMultipartUpload holds for the completed object.
    up = s3.create_multipart_upload(Bucket=b, Key="mp", ACL="public-read")["UploadId"]
    etag = s3.upload_part(Bucket=b, Key="mp", UploadId=up, PartNumber=1, Body=b"m")["ETag"]
    s3.complete_multipart_upload(Bucket=b, Key="mp", UploadId=up,
                                 MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]})
    assert anonymous(server, f"/{b}/mp") == 200


def test_bucket_canned_acls(server: AnvilServer, s3) -> None:
    b = unique_bucket("aclb")
    s3.create_bucket(Bucket=b, ACL="public-read")
    s3.put_object(Bucket=b, Key="k", Body=b"k")
    assert anonymous(server, f"/{b}/k") == 200 and anonymous(server, f"/{b}") == 200
    assert grants(s3.get_bucket_acl(Bucket=b)) == [("CanonicalUser", "FULL_CONTROL"), (ALL_USERS, "READ")]
    # The grants that actually hold: an object in a public bucket is readable by everyone.
    assert (ALL_USERS, "READ") in grants(s3.get_object_acl(Bucket=b, Key="k"))
    s3.put_bucket_acl(Bucket=b, ACL="private")
    assert anonymous(server, f"/{b}/k") == 403
    assert grants(s3.get_bucket_acl(Bucket=b)) == [("CanonicalUser", "FULL_CONTROL")]


@pytest.mark.parametrize("call", [
    lambda s3, b: s3.create_bucket(Bucket=b + "-rw", ACL="public-read-write"),
    lambda s3, b: s3.create_bucket(Bucket=b + "-ar", ACL="authenticated-read"),
    lambda s3, b: s3.put_bucket_acl(Bucket=b, ACL="public-read-write"),
    lambda s3, b: s3.put_bucket_acl(Bucket=b, ACL="bucket-owner-full-control"),
    lambda s3, b: s3.put_object(Bucket=b, Key="k", Body=b"x", ACL="public-read-write"),
    lambda s3, b: s3.put_object(Bucket=b, Key="k", Body=b"x", GrantRead='id="another-account"'),
    lambda s3, b: s3.put_object_acl(Bucket=b, Key="k", GrantFullControl='id="another-account"'),
    lambda s3, b: s3.put_object_acl(Bucket=b, Key="k", AccessControlPolicy={
        "Owner": {"ID": "x"}, "Grants": [{"Grantee": {"Type": "CanonicalUser", "ID": "another-account"},
                                          "Permission": "READ"}]}),
    lambda s3, b: s3.copy_object(Bucket=b, Key="k2", CopySource={"Bucket": b, "Key": "k"}, ACL="aws-exec-read"),
    lambda s3, b: s3.create_multipart_upload(Bucket=b, Key="m", ACL="log-delivery-write"),
])
def test_what_cannot_be_honoured_is_not_implemented(server: AnvilServer, s3, call) -> None:
    b = unique_bucket("aclno")
    s3.create_bucket(Bucket=b)
    s3.put_object(Bucket=b, Key="k", Body=b"k")
    with pytest.raises(ClientError) as e:
        call(s3, b)
    assert e.value.response["Error"]["Code"] == "NotImplemented"
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 501
    # Nothing changed: no new bucket, object or upload, nothing public.
    names = {x["Name"] for x in s3.list_buckets()["Buckets"]}
    assert b + "-rw" not in names and b + "-ar" not in names
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=b)["Contents"]] == ["k"]
    assert s3.list_multipart_uploads(Bucket=b).get("Uploads", []) == []
    assert grants(s3.get_bucket_acl(Bucket=b)) == [("CanonicalUser", "FULL_CONTROL")]
    assert grants(s3.get_object_acl(Bucket=b, Key="k")) == [("CanonicalUser", "FULL_CONTROL")]


def test_copy_with_new_tags_and_acl_is_one_mutation(server: AnvilServer, s3) -> None:
    """CopyObject with `x-amz-tagging-directive: REPLACE` and `x-amz-acl: public-read` writes the copy, its
    tags and its ACL in one journaled mutation (one `object.put` carrying them), as PutObject with
    `x-amz-tagging` does: no reader can see the copy with the source's tags or without its ACL."""
    import json

    from anvil.storage import records

    b = unique_bucket("cpytag")
    s3.create_bucket(Bucket=b)
    s3.put_object(Bucket=b, Key="src", Body=b"s", Tagging="from=source")
    s3.copy_object(Bucket=b, Key="dst", CopySource=f"{b}/src", TaggingDirective="REPLACE", Tagging="to=copy",
                   ACL="public-read")
    s3.copy_object(Bucket=b, Key="bare", CopySource=f"{b}/src", TaggingDirective="REPLACE")
    s3.copy_object(Bucket=b, Key="same", CopySource=f"{b}/src")
    assert s3.get_object_tagging(Bucket=b, Key="dst")["TagSet"] == [{"Key": "to", "Value": "copy"}]
    assert s3.get_object_tagging(Bucket=b, Key="bare")["TagSet"] == []
    assert s3.get_object_tagging(Bucket=b, Key="same")["TagSet"] == [{"Key": "from", "Value": "source"}]
    assert anonymous(server, f"/{b}/dst") == 200 and anonymous(server, f"/{b}/same") == 403
    conn = records.open_readonly(server.storage_path / "catalog.db")
    try:
        events = [(kind, scope, json.loads(payload)) for kind, scope, payload in conn.execute(
            "SELECT kind, scope, payload FROM journal WHERE scope IN (?, ?) ORDER BY seq", (f"{b}/dst", f"{b}/bare"))]
    finally:
        records.close(conn)
    assert [(kind, scope) for kind, scope, _ in events] == [("object.put", f"{b}/dst"), ("object.put", f"{b}/bare")]
    assert events[0][2]["extra"]["tags"] == [["to", "copy"]] and events[0][2]["extra"]["public"] is True
    assert "tags" not in events[1][2].get("extra", {})
