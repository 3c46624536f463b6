"""Issue 18, item 4: the error and edge semantics moto cannot referee (it does not implement them, or
gets them wrong), each pinned to the AWS page named beside it. The differential half is
`test_error_semantics` in tests/test_s3_differential.py."""

from __future__ import annotations

import re
import urllib.parse

import httpx
import pytest

from tests.helpers import AnvilServer, unique_bucket
from tests.s3_helpers import dev_credentials
from tests.s3_sign import sign

TIMEOUT = 10
UNSIGNED = "UNSIGNED-PAYLOAD"


@pytest.fixture(scope="module")
def bkt(s3) -> str:
    name = unique_bucket("errs")
    s3.create_bucket(Bucket=name)
    return name


def signed(server: AnvilServer, method: str, path: str, *, headers: dict[str, str] | None = None,
           payload: str = UNSIGNED) -> dict[str, str]:
    h, _ = sign(method, server.endpoint + path, dev_credentials(server), headers=headers, payload_hash=payload)
    return h


def test_put_without_content_length_is_411(server: AnvilServer, s3, bkt: str) -> None:
    # AWS "Error responses": MissingContentLength, 411, "You must provide the Content-Length HTTP header."
    up = s3.create_multipart_upload(Bucket=bkt, Key="mp")["UploadId"]
    for path in (f"/{bkt}/no-length", f"/{bkt}/mp?partNumber=1&uploadId={up}"):
        r = httpx.put(server.endpoint + path, content=iter([b"chunked ", b"body"]),  # Transfer-Encoding: chunked
                      headers=signed(server, "PUT", path), timeout=TIMEOUT)
        assert r.status_code == 411 and b"<Code>MissingContentLength</Code>" in r.content, r.content
    assert s3.list_objects_v2(Bucket=bkt, Prefix="no-length")["KeyCount"] == 0
    assert s3.list_parts(Bucket=bkt, Key="mp", UploadId=up).get("Parts", []) == []
    s3.abort_multipart_upload(Bucket=bkt, Key="mp", UploadId=up)


@pytest.mark.parametrize(("expires", "message"), [
    ("0", "X-Amz-Expires must be at least 1 second"),
    ("-1", "X-Amz-Expires must be non-negative"),
    ("soon", "X-Amz-Expires should be a number"),
    ("604801", "X-Amz-Expires must be less than a week (in seconds) that is 604800"),
])
def test_presigned_x_amz_expires_edges(server: AnvilServer, s3, bkt: str, expires: str, message: str) -> None:
    # AWS "Authenticating Requests: Using Query Parameters (AWS Signature Version 4)": X-Amz-Expires is
    # 1 to 604800 seconds; S3 answers AuthorizationQueryParametersError with these messages.
    s3.put_object(Bucket=bkt, Key="p", Body=b"p")
    url = s3.generate_presigned_url("get_object", Params={"Bucket": bkt, "Key": "p"}, ExpiresIn=600)
    assert httpx.get(url, timeout=TIMEOUT).status_code == 200
    week = s3.generate_presigned_url("get_object", Params={"Bucket": bkt, "Key": "p"}, ExpiresIn=604800)
    assert httpx.get(week, timeout=TIMEOUT).status_code == 200
    bad = re.sub(r"X-Amz-Expires=\d+", f"X-Amz-Expires={urllib.parse.quote(expires)}", url)
    r = httpx.get(bad, timeout=TIMEOUT)
    assert r.status_code == 400 and b"<Code>AuthorizationQueryParametersError</Code>" in r.content
    assert message.encode() in r.content


def test_unicode_and_rfc2047_metadata(server: AnvilServer, s3, bkt: str) -> None:
    # AWS "Working with object metadata" (user-defined metadata): values with non-US-ASCII characters are
    # decoded per RFC 2047 before storing and encoded per RFC 2047 (mail-safe) when returned; US-ASCII
    # values are returned as they are.
    cases = {
        "raw-utf8": ("café ☕".encode().decode("latin-1"), "=?UTF-8?Q?caf=C3=A9_=E2=98=95?="),
        "b-word": ("=?UTF-8?B?Y2Fmw6k=?=", "=?UTF-8?Q?caf=C3=A9?="),
        "q-word": ("=?utf-8?q?caf=C3=A9?=", "=?UTF-8?Q?caf=C3=A9?="),
        "ascii": ("plain value", "plain value"),
        "ascii-word": ("=?UTF-8?Q?plain?=", "plain"),
    }
    for name, (sent, _) in cases.items():
        path = f"/{bkt}/meta-{name}"
        headers = signed(server, "PUT", path, headers={"x-amz-meta-v": sent})
        r = httpx.put(server.endpoint + path, content=b"m", timeout=TIMEOUT,
                      headers={k: val.encode("latin-1") for k, val in headers.items()})  # the raw UTF-8 bytes
        assert r.status_code == 200, r.content
    for name, (_, returned) in cases.items():
        assert s3.head_object(Bucket=bkt, Key=f"meta-{name}")["Metadata"] == {"v": returned}, name


