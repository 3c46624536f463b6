"""AWS Signature Version 4 for S3: header auth, presigned URLs, and the per-chunk signer (Signature
Version 2 requests are handed to `sigv2`).

`credentials(access_key_id)` returns `(secret_access_key, Principal)` or None; identity will
supply it (the access key is an application's client_id, the secret its client_secret).

What the signature covers is what the request means: the query the gateway acts on is the one
canonicalised here (`query_params`), and every `x-amz-*` header must be signed (`HeadersNotSigned`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from starlette.datastructures import Headers, QueryParams
from starlette.requests import Request

from anvil.api.fastreq import FastHeaders, amz_items
from anvil.api.s3 import sigv2
from anvil.api.s3.errors import S3Error
from anvil.context import Principal
from anvil.frozen import fast_init
from anvil.storage.digests import HmacSha256, sha256_hex

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
MAX_SKEW_SECONDS = 15 * 60
MAX_PRESIGN_EXPIRES = 7 * 24 * 3600

UNSIGNED = "UNSIGNED-PAYLOAD"
STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
STREAMING_SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
STREAMING_MODES = (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER, STREAMING_UNSIGNED_TRAILER)

CredentialLookup = Callable[[str], "tuple[str, Principal] | None"]

ANONYMOUS = Principal(tenant="", subject="anonymous", anonymous=True)


@fast_init
@dataclass(frozen=True)
class AuthResult:
    principal: Principal
    payload_hash: str  # a hex SHA-256, UNSIGNED-PAYLOAD or one of the STREAMING-* modes
    signing_key: bytes | None = None
    seed_signature: str | None = None
    amz_date: str = ""
    scope: str = ""


_key_cache: dict[tuple[str, str, str], bytes] = {}


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.digest(key, msg.encode(), "sha256")


_macs: dict[bytes, HmacSha256] = {}


def _hmac_hex(key: bytes, msg: str) -> str:
    # Under a signing key (one per secret, day and region, cached): its HMAC states are kept with it, so
    # a signature costs no OpenSSL algorithm lookup (storage/digests.py; hmac.digest made one per call).
    mac = _macs.get(key)
    if mac is None:
        if len(_macs) > 1024:
            _macs.clear()
        mac = _macs[key] = HmacSha256(key)
    return mac.digest(msg.encode()).hex()


def signing_key(secret: str, date: str, region: str) -> bytes:
    cache_key = (secret, date, region)
    k = _key_cache.get(cache_key)
    if k is None:
        k = _hmac(_hmac(_hmac(_hmac(("AWS4" + secret).encode(), date), region), "s3"), "aws4_request")
        if len(_key_cache) > 1024:
            _key_cache.clear()
        _key_cache[cache_key] = k
    return k


def _quote(s: str) -> str:
    return urllib.parse.quote(s, safe="-_.~")


def parse_query(raw_query: str) -> list[tuple[str, str]]:
    """The query's (name, value) pairs, as both the signature and the handlers read them. A raw `+`
    is a space, as AWS reads it (a literal plus arrives as `%2B`): were the two to read it differently,
    a `+` swapped for a signed `%2B` would keep the signature valid while changing what it authorised."""
    return urllib.parse.parse_qsl(raw_query, keep_blank_values=True)


_NO_QUERY = QueryParams()  # immutable: one shared by every request without a query


def query_params(request: Request) -> QueryParams:
    raw = request.scope.get("query_string", b"")
    if not raw:
        return _NO_QUERY
    return QueryParams(parse_query(raw.decode("latin-1")))


def canonical_query(pairs: list[tuple[str, str]], *, drop: str | None = None) -> str:
    if not pairs:
        return ""  # most object requests carry no query
    encoded = sorted((_quote(k), _quote(val)) for k, val in pairs if drop is None or k != drop)
    return "&".join(f"{k}={val}" for k, val in encoded)


# A path of these characters only is its own re-encoding (nothing to unquote, nothing quote escapes).
_PLAIN_PATH = re.compile("[A-Za-z0-9/_.~-]*")


def _canonical_uris(raw_path: str) -> list[str]:
    """The path as sent, and the path re-encoded by S3's rules (clients differ in what they escape)."""
    if _PLAIN_PATH.fullmatch(raw_path) is not None:
        return [raw_path]  # the usual key: one regex match instead of an unquote and a quote
    reencoded = urllib.parse.quote(urllib.parse.unquote(raw_path), safe="/~")
    return [raw_path] if reencoded == raw_path else [raw_path, reencoded]


