"""AWS Signature Version 2 for S3: the `Authorization: AWS <key>:<signature>` header and presigned
URLs (`AWSAccessKeyId`, `Expires`, `Signature`), as aws-cli 1.x `aws s3 presign` and s3cmd with
`signature_v2 = True` make them.

The rules are SigV4's, as far as SigV2 can express them:

- **Expiry.** A header-signed request's `x-amz-date` or `Date` must be within 15 minutes of the
  server's clock (`RequestTimeTooSkewed`); a presigned URL is refused once `Expires` (epoch seconds)
  has passed, and when it lies more than 7 days (SigV4's longest presign) plus the skew ahead.
- **Sub-resources are signed.** The canonical resource carries every sub-resource S3 and the clients
  list (`SUBRESOURCES`) and every query name the gateway routes on (save `list-type`, a listing
  parameter like `prefix`, which SigV2 never signs): a sub-resource added to or changed in a signed
  request changes the string to sign, so the signature no longer matches.
- **Every `x-amz-*` header is signed.** SigV2 has no SignedHeaders list: the string to sign carries
  all the `x-amz-*` headers present, so one added to a presigned URL fails the signature check
  (`SignatureDoesNotMatch`) instead of widening what the signer authorised.

Reference: AWS S3 Developer Guide, "Signing and authenticating REST requests" (RESTAuthentication).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import urllib.parse
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING

from starlette.datastructures import QueryParams
from starlette.requests import Request

from anvil.api.s3.errors import S3Error

if TYPE_CHECKING:
    from collections.abc import Callable

    from anvil.context import Principal

# The sub-resources of S3's RESTAuthentication page, botocore's HmacV1Auth and s3cmd's
# sign_request_v2, plus the gateway's own (attributes): a name a client does not sign but the
# server does only ever makes a request fail, never authorises more.
SUBRESOURCES = frozenset({
    "accelerate", "acl", "analytics", "attributes", "cors", "defaultObjectAcl", "delete", "inventory", "lifecycle",
    "location", "logging", "metrics", "notification", "object-lock", "partNumber", "policy", "replication",
    "requestPayment", "restore", "select", "select-type", "storageClass", "tagging", "torrent", "uploadId",
    "uploads", "versionId", "versioning", "versions", "website",
    "response-cache-control", "response-content-disposition", "response-content-encoding",
    "response-content-language", "response-content-type", "response-expires",
})
QUERY_AUTH_PARAMS = ("AWSAccessKeyId", "Signature", "Expires")


def _http_date(value: str) -> float | None:
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        pass
    try:  # ISO 8601 basic, as SigV4 clients send x-amz-date
        return datetime.strptime(value, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def canonical_resource(raw_path: str, raw_query: str, bucket_from_host: str | None) -> list[str]:
    """The CanonicalizedResource candidates: the path as sent and re-encoded by S3's rules (clients
    differ in what they escape), each followed by the signed sub-resources, sorted by name, with their
    values decoded as the gateway reads them."""
    subs: list[tuple[str, str | None]] = []
    for item in raw_query.split("&") if raw_query else ():
        name, eq, value = item.partition("=")
        name = urllib.parse.unquote_plus(name)
        if name in SUBRESOURCES:
            subs.append((name, urllib.parse.unquote_plus(value) if eq else None))
    subs.sort(key=lambda nv: nv[0])
    suffix = "&".join(n if val is None else f"{n}={val}" for n, val in subs)
    suffix = "?" + suffix if suffix else ""
    prefix = f"/{bucket_from_host}" if bucket_from_host else ""
    paths = [prefix + raw_path]
    reencoded = prefix + urllib.parse.quote(urllib.parse.unquote(raw_path), safe="/~")
    if reencoded != paths[0]:
        paths.append(reencoded)
    if len(paths[0]) > 1 and paths[0].count("/") == 1:
        # A bucket's own resource is `/bucket/` (S3's RESTAuthentication page; botocore signs it so)
        # whether or not the request line ends in a slash.
        paths.append(paths[0] + "/")
    return [p + suffix for p in paths]


def _amz_headers(request: Request) -> str:
    found: dict[str, list[str]] = {}
    for k, val in request.scope["headers"]:
        name = k.decode("latin-1").lower()
        if name.startswith("x-amz-"):
            found.setdefault(name, []).append(val.decode("latin-1").strip())
    return "".join(f"{n}:{','.join(found[n])}\n" for n in sorted(found))


def _sign(secret: str, string_to_sign: str) -> str:
    return base64.b64encode(hmac.new(secret.encode(), string_to_sign.encode("utf-8", "surrogateescape"),
                                     hashlib.sha1).digest()).decode()


def _mismatch() -> S3Error:
    return S3Error("SignatureDoesNotMatch", "the request signature we calculated does not match the signature you "
                   "provided. Check your key and signing method.", 403)


def authenticate(request: Request, lookup: Callable[[str], tuple[str, Principal] | None], q: QueryParams, *,
                 now: float, bucket_from_host: str | None, header: str | None, max_skew: int,
                 max_expires: int) -> Principal:
    """The principal of a valid SigV2 request (`header`: its Authorization header, or None for a
    presigned URL); S3Error otherwise."""
    h = request.headers
    if header is not None:
        access_key, colon, signature = header[4:].strip().rpartition(":")
        if not colon or not access_key or not signature:
            raise S3Error("InvalidArgument", "the Authorization header must be AWS <AWSAccessKeyId>:<Signature>")
        amz_date, date = h.get("x-amz-date"), h.get("date")
        stamp = amz_date if amz_date is not None else date
        if stamp is None:
            raise S3Error("AccessDenied", "AWS authentication requires a valid Date or x-amz-date header", 403)
        ts = _http_date(stamp)
        if ts is None:
            raise S3Error("AccessDenied", "AWS authentication requires a valid Date or x-amz-date header", 403)
        if abs(now - ts) > max_skew:
            raise S3Error("RequestTimeTooSkewed",
                          "the difference between the request time and the server's time is too large", 403,
                          fields={"RequestTime": stamp,
                                  "ServerTime": datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                                  "MaxAllowedSkewMilliseconds": str(max_skew * 1000)})
        # S3 leaves the Date line empty when x-amz-date is sent (s3cmd); botocore sends both and signs Date.
        date_lines = [date or ""] if amz_date is None else list(dict.fromkeys([date or "", ""]))
    else:
        try:
            access_key, signature, expires_text = (q[n] for n in QUERY_AUTH_PARAMS)
            expires = int(expires_text)
        except (KeyError, ValueError):
            raise S3Error("AuthorizationQueryParametersError", "Query-string authentication requires the "
                          "Signature, Expires and AWSAccessKeyId parameters, Expires in seconds since the epoch")
        if now > expires:
            raise S3Error("AccessDenied", "Request has expired", 403,
                          fields={"Expires": datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                                  "ServerTime": datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")})
        if expires - now > max_expires + max_skew:
            raise S3Error("AuthorizationQueryParametersError",
                          f"Expires must be at most {max_expires} seconds (7 days) from now")
        # A raw '+' in the query reads as a space; base64 has none, so it was a '+' left unescaped.
        signature = signature.replace(" ", "+")
        date_lines = [expires_text]

    found = lookup(access_key)
    if found is None:
        raise S3Error("InvalidAccessKeyId", "the AWS access key id you provided does not exist in our records", 403)
    secret, principal = found
    raw_path = request.scope.get("raw_path", b"").decode("latin-1") or request.url.path
    raw_query = request.scope.get("query_string", b"").decode("latin-1")
    head = f"{request.method}\n{(h.get('content-md5') or '').strip()}\n{(h.get('content-type') or '').strip()}\n"
    amz = _amz_headers(request)
    claimed = signature.encode("utf-8", "surrogateescape")
    for resource in canonical_resource(raw_path, raw_query, bucket_from_host):
        for date_line in date_lines:
            expected = _sign(secret, f"{head}{date_line}\n{amz}{resource}")
            if hmac.compare_digest(expected.encode(), claimed):
                return principal
    raise _mismatch()