def test_control_character_keys_listed(server: AnvilServer, s3, bkt: str) -> None:
    # AWS "Object key naming guidelines" (XML related object key constraints): a CR in a key is sent as
    # &#13; so XML end-of-line normalisation cannot turn it into LF; other controls likewise as character
    # references. With encoding-type=url they are percent-encoded.
    keys = ["ctl/a\rb", "ctl/tab\there", "ctl/x\x01y\x7f", "ctl/line\nfeed"]
    for k in keys:
        s3.put_object(Bucket=bkt, Key=k, Body=b"c")
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bkt, Prefix="ctl/")["Contents"]] == sorted(keys)
    for query in ("list-type=2&prefix=ctl%2F", "prefix=ctl%2F", "versions&prefix=ctl%2F"):
        path = f"/{bkt}?{query}"
        body = httpx.get(server.endpoint + path, headers=signed(server, "GET", path), timeout=TIMEOUT).content
        found = re.findall(rb"<Key>(.*?)</Key>", body, re.S)
        assert found == [b"ctl/a&#xD;b", b"ctl/line\nfeed", b"ctl/tab\there", b"ctl/x&#x1;y&#x7F;"], (query, body)
        path += "&encoding-type=url"
        body = httpx.get(server.endpoint + path, headers=signed(server, "GET", path), timeout=TIMEOUT).content
        found = re.findall(rb"<Key>(.*?)</Key>", body, re.S)
        assert [urllib.parse.unquote(k.decode()) for k in found] == sorted(keys)


def test_vanished_version_id_marker_continues_the_listing(s3) -> None:
    # AWS ListObjectVersions API reference: the listing resumes after (key-marker, version-id-marker) in
    # S3's order; the marker names a position, so a marker version deleted between pages still resumes
    # there (moto answers an empty page instead).
    b = unique_bucket("vmark")
    s3.create_bucket(Bucket=b)
    s3.put_bucket_versioning(Bucket=b, VersioningConfiguration={"Status": "Enabled"})
    vids = [s3.put_object(Bucket=b, Key="a", Body=b"%d" % i)["VersionId"] for i in range(3)]
    s3.put_object(Bucket=b, Key="b", Body=b"b")
    page = s3.list_object_versions(Bucket=b, MaxKeys=2)
    assert page["IsTruncated"] and page["NextVersionIdMarker"] == vids[1]
    s3.delete_object(Bucket=b, Key="a", VersionId=vids[1])
    rest = s3.list_object_versions(Bucket=b, KeyMarker=page["NextKeyMarker"],
                                   VersionIdMarker=page["NextVersionIdMarker"])
    assert [(v["Key"], v["VersionId"]) for v in rest["Versions"]][0] == ("a", vids[0])
    assert [v["Key"] for v in rest["Versions"]] == ["a", "b"] and not rest["IsTruncated"]


# ------------------------------------------------------------------ every operation accounted for


def _operations() -> list[tuple[str, str, str, list[str]]]:
    """(name, method, request URI, query sub-resources) of every operation in botocore's S3 model."""
    import botocore.session

    model = botocore.session.get_session().get_service_model("s3")
    out = []
    for name in model.operation_names:
        http = model.operation_model(name).http
        query = http["requestUri"].partition("?")[2]
        out.append((name, http["method"], http["requestUri"],
                    [p.split("=")[0] for p in query.split("&") if p and not p.startswith("x-id")]))
    return out


def test_every_operation_is_routed_or_not_implemented() -> None:
    """No S3 operation falls through to another: each sub-resource in botocore's model is either served
    (the dispatch table) or answered NotImplemented (a PUT ?abac must not become a CreateBucket)."""
    from anvil.api.s3.dispatch import ROUTES
    from anvil.api.s3.gateway import UNSUPPORTED_SUBRESOURCES

    routed = {sub.split("=")[0] for _, _, sub, _ in ROUTES if sub}
    # select-type is SelectObjectContent's second parameter; `select` already refuses it.
    loose = [(name, subs) for name, _, _, subs in _operations()
             if any(s not in routed and s not in UNSUPPORTED_SUBRESOURCES and s != "select-type" for s in subs)]
    assert loose == []


def test_compatibility_table_names_every_operation() -> None:
    """docs/s3.md's compatibility table names every operation of botocore's S3 model (issue 18)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "s3.md").read_text()
    table = text[text.index("## Compatibility"):text.index("## Edge semantics")]
    named = set()
    # `Get/Put/DeleteBucketTagging` names GetBucketTagging, PutBucketTagging and DeleteBucketTagging.
    for m in re.finditer(r"((?:[A-Z][a-z]+/)*)([A-Z][a-z]+)([A-Za-z0-9]*)", table):
        for verb in [v for v in m.group(1).split("/") if v] + [m.group(2)]:
            named.add(verb + m.group(3))
    assert [name for name, *_ in _operations() if name not in named] == []


def test_not_implemented_operations_answer_501_and_change_nothing(server: AnvilServer, s3, bkt: str) -> None:
    """Every operation answered NotImplemented, sent as botocore would address it: 501 NotImplemented,
    never a 500, never a silent success, and the bucket and its object untouched."""
    from anvil.api.s3.gateway import UNSUPPORTED_SUBRESOURCES

    s3.put_object(Bucket=bkt, Key="keep", Body=b"kept")
    tried = []
    for name, method, uri, subs in _operations():
        if not subs or not set(subs) & UNSUPPORTED_SUBRESOURCES:
            continue
        path = uri.partition("?")[0].replace("{Bucket}", bkt).replace("{Key+}", "keep")
        query = uri.partition("?")[2].replace("&x-id=" + name, "")
        url = f"{server.endpoint}{path}?{query}"
        body = b"<Document/>" if method in ("PUT", "POST") else b""
        headers = signed(server, method, f"{path}?{query}")
        r = httpx.request(method, url, content=body, headers=headers, timeout=TIMEOUT)
        assert r.status_code == 501 and b"<Code>NotImplemented</Code>" in r.content, (name, r.status_code, r.content)
        tried.append(name)
    assert len(tried) >= 50, tried
    assert s3.get_object(Bucket=bkt, Key="keep")["Body"].read() == b"kept"
