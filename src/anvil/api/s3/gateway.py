"""The S3 REST API: request checks, authentication, and routing onto the per-resource handlers
(`buckets`, `objects`, `listings`, `multipart`) through the `dispatch` table.

Order of checks for every request: request shape (header size, names) -> reserved namespace
(`_anvil/` keys, before anything else) -> operations Anvil does not offer (NotImplemented) ->
signature -> recovery mode for writes -> route -> `identity.authorize` -> the operation itself.
"""

from __future__ import annotations

import dataclasses
import logging
import urllib.parse
from dataclasses import dataclass
from itertools import chain
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from anvil.api.common import RawResponse
from anvil.api.limits import log_client_disconnect
from anvil.api.record import note
from anvil.api.record import request_id as request_id_of
from anvil.api.s3 import acl, cors
from anvil.api.s3 import auth as sig
from anvil.api.s3.dispatch import BUCKET, COPY, OBJECT, SERVICE, route
from anvil.api.s3.errors import S3Error, error_response, from_anvil, not_implemented, reserved_namespace
from anvil.api.s3.objects import parse_copy_source
from anvil.api.s3.request import S3Request
from anvil.errors import AnvilError
from anvil.objects import validation as v
from anvil.storage.space import is_full_error, storage_full

log = logging.getLogger("anvil.s3")

MAX_HEADER_BYTES = 8 * 1024

# Sub-resources S3 offers and Anvil does not: answered 501 NotImplemented, never a 500.
UNSUPPORTED_SUBRESOURCES = frozenset({
    "policy", "policyStatus", "website", "encryption", "logging",
    "notification", "replication", "requestPayment", "accelerate", "analytics", "inventory", "metrics",
    "intelligent-tiering", "object-lock", "ownershipControls", "publicAccessBlock", "retention", "legal-hold",
    "torrent", "restore", "select", "session", "metadataTable", "renameObject",
    # S3 Metadata configurations, attribute-based access control, object annotations: without these a
    # PUT ?abac would fall through to CreateBucket and a PUT ?annotation overwrite the object.
    "metadataConfiguration", "metadataAnnotationTable", "metadataInventoryTable", "metadataJournalTable",
    "abac", "annotation",
})
UNSUPPORTED_HEADERS = {
    "x-amz-server-side-encryption-customer-algorithm": "SSE-C (customer-provided encryption keys)",
    "x-amz-copy-source-server-side-encryption-customer-algorithm": "SSE-C (customer-provided encryption keys)",
    "x-amz-server-side-encryption": "server-side encryption headers",
    "x-amz-server-side-encryption-aws-kms-key-id": "SSE-KMS",
    "x-amz-object-lock-mode": "object lock",
    "x-amz-object-lock-retain-until-date": "object lock",
    "x-amz-object-lock-legal-hold": "object lock",
    "x-amz-bucket-object-lock-enabled": "object lock",
    "x-amz-website-redirect-location": "website redirects",
    "x-amz-request-payer": "requester pays",
    "x-amz-write-offset-bytes": "appends",
}
_UNSUPPORTED_HEADER_BYTES = tuple((k.encode("latin-1"), what) for k, what in UNSUPPORTED_HEADERS.items())
_UNSUPPORTED_NAMES = frozenset(k for k, _ in _UNSUPPORTED_HEADER_BYTES)
_GRANT_NAMES = frozenset(k.encode("latin-1") for k in acl.GRANT_HEADERS)


@dataclass
class Target:
    bucket: str | None
    key: str | None
    virtual_host: bool = False