def _headers_by_name(request: Request) -> dict[str, list[str]]:
    """Every header's values by lower-case name, in arrival order, from one pass over the headers
    (looking each signed header up with `headers.getlist` rescans them all every time; the gateway's
    request has them decoded already)."""
    out: dict[str, list[str]] = {}
    for k, val in request.headers.items():
        if k in out:
            out[k].append(val)
        else:
            out[k] = [val]
    return out


def _canonical_headers(request: Request, h: Headers, signed_names: list[str]) -> str:
    """The canonical header lines of the signed names (a missing one has an empty value)."""
    if type(h) is FastHeaders and len(h._map) == len(h._items):
        # No name is repeated (the usual request): each signed header's one value, with no pass over
        # every header to group their values.
        values = h._map
        return "".join([f"{n}:{' '.join(values.get(n.lower(), '').split())}\n" for n in signed_names])
    by_name = _headers_by_name(request)
    return "".join(f"{n}:{_header_value(by_name.get(n.lower(), []))}\n" for n in signed_names)


def _header_value(values: list[str]) -> str:
    if len(values) == 1:  # the usual case, without a generator (split() drops the ends' spaces too)
        return " ".join(values[0].split())
    return ",".join(" ".join(val.split()) for val in values)


_last_amz_date: tuple[str, float] = ("", 0.0)


def parse_amz_date(value: str) -> float:
    # Concurrent clients sign with the same second: the last valid value's answer is kept.
    global _last_amz_date
    last = _last_amz_date
    if value == last[0]:
        return last[1]
    ts = _parse_amz_date(value)
    _last_amz_date = (value, ts)
    return ts


def _parse_amz_date(value: str) -> float:
    # Fixed-width digits by hand (strptime costs ~10 us a request); the datetime call still rejects
    # impossible dates such as month 13.
    if len(value) != 16 or value[8] != "T" or value[15] != "Z" or not (value[:8] + value[9:15]).isdigit() \
            or not value.isascii():
        raise S3Error("AccessDenied", "X-Amz-Date must be in the ISO 8601 basic format YYYYMMDDTHHMMSSZ", 403)
    try:
        return datetime(int(value[0:4]), int(value[4:6]), int(value[6:8]), int(value[9:11]), int(value[11:13]),
                        int(value[13:15]), tzinfo=UTC).timestamp()
    except ValueError:
        raise S3Error("AccessDenied", "X-Amz-Date must be in the ISO 8601 basic format YYYYMMDDTHHMMSSZ", 403)


_signed_cache: dict[str, tuple[list[str], frozenset[str]]] = {}


def _signed_headers(signed: str) -> tuple[list[str], frozenset[str]]:
    """SignedHeaders as names in order and as a set of lower-case names. Kept per value: a client signs
    the same headers on every request of a kind."""
    hit = _signed_cache.get(signed)
    if hit is None:
        names = signed.split(";")
        if "host" not in names:
            raise S3Error("AuthorizationHeaderMalformed", "SignedHeaders must include host")
        if len(_signed_cache) > 256:
            _signed_cache.clear()
        hit = _signed_cache[signed] = (names, frozenset(n.lower() for n in names))
    return hit


_scope_cache: dict[tuple[str, str, str], tuple[str, str, str]] = {}


def _check_scope(credential: str, amz_date: str, region: str) -> tuple[str, str, str]:
    """(access key, date, credential scope) of a well-formed Credential; kept per key and day (a client
    sends the same one all day), only when it passed."""
    key = (credential, amz_date[:8], region)
    hit = _scope_cache.get(key)
    if hit is None:
        hit = _parse_scope(credential, amz_date, region)
        if len(_scope_cache) > 1024:
            _scope_cache.clear()
        _scope_cache[key] = hit
    return hit


def _parse_scope(credential: str, amz_date: str, region: str) -> tuple[str, str, str]:
    parts = credential.split("/")
    if len(parts) != 5:
        raise S3Error("AuthorizationHeaderMalformed",
                      "the Credential is malformed; expecting \"<AccessKeyId>/<YYYYMMDD>/<region>/s3/aws4_request\"")
    access_key, date, req_region, service, terminal = parts
    if req_region != region:
        raise S3Error("AuthorizationHeaderMalformed",
                      f"the authorization header is malformed; the region '{req_region}' is wrong; "
                      f"expecting '{region}'", fields={"Region": region})
    if service != "s3" or terminal != "aws4_request":
        raise S3Error("AuthorizationHeaderMalformed", "the credential scope must end in /s3/aws4_request")
    if date != amz_date[:8]:
        raise S3Error("AuthorizationHeaderMalformed", "the credential date does not match X-Amz-Date")
    return access_key, date, "/".join(parts[1:])


