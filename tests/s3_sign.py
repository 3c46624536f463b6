"""Hand-built signed S3 requests for the tests: botocore's SigV4 signer with a chosen clock and
payload mode, plus aws-chunked bodies with per-chunk signatures computed here (botocore only
implements those in its CRT path). Independent of the server's own signing code."""

from __future__ import annotations

import hashlib
import hmac
import zlib
from base64 import b64encode
from datetime import UTC, datetime

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

EMPTY = hashlib.sha256(b"").hexdigest()


class _Signer(S3SigV4Auth):
    def __init__(self, creds: Credentials, region: str, payload_hash: str, when: datetime):
        super().__init__(creds, "s3", region)
        self._payload_hash = payload_hash
        self._when = when

    def payload(self, request):  # noqa: D401 - botocore hook
        return self._payload_hash

    def add_auth(self, request):
        request.context["timestamp"] = self._when.strftime("%Y%m%dT%H%M%SZ")
        self._modify_request_before_signing(request)
        canonical = self.canonical_request(request)
        string_to_sign = self.string_to_sign(request, canonical)
        self.last_signature = self.signature(string_to_sign, request)
        self._inject_signature_to_request(request, self.last_signature)


def sign(method: str, url: str, creds: dict[str, str], *, headers: dict[str, str] | None = None,
         payload_hash: str | None = None, body: bytes = b"", region: str = "us-east-1",
         when: datetime | None = None) -> tuple[dict[str, str], str]:
    """Return (headers to send, seed signature)."""
    when = when or datetime.now(UTC)
    req = AWSRequest(method=method, url=url, headers=dict(headers or {}), data=body)
    signer = _Signer(Credentials(creds["access_key_id"], creds["secret_access_key"]), region,
                     payload_hash or hashlib.sha256(body).hexdigest(), when)
    signer.add_auth(req)
    return dict(req.headers.items()), signer.last_signature


def signing_key(secret: str, when: datetime, region: str = "us-east-1") -> bytes:
    k = hmac.new(("AWS4" + secret).encode(), when.strftime("%Y%m%d").encode(), hashlib.sha256).digest()
    for part in (region, "s3", "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    return k


def signed_chunked_body(data: bytes, chunk_size: int, seed: str, secret: str, when: datetime,
                        region: str = "us-east-1") -> list[bytes]:
    """aws-chunked framing with STREAMING-AWS4-HMAC-SHA256-PAYLOAD chunk signatures, as pieces."""
    key = signing_key(secret, when, region)
    scope = f"{when.strftime('%Y%m%d')}/{region}/s3/aws4_request"
    stamp = when.strftime("%Y%m%dT%H%M%SZ")
    previous = seed
    out = []
    chunks = [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)] + [b""]
    for chunk in chunks:
        to_sign = "\n".join(["AWS4-HMAC-SHA256-PAYLOAD", stamp, scope, previous, EMPTY,
                             hashlib.sha256(chunk).hexdigest()])
        previous = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        out.append(f"{len(chunk):x};chunk-signature={previous}\r\n".encode() + chunk + b"\r\n")
    return out


def unsigned_trailer_body(data: bytes, chunk_size: int, trailer_name: str, trailer_value: str) -> bytes:
    out = b""
    for i in range(0, len(data), chunk_size):
        chunk = data[i:i + chunk_size]
        out += f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    return out + b"0\r\n" + f"{trailer_name}:{trailer_value}\r\n".encode() + b"\r\n"


def crc32_b64(data: bytes) -> str:
    return b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def signed_trailer_body(data: bytes, chunk_size: int, seed: str, secret: str, when: datetime, trailer_name: str,
                        trailer_value: str, region: str = "us-east-1") -> bytes:
    """STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER: signed chunks, then a signed trailer."""
    pieces = signed_chunked_body(data, chunk_size, seed, secret, when, region)
    final = pieces[-1]
    last_sig = final.split(b"chunk-signature=")[1].split(b"\r\n")[0].decode()
    key = signing_key(secret, when, region)
    scope = f"{when.strftime('%Y%m%d')}/{region}/s3/aws4_request"
    trailer = f"{trailer_name}:{trailer_value}\n".encode()
    to_sign = "\n".join(["AWS4-HMAC-SHA256-TRAILER", when.strftime("%Y%m%dT%H%M%SZ"), scope, last_sig,
                         hashlib.sha256(trailer).hexdigest()])
    trailer_sig = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    # The final chunk's framing ends after its header line; trailers follow, then an empty line.
    head = final[: final.index(b"\r\n") + 2]
    return (b"".join(pieces[:-1]) + head + trailer.rstrip(b"\n") + b"\r\n"
            + f"x-amz-trailer-signature:{trailer_sig}\r\n\r\n".encode())
