"""Object and bucket sub-resources beyond the basics: tagging (object and bucket) and
GetObjectAttributes, stored as source records through `ObjectService.set_object_tags` /
`put_bucket_setting` (lifecycle and CORS documents live in lifecycle.py and cors.py)."""

from __future__ import annotations

import urllib.parse
from datetime import UTC, datetime
from typing import Any

from starlette.responses import Response

from anvil.api.common import blocking
from anvil.api.s3 import xmlutil as X
from anvil.api.s3.errors import S3Error, from_anvil
from anvil.api.s3.request import S3Request, checksum_type, version_headers, xml
from anvil.errors import AnvilError

MAX_OBJECT_TAGS = 10
MAX_BUCKET_TAGS = 50
MAX_TAG_KEY = 128
MAX_TAG_VALUE = 256


# ------------------------------------------------------------------ tags


def check_tags(tags: list[list[str]], limit: int, what: str) -> list[list[str]]:
    """S3's tag rules (AWS "Categorizing your storage using tags"): at most 10 per object (50 per
    bucket), keys 1-128 and values 0-256 Unicode characters, keys unique, no `aws:` prefix."""
    if len(tags) > limit:
        raise S3Error("BadRequest" if what == "object" else "InvalidTag",
                      f"{what.capitalize()} tags cannot be greater than {limit}")
    seen: set[str] = set()
    for k, val in tags:
        if not 1 <= len(k) <= MAX_TAG_KEY:
            raise S3Error("InvalidTag", "The TagKey you have provided is invalid")
        if len(val) > MAX_TAG_VALUE:
            raise S3Error("InvalidTag", "The TagValue you have provided is invalid")
        if k.lower().startswith("aws:"):
            raise S3Error("InvalidTag", "Your TagKey cannot be prefixed with aws:")
        if k in seen:
            raise S3Error("InvalidTag", "Cannot provide multiple Tags with the same key")
        seen.add(k)
    return tags


def header_tags(value: str | None) -> list[list[str]] | None:
    """`x-amz-tagging: k1=v1&k2=v2` (URL query encoded), checked; None when absent."""
    if value is None:
        return None
    raw = value.encode("latin-1", "replace").decode("utf-8", "replace")
    pairs = urllib.parse.parse_qsl(raw, keep_blank_values=True)
    return check_tags([[k, val] for k, val in pairs], MAX_OBJECT_TAGS, "object")


async def _tag_document(r: S3Request, limit: int, what: str) -> list[list[str]]:
    root = await r.body_xml()
    if root.tag != "Tagging" or root.find("TagSet") is None:
        raise S3Error("MalformedXML", "expected a Tagging document with a TagSet")
    tags = []
    for tag in root.find("TagSet") or []:
        if tag.tag != "Tag":
            raise S3Error("MalformedXML", "a TagSet holds Tag elements")
        k, val = X.child_text(tag, "Key"), X.child_text(tag, "Value")
        if k is None or val is None:
            raise S3Error("MalformedXML", "every Tag needs a Key and a Value")
        tags.append([k, val])
    return check_tags(tags, limit, what)


def _tag_set(tags: list[list[str]]) -> str:
    return "<TagSet>" + "".join(f"<Tag>{X.element('Key', k)}{X.element('Value', val)}</Tag>"
                                for k, val in tags) + "</TagSet>"


def _version_id(r: S3Request) -> str | None:
    version_id = r.q.get("versionId")
    if version_id == "":
        raise S3Error("InvalidArgument", "Version id cannot be the empty string")
    return version_id


def _head(r: S3Request, version_id: str | None) -> Any:
    try:
        return r.objects.head_object(r.bucket, r.key, version_id=version_id)
    except AnvilError as e:
        err = from_anvil(e)
        if version_id and err.code == "NoSuchVersion":
            raise S3Error("NoSuchVersion", "The specified version does not exist.", 404)
        raise err


async def get_object_tagging(r: S3Request) -> Response:
    r.authorize("object:read", r.bucket, r.key)
    b = r.objects.get_bucket(r.bucket)
    obj = _head(r, _version_id(r))
    return xml("Tagging", _tag_set(obj.extra.get("tags") or []),
               headers=version_headers(obj.version_id, b.versioning))


async def _set_object_tags(r: S3Request, tags: list[list[str]] | None, status: int) -> Response:
    r.authorize("object:write", r.bucket, r.key)
    version_id = _version_id(r)
    b = r.objects.get_bucket(r.bucket)
    try:
        result = await blocking(r.objects.set_object_tags, r.ctx, r.bucket, r.key, version_id, tags)
    except AnvilError as e:
        err = from_anvil(e)
        if version_id and err.code == "NoSuchVersion":
            raise S3Error("NoSuchVersion", "The specified version does not exist.", 404)
        raise err
    return Response(status_code=status, headers=version_headers(result["version_id"], b.versioning))


async def put_object_tagging(r: S3Request) -> Response:
    r.authorize("object:write", r.bucket, r.key)
    tags = await _tag_document(r, MAX_OBJECT_TAGS, "object")
    return await _set_object_tags(r, tags, 200)


async def delete_object_tagging(r: S3Request) -> Response:
    return await _set_object_tags(r, None, 204)


