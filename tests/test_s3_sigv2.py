"""Signature Version 2 against a real server: aws-cli 1.x `aws s3 presign` fetched with curl and
httpx, boto3's SigV2 signers (header and query, botocore's HmacV1Auth/HmacV1QueryAuth, independent
of the server's code), s3cmd with `signature_v2 = True`, and SigV4's rules applied to SigV2: expiry,
signed sub-resources, no x-amz-* header the signer did not sign."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
from email.utils import formatdate
from pathlib import Path

import boto3
import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from anvil.api.s3 import dispatch, sigv2
from tests.helpers import AnvilServer, unique_bucket
from tests.s3_helpers import REGION, aws_env, dev_credentials, s3_client

TIMEOUT = 10
BASE_DOMAIN = "s3.anvil.test"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """The module's one server, with virtual-host style on (SigV2 signs the bucket from the Host)."""
    srv = AnvilServer(tmp_path_factory.mktemp("sigv2") / "data", env={"ANVIL_S3_BASE_DOMAIN": BASE_DOMAIN}).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def s3(server: AnvilServer):
    return s3_client(server)


@pytest.fixture(scope="module")
def v2(server: AnvilServer):
    """A boto3 client signing every request with SigV2 (`Authorization: AWS key:signature`)."""
    creds = dev_credentials(server)
    return boto3.client("s3", endpoint_url=server.endpoint, region_name=REGION,
                        aws_access_key_id=creds["access_key_id"], aws_secret_access_key=creds["secret_access_key"],
                        config=Config(signature_version="s3", s3={"addressing_style": "path"},
                                      retries={"max_attempts": 1, "mode": "standard"}))


@pytest.fixture(scope="module")
def bkt(s3) -> str:
    name = unique_bucket("sigv2")
    s3.create_bucket(Bucket=name)
    s3.put_object(Bucket=name, Key="dir/hello world.txt", Body=b"hello v2", ContentType="text/plain")
    return name


def v2_sign(secret: str, string_to_sign: str) -> str:
    """SigV2 by the RESTAuthentication page, written out here (not the server's code)."""
    return base64.b64encode(hmac.new(secret.encode(), string_to_sign.encode(), hashlib.sha1).digest()).decode()


def presigned(server: AnvilServer, method: str, path: str, *, expires: int, sub: str = "",
              headers: str = "", query: str = "") -> str:
    creds = dev_credentials(server)
    sig = v2_sign(creds["secret_access_key"], f"{method}\n\n\n{expires}\n{headers}{path}{sub}")
    q = urllib.parse.urlencode({"AWSAccessKeyId": creds["access_key_id"], "Expires": expires, "Signature": sig})
    extra = sub.lstrip("?")
    return f"{server.endpoint}{path}?{q}" + (f"&{extra}" if extra else "") + (f"&{query}" if query else "")


def aws_presign(server: AnvilServer, url: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "awscli", "s3", "presign", url, *args], env=aws_env(server),
                          capture_output=True, text=True, timeout=60, check=True)
    return proc.stdout.strip()


# ------------------------------------------------------------------ aws-cli 1.x presign


def test_aws_cli_presign_fetched_with_curl_and_httpx(server: AnvilServer, bkt: str) -> None:
    url = aws_presign(server, f"s3://{bkt}/dir/hello world.txt", "--expires-in", "300")
    assert "AWSAccessKeyId=" in url and "Signature=" in url and "X-Amz-" not in url  # SigV2, as 1.x makes it
    r = httpx.get(url, timeout=TIMEOUT)
    assert r.status_code == 200 and r.content == b"hello v2" and r.headers["content-type"] == "text/plain"
    curl = subprocess.run(["curl", "-sS", "-f", url], capture_output=True, timeout=30)
    assert curl.returncode == 0 and curl.stdout == b"hello v2", curl.stderr
    # The same URL for another key, or with a sub-resource added, is no longer what was signed.
    other = url.replace("hello%20world.txt", "other.txt")
    r = httpx.get(other, timeout=TIMEOUT)
    assert r.status_code == 403 and b"<Code>SignatureDoesNotMatch</Code>" in r.content
    r = httpx.get(url + "&versionId=null", timeout=TIMEOUT)
    assert r.status_code == 403 and b"<Code>SignatureDoesNotMatch</Code>" in r.content
    # An x-amz-* header the signer never saw is not signed: refused.
    r = httpx.get(url, headers={"x-amz-checksum-mode": "ENABLED"}, timeout=TIMEOUT)
    assert r.status_code == 403 and b"<Code>SignatureDoesNotMatch</Code>" in r.content


