"""What a SigV4 signature covers, against a real server: every x-amz-* header must be signed (S3's
HeadersNotSigned), and the query the gateway acts on is the query that was signed (`+` vs `%2B`)."""

from __future__ import annotations

import httpx
import pytest
from botocore.exceptions import ClientError

from anvil.api.s3.auth import canonical_query, parse_query
from tests.helpers import AnvilServer, unique_bucket
from tests.s3_helpers import dev_credentials
from tests.s3_sign import sign

TIMEOUT = 10


@pytest.fixture
def buckets(s3) -> tuple[str, str]:
    """(a source bucket holding `secret`, an empty destination bucket)."""
    src, dst = unique_bucket("sigsrc"), unique_bucket("sigdst")
    s3.create_bucket(Bucket=src)
    s3.create_bucket(Bucket=dst)
    s3.put_object(Bucket=src, Key="secret", Body=b"the source's bytes", Metadata={"origin": "src"})
    return src, dst


def keys(s3, bucket: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]


def assert_headers_not_signed(r: httpx.Response, *names: str) -> None:
    assert r.status_code == 403, r.content
    assert b"<Code>AccessDenied</Code>" in r.content
    assert b"There were headers present in the request which were not signed" in r.content
    listed = r.content.split(b"<HeadersNotSigned>")[1].split(b"</HeadersNotSigned>")[0].decode()
    assert sorted(listed.split(", ")) == sorted(names)


# ------------------------------------------------------------------ header auth


def test_unsigned_copy_source_refused_with_header_auth(server: AnvilServer, s3, buckets) -> None:
    src, dst = buckets
    url = f"{server.endpoint}/{dst}/copied"
    headers, _ = sign("PUT", url, dev_credentials(server), body=b"")
    headers["x-amz-copy-source"] = f"{src}/secret"  # added after signing: not in SignedHeaders
    r = httpx.put(url, content=b"", headers=headers, timeout=TIMEOUT)
    assert_headers_not_signed(r, "x-amz-copy-source")
    assert keys(s3, dst) == []
    # The same copy with the header signed goes through: the refusal is about the signature only.
    signed, _ = sign("PUT", url, dev_credentials(server), body=b"", headers={"x-amz-copy-source": f"{src}/secret"})
    assert httpx.put(url, content=b"", headers=signed, timeout=TIMEOUT).status_code == 200
    assert s3.get_object(Bucket=dst, Key="copied")["Body"].read() == b"the source's bytes"


def test_unsigned_metadata_refused_with_header_auth(server: AnvilServer, s3, buckets) -> None:
    _, dst = buckets
    url = f"{server.endpoint}/{dst}/meta"
    headers, _ = sign("PUT", url, dev_credentials(server), body=b"body", headers={"x-amz-meta-signed": "yes"})
    headers["x-amz-meta-injected"] = "evil"
    headers["x-amz-copy-source"] = "elsewhere/key"
    r = httpx.put(url, content=b"body", headers=headers, timeout=TIMEOUT)
    assert_headers_not_signed(r, "x-amz-meta-injected", "x-amz-copy-source")
    assert keys(s3, dst) == []


def test_unsigned_payload_hash_refused_with_header_auth(server: AnvilServer, s3, buckets) -> None:
    _, dst = buckets
    url = f"{server.endpoint}/{dst}/hash"
    headers, _ = sign("PUT", url, dev_credentials(server), body=b"x")
    name = next(k for k in headers if k.lower() == "authorization")
    assert ";x-amz-content-sha256;" in headers[name]
    headers[name] = headers[name].replace(";x-amz-content-sha256;", ";")
    r = httpx.put(url, content=b"x", headers=headers, timeout=TIMEOUT)
    assert_headers_not_signed(r, "x-amz-content-sha256")
    assert keys(s3, dst) == []


# ------------------------------------------------------------------ presigned URLs


def test_presigned_put_refuses_unsigned_copy_source_and_metadata(s3, buckets) -> None:
    src, dst = buckets
    url = s3.generate_presigned_url("put_object", Params={"Bucket": dst, "Key": "target"}, ExpiresIn=600)
    r = httpx.put(url, content=b"", headers={"x-amz-copy-source": f"{src}/secret"}, timeout=TIMEOUT)
    assert_headers_not_signed(r, "x-amz-copy-source")
    r = httpx.put(url, content=b"mine", headers={"x-amz-meta-owner": "attacker"}, timeout=TIMEOUT)
    assert_headers_not_signed(r, "x-amz-meta-owner")
    r = httpx.put(url, content=b"mine", headers={"X-Amz-Metadata-Directive": "REPLACE",
                                                  "x-amz-copy-source": f"{src}/secret"}, timeout=TIMEOUT)
    assert_headers_not_signed(r, "x-amz-metadata-directive", "x-amz-copy-source")
    assert keys(s3, dst) == []
    # What the URL was signed for still works, with the payload hash header some clients add unsigned.
    body = b"what the signer meant"
    r = httpx.put(url, content=body, headers={"x-amz-content-sha256": "UNSIGNED-PAYLOAD"}, timeout=TIMEOUT)
    assert r.status_code == 200, r.content
    got = s3.get_object(Bucket=dst, Key="target")
    assert got["Body"].read() == body and got["Metadata"] == {}


