"""Bucket CORS against a real server: the configuration through boto3, then what a browser does for a
cross-origin upload: a preflight OPTIONS with real Origin / Access-Control-Request-* headers, then the
presigned PUT itself with its Origin, and the headers the browser checks on both answers."""

from __future__ import annotations

import httpx
import pytest
from botocore.exceptions import ClientError

from tests.helpers import AnvilServer, unique_bucket

TIMEOUT = 10
APP = "https://app.example.test"


@pytest.fixture(scope="module")
def bkt(s3) -> str:
    name = unique_bucket("cors")
    s3.create_bucket(Bucket=name)
    return name


def test_cors_configuration_round_trip(s3, bkt: str) -> None:
    with pytest.raises(ClientError) as e:
        s3.get_bucket_cors(Bucket=bkt)
    assert e.value.response["Error"]["Code"] == "NoSuchCORSConfiguration"
    rules = [{"ID": "uploads", "AllowedOrigins": [APP, "https://*.example.org"], "AllowedMethods": ["PUT", "GET"],
              "AllowedHeaders": ["content-type", "x-amz-*"], "ExposeHeaders": ["ETag"], "MaxAgeSeconds": 600},
             {"AllowedOrigins": ["*"], "AllowedMethods": ["GET"]}]
    s3.put_bucket_cors(Bucket=bkt, CORSConfiguration={"CORSRules": rules})
    assert s3.get_bucket_cors(Bucket=bkt)["CORSRules"] == rules
    with pytest.raises(ClientError) as e:
        s3.put_bucket_cors(Bucket=bkt, CORSConfiguration={"CORSRules": [
            {"AllowedOrigins": ["*"], "AllowedMethods": ["PATCH"]}]})
    assert e.value.response["Error"]["Code"] == "InvalidRequest"
    assert s3.get_bucket_cors(Bucket=bkt)["CORSRules"] == rules  # a refused document changes nothing


def test_browser_preflight_then_presigned_put(server: AnvilServer, s3, bkt: str) -> None:
    s3.put_bucket_cors(Bucket=bkt, CORSConfiguration={"CORSRules": [
        {"AllowedOrigins": [APP], "AllowedMethods": ["PUT", "GET"], "AllowedHeaders": ["content-type", "x-amz-*"],
         "ExposeHeaders": ["ETag", "x-amz-version-id"], "MaxAgeSeconds": 600},
        {"AllowedOrigins": ["*"], "AllowedMethods": ["GET"]}]})
    url = s3.generate_presigned_url("put_object", Params={"Bucket": bkt, "Key": "upload.txt"}, ExpiresIn=300)
    # What Chrome sends before a fetch(url, {method: "PUT", headers: {"Content-Type": "text/plain"}}).
    pre = httpx.options(url, headers={"Origin": APP, "Access-Control-Request-Method": "PUT",
                                      "Access-Control-Request-Headers": "content-type",
                                      "Sec-Fetch-Mode": "cors", "User-Agent": "Mozilla/5.0"}, timeout=TIMEOUT)
    assert pre.status_code == 200, pre.content
    assert pre.headers["access-control-allow-origin"] == APP
    assert "PUT" in pre.headers["access-control-allow-methods"].split(", ")
    assert pre.headers["access-control-allow-headers"] == "content-type"
    assert pre.headers["access-control-max-age"] == "600"
    assert pre.headers["access-control-allow-credentials"] == "true"
    assert "Origin" in pre.headers["vary"]
    put = httpx.put(url, content=b"from the browser", headers={"Origin": APP, "Content-Type": "text/plain"},
                    timeout=TIMEOUT)
    assert put.status_code == 200, put.content
    assert put.headers["access-control-allow-origin"] == APP
    assert put.headers["access-control-expose-headers"] == "ETag, x-amz-version-id"
    got = s3.get_object(Bucket=bkt, Key="upload.txt")
    assert got["Body"].read() == b"from the browser" and got["ContentType"] == "text/plain"
    # Any origin may GET (second rule): "*", and no credentials.
    get_url = s3.generate_presigned_url("get_object", Params={"Bucket": bkt, "Key": "upload.txt"}, ExpiresIn=300)
    r = httpx.get(get_url, headers={"Origin": "https://elsewhere.test"}, timeout=TIMEOUT)
    assert r.headers["access-control-allow-origin"] == "*" and "access-control-allow-credentials" not in r.headers


@pytest.mark.parametrize(("headers", "status"), [
    ({"Origin": "https://evil.test", "Access-Control-Request-Method": "PUT"}, 403),
    ({"Origin": APP, "Access-Control-Request-Method": "DELETE"}, 403),
    ({"Origin": APP, "Access-Control-Request-Method": "PUT", "Access-Control-Request-Headers": "x-custom"}, 403),
    ({"Access-Control-Request-Method": "PUT"}, 400),
    ({"Origin": APP}, 400),
])
def test_preflight_refusals(server: AnvilServer, s3, bkt: str, headers: dict[str, str], status: int) -> None:
    s3.put_bucket_cors(Bucket=bkt, CORSConfiguration={"CORSRules": [
        {"AllowedOrigins": [APP], "AllowedMethods": ["PUT"], "AllowedHeaders": ["content-type"]}]})
    r = httpx.options(f"{server.endpoint}/{bkt}/k", headers=headers, timeout=TIMEOUT)
    assert r.status_code == status, r.content
    assert "access-control-allow-origin" not in r.headers


def test_no_cors_configuration(server: AnvilServer, s3) -> None:
    b = unique_bucket("nocors")
    s3.create_bucket(Bucket=b)
    r = httpx.options(f"{server.endpoint}/{b}/k", headers={"Origin": APP, "Access-Control-Request-Method": "GET"},
                      timeout=TIMEOUT)
    assert r.status_code == 403 and b"CORS is not enabled for this bucket" in r.content
    s3.put_bucket_cors(Bucket=b, CORSConfiguration={
        "CORSRules": [{"AllowedOrigins": ["*"], "AllowedMethods": ["GET"]}]})
    s3.delete_bucket_cors(Bucket=b)
    r = httpx.options(f"{server.endpoint}/{b}/k", headers={"Origin": APP, "Access-Control-Request-Method": "GET"},
                      timeout=TIMEOUT)
    assert r.status_code == 403
    r = httpx.options(f"{server.endpoint}/no-such-bucket-cors/k",
                      headers={"Origin": APP, "Access-Control-Request-Method": "GET"}, timeout=TIMEOUT)
    assert r.status_code == 404
