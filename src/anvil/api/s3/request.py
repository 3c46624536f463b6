"""What every S3 handler shares: the request's state, authorisation, XML answers, version headers and
the checks of small bodies and declared checksums."""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import TYPE_CHECKING

from starlette.datastructures import Headers, QueryParams
from starlette.requests import Request
from starlette.responses import Response

from anvil.api.fastreq import amz_items
from anvil.api.limits import declared_length
from anvil.api.s3 import auth as sig
from anvil.api.s3 import xmlutil as X
from anvil.api.s3.body import BodyReader, message_too_long
from anvil.api.s3.errors import S3Error, not_implemented
from anvil.context import Principal, RequestContext
from anvil.errors import AnvilError
from anvil.identity import authorize, gate
from anvil.identity.gate import OBJECT_ACTIONS
from anvil.objects.checksums import ALGORITHMS, content_md5_hex, digest_length, new_checksum

if TYPE_CHECKING:
    from anvil.api.s3.gateway import S3Gateway
    from anvil.objects.service import ObjectService

READ_ACTIONS = frozenset({"object:read", "object:list"})
# Checksum headers that name an algorithm or a type rather than carry a value.
_CHECKSUM_CONTROL_HEADERS = frozenset({"x-amz-checksum-mode", "x-amz-checksum-algorithm", "x-amz-checksum-type"})


class S3Request:
    """One authenticated request being served: what every handler reads. Slots, as one is made per request."""

    __slots__ = ("gw", "request", "auth", "principal", "bucket", "key", "q", "h", "objects", "ctx")

    def __init__(self, gw: S3Gateway, request: Request, auth: sig.AuthResult, bucket: str | None, key: str | None,
                 q: QueryParams, request_id: str):
        self.gw = gw
        self.request = request
        self.auth = auth
        self.principal: Principal = auth.principal
        self.bucket = bucket
        self.key = key
        self.q = q
        self.h: Headers = request.headers
        self.objects: ObjectService = request.app.state.anvil.objects
        self.ctx = RequestContext(principal=self.principal, request_id=request_id)

    def authorize(self, action: str, bucket: str | None = None, key: str | None = None) -> None:
        if self.principal.anonymous:
            # Anonymous callers may only read public buckets; the same answer whether or not it exists.
            b = self.objects.find_bucket(bucket) if bucket else None
            if action in READ_ACTIONS and b is not None and b.public:
                self._binding(action, bucket, key)
                return
            if action == "object:read" and b is not None and key is not None and self._object_public(bucket, key):
                self._binding(action, bucket, key)
                return  # canned public-read on the object itself
            raise S3Error("AccessDenied", "Access Denied: anonymous access is limited to reads of public buckets",
                          403)
        if action in ("bucket:create", "bucket:list"):
            resource = f"tenant:{self.principal.tenant}"
        else:
            resource = f"bucket:{bucket}" if key is None else f"bucket:{bucket}/{key}"
        try:
            authorize(self.principal, action, resource)
        except AnvilError as e:
            # Tenants are S3 accounts (docs/s3.md, "Tenants are S3 accounts"). An object made public-read
            # is readable by every account; any other request into another account's bucket is S3's
            # 403 AccessDenied -- bucket names are global, so S3 does not hide that the bucket exists
            # (the native API does: it answers as for a missing bucket).
            if action == "object:read" and bucket and key is not None and self._object_public(bucket, key):
                if getattr(e, "binding", False):
                    raise  # a bucket binding refused it: public-read does not override the binding
                return
            if e.code == "NotFound" and getattr(e, "denied", False):
                raise S3Error("AccessDenied", "Access Denied", 403) from None
            raise

    def _binding(self, action: str, bucket: str | None, key: str | None) -> None:
        """A bound bucket decides objects by relationships even where public access let the request in."""
        if bucket and key is not None and action in OBJECT_ACTIONS:
            hook = gate._object_access
            if hook is not None:
                hook.check(self.principal, action, bucket, key)

    def _object_public(self, bucket: str, key: str) -> bool:
        try:
            obj = self.objects.head_object(bucket, key, version_id=self.q.get("versionId") or None)
        except AnvilError:
            return False
        return bool(obj.extra.get("public"))

    async def body_xml(self, *, checksums_describe_body: bool = True):
        reader = BodyReader(self.request, self.auth)
        # A body declared too large is refused before any of it is read (read_all caps the rest).
        declared = reader.decoded_length if reader.chunked else declared_length(self.h.get("content-length"))
        if declared is not None and declared > X.MAX_XML_BODY:
            raise message_too_long()
        data = await reader.read_all(X.MAX_XML_BODY)
        check_small_body_digests(self.h, data, checksums=checksums_describe_body)
        try:
            return X.parse(data)
        except X.XMLRejected as e:
            raise S3Error("MalformedXML", f"The XML you provided was not well-formed or did not validate against "
                          f"our published schema: {e}")