def _presign_expires(text: str) -> int:
    """X-Amz-Expires, with S3's answers for each way it can be wrong (AWS "Authenticating Requests:
    Using Query Parameters (AWS Signature Version 4)": 1 to 604800 seconds). All are
    AuthorizationQueryParametersError; S3's messages are kept, as tools match on them."""
    t = text.strip()
    if not (t.isascii() and t.lstrip("-").isdigit()):
        raise S3Error("AuthorizationQueryParametersError", "X-Amz-Expires should be a number")
    expires = int(t)
    if expires < 0:
        raise S3Error("AuthorizationQueryParametersError", "X-Amz-Expires must be non-negative")
    if expires == 0:
        raise S3Error("AuthorizationQueryParametersError", "X-Amz-Expires must be at least 1 second")
    if expires > MAX_PRESIGN_EXPIRES:
        raise S3Error("AuthorizationQueryParametersError",
                      f"X-Amz-Expires must be less than a week (in seconds) that is {MAX_PRESIGN_EXPIRES}")
    return expires


def _headers_not_signed(names: list[str]) -> S3Error:
    return S3Error("AccessDenied", "There were headers present in the request which were not signed", 403,
                   fields={"HeadersNotSigned": ", ".join(names)})


def _v2(request: Request, lookup: CredentialLookup, q: QueryParams, now: float, bucket_from_host: str | None,
        header: str | None) -> AuthResult:
    principal = sigv2.authenticate(request, lookup, q, now=now, bucket_from_host=bucket_from_host, header=header,
                                   max_skew=MAX_SKEW_SECONDS, max_expires=MAX_PRESIGN_EXPIRES)
    # x-amz-content-sha256 is an x-amz-* header, so SigV2 signed it; the body is checked against it.
    return AuthResult(principal, request.headers.get("x-amz-content-sha256") or UNSIGNED)


