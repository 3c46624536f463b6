"""Object listings: ListObjects (v1), ListObjectsV2, ListObjectVersions, and the query parsing and
key encoding every listing (ListMultipartUploads and ListParts too) shares."""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable

from starlette.datastructures import QueryParams
from starlette.responses import Response

from anvil.api.access import list_objects_filtered, list_versions_filtered
from anvil.api.common import catalog_read
from anvil.api.s3 import xmlutil as X
from anvil.api.s3.errors import S3Error
from anvil.api.s3.request import S3Request, owner, xml
from anvil.identity.gate import object_filter
from anvil.objects.service import ObjectVersion, marks_common_prefix, token_after_prefix

Encoder = Callable[[str], str]


def _identity(s: str) -> str:
    return s


def _url_encode(s: str) -> str:
    return urllib.parse.quote(s, safe="/")


def max_keys(q: QueryParams, name: str = "max-keys") -> int:
    raw = q.get(name)
    if raw is None or raw == "":
        return 1000
    try:
        n = int(raw)
    except ValueError:
        raise S3Error("InvalidArgument", f"{name} must be an integer")
    if n < 0:
        raise S3Error("InvalidArgument", f"{name} must not be negative")
    return min(n, 1000)


def encoder(q: QueryParams) -> Encoder:
    enc = q.get("encoding-type")
    if enc is None:
        return _identity
    if enc != "url":
        raise S3Error("InvalidArgument", "Invalid Encoding Method specified in Request")
    return _url_encode


def listing_fields(q: QueryParams, max_keys: int, delimiter: str, enc: Encoder, truncated: bool) -> list[str]:
    """The elements every listing answer carries after its markers, in S3's order."""
    fields = [X.element("MaxKeys", max_keys)]
    if delimiter:
        fields.append(X.element("Delimiter", enc(delimiter)))
    if q.get("encoding-type"):
        fields.append(X.element("EncodingType", "url"))
    fields.append(X.element("IsTruncated", truncated))
    return fields


# Listings run in the read pool (api.common.catalog_read), query and XML both: off the event loop.
async def list_objects_v1(r: S3Request) -> Response:
    return await catalog_read(_list_objects, r, v2=False)


async def list_objects_v2(r: S3Request) -> Response:
    return await catalog_read(_list_objects, r, v2=True)


def _list_objects(r: S3Request, *, v2: bool) -> Response:
    r.authorize("object:list", r.bucket)
    q = r.q
    prefix, delimiter = q.get("prefix", ""), q.get("delimiter", "")
    limit = max_keys(q)
    enc = encoder(q)
    token = q.get("continuation-token") if v2 else None
    start_after = q.get("start-after", "") if v2 else q.get("marker", "")
    if not v2 and marks_common_prefix(start_after, prefix, delimiter):
        # A v1 marker that is a rolled-up prefix (S3's NextMarker) resumes after the whole prefix.
        token = token_after_prefix(start_after)
    kf = object_filter(r.principal, "object:list", r.bucket)
    fetch_owner = (q.get("fetch-owner") == "true") if v2 else True
    rendered = None
    if kf is None and limit > 0 and enc is _identity:
        # The page rendered in SQL (storage.listing): no Python per listed object. A page holding a
        # control character (written as a character reference) is rendered below instead.
        who = owner(r.objects.get_bucket(r.bucket).tenant) if fetch_owner else ""
        rendered = r.objects.list_objects_rendered(r.bucket, prefix=prefix, delimiter=delimiter,
                                                   start_after=start_after, max_keys=limit, token=token or None,
                                                   xml=True, who=who)
        if rendered is not None and rendered.page.control:
            rendered = None
    if rendered is not None:
        page = rendered.page
        truncated, next_token = page.truncated, rendered.next_token
        return xml("ListBucketResult", "".join(_head_fields(
            r, v2, prefix, delimiter, enc, limit, truncated, next_token, page.count, page.last or ""))
            + page.objects + page.prefixes)
    if limit == 0:
        r.objects.get_bucket(r.bucket)
        objects, prefixes, truncated, next_token = [], [], False, None
    elif kf is not None:  # a bound bucket: only the keys the subject may list (docs/authz.md)
        after_prefix = None
        if not v2 and token:
            after_prefix, start_after, token = start_after, "", None
        res = list_objects_filtered(r.objects, kf, r.bucket, prefix=prefix, delimiter=delimiter,
                                    start_after=start_after, max_keys=limit, token=token or None,
                                    after_prefix=after_prefix)
        objects, prefixes, truncated, next_token = res.objects, res.common_prefixes, res.truncated, res.next_token
    else:
        res = r.objects.list_objects(r.bucket, prefix=prefix, delimiter=delimiter,
                                     start_after=start_after, max_keys=limit, token=token or None, rows=True)
        prefixes, truncated, next_token = res.common_prefixes, res.truncated, res.next_token
        # (key, created, etag, size) straight from the rows: no ObjectVersion per listed object.
        listed = [(row[1], row[12], row[7], row[6]) for row in res.rows]
    if kf is not None or limit == 0:
        listed = [(o.key, o.created, o.etag, o.size) for o in objects]
    who = owner(r.objects.get_bucket(r.bucket).tenant) if fetch_owner else ""
    last_key = listed[-1][0] if listed else ""
    last_cp = prefixes[-1] if prefixes else ""
    parts = _head_fields(r, v2, prefix, delimiter, enc, limit, truncated, next_token, len(listed) + len(prefixes),
                         max(last_key, last_cp))
    parts += contents_xml(listed, enc, who)
    for p in prefixes:
        parts.append("<CommonPrefixes>" + X.element("Prefix", enc(p)) + "</CommonPrefixes>")
    return xml("ListBucketResult", "".join(parts))