def xml(root: str, inner: str, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(X.xml_document(root, inner), status_code=status, media_type="application/xml", headers=headers)


def owner(tenant: str) -> str:
    return f"<Owner>{X.element('ID', tenant)}{X.element('DisplayName', tenant)}</Owner>"


def version_headers(version_id: str | None, bucket_versioning: str | None = None, *,
                    write: bool = False) -> dict[str, str]:
    """`x-amz-version-id` as S3 sends it. Reads of a versioning-configured bucket name the null
    version; a write (PutObject, CopyObject, CompleteMultipartUpload) that made a null version
    -- versioning suspended -- answers without the header, as S3 does."""
    if version_id is None:
        return {}
    if version_id == "null" and (not bucket_versioning or write):
        return {}
    return {"x-amz-version-id": version_id}


def check_small_body_digests(headers: Headers, data: bytes, *, checksums: bool = True) -> None:
    md5 = content_md5(headers.get("content-md5"))
    if md5 is not None:
        if hashlib.md5(data).hexdigest() != md5:
            raise S3Error("BadDigest", "the Content-MD5 you specified did not match what we received")
    if not checksums:
        return
    for alg, expected in declared_checksums(headers).items():
        c = new_checksum(alg)
        c.update(data)
        if c.b64() != expected:
            raise S3Error("BadDigest", f"the {alg.upper()} you specified did not match the calculated checksum")


def content_md5(value: str | None) -> str | None:
    if value is None:
        return None
    md5 = content_md5_hex(value)
    if md5 is None:
        raise S3Error("InvalidDigest", "The Content-MD5 you specified was invalid.")
    return md5


def declared_checksums(headers, *, part_count_ok: bool = False) -> dict[str, str]:
    """The `x-amz-checksum-<algorithm>` headers, checked for form; `part_count_ok` admits a composite
    multipart checksum (`<base64>-N`)."""
    out: dict[str, str] = {}
    for k, val in amz_items(headers):
        if k.startswith("x-amz-checksum-") and k not in _CHECKSUM_CONTROL_HEADERS:
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


def trailer_algorithms(headers) -> list[str]:
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


def body_algorithms(headers, declared: dict[str, str] | None = None, trailers: list[str] | None = None) -> set[str]:
    """The checksum algorithms a request body comes with: as headers, as trailers, or announced by
    the SDK (`x-amz-sdk-checksum-algorithm`, whose value then comes in one of the other two).
    `declared` and `trailers`: `declared_checksums(headers)` and `trailer_algorithms(headers)`, when
    the caller has them already."""
    algs = set(declared_checksums(headers) if declared is None else declared)
    algs.update(trailer_algorithms(headers) if trailers is None else trailers)
    sdk_alg = (headers.get("x-amz-sdk-checksum-algorithm") or "").lower()
    if sdk_alg in ALGORITHMS:
        algs.add(sdk_alg)
    return algs


def checksum_type(checksums: dict[str, str]) -> str:
    # Only a composite multipart checksum carries a part count (`-N`); base64 itself has no '-'.
    return "COMPOSITE" if any("-" in val for val in checksums.values()) else "FULL_OBJECT"
