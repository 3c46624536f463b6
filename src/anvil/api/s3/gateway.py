"""The S3 REST API: routing, authentication, and translation onto `anvil.objects`.

Order of checks for every request: request shape (header size, names) -> reserved namespace
(`_anvil/` keys, before anything else) -> operations Anvil does not offer (NotImplemented) ->
signature -> recovery mode for writes -> `identity.authorize` -> the operation itself.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime
from typing import Any
from xml.sax.saxutils import escape

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from anvil.api.common import blocking, committed, file_io
from anvil.api.s3 import auth as sig
from anvil.api.s3 import xmlutil as X
from anvil.api.s3.body import BodyReader
from anvil.api.s3.errors import S3Error, error_response, from_anvil, not_implemented, reserved_namespace
from anvil.context import Principal, RequestContext, new_request_id
from anvil.errors import AnvilError
from anvil.identity import authorize
from anvil.objects import Conditions, ObjectVersion
from anvil.objects import validation as v
from anvil.objects.checksums import (
    ALGORITHMS,
    COMPOSITE_ALGORITHMS,
    FULL_OBJECT_ALGORITHMS,
    content_md5_hex,
    digest_length,
    new_checksum,
)
from anvil.objects.service import (
    IF_MATCH_NO_OBJECT,
    UploadListResult,
    marks_common_prefix,
    parse_etag_list,
    token_after_prefix,
)
from anvil.runtime import Anvil

log = logging.getLogger("anvil.s3")

MAX_HEADER_BYTES = 8 * 1024
INLINE_BODY_LIMIT = 1024 * 1024
SINK_CHUNK = 1024 * 1024
MAX_DELETE_KEYS = 1000

# Sub-resources S3 offers and Anvil does not: answered 501 NotImplemented, never a 500.
UNSUPPORTED_SUBRESOURCES = frozenset({
    "acl", "policy", "policyStatus", "lifecycle", "tagging", "website", "cors", "encryption", "logging",
    "notification", "replication", "requestPayment", "accelerate", "analytics", "inventory", "metrics",
    "intelligent-tiering", "object-lock", "ownershipControls", "publicAccessBlock", "retention", "legal-hold",
    "torrent", "restore", "select", "attributes", "session", "metadataTable", "renameObject",
})
UNSUPPORTED_HEADERS = {
    "x-amz-server-side-encryption-customer-algorithm": "SSE-C (customer-provided encryption keys)",
    "x-amz-copy-source-server-side-encryption-customer-algorithm": "SSE-C (customer-provided encryption keys)",
    "x-amz-server-side-encryption": "server-side encryption headers",
    "x-amz-server-side-encryption-aws-kms-key-id": "SSE-KMS",
    "x-amz-tagging": "object tagging",
    "x-amz-object-lock-mode": "object lock",
    "x-amz-object-lock-retain-until-date": "object lock",
    "x-amz-object-lock-legal-hold": "object lock",
    "x-amz-bucket-object-lock-enabled": "object lock",
    "x-amz-website-redirect-location": "website redirects",
    "x-amz-request-payer": "requester pays",
    "x-amz-write-offset-bytes": "appends",
}
_UNSUPPORTED_HEADER_BYTES = tuple((k.encode("latin-1"), what) for k, what in UNSUPPORTED_HEADERS.items())
SYSTEM_HEADERS = ("cache-control", "content-disposition", "content-encoding", "content-language", "expires")
RESPONSE_OVERRIDES = {
    "response-content-type": "content-type", "response-content-language": "content-language",
    "response-expires": "expires", "response-cache-control": "cache-control",
    "response-content-disposition": "content-disposition", "response-content-encoding": "content-encoding",
}
READ_ACTIONS = frozenset({"object:read", "object:list"})
# What S3 stores when a write names no Content-Type (the native API's default is application/octet-stream).
S3_DEFAULT_CONTENT_TYPE = "binary/octet-stream"
# The largest body one PutObject (or UploadPart) may carry; larger objects need a multipart upload.
MAX_PUT_SIZE = 5 * 1024**3


def _http_date(ts: float) -> str:
    return formatdate(ts, usegmt=True)


def _parse_http_date(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None  # S3 ignores an unparsable date condition


def _header_to_text(value: str) -> str:
    """Starlette decodes headers as latin-1; clients send UTF-8 bytes. Recover the real text."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


def _text_to_header(value: str) -> str:
    return value.encode("utf-8").decode("latin-1")


def _override_value(param: str, value: str) -> str:
    """A `response-*` query value as a response header: UTF-8 on the wire, as stored metadata goes out.
    A control character (CR, LF, NUL...) cannot be sent in a header at all: refused, never a 500."""
    if any(c < " " and c != "\t" or c == "\x7f" for c in value):
        raise S3Error("InvalidArgument", f"the {param} parameter must not contain control characters")
    return _text_to_header(value)


@dataclass
class Target:
    bucket: str | None
    key: str | None


class S3Gateway:
    """One S3 request at a time: `await gateway(request)` -> Response."""

    def __init__(self, *, region: str, base_domain: str | None):
        self.region = region
        self.base_domain = base_domain.lower().strip(".") if base_domain else None

    # ------------------------------------------------------------------ entry point

    async def __call__(self, request: Request) -> Response:
        request_id = new_request_id()
        resource = request.url.path
        head = request.method == "HEAD"
        try:
            response = await self._dispatch(request, request_id)
        except S3Error as err:
            response = error_response(err, request_id, resource=resource, head=head)
        except AnvilError as err:
            response = error_response(from_anvil(err), request_id, resource=resource, head=head)
        except Exception:  # noqa: BLE001 - a client never sees a traceback
            log.exception("unhandled error in S3 %s %s", request.method, request.url.path)
            err = S3Error("InternalError", "we encountered an internal error; please try again", 500)
            response = error_response(err, request_id, resource=resource, head=head)
        response.headers["x-amz-request-id"] = request_id
        response.headers.setdefault("x-amz-id-2", request_id)
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
            return Target(bucket, key or None)
        parts = path[1:].split("/", 1) if path.startswith("/") else path.split("/", 1)
        bucket = parts[0] or None
        key = parts[1] if len(parts) > 1 and parts[1] != "" else None
        return Target(bucket, key)

    async def _dispatch(self, request: Request, request_id: str) -> Response:
        raw_headers = request.scope["headers"]  # latin-1 on the wire: byte lengths are the character counts
        header_bytes = sum(len(k) + len(val) + 4 for k, val in raw_headers)
        if header_bytes > MAX_HEADER_BYTES:
            raise S3Error("RequestHeaderSectionTooLarge",
                          f"your request header section exceeds the maximum allowed size ({MAX_HEADER_BYTES} bytes)")
        t = self._target(request)
        q = request.query_params
        # The reserved namespace comes first: keys, copy sources and listing prefixes.
        if t.key is not None and v.is_reserved_key(t.key):
            raise reserved_namespace()
        copy_source = request.headers.get("x-amz-copy-source")
        if copy_source is not None and v.is_reserved_key(_parse_copy_source(copy_source)[1]):
            raise reserved_namespace()
        for name in ("prefix", "key-marker"):
            if v.is_reserved_key(q.get(name, "")):
                raise reserved_namespace()
        for name in q.keys():
            if name in UNSUPPORTED_SUBRESOURCES:
                raise not_implemented(f"the ?{name} sub-resource")
        present = {k for k, _ in raw_headers}  # ASGI header names are lower-case bytes
        for name, what in _UNSUPPORTED_HEADER_BYTES:
            if name in present:
                raise not_implemented(what)
        acl = request.headers.get("x-amz-acl")
        if acl is not None and acl != "private":
            raise not_implemented("canned ACLs other than private")
        storage_class = request.headers.get("x-amz-storage-class")
        if storage_class is not None and storage_class != "STANDARD":
            raise S3Error("InvalidStorageClass", "the only storage class Anvil offers is STANDARD")

        app = request.app
        auth = sig.authenticate(request, app.state.s3_credentials, self.region)
        writes = request.method in ("PUT", "POST", "DELETE")
        if writes and getattr(app.state, "recovery_mode", False):
            raise S3Error("ServiceUnavailable", "RecoveryMode: Anvil is in recovery mode and refuses writes until "
                          "an operator runs `anvil recovery resume`", 503)
        op = _Op(self, request, auth, t, request_id)
        return await op.run()


