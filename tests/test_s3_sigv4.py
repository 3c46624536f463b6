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


# ------------------------------------------------------------------ the per-request shortcuts (s3put7)


def test_canonical_uri_shortcut_equals_s3_reencoding() -> None:
    """A plain path is taken as its own canonical URI without re-encoding it: only when it is one."""
    import urllib.parse

    from anvil.api.s3.auth import _canonical_uris

    for path in ["/b/small/000123", "/b/a-b_c.d~e/", "/", "", "/b/a%20b", "/b/a b", "/b/a+b", "/b/caf\u00e9",
                 "/b/a%2Fb", "/b/%7Etilde", "/b/a=b&c", "/b/\u00e9%C3%A9"]:
        reencoded = urllib.parse.quote(urllib.parse.unquote(path), safe="/~")
        assert _canonical_uris(path) == ([path] if reencoded == path else [path, reencoded]), path


def test_amz_date_kept_only_for_the_same_value() -> None:
    from anvil.api.s3.auth import parse_amz_date

    ts = parse_amz_date("20130524T000000Z")
    assert ts == WHEN and parse_amz_date("20130524T000000Z") == WHEN
    for bad in ["20131324T000000Z", "20130524T000000", "2013052 T000000Z"]:  # right after a valid one
        with pytest.raises(S3Error) as e:
            parse_amz_date(bad)
        assert e.value.code == "AccessDenied"
    assert parse_amz_date("20130524T000001Z") == WHEN + 1


def test_unsigned_amz_header_refused_and_named_once() -> None:
    """The unsigned x-amz-* check reads the request's x-amz-* headers (found once per request): a
    repeated unsigned header is named once, a signed one is not named."""
    from anvil.api.fastreq import FastRequest

    headers = [(b"host", b"h"), (b"x-amz-date", b"20130524T000000Z"), (b"x-amz-content-sha256", b"UNSIGNED-PAYLOAD"),
               (b"x-amz-meta-a", b"1"), (b"x-amz-meta-a", b"2"), (b"x-amz-tagging", b"k=v"),
               (b"authorization", f"AWS4-HMAC-SHA256 {CRED},SignedHeaders=host;x-amz-content-sha256;x-amz-date,"
                                  "Signature=00".encode())]
    scope = {"type": "http", "method": "PUT", "path": "/b/k", "raw_path": b"/b/k", "query_string": b"",
             "headers": headers}
    for request in (FastRequest(scope), Request(dict(scope))):
        with pytest.raises(S3Error) as e:
            authenticate(request, lookup, "us-east-1", now=WHEN)
        assert e.value.code == "AccessDenied" and e.value.fields["HeadersNotSigned"] == "x-amz-meta-a, x-amz-tagging"


def test_scope_matchers_agree_with_fnmatch() -> None:
    """Scopes are compiled to equality and prefix tests (every S3 request checks them): the same answers
    as fnmatchcase, including for patterns that are not a plain prefix."""
    import itertools
    from fnmatch import fnmatchcase

    from anvil.identity.scopes import allows, allows_any

    def reference(scope: str, action: str, resource: str) -> bool:
        if scope == "*":
            return True
        scope_action, _, scope_resource = scope.partition("|")
        return fnmatchcase(action, scope_action) and fnmatchcase(resource, scope_resource or "*")

    scopes = ["*", "object:*|bucket:b/*", "object:read|bucket:b/k", "object:*", "*|*", "object:read|", "|",
              "obj?ct:read|bucket:[ab]/*", "object:read|bucket:b*x", "object:read|bucket:b/\nk*", "*:read|bucket:*"]
    actions = ["object:read", "object:write", "", "objectXread"]
    resources = ["bucket:b/k", "bucket:b/k/x", "bucket:b", "bucket:a/z", "bucket:bx", "", "bucket:b/\nkz", "tenant:t"]
    for scope, action, resource in itertools.product(scopes, actions, resources):
        assert allows(scope, action, resource) == reference(scope, action, resource), (scope, action, resource)
    # A principal's scopes as a whole (what every request asks): any one of them, in any combination.
    for n in (0, 1, 2, 3):
        for combo in itertools.combinations(scopes, n):
            for action, resource in itertools.product(actions, resources):
                expected = any(reference(s, action, resource) for s in combo)
                assert allows_any(combo, action, resource) == expected, (combo, action, resource)
                assert allows_any(list(combo), action, resource) == expected


def test_app_state_attributes_read_set_and_deleted() -> None:
    from anvil.api.app import AppState

    state = AppState()
    state.x = 1
    assert state.x == 1 and "x" in state.__dict__ and state._state["x"] == 1
    state.x = 2
    assert state.x == 2 and state._state["x"] == 2
    del state.x
    with pytest.raises(AttributeError):
        _ = state.x
    assert "x" not in state._state


def test_plain_body_stream_marks_consumed_and_raises_on_disconnect() -> None:
    from starlette.requests import ClientDisconnect

    from anvil.api.s3.body import _stream

    request = make_request("PUT", "/b/k", {"Host": "h"}, b"abcdefghij", chunk=4)
    assert asyncio.run(_collect(_stream(request))) == [b"abcd", b"efgh", b"ij"]
    assert request._stream_consumed
    with pytest.raises(RuntimeError):  # read twice: Starlette's answer
        asyncio.run(_collect(_stream(request)))

    async def gone():
        return {"type": "http.disconnect"}

    request = Request(make_request("PUT", "/b/k", {"Host": "h"}).scope, gone)
    with pytest.raises(ClientDisconnect):
        asyncio.run(_collect(_stream(request)))
    assert request._is_disconnected


async def _collect(it) -> list[bytes]:
    return [p async for p in it]


def test_digests_without_lookups_agree_with_hashlib_and_hmac() -> None:
    """storage/digests.py (SigV4 signatures, small body digests) gives hashlib's and hmac's
    answers: keys shorter than, as long as and longer than a block, empty and multi-block messages."""
    import hashlib
    import hmac
    import os

    from anvil.storage.digests import HmacSha256, md5_hex, sha256_hex

    for data in (b"", b"a", os.urandom(63), os.urandom(64), os.urandom(1000), os.urandom(70_000)):
        assert sha256_hex(data) == hashlib.sha256(data).hexdigest()
        assert md5_hex(data) == hashlib.md5(data).hexdigest()
        for key in (b"", b"k", os.urandom(32), os.urandom(64), os.urandom(65), os.urandom(200)):
            mac = HmacSha256(key)
            assert mac.digest(data) == hmac.digest(key, data, "sha256")
            assert mac.digest(data) == hmac.digest(key, data, "sha256")  # the kept states are not consumed