def contents_xml(listed: list[tuple[str, float, str, int]], enc: Encoder, who: str) -> list[str]:
    """The <Contents> of (key, created, etag, size) objects; `storage.listing` renders the same in SQL."""
    # The hot loop of a listing rendered in Python: one f-string per object (ETags and sizes need no
    # escaping).
    return [f"<Contents><Key>{X.text(enc(key))}</Key><LastModified>{X.iso_time(created)}"
            f'</LastModified><ETag>"{etag}"</ETag><Size>{size}</Size>'
            f"<StorageClass>STANDARD</StorageClass>{who}</Contents>" for key, created, etag, size in listed]


def _head_fields(r: S3Request, v2: bool, prefix: str, delimiter: str, enc: Encoder, limit: int, truncated: bool,
                 next_token: str | None, count: int, last: str) -> list[str]:
    """Everything of a ListBucketResult before its entries; `last` is the page's last entry (key or
    common prefix), v1's NextMarker."""
    q = r.q
    parts = [X.element("Name", r.bucket), X.element("Prefix", enc(prefix))]
    if v2:
        if q.get("continuation-token") is not None:
            parts.append(X.element("ContinuationToken", q["continuation-token"]))
        if q.get("start-after"):
            parts.append(X.element("StartAfter", enc(q["start-after"])))
        parts.append(X.element("KeyCount", count))
        if truncated and next_token:
            parts.append(X.element("NextContinuationToken", next_token))
    else:
        parts.append(X.element("Marker", enc(q.get("marker", ""))))
        if truncated and delimiter:
            parts.append(X.element("NextMarker", enc(last)))
    return parts + listing_fields(q, limit, delimiter, enc, truncated)


async def list_versions(r: S3Request) -> Response:
    return await catalog_read(_list_versions, r)


def _list_versions(r: S3Request) -> Response:
    r.authorize("object:list", r.bucket)
    q = r.q
    prefix, delimiter = q.get("prefix", ""), q.get("delimiter", "")
    key_marker, version_marker = q.get("key-marker", ""), q.get("version-id-marker", "")
    limit = max_keys(q)
    enc = encoder(q)
    b = r.objects.get_bucket(r.bucket)
    kf = object_filter(r.principal, "object:list", r.bucket)
    who = owner(b.tenant)
    if kf is None and limit > 0 and enc is _identity:
        # The page rendered in SQL (storage.listing.versions_page), as ListObjects' pages are; a page
        # holding a control character is rendered below instead.
        rendered = r.objects.list_versions_rendered(r.bucket, prefix=prefix, delimiter=delimiter,
                                                    key_marker=key_marker, version_marker=version_marker,
                                                    max_keys=limit, who=who)
        if rendered is not None and not rendered.page.control:
            page = rendered.page
            return xml("ListVersionsResult", "".join(_versions_head(
                q, prefix, delimiter, enc, limit, key_marker, version_marker, page.truncated,
                rendered.next_key_marker, rendered.next_version_marker, r.bucket)) + page.objects + page.prefixes)
    if limit == 0:
        versions, prefixes, truncated, nk, nv = [], [], False, None, None
    elif kf is not None:  # a bound bucket: only the keys the subject may list (docs/authz.md)
        res = list_versions_filtered(r.objects, kf, r.bucket, prefix=prefix, delimiter=delimiter,
                                     key_marker=key_marker, version_marker=version_marker, max_keys=limit)
        versions, prefixes, truncated = res.versions, res.common_prefixes, res.truncated
        nk, nv = res.next_key_marker, res.next_version_marker
    else:
        res = r.objects.list_versions(r.bucket, prefix=prefix, delimiter=delimiter, key_marker=key_marker,
                                      version_marker=version_marker, max_keys=limit)
        versions, prefixes, truncated = res.versions, res.common_prefixes, res.truncated
        nk, nv = res.next_key_marker, res.next_version_marker
    parts = _versions_head(q, prefix, delimiter, enc, limit, key_marker, version_marker, truncated, nk, nv, r.bucket)
    parts += versions_xml(versions, enc, who)
    for p in prefixes:
        parts.append("<CommonPrefixes>" + X.element("Prefix", enc(p)) + "</CommonPrefixes>")
    return xml("ListVersionsResult", "".join(parts))


def versions_xml(versions: list[ObjectVersion], enc: Encoder, who: str) -> list[str]:
    """The <Version>/<DeleteMarker> entries; `storage.listing.versions_page` renders the same in SQL."""
    parts = []
    for o in versions:
        common = (X.element("Key", enc(o.key)) + X.element("VersionId", o.version_id)
                  + X.element("IsLatest", o.is_latest) + X.element("LastModified", X.iso_time(o.created)))
        if o.delete_marker:
            parts.append(f"<DeleteMarker>{common}{who}</DeleteMarker>")
        else:
            parts.append(f"<Version>{common}" + X.element("ETag", f'"{o.etag}"') + X.element("Size", o.size)
                         + X.element("StorageClass", "STANDARD") + who + "</Version>")
    return parts


def _versions_head(q: QueryParams, prefix: str, delimiter: str, enc: Encoder, limit: int, key_marker: str,
                   version_marker: str, truncated: bool, nk: str | None, nv: str | None, bucket: str) -> list[str]:
    """Everything of a ListVersionsResult before its entries."""
    parts = [X.element("Name", bucket), X.element("Prefix", enc(prefix)),
             X.element("KeyMarker", enc(key_marker)), X.element("VersionIdMarker", version_marker)]
    if truncated:
        if nk is not None:
            parts.append(X.element("NextKeyMarker", enc(nk)))
        if nv is not None:
            parts.append(X.element("NextVersionIdMarker", nv))
    return parts + listing_fields(q, limit, delimiter, enc, truncated)