async def get_bucket_tagging(r: S3Request) -> Response:
    r.authorize("bucket:read", r.bucket)
    r.objects.get_bucket(r.bucket)
    doc = r.objects.bucket_setting(r.bucket, "tagging")
    if doc is None:
        raise S3Error("NoSuchTagSet", "The TagSet does not exist", 404, fields={"BucketName": r.bucket or ""})
    return xml("Tagging", _tag_set(doc))


async def put_bucket_tagging(r: S3Request) -> Response:
    r.authorize("bucket:configure", r.bucket)
    r.objects.get_bucket(r.bucket)
    tags = await _tag_document(r, MAX_BUCKET_TAGS, "bucket")
    await blocking(r.objects.put_bucket_setting, r.ctx, r.bucket, "tagging", tags)
    return Response(status_code=204)


async def delete_bucket_tagging(r: S3Request) -> Response:
    r.authorize("bucket:configure", r.bucket)
    r.objects.get_bucket(r.bucket)
    await blocking(r.objects.put_bucket_setting, r.ctx, r.bucket, "tagging", None)
    return Response(status_code=204)


# ------------------------------------------------------------------ GetObjectAttributes

ATTRIBUTES = ("ETag", "Checksum", "ObjectParts", "StorageClass", "ObjectSize")


async def get_object_attributes(r: S3Request) -> Response:
    """GetObjectAttributes (AWS API reference): the attributes named in `x-amz-object-attributes`.

    - Checksum: the object's checksum and its ChecksumType. A composite multipart value goes out
      without its `-N` part count, which S3 appends on GET/HEAD but not here (MinIO documents the same
      observation); the part count is ObjectParts' PartsCount.
    - ObjectParts (multipart objects only): PartsCount always; the Part list (number, size, checksum)
      only when the upload had a checksum algorithm ("if an additional checksum ... isn't applied to
      the object ..., the response doesn't return the Part element"), paged by `x-amz-max-parts`
      (default and most 1,000) and `x-amz-part-number-marker`."""
    r.authorize("object:read", r.bucket, r.key)
    wanted = [a.strip() for a in (r.h.get("x-amz-object-attributes") or "").split(",") if a.strip()]
    if not wanted:
        raise S3Error("InvalidArgument", "Invalid attribute name specified.")
    for a in wanted:
        if a not in ATTRIBUTES:
            raise S3Error("InvalidArgument", "Invalid attribute name specified.")
    max_parts = _int_header(r, "x-amz-max-parts", 1000)
    marker = _int_header(r, "x-amz-part-number-marker", 0)
    b = r.objects.get_bucket(r.bucket)
    version_id = _version_id(r)
    obj = _head(r, version_id)
    parts: list[str] = []
    if "ETag" in wanted:
        parts.append(X.element("ETag", obj.etag))
    checksums = obj.checksums
    if "Checksum" in wanted and checksums:
        inner = "".join(X.element(f"Checksum{alg.upper()}", val.split("-")[0])
                        for alg, val in sorted(checksums.items()))
        parts.append(f"<Checksum>{inner}{X.element('ChecksumType', checksum_type(checksums))}</Checksum>")
    if "ObjectParts" in wanted and obj.parts_count:
        parts.append(_object_parts(obj, max_parts, marker))
    if "StorageClass" in wanted:
        parts.append(X.element("StorageClass", "STANDARD"))
    if "ObjectSize" in wanted:
        parts.append(X.element("ObjectSize", obj.size))
    headers = {"last-modified": datetime.fromtimestamp(obj.created, UTC).strftime("%a, %d %b %Y %H:%M:%S GMT"),
               **version_headers(obj.version_id, b.versioning)}
    return xml("GetObjectAttributesResponse", "".join(parts), headers=headers)


def _object_parts(obj: Any, max_parts: int, marker: int) -> str:
    total = obj.parts_count or 0
    algorithm = next(iter(obj.checksums), None)
    part_sums = obj.extra.get("part_checksums") or []
    if algorithm is None or len(part_sums) != total:
        # No per-part checksums (an upload without a checksum algorithm): S3 lists no parts, so there is
        # nothing to page either; the count alone.
        return f"<ObjectParts>{X.element('PartsCount', total)}</ObjectParts>"
    out = X.element("PartsCount", total) + X.element("PartNumberMarker", marker)
    numbers = range(marker + 1, total + 1)
    page = list(numbers)[:max_parts]
    truncated = bool(page) and page[-1] < total
    out += X.element("NextPartNumberMarker", page[-1] if page else marker)
    out += X.element("MaxParts", max_parts) + X.element("IsTruncated", truncated)
    tag = f"Checksum{algorithm.upper()}"
    for n in page:
        out += (f"<Part>{X.element('PartNumber', n)}{X.element('Size', obj.chunks[n - 1][1])}"
                f"{X.element(tag, part_sums[n - 1])}</Part>")
    return f"<ObjectParts>{out}</ObjectParts>"


def _int_header(r: S3Request, name: str, default: int) -> int:
    raw = r.h.get(name)
    if raw is None:
        return default
    try:
        n = int(raw)
    except ValueError:
        raise S3Error("InvalidArgument", f"{name} must be an integer")
    if n < 0:
        raise S3Error("InvalidArgument", f"{name} must not be negative")
    return min(n, 1000) if name == "x-amz-max-parts" else n