def test_aws_cli_presign_expiry(server: AnvilServer, bkt: str) -> None:
    url = aws_presign(server, f"s3://{bkt}/dir/hello world.txt", "--expires-in", "1")
    time.sleep(2.1)
    r = httpx.get(url, timeout=TIMEOUT)
    assert r.status_code == 403 and b"<Code>AccessDenied</Code>" in r.content and b"Request has expired" in r.content


# ------------------------------------------------------------------ presigned query, hand-signed


def test_presigned_expires_edges(server: AnvilServer, bkt: str) -> None:
    path = f"/{bkt}/dir/hello%20world.txt"
    now = int(time.time())
    assert httpx.get(presigned(server, "GET", path, expires=now + 60), timeout=TIMEOUT).status_code == 200
    r = httpx.get(presigned(server, "GET", path, expires=now - 5), timeout=TIMEOUT)
    assert r.status_code == 403 and b"Request has expired" in r.content
    # Further ahead than SigV4's longest presign (7 days) plus the clock skew: refused as SigV4 would.
    r = httpx.get(presigned(server, "GET", path, expires=now + 7 * 86400 + 3600), timeout=TIMEOUT)
    assert r.status_code == 400 and b"<Code>AuthorizationQueryParametersError</Code>" in r.content
    assert httpx.get(presigned(server, "GET", path, expires=now + 7 * 86400), timeout=TIMEOUT).status_code == 200
    creds = dev_credentials(server)
    for q in ("AWSAccessKeyId=x&Signature=y", f"AWSAccessKeyId={creds['access_key_id']}&Signature=y&Expires=soon"):
        r = httpx.get(f"{server.endpoint}{path}?{q}", timeout=TIMEOUT)
        assert r.status_code == 400 and b"<Code>AuthorizationQueryParametersError</Code>" in r.content
    r = httpx.get(f"{server.endpoint}{path}?AWSAccessKeyId=nobody&Signature=abc&Expires={now + 60}",
                  timeout=TIMEOUT)
    assert r.status_code == 403 and b"<Code>InvalidAccessKeyId</Code>" in r.content


def test_presigned_put_signed_headers_and_subresources(server: AnvilServer, s3, bkt: str) -> None:
    exp = int(time.time()) + 120
    url = presigned(server, "PUT", f"/{bkt}/up", expires=exp)
    r = httpx.put(url, content=b"uploaded", timeout=TIMEOUT)
    assert r.status_code == 200, r.content
    assert s3.get_object(Bucket=bkt, Key="up")["Body"].read() == b"uploaded"
    # A presigned PUT cannot be turned into a copy or store metadata the signer did not choose.
    for extra in ({"x-amz-copy-source": f"/{bkt}/dir/hello%20world.txt"}, {"x-amz-meta-evil": "1"}):
        r = httpx.put(url, content=b"", headers=extra, timeout=TIMEOUT)
        assert r.status_code == 403 and b"<Code>SignatureDoesNotMatch</Code>" in r.content, r.content
    # Signed x-amz-* headers are honoured.
    url = presigned(server, "PUT", f"/{bkt}/meta", expires=exp, headers="x-amz-meta-team:core\n")
    assert httpx.put(url, content=b"m", headers={"x-amz-meta-team": "core"}, timeout=TIMEOUT).status_code == 200
    assert s3.head_object(Bucket=bkt, Key="meta")["Metadata"] == {"team": "core"}
    # A signed sub-resource routes; the same request without it signed does not authenticate.
    up = s3.create_multipart_upload(Bucket=bkt, Key="mp")["UploadId"]
    url = presigned(server, "PUT", f"/{bkt}/mp", expires=exp, sub=f"?partNumber=1&uploadId={up}")
    r = httpx.put(url, content=b"part", timeout=TIMEOUT)
    assert r.status_code == 200, r.content
    assert [p["PartNumber"] for p in s3.list_parts(Bucket=bkt, Key="mp", UploadId=up)["Parts"]] == [1]
    unsigned = presigned(server, "PUT", f"/{bkt}/mp", expires=exp, query=f"partNumber=2&uploadId={up}")
    r = httpx.put(unsigned, content=b"part", timeout=TIMEOUT)
    assert r.status_code == 403 and b"<Code>SignatureDoesNotMatch</Code>" in r.content
    s3.abort_multipart_upload(Bucket=bkt, Key="mp", UploadId=up)