class S3Gateway:
    """One S3 request at a time: `await gateway(request)` -> Response."""

    def __init__(self, *, region: str, base_domain: str | None):
        self.region = region
        self.base_domain = base_domain.lower().strip(".") if base_domain else None

    # ------------------------------------------------------------------ entry point

    async def __call__(self, request: Request) -> Response:
        request_id = request_id_of(request.scope)
        head = request.method == "HEAD"
        try:
            response = await self._dispatch(request, request_id)
        except ClientDisconnect:
            log_client_disconnect(request)  # the client's doing: one INFO line, no traceback
            return Response(status_code=400)
        except Exception as exc:  # noqa: BLE001 - a client never sees a traceback
            response = error_response(error_of(exc, request.method, request.url.path), request_id,
                                      resource=request.url.path, head=head)
        if type(response) is RawResponse:  # a GET, HEAD or PUT answer: neither header is in it yet
            rid = request_id.encode("latin-1")
            response.raw_headers += ((b"x-amz-request-id", rid), (b"x-amz-id-2", rid))
        else:
            response.headers["x-amz-request-id"] = request_id
            response.headers.setdefault("x-amz-id-2", request_id)
        if request.method != "OPTIONS" and "origin" in request.headers:
            # A browser's actual request: the bucket's CORS rule (if one allows it) decides what it may read.
            try:
                bucket = self._target(request).bucket
            except S3Error:
                bucket = None
            for k, val in cors.response_headers(request, bucket, request.app.state.anvil.objects).items():
                response.headers[k] = val
        if response.status_code >= 300 and request.method in ("PUT", "POST") and not getattr(
                request, "_stream_consumed", True):
            # We answered before reading the body (often under Expect: 100-continue, so the client never
            # sent it): the connection's framing is unknown, so it must not be reused.
            response.headers["connection"] = "close"
        return response

    def _target(self, request: Request) -> Target:
        raw = request.scope.get("raw_path", b"").decode("latin-1") or request.url.path
        try:
            path = urllib.parse.unquote(raw, errors="strict")
        except UnicodeDecodeError:
            raise S3Error("InvalidURI", "couldn't parse the specified URI: keys must be UTF-8")
        host = (request.headers.get("host") or "").rsplit(":", 1)[0].lower()
        if self.base_domain and host.endswith("." + self.base_domain):
            bucket = host[: -len(self.base_domain) - 1]
            key = path[1:] if path.startswith("/") else path
            return Target(bucket, key or None, True)
        parts = path[1:].split("/", 1) if path.startswith("/") else path.split("/", 1)
        bucket = parts[0] or None
        key = parts[1] if len(parts) > 1 and parts[1] != "" else None
        return Target(bucket, key)

    async def _dispatch(self, request: Request, request_id: str) -> Response:
        raw_headers = request.scope["headers"]  # latin-1 on the wire: byte lengths are the character counts
        # The section's size ("name: value\r\n" each) and the names, in C loops rather than Python ones.
        header_bytes = 4 * len(raw_headers) + sum(map(len, chain.from_iterable(raw_headers)))
        if header_bytes > MAX_HEADER_BYTES:
            raise S3Error("RequestHeaderSectionTooLarge",
                          f"your request header section exceeds the maximum allowed size ({MAX_HEADER_BYTES} bytes)")
        t = self._target(request)
        h, method = request.headers, request.method
        if method == "OPTIONS":
            # A CORS preflight: browsers send it without credentials, so it is answered from the
            # bucket's CORS rules alone, before any signature check.
            return cors.preflight(request, t.bucket, request.app.state.anvil.objects)
        # Parsed as the signature reads it (`sig.parse_query`): what was signed is what is acted on.
        q = sig.query_params(request)
        # The reserved namespace comes first: keys, copy sources and listing prefixes.
        if t.key is not None and v.is_reserved_key(t.key):
            raise reserved_namespace()
        copy_source = h.get("x-amz-copy-source")
        if copy_source is not None and v.is_reserved_key(parse_copy_source(copy_source)[1]):
            raise reserved_namespace()
        if q:  # (most object requests have no query)
            for name in ("prefix", "key-marker"):
                if v.is_reserved_key(q.get(name, "")):
                    raise reserved_namespace()
            for name in q.keys():
                if name in UNSUPPORTED_SUBRESOURCES:
                    raise not_implemented(f"the ?{name} sub-resource")
        present = dict(raw_headers).keys()  # ASGI header names are lower-case bytes
        if not present.isdisjoint(_UNSUPPORTED_NAMES):
            for name, what in _UNSUPPORTED_HEADER_BYTES:
                if name in present:
                    raise not_implemented(what)
        # ACLs Anvil cannot honour are refused before anything happens (docs/s3.md, "ACLs").
        acl.canned(h.get("x-amz-acl"), bucket=t.key is None and method == "PUT" and "acl" not in q)
        if not present.isdisjoint(_GRANT_NAMES):
            acl.refuse_grant_headers(h)
        storage_class = h.get("x-amz-storage-class")
        if storage_class is not None and storage_class != "STANDARD":
            raise S3Error("InvalidStorageClass", "the only storage class Anvil offers is STANDARD")

        app = request.app
        auth = sig.authenticate(request, app.state.s3_credentials, self.region, query=q,
                                bucket_from_host=t.bucket if t.virtual_host else None)
        session = h.get("x-amz-security-token") or (q.get("X-Amz-Security-Token") if q else None)
        if session and not auth.principal.anonymous:
            auth = _with_session(app, auth, session)
        writes = method in ("PUT", "POST", "DELETE")
        if writes and getattr(app.state, "recovery_mode", False):
            raise S3Error("ServiceUnavailable", "RecoveryMode: Anvil is in recovery mode and refuses writes until "
                          "an operator runs `anvil recovery resume`", 503)
        bucket = t.bucket
        if bucket is None:
            shape = SERVICE
        else:
            if bucket in v.RESERVED_BUCKETS:
                raise S3Error("NoSuchBucket", "The specified bucket does not exist", 404)
            if t.key is None:
                shape = BUCKET
            elif copy_source is not None and method == "PUT":
                shape = COPY
            else:
                shape = OBJECT
        handler = route(method, shape, q)
        note(request.scope, principal=auth.principal, op=handler.__name__)  # for metrics and the access log
        return await handler(S3Request(self, request, auth, bucket, t.key, q, request_id))


def error_of(exc: Exception, method: str, path: str) -> S3Error:
    """The S3 error a request that raised `exc` is answered with (also by api/fastput.py)."""
    if isinstance(exc, S3Error):
        return exc
    if isinstance(exc, AnvilError):
        return from_anvil(exc)
    if is_full_error(exc):  # ENOSPC from any file write: the full-disk answer, not a 500
        return from_anvil(storage_full())
    log.error("unhandled error in S3 %s %s", method, path, exc_info=exc)
    return S3Error("InternalError", "we encountered an internal error; please try again", 500)


def _with_session(app: Any, auth: sig.AuthResult, session: str) -> sig.AuthResult:
    """A session token (`X-Amz-Security-Token`, boto3's `aws_session_token`) is a token of Anvil's token
    exchange for the same application: the request then carries that token's scopes and the subject it
    acts for (docs/authz.md, "Object access"). The signature, made with the application's secret, has
    already covered the header."""
    try:
        principal = app.state.anvil.identity.authenticate_token(session)
    except AnvilError as e:
        raise S3Error("InvalidToken", f"The provided token is malformed or otherwise invalid: {e.message}", 400)
    if principal.subject != auth.principal.subject or principal.tenant != auth.principal.tenant:
        raise S3Error("InvalidToken", "The provided token was not issued to the access key that signed the "
                                      "request", 400)
    return dataclasses.replace(auth, principal=principal)