@dataclass
class _Received:
    """A verified request body not yet stored: in memory (small) or in an uncommitted BlobWriter."""

    writer: Any
    data: bytes | None
    md5: str | None
    computed: dict[str, str]

    def commit(self, objects: Any) -> Any:
        """Store it (blocking: file I/O and fsync); a Content-MD5 mismatch stores nothing (BadDigest)."""
        if self.data is not None:
            return objects.store_bytes(self.data, expected_md5=self.md5)
        return objects.store_body(self.writer, expected_md5=self.md5)


def _parse_copy_source(value: str) -> tuple[str, str, str | None]:
    raw, _, query = value.partition("?")
    text = urllib.parse.unquote(raw)
    if text.startswith("/"):
        text = text[1:]
    bucket, _, key = text.partition("/")
    version = None
    if query:
        params = urllib.parse.parse_qs(query)
        version = params.get("versionId", [None])[0]
    return bucket, key, version


class _Op:
    """One request being served."""

    def __init__(self, gw: S3Gateway, request: Request, auth: sig.AuthResult, t: Target, request_id: str):
        self.gw = gw
        self.request = request
        self.auth = auth
        self.principal: Principal = auth.principal
        self.bucket = t.bucket
        self.key = t.key
        self.q = request.query_params
        self.h = request.headers
        self.anvil: Anvil = request.app.state.anvil
        self.objects = self.anvil.objects
        self.ctx = RequestContext(principal=self.principal, request_id=request_id)

    # ------------------------------------------------------------------ plumbing

    def authorize(self, action: str, bucket: str | None = None, key: str | None = None) -> None:
        if self.principal.anonymous:
            # Anonymous callers may only read public buckets; the same answer whether or not it exists.
            b = self.objects.find_bucket(bucket) if bucket else None
            if action in READ_ACTIONS and b is not None and b.public:
                return
            raise S3Error("AccessDenied", "Access Denied: anonymous access is limited to reads of public buckets",
                          403)
        if action in ("bucket:create", "bucket:list"):
            resource = f"tenant:{self.principal.tenant}"
        else:
            resource = f"bucket:{bucket}" if key is None else f"bucket:{bucket}/{key}"
        authorize(self.principal, action, resource)

    def xml(self, root: str, inner: str, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        return Response(X.xml_document(root, inner), status_code=status, media_type="application/xml",
                        headers=headers)

    async def body_xml(self, *, checksums_describe_body: bool = True):
        reader = BodyReader(self.request, self.auth)
        data = await reader.read_all(X.MAX_XML_BODY)
        self._check_small_body_digests(data, checksums=checksums_describe_body)
        try:
            return X.parse(data)
        except X.XMLRejected as e:
            raise S3Error("MalformedXML", f"The XML you provided was not well-formed or did not validate against "
                          f"our published schema: {e}")

    def _check_small_body_digests(self, data: bytes, *, checksums: bool = True) -> None:
        md5 = _content_md5(self.h.get("content-md5"))
        if md5 is not None:
            if hashlib.md5(data).hexdigest() != md5:
                raise S3Error("BadDigest", "the Content-MD5 you specified did not match what we received")
        if not checksums:
            return
        for alg, expected in _declared_checksums(self.h).items():
            c = new_checksum(alg)
            c.update(data)
            if c.b64() != expected:
                raise S3Error("BadDigest", f"the {alg.upper()} you specified did not match the calculated checksum")

    def version_headers(self, version_id: str | None, bucket_versioning: str | None = None, *,
                        write: bool = False) -> dict[str, str]:
        """`x-amz-version-id` as S3 sends it. Reads of a versioning-configured bucket name the null
        version; a write (PutObject, CopyObject, CompleteMultipartUpload) that made a null version
        -- versioning suspended -- answers without the header, as S3 does."""
        if version_id is None:
            return {}
        if version_id == "null" and (not bucket_versioning or write):
            return {}
        return {"x-amz-version-id": version_id}

    # ------------------------------------------------------------------ routing

    async def run(self) -> Response:
        m = self.request.method
        q = self.q
        if self.bucket is None:
            if m == "GET":
                return await self.list_buckets()
            raise S3Error("MethodNotAllowed", "the specified method is not allowed against this resource", 405)
        if self.bucket in v.RESERVED_BUCKETS:
            raise S3Error("NoSuchBucket", "The specified bucket does not exist", 404)
        if self.key is None:
            if m == "PUT":
                if "versioning" in q:
                    return await self.put_versioning()
                return await self.create_bucket()
            if m == "HEAD":
                return await self.head_bucket()
            if m == "GET":
                if "location" in q:
                    return await self.get_location()
                if "versioning" in q:
                    return await self.get_versioning()
                if "versions" in q:
                    return await self.list_versions()
                if "uploads" in q:
                    return await self.list_uploads()
                if q.get("list-type") == "2":
                    return await self.list_objects(v2=True)
                return await self.list_objects(v2=False)
            if m == "DELETE":
                return await self.delete_bucket()
            if m == "POST":
                if "delete" in q:
                    return await self.delete_objects()
                raise not_implemented("POST to a bucket (browser form uploads)")
            raise S3Error("MethodNotAllowed", "the specified method is not allowed against this resource", 405)
        if m == "PUT":
            if "uploadId" in q or "partNumber" in q:
                if "x-amz-copy-source" in self.h:
                    return await self.upload_part_copy()
                return await self.upload_part()
            if "x-amz-copy-source" in self.h:
                return await self.copy_object()
            return await self.put_object()
        if m in ("GET", "HEAD"):
            if "uploadId" in q and m == "GET":
                return await self.list_parts()
            return await self.get_object(head=m == "HEAD")
        if m == "DELETE":
            if "uploadId" in q:
                return await self.abort_upload()
            return await self.delete_object()
        if m == "POST":
            if "uploads" in q:
                return await self.create_upload()
            if "uploadId" in q:
                return await self.complete_upload()
            raise not_implemented("this POST operation")
        raise S3Error("MethodNotAllowed", "the specified method is not allowed against this resource", 405)

    # ------------------------------------------------------------------ buckets

    async def list_buckets(self) -> Response:
        self.authorize("bucket:list")
        tenant = None if self.principal.admin else self.principal.tenant
        buckets = self.objects.list_buckets(tenant)
        owner = self._owner(self.principal.tenant)
        items = "".join(
            "<Bucket>" + X.element("Name", b.name) + X.element("CreationDate", X.iso_time(b.created))
            + X.element("BucketRegion", self.gw.region) + "</Bucket>"
            for b in buckets
        )
        return self.xml("ListAllMyBucketsResult", f"{owner}<Buckets>{items}</Buckets>")

    @staticmethod
    def _owner(tenant: str) -> str:
        return f"<Owner>{X.element('ID', tenant)}{X.element('DisplayName', tenant)}</Owner>"

    async def create_bucket(self) -> Response:
        name = self.bucket
        assert name is not None
        try:
            v.check_bucket_name(name)
        except AnvilError as e:
            raise S3Error("InvalidBucketName", f"The specified bucket is not valid: {e.message}")
        self.authorize("bucket:create")
        reader = BodyReader(self.request, self.auth)
        data = await reader.read_all(64 * 1024)
        if data.strip():
            try:
                root = X.parse(data)
            except X.XMLRejected as e:
                raise S3Error("MalformedXML", f"The XML you provided was not well-formed: {e}")
            if root.tag != "CreateBucketConfiguration":
                raise S3Error("MalformedXML", "expected a CreateBucketConfiguration document")
            location = X.child_text(root, "LocationConstraint")
            if location and location != self.gw.region:
                raise S3Error("IllegalLocationConstraintException",
                              f"the {location} location constraint is incompatible with the region "
                              f"'{self.gw.region}' this endpoint serves")
        existing = self.objects.find_bucket(name)
        if existing is not None:
            if existing.tenant == self.principal.tenant:
                if self.gw.region == "us-east-1":
                    # S3's legacy behaviour in us-east-1 (only there): re-creating a bucket you own is a
                    # no-op that answers 200 OK; every other region answers BucketAlreadyOwnedByYou.
                    return Response(status_code=200, headers={"location": f"/{name}"})
                raise S3Error("BucketAlreadyOwnedByYou", "Your previous request to create the named bucket "
                              "succeeded and you already own it.", 409)
            raise S3Error("BucketAlreadyExists", "The requested bucket name is not available.", 409)
        try:
            await blocking(self.objects.create_bucket, self.ctx, name)
        except AnvilError as e:
            if e.code == "AlreadyExists":
                raise S3Error("BucketAlreadyOwnedByYou", "Your previous request to create the named bucket "
                              "succeeded and you already own it.", 409)
            raise
        return Response(status_code=200, headers={"location": f"/{name}"})

    async def head_bucket(self) -> Response:
        self.authorize("bucket:read", self.bucket)
        self.objects.get_bucket(self.bucket)
        return Response(status_code=200, headers={"x-amz-bucket-region": self.gw.region})

    async def delete_bucket(self) -> Response:
        self.authorize("bucket:delete", self.bucket)
        await blocking(self.objects.delete_bucket, self.ctx, self.bucket)
        return Response(status_code=204)

    async def get_location(self) -> Response:
        self.authorize("bucket:read", self.bucket)
        self.objects.get_bucket(self.bucket)
        region = "" if self.gw.region == "us-east-1" else self.gw.region
        return Response(X.xml_document("LocationConstraint", escape(region)), media_type="application/xml")

    async def get_versioning(self) -> Response:
        self.authorize("bucket:read", self.bucket)
        b = self.objects.get_bucket(self.bucket)
        inner = X.element("Status", b.versioning) if b.versioning else ""
        return self.xml("VersioningConfiguration", inner)

    async def put_versioning(self) -> Response:
        self.authorize("bucket:configure", self.bucket)
        root = await self.body_xml()
        if root.tag != "VersioningConfiguration":
            raise S3Error("MalformedXML", "expected a VersioningConfiguration document")
        if X.child_text(root, "MfaDelete") not in (None, "Disabled"):
            raise not_implemented("MFA delete")
        status = X.child_text(root, "Status")
        if status not in ("Enabled", "Suspended"):
            raise S3Error("MalformedXML", "Status must be Enabled or Suspended")
        await blocking(self.objects.set_versioning, self.ctx, self.bucket, status)
        return Response(status_code=200)

    # ------------------------------------------------------------------ listing

    def _max_keys(self, name: str = "max-keys") -> int:
        raw = self.q.get(name)
        if raw is None or raw == "":
            return 1000
        try:
            n = int(raw)
        except ValueError:
            raise S3Error("InvalidArgument", f"{name} must be an integer")
        if n < 0:
            raise S3Error("InvalidArgument", f"{name} must not be negative")
        return min(n, 1000)

    def _encoder(self):
        enc = self.q.get("encoding-type")
        if enc is None:
            return lambda s: s
        if enc != "url":
            raise S3Error("InvalidArgument", "Invalid Encoding Method specified in Request")
        return lambda s: urllib.parse.quote(s, safe="/")

    async def list_objects(self, *, v2: bool) -> Response:
        self.authorize("object:list", self.bucket)
        q = self.q
        prefix, delimiter = q.get("prefix", ""), q.get("delimiter", "")
        max_keys = self._max_keys()
        enc = self._encoder()
        token = q.get("continuation-token") if v2 else None
        start_after = q.get("start-after", "") if v2 else q.get("marker", "")
        if not v2 and marks_common_prefix(start_after, prefix, delimiter):
            # A v1 marker that is a rolled-up prefix (S3's NextMarker) resumes after the whole prefix.
            token = token_after_prefix(start_after)
        if max_keys == 0:
            self.objects.get_bucket(self.bucket)
            objects, prefixes, truncated, next_token = [], [], False, None
        else:
            res = self.objects.list_objects(self.bucket, prefix=prefix, delimiter=delimiter,
                                            start_after=start_after, max_keys=max_keys, token=token or None)
            objects, prefixes, truncated, next_token = res.objects, res.common_prefixes, res.truncated, res.next_token
        fetch_owner = (q.get("fetch-owner") == "true") if v2 else True
        owner = self._owner(self.objects.get_bucket(self.bucket).tenant) if fetch_owner else ""
        parts = [X.element("Name", self.bucket), X.element("Prefix", enc(prefix))]
        if v2:
            if q.get("continuation-token") is not None:
                parts.append(X.element("ContinuationToken", q["continuation-token"]))
            if q.get("start-after"):
                parts.append(X.element("StartAfter", enc(q["start-after"])))
            parts.append(X.element("KeyCount", len(objects) + len(prefixes)))
            if truncated and next_token:
                parts.append(X.element("NextContinuationToken", next_token))
        else:
            parts.append(X.element("Marker", enc(q.get("marker", ""))))
            if truncated and delimiter:
                last_key = objects[-1].key if objects else ""
                last_cp = prefixes[-1] if prefixes else ""
                parts.append(X.element("NextMarker", enc(max(last_key, last_cp))))
        parts += self._listing_fields(max_keys, delimiter, enc, truncated)
        for o in objects:
            # The hot loop of every listing: one f-string per object (ETags and sizes need no escaping).
            parts.append(f"<Contents><Key>{escape(enc(o.key))}</Key><LastModified>{X.iso_time(o.created)}"
                         f'</LastModified><ETag>"{o.etag}"</ETag><Size>{o.size}</Size>'
                         f"<StorageClass>STANDARD</StorageClass>{owner}</Contents>")
        for p in prefixes:
            parts.append("<CommonPrefixes>" + X.element("Prefix", enc(p)) + "</CommonPrefixes>")
        return self.xml("ListBucketResult", "".join(parts))

    def _listing_fields(self, max_keys: int, delimiter: str, enc: Any, truncated: bool) -> list[str]:
        """The elements every listing answer carries after its markers, in S3's order."""
        fields = [X.element("MaxKeys", max_keys)]
        if delimiter:
            fields.append(X.element("Delimiter", enc(delimiter)))
        if self.q.get("encoding-type"):
            fields.append(X.element("EncodingType", "url"))
        fields.append(X.element("IsTruncated", truncated))
        return fields

    async def list_versions(self) -> Response:
        self.authorize("object:list", self.bucket)
        q = self.q
        prefix, delimiter = q.get("prefix", ""), q.get("delimiter", "")
        key_marker, version_marker = q.get("key-marker", ""), q.get("version-id-marker", "")
        max_keys = self._max_keys()
        enc = self._encoder()
        b = self.objects.get_bucket(self.bucket)
        if max_keys == 0:
            versions, prefixes, truncated, nk, nv = [], [], False, None, None
        else:
            res = self.objects.list_versions(self.bucket, prefix=prefix, delimiter=delimiter, key_marker=key_marker,
                                             version_marker=version_marker, max_keys=max_keys)
            versions, prefixes, truncated = res.versions, res.common_prefixes, res.truncated
            nk, nv = res.next_key_marker, res.next_version_marker
        owner = self._owner(b.tenant)
        parts = [X.element("Name", self.bucket), X.element("Prefix", enc(prefix)),
                 X.element("KeyMarker", enc(key_marker)), X.element("VersionIdMarker", version_marker)]
        if truncated:
            if nk is not None:
                parts.append(X.element("NextKeyMarker", enc(nk)))
            if nv is not None:
                parts.append(X.element("NextVersionIdMarker", nv))
        parts += self._listing_fields(max_keys, delimiter, enc, truncated)
        for o in versions:
            common = (X.element("Key", enc(o.key)) + X.element("VersionId", o.version_id)
                      + X.element("IsLatest", o.is_latest) + X.element("LastModified", X.iso_time(o.created)))
            if o.delete_marker:
                parts.append(f"<DeleteMarker>{common}{owner}</DeleteMarker>")
            else:
                parts.append(f"<Version>{common}" + X.element("ETag", f'"{o.etag}"') + X.element("Size", o.size)
                             + X.element("StorageClass", "STANDARD") + owner + "</Version>")
        for p in prefixes:
            parts.append("<CommonPrefixes>" + X.element("Prefix", enc(p)) + "</CommonPrefixes>")
        return self.xml("ListVersionsResult", "".join(parts))

    # ------------------------------------------------------------------ object bodies in

    async def _receive(self, *, max_size: int = v.MAX_OBJECT_SIZE,
                       also: str | None = None) -> tuple[Any, dict[str, str]]:
        """Stream the body into a blob, verifying payload hash, Content-MD5 and checksums; nothing is
        committed unless every check passes. Returns (BlobInfo, {algorithm: base64 checksum}), with
        the `also` algorithm computed too when the client sent no value for it."""
        body = await self._receive_uncommitted(max_size=max_size, also=also)
        info = await file_io(body.commit, self.objects)
        return info, body.computed

    async def _receive_uncommitted(self, *, max_size: int = v.MAX_OBJECT_SIZE, also: str | None = None) -> _Received:
        """`_receive` up to the commit: every check but Content-MD5 passed (the commit checks that and
        stores nothing on a mismatch). Bodies under SINK_CHUNK stay in memory and are stored in one go
        (`objects.store_bytes`, the native API's small-PUT path); larger ones stream into a BlobWriter."""
        reader = BodyReader(self.request, self.auth)
        # Refuse a body declared too large before reading any of it: nothing is received or stored.
        raw_length = self.h.get("x-amz-decoded-content-length") if reader.chunked else self.h.get("content-length")
        declared_length = v.decimal_length(raw_length)
        if declared_length is not None and declared_length > max_size:
            raise S3Error("EntityTooLarge", "Your proposed upload exceeds the maximum allowed size",
                          fields={"ProposedSize": raw_length, "MaxSizeAllowed": str(max_size)})
        declared = _declared_checksums(self.h)
        trailer_algs = _trailer_algorithms(self.h)
        algs = _body_algorithms(self.h)
        if also:
            algs.add(also)
        md5 = _content_md5(self.h.get("content-md5"))
        sums = {a: new_checksum(a) for a in algs}
        writer = None

        def sink(data: bytes) -> None:
            assert writer is not None
            writer.write(data)
            for c in sums.values():
                c.update(data)

        pending = bytearray()
        loop = asyncio.get_running_loop()
        inflight: asyncio.Future | None = None
        try:
            async for piece in reader.pieces():
                pending += piece
                if len(pending) >= SINK_CHUNK:
                    # Hash and write whole MiBs in a worker thread (hashlib and zlib release the GIL) while
                    # the next MiB arrives: one MiB in flight keeps order and bounds memory per upload.
                    data = bytes(pending)
                    pending.clear()
                    if writer is None:
                        writer = self.objects.blobs.writer(max_size=max_size)
                    if inflight is not None:
                        await inflight
                    inflight = loop.run_in_executor(None, sink, data)
            if inflight is not None:
                await inflight
                inflight = None
            small: bytes | None = None
            if writer is None:
                small = bytes(pending)
                if len(small) > max_size:
                    raise OverflowError("body larger than allowed")
                for c in sums.values():
                    c.update(small)
                if reader.declared_sha256 is not None:
                    reader.check_sha256(hashlib.sha256(small).hexdigest())
            else:
                if pending:
                    sink(bytes(pending))
                reader.check_sha256(writer.digests().sha256)
            computed = {a: c.b64() for a, c in sums.items()}
            expected = dict(declared)
            for alg in trailer_algs:
                value = reader.trailers.get(f"x-amz-checksum-{alg}")
                if value is None:
                    raise S3Error("InvalidRequest", f"the x-amz-checksum-{alg} trailer is missing")
                expected[alg] = value
            for alg, value in expected.items():
                if computed[alg] != value:
                    raise S3Error("BadDigest", f"the {alg.upper()} you specified did not match the calculated "
                                  "checksum")
        except BaseException as exc:
            if inflight is not None:
                # The worker may still be writing: let it finish before the file is closed and removed.
                await asyncio.wait([inflight])
            if writer is not None:
                writer.abort()
            if isinstance(exc, OverflowError):
                raise S3Error("EntityTooLarge", "your proposed upload exceeds the maximum allowed size")
            raise
        return _Received(writer, small, md5, computed)

    def _metadata(self) -> tuple[dict[str, str], dict[str, str]]:
        user: dict[str, str] = {}
        system: dict[str, str] = {}
        for k, val in self.h.items():
            if k.startswith("x-amz-meta-"):
                user[k[len("x-amz-meta-"):]] = _header_to_text(val)
        for name in SYSTEM_HEADERS:
            val = self.h.get(name)
            if val is None:
                continue
            if name == "content-encoding":
                # aws-chunked is transport framing, not a property of the stored object.
                val = ",".join(e.strip() for e in val.split(",") if e.strip() and e.strip() != "aws-chunked")
                if not val:
                    continue
            system[name] = _header_to_text(val)
        try:
            user = v.normalise_metadata(user)
        except AnvilError as e:
            raise from_anvil(e)
        return user, system

    def _content_type(self) -> str:
        return v.check_content_type(self.h.get("content-type") or S3_DEFAULT_CONTENT_TYPE)

    def _write_conditions(self) -> Conditions:
        return Conditions(if_match=parse_etag_list(self.h.get("if-match")),
                          if_none_match=parse_etag_list(self.h.get("if-none-match")))

    async def put_object(self) -> Response:
        self.authorize("object:write", self.bucket, self.key)
        self.objects.prepare_write(self.bucket, self.key)
        user, system = self._metadata()
        content_type = self._content_type()
        cond = self._write_conditions()
        body = await self._receive_uncommitted(max_size=MAX_PUT_SIZE)
        computed = body.computed
        extra: dict[str, Any] = {}
        if system:
            extra["system"] = system
        if computed:
            extra["checksums"] = computed
        objects, ctx, bucket, key = self.objects, self.ctx, self.bucket, self.key

        def store_and_submit() -> Any:
            # One trip to the file-I/O pool: make the blob durable, then queue the version from that
            # thread; the event loop awaits the commit without parking a thread on it (as native PUT).
            info = body.commit(objects)
            return objects.submit_put_object(ctx, bucket, key, info, content_type=content_type, metadata=user,
                                             cond=cond, extra=extra or None)

        with _if_match_needs_object():
            result = await committed(await file_io(store_and_submit))
        b = self.objects.get_bucket(self.bucket)
        headers = {"etag": f'"{result["etag"]}"',
                   **self.version_headers(result["version_id"], b.versioning, write=True)}
        headers.update({f"x-amz-checksum-{a}": val for a, val in computed.items()})
        if computed:
            headers["x-amz-checksum-type"] = "FULL_OBJECT"
        return Response(status_code=200, headers=headers)

    # ------------------------------------------------------------------ object bodies out

    def _object_headers(self, obj: ObjectVersion, versioning: str) -> dict[str, str]:
        headers = {
            "etag": f'"{obj.etag}"',
            "last-modified": _http_date(obj.created),
            "accept-ranges": "bytes",
            "content-type": obj.content_type,
            **self.version_headers(obj.version_id, versioning),
        }
        for k, val in obj.system_metadata.items():
            headers[k] = _text_to_header(val)
        for k, val in obj.metadata.items():
            headers[f"x-amz-meta-{k}"] = _text_to_header(val)
        return headers

    def _read_conditions(self, obj: ObjectVersion) -> None:
        h = self.h
        etag_headers = {"etag": f'"{obj.etag}"', "last-modified": _http_date(obj.created)}
        modified = int(obj.created)
        if_match = parse_etag_list(h.get("if-match"))
        if if_match is not None:
            if "*" not in if_match and obj.etag not in if_match:
                raise S3Error("PreconditionFailed", "At least one of the pre-conditions you specified did not hold",
                              412, fields={"Condition": "If-Match"})
        else:
            since = _parse_http_date(h.get("if-unmodified-since"))
            if since is not None and modified > since:
                raise S3Error("PreconditionFailed", "At least one of the pre-conditions you specified did not hold",
                              412, fields={"Condition": "If-Unmodified-Since"})
        if_none = parse_etag_list(h.get("if-none-match"))
        if if_none is not None:
            if "*" in if_none or obj.etag in if_none:
                raise S3Error("NotModified", "Not Modified", 304, headers=etag_headers)
        else:
            since = _parse_http_date(h.get("if-modified-since"))
            if since is not None and modified <= since:
                raise S3Error("NotModified", "Not Modified", 304, headers=etag_headers)

    async def get_object(self, *, head: bool) -> Response:
        self.authorize("object:read", self.bucket, self.key)
        version_id = self.q.get("versionId")
        if version_id == "":
            raise S3Error("InvalidArgument", "Version id cannot be the empty string")
        b = self.objects.get_bucket(self.bucket)
        try:
            obj = self.objects.head_object(self.bucket, self.key, version_id=version_id)
        except AnvilError as e:
            err = from_anvil(e)
            if version_id and err.code == "NoSuchVersion":
                raise S3Error("NoSuchVersion", "The specified version does not exist.", 404)
            raise err
        self._read_conditions(obj)
        headers = self._object_headers(obj, b.versioning)
        for param, header in RESPONSE_OVERRIDES.items():
            if param in self.q:
                headers[header] = _override_value(param, self.q[param])
        rng = None
        part_number = self.q.get("partNumber")
        range_header = self.h.get("range")
        if part_number is not None:
            if range_header:
                raise S3Error("InvalidRequest", "Cannot specify both Range header and partNumber query parameter")
            try:
                n = int(part_number)
            except ValueError:
                raise S3Error("InvalidArgument", "Part number must be an integer between 1 and 10000, inclusive")
            count = obj.parts_count or 1
            if not 1 <= n <= count:
                raise S3Error("InvalidPartNumber", "The requested partnumber is not satisfiable", 416)
            if obj.parts_count:
                start = sum(size for _, size in obj.chunks[: n - 1])
                rng = v.ByteRange(start, start + obj.chunks[n - 1][1] - 1)
                headers["x-amz-mp-parts-count"] = str(count)
            elif obj.size:
                # An object stored in one piece is its own part 1: S3 answers as for a range over all of it
                # (206 with Content-Range) and sends no parts count.
                rng = v.ByteRange(0, obj.size - 1)
        elif range_header:
            try:
                rng = v.parse_range(range_header, obj.size)
            except AnvilError as e:
                if e.code == "InvalidArgument":
                    rng = None  # S3 ignores a malformed Range header and returns the whole object
                elif obj.size == 0 and range_header.strip().startswith("bytes=-"):
                    rng = None  # S3 answers a suffix range on an empty object with the (empty) object, 200
                else:
                    raise S3Error("InvalidRange", "The requested range is not satisfiable", 416,
                                  headers={"content-range": f"bytes */{obj.size}"},
                                  fields={"RangeRequested": range_header, "ActualObjectSize": str(obj.size)})
        whole = rng is None or (part_number is not None and not obj.parts_count)
        if whole and (self.h.get("x-amz-checksum-mode") or "").upper() == "ENABLED":
            for alg, val in obj.checksums.items():
                headers[f"x-amz-checksum-{alg}"] = val
            if obj.checksums:
                headers["x-amz-checksum-type"] = _checksum_type(obj.checksums)
        status, length = 200, obj.size
        if rng is not None and (rng.length != obj.size or range_header or part_number is not None):
            status, length = 206, rng.length
            headers["content-range"] = f"bytes {rng.start}-{rng.end}/{obj.size}"
        headers["content-length"] = str(length)
        if head:
            return Response(status_code=status, headers=headers)
        if length <= INLINE_BODY_LIMIT:
            # Read inline, as the native API does: a page-cache read of a small blob costs less than the
            # hand-off to a worker thread and back.
            body = b"".join(self.objects.read_body(obj, rng))
            return Response(body, status_code=status, headers=headers)
        return StreamingResponse(_guarded(self.objects.read_body(obj, rng)), status_code=status, headers=headers)

    # ------------------------------------------------------------------ deletes

    async def delete_object(self) -> Response:
        self.authorize("object:delete", self.bucket, self.key)
        version_id = self.q.get("versionId")
        if version_id == "":
            raise S3Error("InvalidArgument", "Version id cannot be the empty string")
        if version_id is not None and not (version_id.isascii() and version_id.isprintable()):
            # No version id has such characters, and an absent version's id is echoed in a header below.
            raise S3Error("InvalidArgument", "Invalid version id specified")
        cond = Conditions(if_match=parse_etag_list(self.h.get("if-match")))
        b = self.objects.get_bucket(self.bucket)
        try:
            result = await blocking(self.objects.delete_object, self.ctx, self.bucket, self.key,
                                    version_id=version_id, cond=cond)
        except AnvilError as e:
            if version_id and e.code == "NotFound" and e.message.startswith("version"):
                return Response(status_code=204, headers={"x-amz-version-id": version_id})
            raise
        headers = self.version_headers(result.get("version_id"), b.versioning)
        if result.get("delete_marker"):
            headers["x-amz-delete-marker"] = "true"
        return Response(status_code=204, headers=headers)

    async def delete_objects(self) -> Response:
        self.authorize("object:delete", self.bucket)
        root = await self.body_xml()
        if root.tag != "Delete":
            raise S3Error("MalformedXML", "expected a Delete document")
        quiet = (X.child_text(root, "Quiet") or "").strip().lower() == "true"
        entries = root.findall("Object")
        if len(entries) > MAX_DELETE_KEYS:
            raise S3Error("MalformedXML", f"a DeleteObjects request may name at most {MAX_DELETE_KEYS} keys")
        if not entries:
            raise S3Error("MalformedXML", "a DeleteObjects request must name at least one key")
        targets: list[tuple[str, str | None]] = []
        for e in entries:
            key = X.child_text(e, "Key")
            if not key:
                raise S3Error("MalformedXML", "every Object needs a Key")
            targets.append((key, X.child_text(e, "VersionId") or None))
        self.objects.get_bucket(self.bucket)  # NoSuchBucket for the whole request, not per key

        def run() -> list[str]:
            out: list[str] = []
            for key, version_id in targets:
                base = X.element("Key", key) + (X.element("VersionId", version_id) if version_id else "")
                try:
                    if v.is_reserved_key(key):
                        raise reserved_namespace()
                    authorize(self.principal, "object:delete", f"bucket:{self.bucket}/{key}")
                    result = self.objects.delete_object(self.ctx, self.bucket, key, version_id=version_id)
                except (AnvilError, S3Error) as err:
                    s3 = from_anvil(err) if isinstance(err, AnvilError) else err
                    if s3.code == "NoSuchVersion" and version_id:
                        s3 = None  # deleting an absent version succeeds, as in S3
                    if s3 is not None:
                        out.append("<Error>" + base + X.element("Code", s3.code) + X.element("Message", s3.message)
                                   + "</Error>")
                        continue
                    result = {"version_id": version_id, "delete_marker": False}
                if quiet:
                    continue
                extra = ""
                if result.get("delete_marker"):
                    extra = X.element("DeleteMarker", True)
                    if result.get("version_id") and not version_id:
                        extra += X.element("DeleteMarkerVersionId", result["version_id"])
                out.append("<Deleted>" + base + extra + "</Deleted>")
            return out

        return self.xml("DeleteResult", "".join(await blocking(run)))

    # ------------------------------------------------------------------ copy

    def _copy_source(self) -> tuple[str, str, str | None]:
        src_bucket, src_key, src_version = _parse_copy_source(self.h["x-amz-copy-source"])
        if not src_bucket or not src_key:
            raise S3Error("InvalidArgument", "Copy Source must name the source bucket and key: bucket/key")
        if v.is_reserved_key(src_key):
            raise reserved_namespace()
        return src_bucket, src_key, src_version

    def _source_object(self, src_bucket: str, src_key: str, src_version: str | None) -> ObjectVersion:
        self.authorize("object:read", src_bucket, src_key)
        try:
            src = self.objects.head_object(src_bucket, src_key, version_id=src_version)
        except AnvilError as e:
            err = from_anvil(e)
            if err.code == "MethodNotAllowed":
                raise S3Error("InvalidRequest", "The source of a copy request may not specifically refer to a "
                              "delete marker by version id.")
            raise S3Error(err.code, err.message, err.status)
        self._copy_conditions(src)
        return src

    def _copy_conditions(self, src: ObjectVersion) -> None:
        h = self.h
        modified = int(src.created)
        failed = S3Error("PreconditionFailed", "At least one of the pre-conditions you specified did not hold", 412)
        if_match = parse_etag_list(h.get("x-amz-copy-source-if-match"))
        if_none = parse_etag_list(h.get("x-amz-copy-source-if-none-match"))
        unmod = _parse_http_date(h.get("x-amz-copy-source-if-unmodified-since"))
        mod = _parse_http_date(h.get("x-amz-copy-source-if-modified-since"))
        if if_match is not None:
            if "*" not in if_match and src.etag not in if_match:
                raise failed
        elif unmod is not None and modified > unmod:
            raise failed
        if if_none is not None:
            if "*" in if_none or src.etag in if_none:
                raise failed
        elif mod is not None and modified <= mod:
            raise failed

    async def copy_object(self) -> Response:
        src_bucket, src_key, src_version = self._copy_source()
        self.authorize("object:write", self.bucket, self.key)
        src = self._source_object(src_bucket, src_key, src_version)
        directive = (self.h.get("x-amz-metadata-directive") or "COPY").upper()
        if directive not in ("COPY", "REPLACE"):
            raise S3Error("InvalidArgument", "Unknown metadata directive.")
        user, system = self._metadata() if directive == "REPLACE" else ({}, {})
        if directive == "COPY" and src_bucket == self.bucket and src_key == self.key and src_version is None:
            raise S3Error("InvalidRequest", "This copy request is illegal because it is trying to copy an object to "
                          "itself without changing the object's metadata, storage class, website redirect location "
                          "or encryption attributes.")
        with _if_match_needs_object():
            result = await blocking(
                self.objects.copy_object, self.ctx, src_bucket=src_bucket, src_key=src_key,
                src_version=src.version_id, bucket=self.bucket, key=self.key, metadata_directive=directive,
                content_type=self._content_type() if directive == "REPLACE" else None, metadata=user,
                cond=self._write_conditions(), src_cond=Conditions(if_match=[src.etag]), system_metadata=system,
            )
        b = self.objects.get_bucket(self.bucket)
        headers = self.version_headers(result["version_id"], b.versioning, write=True)
        src_b = self.objects.get_bucket(src_bucket)
        if src_b.versioning:
            headers["x-amz-copy-source-version-id"] = src.version_id
        inner = X.element("ETag", f'"{result["etag"]}"') + X.element("LastModified", X.iso_time(time.time()))
        return self.xml("CopyObjectResult", inner, headers=headers)

    # ------------------------------------------------------------------ multipart

    def _upload(self) -> dict[str, Any]:
        upload_id = self.q.get("uploadId") or ""
        try:
            up = self.objects.get_upload(self.bucket, upload_id)
        except AnvilError as e:
            if e.code == "NotFound":
                self.objects.get_bucket(self.bucket)
                raise S3Error("NoSuchUpload", "The specified upload does not exist. The upload ID may be invalid, "
                              "or the upload may have been aborted or completed.", 404)
            raise
        if up["key"] != self.key:
            raise S3Error("NoSuchUpload", "The specified upload does not exist for this key.", 404)
        return up

    def _part_number(self) -> int:
        try:
            n = int(self.q.get("partNumber", ""))
        except ValueError:
            n = 0
        if not 1 <= n <= v.MAX_PART_NUMBER:
            raise S3Error("InvalidArgument", "Part number must be an integer between 1 and 10000, inclusive")
        return n

    async def create_upload(self) -> Response:
        self.authorize("object:write", self.bucket, self.key)
        v.check_key(self.key)
        user, system = self._metadata()
        content_type = self._content_type()
        extra: dict[str, Any] = {}
        if system:
            extra["system"] = system
        alg = (self.h.get("x-amz-checksum-algorithm") or "").lower()
        ctype = (self.h.get("x-amz-checksum-type") or "").upper()
        if ctype and ctype not in ("COMPOSITE", "FULL_OBJECT"):
            raise S3Error("InvalidRequest", "x-amz-checksum-type must be COMPOSITE or FULL_OBJECT")
        if ctype and not alg:
            raise S3Error("InvalidRequest", "x-amz-checksum-type needs an x-amz-checksum-algorithm")
        if alg:
            if alg not in ALGORITHMS:
                raise not_implemented(f"the {alg.upper()} checksum algorithm")
            # As S3: CRC64NVME is only ever a full-object checksum, the others default to composite.
            ctype = ctype or ("COMPOSITE" if alg in COMPOSITE_ALGORITHMS else "FULL_OBJECT")
            if alg not in (FULL_OBJECT_ALGORITHMS if ctype == "FULL_OBJECT" else COMPOSITE_ALGORITHMS):
                raise S3Error("InvalidRequest", f"The {ctype} checksum type cannot be used with the {alg.upper()} "
                              "checksum algorithm.")
            extra["checksum_algorithm"] = alg
            extra["checksum_type"] = ctype
        result = await blocking(self.objects.create_multipart, self.ctx, self.bucket, self.key,
                                content_type=content_type, metadata=user, extra=extra or None)
        inner = X.element("Bucket", self.bucket) + X.element("Key", self.key) + X.element("UploadId",
                                                                                        result["upload_id"])
        headers = {"x-amz-checksum-algorithm": alg.upper(), "x-amz-checksum-type": ctype} if alg else None
        return self.xml("InitiateMultipartUploadResult", inner, headers=headers)

    async def upload_part(self) -> Response:
        n = self._part_number()
        up = self._upload()
        self.authorize("object:write", self.bucket, self.key)
        alg = up["extra"].get("checksum_algorithm")
        # A composite checksum is made of the client's part checksums, so each part must bring one.
        # A full-object CRC only needs every part's CRC and size, which Anvil computes as the part
        # streams in when the client sends none.
        if alg and _upload_checksum_type(up) == "COMPOSITE" and alg not in _body_algorithms(self.h):
            raise S3Error("InvalidRequest", f"this upload expects an x-amz-checksum-{alg} on every part")
        info, computed = await self._receive(max_size=MAX_PUT_SIZE, also=alg)
        result = await blocking(self.objects.upload_part, self.ctx, self.bucket, up["upload_id"], n, info,
                                checksums=computed or None)
        headers = {"etag": f'"{result["etag"]}"'}
        headers.update({f"x-amz-checksum-{a}": val for a, val in computed.items()})
        return Response(status_code=200, headers=headers)

    async def upload_part_copy(self) -> Response:
        n = self._part_number()
        src_bucket, src_key, src_version = self._copy_source()
        up = self._upload()
        self.authorize("object:write", self.bucket, self.key)
        src = self._source_object(src_bucket, src_key, src_version)
        rng = None
        raw_range = self.h.get("x-amz-copy-source-range")
        if raw_range:
            try:
                rng = v.parse_range(raw_range, src.size)
            except AnvilError:
                rng = None
            if rng is None or raw_range.startswith("bytes=-") or raw_range.endswith("-"):
                raise S3Error("InvalidArgument", "The x-amz-copy-source-range value must be of the form "
                              "bytes=first-last where first and last are the zero-based offsets of the first and last "
                              "bytes to copy")
        objects = self.objects
        alg = up["extra"].get("checksum_algorithm")

        def copy_bytes():
            writer = objects.blobs.writer()
            checksum = new_checksum(alg) if alg else None
            try:
                for piece in objects.read_body(src, rng):
                    writer.write(piece)
                    if checksum is not None:
                        checksum.update(piece)
            except BaseException:
                writer.abort()
                raise
            return objects.store_body(writer), ({alg: checksum.b64()} if checksum is not None else {})

        info, computed = await blocking(copy_bytes)
        result = await blocking(self.objects.upload_part, self.ctx, self.bucket, up["upload_id"], n, info,
                                checksums=computed or None)
        inner = (X.element("ETag", f'"{result["etag"]}"') + X.element("LastModified", X.iso_time(time.time()))
                 + "".join(X.element(f"Checksum{a.upper()}", val) for a, val in computed.items()))
        headers = {"x-amz-copy-source-version-id": src.version_id} if src.version_id != "null" else None
        return self.xml("CopyPartResult", inner, headers=headers)

    async def list_parts(self) -> Response:
        up = self._upload()
        self.authorize("object:read", self.bucket, self.key)
        parts = self.objects.list_parts(self.bucket, up["upload_id"])
        try:
            marker = int(self.q.get("part-number-marker") or 0)
        except ValueError:
            raise S3Error("InvalidArgument", "part-number-marker must be an integer")
        max_parts = self._max_keys("max-parts")
        selected = [p for p in parts if p["part_number"] > marker]
        truncated = len(selected) > max_parts
        selected = selected[:max_parts]
        out = [X.element("Bucket", self.bucket), X.element("Key", self.key), X.element("UploadId", up["upload_id"]),
               X.element("PartNumberMarker", marker)]
        if selected:
            out.append(X.element("NextPartNumberMarker", selected[-1]["part_number"]))
        out += [X.element("MaxParts", max_parts), X.element("IsTruncated", truncated)]
        if up["extra"].get("checksum_algorithm"):
            out += [X.element("ChecksumAlgorithm", up["extra"]["checksum_algorithm"].upper()),
                    X.element("ChecksumType", _upload_checksum_type(up))]
        owner = self._owner(up["tenant"])
        out.append(owner.replace("Owner>", "Initiator>") + owner + X.element("StorageClass", "STANDARD"))
        for p in selected:
            sums = "".join(X.element(f"Checksum{a.upper()}", val) for a, val in p["checksums"].items())
            out.append("<Part>" + X.element("PartNumber", p["part_number"])
                       + X.element("LastModified", X.iso_time(p["last_modified"]))
                       + X.element("ETag", f'"{p["etag"]}"') + X.element("Size", p["size"]) + sums + "</Part>")
        return self.xml("ListPartsResult", "".join(out))

    async def list_uploads(self) -> Response:
        self.authorize("object:list", self.bucket)
        q = self.q
        prefix, delimiter = q.get("prefix", ""), q.get("delimiter", "")
        key_marker, id_marker = q.get("key-marker", ""), q.get("upload-id-marker", "")
        max_uploads = self._max_keys("max-uploads")
        enc = self._encoder()
        b = self.objects.get_bucket(self.bucket)
        res = UploadListResult()
        if max_uploads:
            res = self.objects.list_uploads(self.bucket, prefix=prefix, delimiter=delimiter, key_marker=key_marker,
                                            upload_id_marker=id_marker, max_uploads=max_uploads)
        out = [X.element("Bucket", self.bucket), X.element("KeyMarker", enc(key_marker)),
               X.element("UploadIdMarker", id_marker)]
        if res.truncated:
            # After a common prefix there is no upload id: the next page starts past the whole prefix.
            if res.next_key_marker is not None:
                out.append(X.element("NextKeyMarker", enc(res.next_key_marker)))
            if res.next_upload_id_marker is not None:
                out.append(X.element("NextUploadIdMarker", res.next_upload_id_marker))
        out.append(X.element("Prefix", enc(prefix)))
        if delimiter:
            out.append(X.element("Delimiter", enc(delimiter)))
        out += [X.element("MaxUploads", max_uploads), X.element("IsTruncated", res.truncated)]
        if q.get("encoding-type"):
            out.append(X.element("EncodingType", "url"))
        owner = self._owner(b.tenant)
        people = owner.replace("Owner>", "Initiator>") + owner
        for u in res.uploads:
            sums = ""
            if u.get("checksum_algorithm"):
                sums = (X.element("ChecksumAlgorithm", u["checksum_algorithm"].upper())
                        + X.element("ChecksumType", u["checksum_type"]))
            out.append("<Upload>" + X.element("Key", enc(u["key"])) + X.element("UploadId", u["upload_id"])
                       + people + X.element("StorageClass", "STANDARD")
                       + X.element("Initiated", X.iso_time(u["created"])) + sums + "</Upload>")
        for p in res.common_prefixes:
            out.append("<CommonPrefixes>" + X.element("Prefix", enc(p)) + "</CommonPrefixes>")
        return self.xml("ListMultipartUploadsResult", "".join(out))

    async def complete_upload(self) -> Response:
        up = self._upload()
        self.authorize("object:write", self.bucket, self.key)
        # Checksum headers here describe the assembled object (below), not the XML document.
        root = await self.body_xml(checksums_describe_body=False)
        if root.tag != "CompleteMultipartUpload":
            raise S3Error("MalformedXML", "expected a CompleteMultipartUpload document")
        parts: list[tuple[int, str]] = []
        claimed_sums: dict[int, dict[str, str]] = {}
        for p in root.findall("Part"):
            number, etag = X.child_text(p, "PartNumber"), X.child_text(p, "ETag")
            if number is None or etag is None:
                raise S3Error("MalformedXML", "every Part needs a PartNumber and an ETag")
            try:
                n = int(number)
            except ValueError:
                raise S3Error("MalformedXML", "PartNumber must be an integer")
            parts.append((n, etag.strip().strip('"')))
            claimed_sums[n] = {a: X.child_text(p, f"Checksum{a.upper()}") for a in ALGORITHMS
                               if X.child_text(p, f"Checksum{a.upper()}")}
        if not parts:
            raise S3Error("MalformedXML", "The XML you provided was not well-formed or did not validate against our "
                          "published schema: no parts")
        stored = {p["part_number"]: p for p in self.objects.list_parts(self.bucket, up["upload_id"])}
        for n, sums in claimed_sums.items():
            have = stored.get(n, {}).get("checksums", {})
            for alg, val in sums.items():
                if alg in have and have[alg] != val:
                    raise S3Error("InvalidPart", f"the {alg.upper()} of part {n} does not match the uploaded part")
        expected = self._claimed_object_checksum(up)
        with _if_match_needs_object():
            result = await blocking(self.objects.complete_multipart, self.ctx, self.bucket, up["upload_id"], parts,
                                    cond=self._write_conditions(), expected_checksum=expected)
        b = self.objects.get_bucket(self.bucket)
        headers = self.version_headers(result["version_id"], b.versioning, write=True)
        sums = result.get("checksums") or {}
        inner = (X.element("Location", self._object_url())
                 + X.element("Bucket", self.bucket) + X.element("Key", self.key)
                 + X.element("ETag", f'"{result["etag"]}"')
                 + "".join(X.element(f"Checksum{a.upper()}", val) for a, val in sums.items()))
        if sums:
            inner += X.element("ChecksumType", _checksum_type(sums))
        return self.xml("CompleteMultipartUploadResult", inner, headers=headers)

    def _claimed_object_checksum(self, up: dict[str, Any]) -> str | None:
        """The whole object's checksum a CompleteMultipartUpload carries, if any, once it is known to
        fit the upload: same algorithm and checksum type as CreateMultipartUpload chose."""
        alg = up["extra"].get("checksum_algorithm")
        have = _upload_checksum_type(up) if alg else "null"
        ctype = self.h.get("x-amz-checksum-type")
        if ctype is not None and ctype.upper() != have:
            raise S3Error("InvalidRequest", f"The upload was created using the {have} checksum type. The complete "
                          "request must use the same checksum type.")
        claims = _declared_checksums(self.h, part_count_ok=True)
        if not claims:
            return None
        if list(claims) != [alg]:
            raise S3Error("InvalidRequest", f"The upload was created using {alg.upper() if alg else 'no'} checksum "
                          "algorithm. The complete request must use the same checksum algorithm.")
        return claims[alg]

    def _object_url(self) -> str:
        """The object's absolute URL in the addressing style of this request (S3's `Location`)."""
        host = self.h.get("host") or self.request.url.netloc
        bare = host.rsplit(":", 1)[0].lower()
        path = "/" + urllib.parse.quote(self.key or "")
        if not (self.gw.base_domain and bare.endswith("." + self.gw.base_domain)):
            path = f"/{self.bucket}{path}"
        return f"{self.request.url.scheme}://{host}{path}"

    async def abort_upload(self) -> Response:
        up = self._upload()
        self.authorize("object:delete", self.bucket, self.key)
        await blocking(self.objects.abort_multipart, self.ctx, self.bucket, up["upload_id"])
        return Response(status_code=204)


@contextmanager
def _if_match_needs_object() -> Iterator[None]:
    """An If-Match write (PutObject, CopyObject, CompleteMultipartUpload) with no current object to match
    -- none, or a delete marker -- is 404 NoSuchKey in S3, not 412."""
    try:
        yield
    except AnvilError as e:
        if e.code == "PreconditionFailed" and e.message == IF_MATCH_NO_OBJECT:
            raise S3Error("NoSuchKey", "The specified key does not exist.", 404) from None
        raise


def _guarded(it: Iterator[bytes]) -> Iterator[bytes]:
    """Once headers are sent an error can only cut the stream short; log it rather than hide it."""
    try:
        yield from it
    except Exception:  # noqa: BLE001
        log.exception("error while streaming an object body")
        raise


def _content_md5(value: str | None) -> str | None:
    if value is None:
        return None
    md5 = content_md5_hex(value)
    if md5 is None:
        raise S3Error("InvalidDigest", "The Content-MD5 you specified was invalid.")
    return md5


def _declared_checksums(headers, *, part_count_ok: bool = False) -> dict[str, str]:
    """The `x-amz-checksum-<algorithm>` headers, checked for form; `part_count_ok` admits a composite
    multipart checksum (`<base64>-N`)."""
    out: dict[str, str] = {}
    for k, val in headers.items():
        if k.startswith("x-amz-checksum-") and k not in ("x-amz-checksum-mode", "x-amz-checksum-algorithm",
                                                          "x-amz-checksum-type"):
            alg = k[len("x-amz-checksum-"):]
            if alg not in ALGORITHMS:
                raise not_implemented(f"the {alg.upper()} checksum algorithm")
            digest, dash, count = val.partition("-")
            if not (part_count_ok and dash and count.isdigit()):
                digest = val
            try:
                raw = base64.b64decode(digest, validate=True)
            except (binascii.Error, ValueError):
                raw = b""
            if len(raw) != digest_length(alg):
                raise S3Error("InvalidRequest", f"Value for x-amz-checksum-{alg} header is invalid.")
            out[alg] = val
    return out


def _body_algorithms(headers) -> set[str]:
    """The checksum algorithms a request body comes with: as headers, as trailers, or announced by
    the SDK (`x-amz-sdk-checksum-algorithm`, whose value then comes in one of the other two)."""
    algs = set(_declared_checksums(headers)) | set(_trailer_algorithms(headers))
    sdk_alg = (headers.get("x-amz-sdk-checksum-algorithm") or "").lower()
    if sdk_alg in ALGORITHMS:
        algs.add(sdk_alg)
    return algs


def _upload_checksum_type(up: dict[str, Any]) -> str:
    # Uploads created before full-object checksums have no type: they were all composite.
    return up["extra"].get("checksum_type", "COMPOSITE")


def _checksum_type(checksums: dict[str, str]) -> str:
    # Only a composite multipart checksum carries a part count (`-N`); base64 itself has no '-'.
    return "COMPOSITE" if any("-" in val for val in checksums.values()) else "FULL_OBJECT"


def _trailer_algorithms(headers) -> list[str]:
    declared = headers.get("x-amz-trailer")
    if not declared:
        return []
    out = []
    for name in (n.strip().lower() for n in declared.split(",")):
        if not name.startswith("x-amz-checksum-"):
            raise S3Error("InvalidRequest", f"unsupported trailer {name}")
        alg = name[len("x-amz-checksum-"):]
        if alg not in ALGORITHMS:
            raise not_implemented(f"the {alg.upper()} checksum algorithm")
        out.append(alg)
    return out