def test_every_routed_subresource_is_signed() -> None:
    # A query name the gateway routes on but SigV2 did not sign would let a presigned URL be re-aimed.
    routed = {sub.partition("=")[0] for _m, _s, sub, _h in dispatch.ROUTES if sub is not None}
    assert routed - sigv2.SUBRESOURCES == {"list-type"}  # a listing parameter, like prefix: never signed


# ------------------------------------------------------------------ header auth


def test_boto3_sigv2_header_operations(v2, bkt: str) -> None:
    b = unique_bucket("v2ops")
    v2.create_bucket(Bucket=b)
    v2.put_object(Bucket=b, Key="a b+c.txt", Body=b"v2 body", Metadata={"k": "v"})
    got = v2.get_object(Bucket=b, Key="a b+c.txt", ResponseContentType="application/x-test")
    assert got["Body"].read() == b"v2 body" and got["ContentType"] == "application/x-test"
    assert got["Metadata"] == {"k": "v"}
    assert [o["Key"] for o in v2.list_objects_v2(Bucket=b, Prefix="a")["Contents"]] == ["a b+c.txt"]
    v2.put_bucket_versioning(Bucket=b, VersioningConfiguration={"Status": "Enabled"})
    assert v2.get_bucket_versioning(Bucket=b)["Status"] == "Enabled"
    up = v2.create_multipart_upload(Bucket=b, Key="big")["UploadId"]
    e1 = v2.upload_part(Bucket=b, Key="big", UploadId=up, PartNumber=1, Body=b"x" * (5 * 1024 * 1024))["ETag"]
    e2 = v2.upload_part(Bucket=b, Key="big", UploadId=up, PartNumber=2, Body=b"tail")["ETag"]
    v2.complete_multipart_upload(Bucket=b, Key="big", UploadId=up, MultipartUpload={
        "Parts": [{"PartNumber": 1, "ETag": e1}, {"PartNumber": 2, "ETag": e2}]})
    assert v2.head_object(Bucket=b, Key="big")["ContentLength"] == 5 * 1024 * 1024 + 4
    v2.copy_object(Bucket=b, Key="copy", CopySource={"Bucket": b, "Key": "a b+c.txt"})
    deleted = v2.delete_objects(Bucket=b, Delete={"Objects": [{"Key": "a b+c.txt"}, {"Key": "copy"}]})
    assert len(deleted["Deleted"]) == 2


def test_header_auth_refusals(server: AnvilServer, bkt: str) -> None:
    creds = dev_credentials(server)
    url = f"{server.endpoint}/{bkt}/dir/hello%20world.txt"

    def get(date: str, *, secret: str = creds["secret_access_key"], key: str = creds["access_key_id"],
            extra: dict[str, str] | None = None, signed_extra: str = "") -> httpx.Response:
        sig = v2_sign(secret, f"GET\n\n\n{date}\n{signed_extra}/{bkt}/dir/hello%20world.txt")
        return httpx.get(url, headers={"Date": date, "Authorization": f"AWS {key}:{sig}", **(extra or {})},
                         timeout=TIMEOUT)

    assert get(formatdate(usegmt=True)).status_code == 200
    r = get(formatdate(time.time() - 3600, usegmt=True))
    assert r.status_code == 403 and b"<Code>RequestTimeTooSkewed</Code>" in r.content
    r = get(formatdate(usegmt=True), secret="wrong")
    assert r.status_code == 403 and b"<Code>SignatureDoesNotMatch</Code>" in r.content
    r = get(formatdate(usegmt=True), key="AKIDEXAMPLE")
    assert r.status_code == 403 and b"<Code>InvalidAccessKeyId</Code>" in r.content
    r = get(formatdate(usegmt=True), extra={"x-amz-meta-x": "1"})
    assert r.status_code == 403 and b"<Code>SignatureDoesNotMatch</Code>" in r.content
    assert get(formatdate(usegmt=True), extra={"x-amz-meta-x": "1"}, signed_extra="x-amz-meta-x:1\n"
               ).status_code == 200
    r = httpx.get(url, headers={"Authorization": f"AWS {creds['access_key_id']}:abc"}, timeout=TIMEOUT)
    assert r.status_code == 403 and b"valid Date or x-amz-date" in r.content


