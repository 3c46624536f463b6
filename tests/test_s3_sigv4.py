"""The gateway's SigV4 verifier against AWS's published worked examples (independent of botocore)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from starlette.requests import Request

from anvil.api.s3.auth import authenticate
from anvil.api.s3.body import BodyReader
from anvil.api.s3.errors import S3Error
from anvil.context import DEV_PRINCIPAL

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
KEY = "AKIAIOSFODNN7EXAMPLE"
WHEN = datetime(2013, 5, 24, tzinfo=UTC).timestamp()
CRED = f"Credential={KEY}/20130524/us-east-1/s3/aws4_request"


def lookup(access_key: str):
    return (SECRET, DEV_PRINCIPAL) if access_key == KEY else None


def make_request(method: str, path: str, headers: dict[str, str], body: bytes = b"", chunk: int = 7000) -> Request:
    pieces = [body[i:i + chunk] for i in range(0, len(body), chunk)] or [b""]

    async def receive():
        data = pieces.pop(0) if pieces else b""
        return {"type": "http.request", "body": data, "more_body": bool(pieces)}

    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    return Request(scope, receive)


def test_aws_get_object_example() -> None:
    sig = "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    headers = {
        "Host": "examplebucket.s3.amazonaws.com", "Range": "bytes=0-9", "x-amz-date": "20130524T000000Z",
        "x-amz-content-sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "Authorization": f"AWS4-HMAC-SHA256 {CRED},SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,"
                         f"Signature={sig}",
    }
    result = authenticate(make_request("GET", "/test.txt", headers), lookup, "us-east-1", now=WHEN)
    assert result.principal == DEV_PRINCIPAL and result.seed_signature == sig
    headers["Range"] = "bytes=0-10"
    with pytest.raises(S3Error) as e:
        authenticate(make_request("GET", "/test.txt", headers), lookup, "us-east-1", now=WHEN)
    assert e.value.code == "SignatureDoesNotMatch"


def _chunked_example(sigs: list[str], sizes=(65536, 1024, 0)) -> tuple[Request, BodyReader]:
    body = b"".join(f"{n:x};chunk-signature={s}\r\n".encode() + b"a" * n + b"\r\n" for n, s in zip(sizes, sigs,
                                                                                                  strict=True))
    headers = {
        "Host": "s3.amazonaws.com", "x-amz-date": "20130524T000000Z", "x-amz-storage-class": "REDUCED_REDUNDANCY",
        "x-amz-content-sha256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD", "Content-Encoding": "aws-chunked",
        "x-amz-decoded-content-length": "66560", "Content-Length": "66824",
        "Authorization": f"AWS4-HMAC-SHA256 {CRED},SignedHeaders=content-encoding;content-length;host;"
                         "x-amz-content-sha256;x-amz-date;x-amz-decoded-content-length;x-amz-storage-class,"
                         "Signature=4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9",
    }
    request = make_request("PUT", "/examplebucket/chunkObject.txt", headers, body)
    auth = authenticate(request, lookup, "us-east-1", now=WHEN)
    return request, BodyReader(request, auth)


async def _drain(reader: BodyReader) -> bytes:
    return b"".join([p async for p in reader.pieces()])


DOC_SIGS = ["ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
            "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497",
            "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9"]


def test_aws_streaming_chunked_example() -> None:
    _, reader = _chunked_example(DOC_SIGS)
    assert asyncio.run(_drain(reader)) == b"a" * 66560


@pytest.mark.parametrize("which", [0, 1, 2])
def test_aws_streaming_example_with_one_bad_chunk_signature(which: int) -> None:
    sigs = list(DOC_SIGS)
    sigs[which] = sigs[which][:-1] + ("0" if sigs[which][-1] != "0" else "1")
    _, reader = _chunked_example(sigs)
    with pytest.raises(S3Error) as e:
        asyncio.run(_drain(reader))
    assert e.value.code == "SignatureDoesNotMatch"


def test_skew_and_region_checked_before_signature() -> None:
    headers = {"Host": "h", "x-amz-date": "20130524T000000Z", "x-amz-content-sha256": "UNSIGNED-PAYLOAD",
               "Authorization": f"AWS4-HMAC-SHA256 {CRED},SignedHeaders=host,Signature=00"}
    with pytest.raises(S3Error) as e:
        authenticate(make_request("GET", "/b/k", headers), lookup, "us-east-1", now=WHEN + 16 * 60)
    assert e.value.code == "RequestTimeTooSkewed"
    with pytest.raises(S3Error) as e:
        authenticate(make_request("GET", "/b/k", headers), lookup, "eu-west-1", now=WHEN)
    assert e.value.code == "AuthorizationHeaderMalformed" and e.value.fields["Region"] == "eu-west-1"