def test_presigned_put_with_signed_metadata(s3, buckets) -> None:
    _, dst = buckets
    url = s3.generate_presigned_url("put_object", Params={"Bucket": dst, "Key": "m", "Metadata": {"k": "v"}},
                                    ExpiresIn=600)
    assert httpx.put(url, content=b"x", headers={"x-amz-meta-k": "v"}, timeout=TIMEOUT).status_code == 200
    assert s3.head_object(Bucket=dst, Key="m")["Metadata"] == {"k": "v"}


# ------------------------------------------------------------------ `+` in the query


def test_plus_is_a_space_to_signer_and_parser() -> None:
    pairs = parse_query("prefix=a+b&marker=c%2Bd&flag")
    assert pairs == [("prefix", "a b"), ("marker", "c+d"), ("flag", "")]
    assert canonical_query(pairs) == "flag=&marker=c%2Bd&prefix=a%20b"


def test_presigned_plus_cannot_stand_in_for_a_signed_percent_2b(s3, buckets) -> None:
    _, bkt = buckets
    for key in ("a+b/1", "a b/2"):
        s3.put_object(Bucket=bkt, Key=key, Body=b"x")
    url = s3.generate_presigned_url("list_objects_v2", Params={"Bucket": bkt, "Prefix": "a+b"}, ExpiresIn=600)
    assert "prefix=a%2Bb" in url
    r = httpx.get(url, timeout=TIMEOUT)  # botocore asks for encoding-type=url: keys come back escaped
    assert r.status_code == 200 and b"<KeyCount>1</KeyCount><" in r.content and b"<Key>a%2Bb/1</Key>" in r.content
    # A raw `+` means a space: not what was signed, so the signature no longer holds.
    r = httpx.get(url.replace("prefix=a%2Bb", "prefix=a+b"), timeout=TIMEOUT)
    assert r.status_code == 403 and b"<Code>SignatureDoesNotMatch</Code>" in r.content

    url = s3.generate_presigned_url("list_objects_v2", Params={"Bucket": bkt, "Prefix": "a b"}, ExpiresIn=600)
    assert "prefix=a%20b" in url
    for variant in (url, url.replace("prefix=a%20b", "prefix=a+b")):
        # `%20` and `+` are both a space, to the signature and to the listing alike.
        r = httpx.get(variant, timeout=TIMEOUT)
        assert r.status_code == 200, r.content
        assert b"<KeyCount>1</KeyCount><" in r.content and b"<Key>a%20b/2</Key>" in r.content


def test_presigned_response_override_plus_tampering_refused(s3, buckets) -> None:
    src, _ = buckets
    url = s3.generate_presigned_url("get_object", Params={"Bucket": src, "Key": "secret",
                                                          "ResponseContentType": "text/x+y"}, ExpiresIn=600)
    assert "response-content-type=text%2Fx%2By" in url
    r = httpx.get(url, timeout=TIMEOUT)
    assert r.status_code == 200 and r.headers["content-type"] == "text/x+y"
    r = httpx.get(url.replace("text%2Fx%2By", "text%2Fx+y"), timeout=TIMEOUT)
    assert r.status_code == 403 and b"<Code>SignatureDoesNotMatch</Code>" in r.content
    assert "content-type" not in r.headers or r.headers["content-type"] != "text/x y"


def test_boto3_copy_and_metadata_still_signed(s3, buckets) -> None:
    src, dst = buckets
    s3.copy_object(Bucket=dst, Key="c", CopySource={"Bucket": src, "Key": "secret"}, MetadataDirective="REPLACE",
                   Metadata={"m": "1"}, ContentType="text/plain")
    head = s3.head_object(Bucket=dst, Key="c")
    assert head["Metadata"] == {"m": "1"} and head["ContentType"] == "text/plain"
    with pytest.raises(ClientError) as e:
        s3.copy_object(Bucket=dst, Key="c2", CopySource={"Bucket": src, "Key": "missing"})
    assert e.value.response["Error"]["Code"] == "NoSuchKey"