def test_virtual_host_style_signs_the_bucket(server: AnvilServer, bkt: str) -> None:
    # RESTAuthentication: the CanonicalizedResource of a virtual-hosted request starts with /BUCKET.
    creds = dev_credentials(server)
    host = f"{bkt}.{BASE_DOMAIN}:{server.port}"
    for resource, status in ((f"/{bkt}/dir/hello%20world.txt", 200), ("/dir/hello%20world.txt", 403)):
        date = formatdate(usegmt=True)
        sig = v2_sign(creds["secret_access_key"], f"GET\n\n\n{date}\n{resource}")
        r = httpx.get(f"{server.endpoint}/dir/hello%20world.txt", timeout=TIMEOUT,
                      headers={"Host": host, "Date": date, "Authorization": f"AWS {creds['access_key_id']}:{sig}"})
        assert r.status_code == status, (resource, r.content)
    date = formatdate(usegmt=True)  # the bucket itself: /BUCKET/
    sig = v2_sign(creds["secret_access_key"], f"GET\n\n\n{date}\n/{bkt}/")
    r = httpx.get(f"{server.endpoint}/?prefix=dir", timeout=TIMEOUT,
                  headers={"Host": host, "Date": date, "Authorization": f"AWS {creds['access_key_id']}:{sig}"})
    assert r.status_code == 200 and b"<Key>dir/hello world.txt</Key>" in r.content


# ------------------------------------------------------------------ s3cmd


def _s3cmd() -> str | None:
    beside = Path(sys.executable).parent / "s3cmd"
    return str(beside) if beside.exists() else shutil.which("s3cmd")


@pytest.mark.skipif(_s3cmd() is None, reason="s3cmd is not installed: `pip install -e .[dev]` installs it")
def test_s3cmd_signature_v2(server: AnvilServer, tmp_path: Path) -> None:
    creds = dev_credentials(server)
    host = server.endpoint.removeprefix("http://")
    cfg = tmp_path / "s3cfg"
    # host_bucket without %(bucket)s: path-style requests, as for any endpoint without wildcard DNS.
    cfg.write_text(f"[default]\naccess_key = {creds['access_key_id']}\nsecret_key = {creds['secret_access_key']}\n"
                   f"host_base = {host}\nhost_bucket = {host}\nuse_https = False\nsignature_v2 = True\n"
                   f"bucket_location = {REGION}\ncheck_ssl_certificate = False\n")

    def s3cmd(*args: str) -> str:
        proc = subprocess.run([sys.executable, _s3cmd(), "-c", str(cfg), "--no-progress", *args],
                              capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
        assert proc.returncode == 0, f"s3cmd {args}: {proc.stdout}\n{proc.stderr}"
        return proc.stdout

    b = unique_bucket("s3cmd")
    s3cmd("mb", f"s3://{b}")
    small, big = tmp_path / "small.txt", tmp_path / "big.bin"
    small.write_bytes(b"from s3cmd")
    big.write_bytes(os.urandom(6 * 1024 * 1024))
    s3cmd("put", str(small), f"s3://{b}/dir/small file.txt")
    s3cmd("put", "--multipart-chunk-size-mb=5", str(big), f"s3://{b}/big.bin")  # two parts
    listing = s3cmd("ls", "--recursive", f"s3://{b}")
    assert "dir/small file.txt" in listing and "big.bin" in listing
    s3cmd("get", f"s3://{b}/big.bin", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()
    s3cmd("get", f"s3://{b}/dir/small file.txt", str(tmp_path / "back.txt"))
    assert (tmp_path / "back.txt").read_bytes() == b"from s3cmd"
    url = s3cmd("signurl", f"s3://{b}/dir/small file.txt", f"+{300}").strip()
    assert httpx.get(url, timeout=TIMEOUT).content == b"from s3cmd"
    s3cmd("del", "--recursive", "--force", f"s3://{b}")
    s3cmd("rb", f"s3://{b}")
    with pytest.raises(ClientError):
        boto3.client("s3", endpoint_url=server.endpoint, region_name=REGION,
                     aws_access_key_id=creds["access_key_id"], aws_secret_access_key=creds["secret_access_key"],
                     config=Config(signature_version="s3v4", s3={"addressing_style": "path"})).head_bucket(Bucket=b)