def authenticate(request: Request, lookup: CredentialLookup, region: str, *, now: float | None = None,
                 query: QueryParams | None = None, bucket_from_host: str | None = None) -> AuthResult:
    """`query`: the request's parsed query (`query_params`), when the caller already has it;
    `bucket_from_host`: the bucket of a virtual-host-style request (SigV2 signs it in the resource)."""
    now = time.time() if now is None else now
    h = request.headers
    header = h.get("authorization")
    q = query_params(request) if query is None else query
    if header is not None:
        if header.startswith("AWS "):
            return _v2(request, lookup, q, now, bucket_from_host, header)
        if not header.startswith(ALGORITHM + " "):
            raise S3Error("InvalidArgument", "unsupported Authorization type; use AWS4-HMAC-SHA256")
        fields: dict[str, str] = {}
        for item in header[len(ALGORITHM) + 1:].split(","):
            k, _, val = item.strip().partition("=")
            fields[k] = val
        try:
            credential, signed, signature = fields["Credential"], fields["SignedHeaders"], fields["Signature"]
        except KeyError:
            raise S3Error("AuthorizationHeaderMalformed",
                          "the Authorization header needs Credential, SignedHeaders and Signature")
        amz_date = h.get("x-amz-date")
        if amz_date is None:
            date_header = h.get("date")
            if date_header is None:
                raise S3Error("AccessDenied", "AWS authentication requires a valid Date or x-amz-date header", 403)
            from email.utils import parsedate_to_datetime

            try:
                amz_date = parsedate_to_datetime(date_header).astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
            except (TypeError, ValueError):
                raise S3Error("AccessDenied", "the Date header is not a valid HTTP date", 403)
        ts = parse_amz_date(amz_date)
        access_key, date, scope = _check_scope(credential, amz_date, region)
        if abs(now - ts) > MAX_SKEW_SECONDS:
            raise S3Error("RequestTimeTooSkewed",
                          "the difference between the request time and the server's time is too large", 403,
                          fields={"RequestTime": amz_date,
                                  "ServerTime": datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                                  "MaxAllowedSkewMilliseconds": str(MAX_SKEW_SECONDS * 1000)})
        payload_hash = h.get("x-amz-content-sha256")
        if payload_hash is None:
            raise S3Error("InvalidRequest", "missing required header for this request: x-amz-content-sha256")
        drop = None
        # With the Authorization header S3 exempts nothing: x-amz-content-sha256 must be signed too.
        unsigned_ok: tuple[str, ...] = ()
    elif "X-Amz-Algorithm" in q or "X-Amz-Signature" in q:
        if q.get("X-Amz-Algorithm") != ALGORITHM:
            raise S3Error("AuthorizationQueryParametersError", "X-Amz-Algorithm must be AWS4-HMAC-SHA256")
        try:
            credential = q["X-Amz-Credential"]
            signed = q["X-Amz-SignedHeaders"]
            signature = q["X-Amz-Signature"]
            amz_date = q["X-Amz-Date"]
            expires_text = q["X-Amz-Expires"]
        except KeyError:
            raise S3Error("AuthorizationQueryParametersError",
                          "query-string authentication needs X-Amz-Credential, X-Amz-Date, X-Amz-Expires, "
                          "X-Amz-SignedHeaders and X-Amz-Signature")
        expires = _presign_expires(expires_text)
        ts = parse_amz_date(amz_date)
        access_key, date, scope = _check_scope(credential, amz_date, region)
        if now > ts + expires:
            raise S3Error("AccessDenied", "Request has expired", 403,
                          fields={"X-Amz-Expires": str(expires), "Expires": str(ts + expires)})
        if ts - now > MAX_SKEW_SECONDS:
            raise S3Error("AccessDenied", "Request is not valid yet", 403)
        payload_hash = h.get("x-amz-content-sha256") or UNSIGNED
        drop = "X-Amz-Signature"
        # S3 lets a presigned request carry x-amz-content-sha256 unsigned: its value is the canonical
        # request's payload line (UNSIGNED-PAYLOAD when absent), so the signature covers it anyway.
        unsigned_ok = ("x-amz-content-sha256",)
    elif "AWSAccessKeyId" in q or "Signature" in q:
        return _v2(request, lookup, q, now, bucket_from_host, None)
    else:
        return AuthResult(ANONYMOUS, h.get("x-amz-content-sha256") or UNSIGNED)

    found = lookup(access_key)
    if found is None:
        raise S3Error("InvalidAccessKeyId", "the AWS access key id you provided does not exist in our records", 403)
    secret, principal = found
    signed_names, signed_set = _signed_headers(signed)
    # An unsigned x-amz-* header would change what a valid signature authorises (a copy source, stored
    # metadata, ...): refused as S3 does, whether or not the signature itself matches.
    unsigned = [n for n, _ in amz_items(h) if n not in signed_set and n not in unsigned_ok]
    if unsigned:
        raise _headers_not_signed(list(dict.fromkeys(unsigned)))
    canon_headers = _canonical_headers(request, h, signed_names)
    raw_path = request.scope.get("raw_path", b"").decode("latin-1") or request.url.path
    query = canonical_query(q.multi_items(), drop=drop)
    key = signing_key(secret, date, region)
    for uri in _canonical_uris(raw_path):
        canonical = "\n".join([request.method, uri, query, canon_headers, signed, payload_hash])
        to_sign = "\n".join([ALGORITHM, amz_date, scope, sha256_hex(canonical.encode())])
        expected = _hmac_hex(key, to_sign)
        # Bytes: compare_digest refuses non-ASCII strings, and the claimed signature is the client's text.
        if hmac.compare_digest(expected.encode(), signature.encode("utf-8", "surrogateescape")):
            return AuthResult(principal, payload_hash, key, signature, amz_date, scope)
    raise S3Error("SignatureDoesNotMatch", "the request signature we calculated does not match the signature you "
                  "provided. Check your key and signing method.", 403)


def chunk_signature(auth: AuthResult, previous: str, chunk_sha256: str) -> str:
    to_sign = "\n".join(["AWS4-HMAC-SHA256-PAYLOAD", auth.amz_date, auth.scope, previous, EMPTY_SHA256,
                         chunk_sha256])
    assert auth.signing_key is not None
    return _hmac_hex(auth.signing_key, to_sign)


def trailer_signature(auth: AuthResult, previous: str, trailer_bytes: bytes) -> str:
    to_sign = "\n".join(["AWS4-HMAC-SHA256-TRAILER", auth.amz_date, auth.scope, previous,
                         hashlib.sha256(trailer_bytes).hexdigest()])
    assert auth.signing_key is not None
    return _hmac_hex(auth.signing_key, to_sign)
